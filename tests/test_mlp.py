"""The feed-forward block with the ReLU in fc1's epilogue (ops.mlp) equals the module calls."""

import pytest
import torch

from captune.ops import mlp


class _Layer(torch.nn.Module):
    def __init__(self, hidden=6, ffn=10, dtype=torch.float64):
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, ffn, dtype=dtype)
        self.fc2 = torch.nn.Linear(ffn, hidden, dtype=dtype)
        self.activation_fn = torch.nn.ReLU()
        self.fc1.weight.requires_grad_(False)


def test_linear_relu_values_and_gradients_equal_relu_of_linear():
    torch.manual_seed(0)
    layer = _Layer()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = layer.fc1.weight, layer.fc1.bias
    ref = torch.relu(torch.nn.functional.linear(x, w, b))
    got = mlp.LinearReLU.apply(x, w, b)
    assert got.shape == ref.shape and torch.equal(got, ref)
    assert torch.autograd.gradcheck(lambda a, c: mlp.LinearReLU.apply(a, w, c), (x, b))


def test_linear_relu_refuses_a_trained_weight():
    layer = _Layer()
    layer.fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen weight"):
        mlp.LinearReLU.apply(torch.randn(3, 6, dtype=torch.float64), layer.fc1.weight, layer.fc1.bias)


def test_only_a_frozen_plain_linear_with_a_bias_and_no_hooks_then_relu_is_fusable():
    layer = _Layer()
    assert mlp.fusable(layer)
    h = torch.randn(3, 6, dtype=torch.float64)
    assert not mlp.fuses(layer, h)  # the CPU keeps the module calls (and the golden values)
    assert torch.equal(mlp.feed_forward(layer, h), layer.fc2(torch.relu(layer.fc1(h))))
    layer.activation_fn = torch.nn.GELU()
    assert not mlp.fusable(layer)
    layer.activation_fn = type("MyReLU", (torch.nn.ReLU,), {})()  # a subclass may do something else
    assert not mlp.fusable(layer)
    layer = _Layer()
    layer.fc1.weight.requires_grad_(True)
    assert not mlp.fusable(layer)
    layer = _Layer()
    layer.fc1.bias = None
    assert not mlp.fusable(layer)


def test_an_fc1_whose_forward_does_more_is_not_fused():
    """ZeRO-3 gathers a partitioned weight in the module's forward pre-hook (the fused product never calls
    the module, so it would read the empty shard), and marks its parameters with ``ds_id``."""
    layer = _Layer()
    handle = layer.fc1.register_forward_pre_hook(lambda mod, args: None)
    assert not mlp.fusable(layer)
    handle.remove()
    assert mlp.fusable(layer)
    layer.fc1.register_forward_hook(lambda mod, args, out: None)
    assert not mlp.fusable(layer)
    layer = _Layer()
    layer.fc1.weight.ds_id = 7
    assert not mlp.fusable(layer)


def test_a_lora_wrapped_fc1_keeps_peft_forward():
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = _Layer(dtype=torch.float32)

    model = get_peft_model(Wrap(), LoraConfig(r=2, target_modules=["fc1"]))
    assert not mlp.fusable(model.base_model.model.layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_plain_layer_fuses_on_a_gpu():
    layer = _Layer().cuda()
    assert mlp.fuses(layer, torch.randn(3, 6, dtype=torch.float64, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_layer_that_asks_for_gradients_fuses_when_decoding():
    """A model without an adapter (baseline captions, captune caption) has fc1 weights that ask for
    gradients; without autograd its feed-forward is fused all the same, with the same values."""
    layer = _Layer().cuda()
    layer.fc1.weight.requires_grad_(True)
    h = torch.randn(2, 3, 6, dtype=torch.float64, device="cuda")
    assert not mlp.fuses(layer, h)
    with torch.no_grad():
        assert mlp.fuses(layer, h)
        assert torch.equal(mlp.feed_forward(layer, h), layer.fc2(torch.relu(layer.fc1(h))))


class _VisionMLP(torch.nn.Module):
    """The vision tower's MLP as transformers builds it (fc1, its GELU module, fc2)."""

    def __init__(self, hidden=6, ffn=10, dtype=torch.float64):
        from transformers.activations import ACT2FN

        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, ffn, dtype=dtype)
        self.fc2 = torch.nn.Linear(ffn, hidden, dtype=dtype)
        self.activation_fn = ACT2FN["gelu"]
        self.requires_grad_(False)


def test_vision_feed_forward_is_the_tanh_form_of_the_modules_gelu():
    torch.manual_seed(0)
    m = _VisionMLP()
    h = 3 * torch.randn(2, 5, 6, dtype=torch.float64)
    got = mlp.vision_feed_forward(m, h)
    tanh = m.fc2(torch.nn.functional.gelu(m.fc1(h), approximate="tanh"))
    assert got.shape == h.shape and torch.allclose(got, tanh, rtol=0, atol=1e-12)
    erf = m.fc2(m.activation_fn(m.fc1(h)))
    assert 0 < (got - erf).abs().max() < 1e-2  # a different, close function


def test_the_tanh_forms_distance_from_erf_is_as_documented():
    x = torch.linspace(-8, 8, 400_001, dtype=torch.float64)
    gap = (torch.nn.functional.gelu(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs()
    assert 4.7e-4 < gap.max() < 4.8e-4
    assert gap.max() < 0.125 * 2**-8  # half a bf16 step (8 significant bits) at 0.125


def test_only_a_frozen_plain_fc1_then_a_gelu_module_takes_the_vision_feed_forward():
    m = _VisionMLP()
    assert mlp.gelu_fusable(m)
    m.activation_fn = torch.nn.ReLU()
    assert not mlp.gelu_fusable(m)
    m = _VisionMLP()
    m.activation_fn = torch.nn.GELU(approximate="tanh")
    assert mlp.gelu_fusable(m)
    m.fc1.bias = None
    assert not mlp.gelu_fusable(m)
    m = _VisionMLP()
    m.fc1.register_forward_pre_hook(lambda mod, args: None)
    assert not mlp.gelu_fusable(m)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vision_feed_forward_on_a_gpu_is_the_tanh_form_in_the_epilogue():
    torch.manual_seed(0)
    m = _VisionMLP(64, 256, dtype=torch.bfloat16).cuda()
    h = torch.randn(4, 33, 64, dtype=torch.bfloat16, device="cuda")
    got = mlp.vision_feed_forward(m, h).float()
    ref = _VisionMLP(64, 256, dtype=torch.float64).cuda()
    ref.load_state_dict(m.state_dict())
    tanh = ref.fc2(torch.nn.functional.gelu(ref.fc1(h.double()), approximate="tanh")).float()
    assert ((got - tanh).abs() <= tanh.abs().clamp_min(0.05) * 2**-6).float().mean() > 0.99

"""LoRA's products in 16 bits (model.lora_compute): the same function and gradients as peft's."""

import pytest
import torch

from captune.model.lora_compute import LoraLinear, applies, use_16bit_compute


def test_lora_linear_gradients_are_exact_in_float64():
    """The whole LoRA layer as one function (base product with the adapter's added in its epilogue, the
    scalings on the rank-r tensors, the input gradients summed in place): gradcheck with and without
    dropout, and its value is the base layer's plus peft's adapter term."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 12, dtype=torch.float64, generator=g)  # frozen, as the base layer's
    bias = torch.randn(7, dtype=torch.float64, generator=g)
    a = torch.randn(4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    keep = torch.rand(2, 5, 12, generator=g) > 0.3
    for mask, p in ((None, 0.0), (keep, 0.3)):
        fn = lambda x, a, b, m=mask, p=p: LoraLinear.apply(x, w, bias, a, b, 2.0, p, m)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, a, b))
    want = x @ w.t() + bias + 2.0 * ((x * keep / 0.7) @ a.t()) @ b.t()
    assert torch.allclose(LoraLinear.apply(x, w, bias, a, b, 2.0, 0.3, keep), want)
    assert torch.allclose(LoraLinear.apply(x, w, None, a, b, 2.0, 0.0, None), x @ w.t() + 2.0 * (x @ a.t()) @ b.t())


def _peft_opt(tiny_model_dir, dropout, bias="none"):
    from transformers import Blip2ForConditionalGeneration

    from captune.config import LoraConfig
    from captune.model.lora import attach_lora

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, bias=bias))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes every gradient visible
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("bias", ["none", "all"])
def test_patched_layers_give_peft_outputs_and_gradients(tiny_model_dir, bias):
    """Forced onto the CPU fp32 model (where it is never used on its own), the patched forward
    computes what peft's does: outputs and every trained gradient equal to float rounding, the
    base layers' biases too when ``lora.bias`` trains them."""
    ids = torch.randint(4, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    grads, outs = [], []
    for patch in (False, True):
        model = _peft_opt(tiny_model_dir, dropout=0.0, bias=bias)
        if patch:
            assert use_16bit_compute(model, force=True) > 0
        lm = model.base_model.model.language_model
        out = lm(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        # (with bias=all the vision tower's biases train too, and this forward does not reach them)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    trained_bias = [n for n in grads[1] if "q_proj.base_layer.bias" in n]
    assert bool(trained_bias) == (bias == "all")
    assert all(grads[1][n].abs().sum() > 0 for n in trained_bias)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_only_16_bit_gpu_layers_qualify(tiny_model_dir):
    model = _peft_opt(tiny_model_dir, dropout=0.05)
    assert not any(applies(m) for m in model.modules())  # fp32 on the CPU: peft's own forward
    assert use_16bit_compute(model) == 0


def test_adapter_on_a_given_base_output_is_exact_in_float64():
    """``LoraOnOutput`` (the 4-bit layers' path: the base product made by bitsandbytes, the adapter's added to
    it): gradcheck with and without dropout, its value the base output plus peft's adapter term, and the
    base output's gradient passed through unchanged."""
    from captune.model.lora_compute import LoraOnOutput

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    keep = torch.rand(2, 5, 12, generator=g) > 0.3
    for mask, p in ((None, 0.0), (keep, 0.3)):
        fn = lambda y, x, a, b, m=mask, p=p: LoraOnOutput.apply(y, x, a, b, 2.0, p, m)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (y, x, a, b))
    want = y + 2.0 * ((x * keep / 0.7) @ a.t()) @ b.t()
    assert torch.allclose(LoraOnOutput.apply(y, x, a, b, 2.0, 0.3, keep), want)


def test_the_4bit_layers_forward_over_a_base_gives_peft_outputs_and_gradients(tiny_model_dir):
    """The forward 4-bit layers get, bound here to plain peft LoRA layers on the CPU (its base product is
    whatever the base layer computes), against peft's own: outputs and every trained gradient."""
    from peft.tuners.lora.layer import Linear

    from captune.model import lora_compute

    ids = torch.randint(4, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    grads, outs = [], []
    for patch in (False, True):
        model = _peft_opt(tiny_model_dir, dropout=0.0)
        layers = [m for m in model.modules() if type(m) is Linear]
        assert layers
        for m in layers if patch else []:
            lora_compute.route(m, lora_compute._forward_on_output)
        out = model.base_model.model.language_model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_patched_layers_are_freed_without_the_cycle_collector(tiny_model_dir):
    """A model whose LoRA layers were routed through the 16-bit function is freed as soon as it is dropped:
    the patched forwards hold their layers weakly (a bound method stored on its own module is a cycle,
    which kept each patched layer, and on a GPU its base weights, until the cycle collector ran). A deep
    copy's forwards are bound to the copy, and a pickled model's to the unpickled one."""
    import copy
    import gc
    import pickle
    import weakref

    from peft.tuners.lora.layer import Linear

    ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    model = _peft_opt(tiny_model_dir, dropout=0.0)
    assert use_16bit_compute(model, force=True) > 0
    lm = model.base_model.model.language_model
    want = lm(input_ids=ids).logits.detach()
    twin = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(again.base_model.model.language_model(input_ids=ids).logits, want)
    del again
    layers = [weakref.ref(m) for m in model.modules() if type(m) is Linear]
    gc.collect()
    gc.disable()
    try:
        del model, lm
        assert all(ref() is None for ref in layers)
    finally:
        gc.enable()
    torch.testing.assert_close(twin.base_model.model.language_model(input_ids=ids).logits, want)


def test_a_forward_outliving_its_layer_says_so():
    """A shallow copy of a patched layer shares its weak forward: once the original is gone the copy's call
    names the problem and the fix, not an error about None."""
    import copy

    import pytest

    from captune.model.lora_compute import WeakForward

    layer = torch.nn.Linear(2, 2)
    layer.forward = WeakForward(layer, torch.nn.Linear.forward)
    twin = copy.copy(layer)
    del layer
    with pytest.raises(ReferenceError, match="deep-copy"):
        twin(torch.zeros(1, 2))


def test_4bit_layers_are_told_by_their_peft_class():
    from captune.model.lora_compute import _is_4bit

    four = type("Linear4bit", (torch.nn.Module,), {"__module__": "peft.tuners.lora.bnb"})
    other = type("Linear4bit", (torch.nn.Module,), {"__module__": "somewhere.else"})
    assert _is_4bit(four()) and not _is_4bit(other()) and not _is_4bit(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("dtype", "upcast", "want"),
    [
        (torch.bfloat16, False, torch.bfloat16),  # bf16 stays: the residual stream as in bf16 training
        (torch.bfloat16, True, torch.float32),  # lora.compute=fp32: peft's prepare_model_for_kbit_training
        (torch.float16, False, torch.float32),  # fp16's range is upcast in any case
    ],
)
def test_kbit_preparation_upcasts_only_fp16_or_when_asked(tiny_model_dir, dtype, upcast, want):
    """A k-bit model's unquantized language-model parts: fp32 for fp16 or with lora.compute=fp32, else kept in
    bf16 (an fp32 copy of bf16-loaded weights adds only step time and memory); all of them frozen, the
    vision side untouched."""
    from transformers import Blip2ForConditionalGeneration

    from captune.model.lora import prepare_kbit_training

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=dtype)
    prepare_kbit_training(model, upcast=upcast)
    assert {p.dtype for p in model.language_model.parameters()} == {want}
    assert {p.dtype for p in model.vision_model.parameters()} == {dtype}
    assert not any(p.requires_grad for p in model.parameters())


def test_fp32_lora_compute_upcasts_a_quantized_model(tiny_model_dir, monkeypatch):
    """attach_lora hands lora.compute=fp32 on to the k-bit preparation (bitsandbytes needs a GPU: the
    quantized check is taken as true here, the preparation itself is the real one)."""
    from transformers import Blip2ForConditionalGeneration

    from captune.config import LoraConfig
    from captune.model import lora

    monkeypatch.setattr(lora, "is_quantized", lambda model: True)
    for compute, want in (("auto", torch.bfloat16), ("fp32", torch.float32)):
        model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        peft_model = lora.attach_lora(model, LoraConfig(r=4, alpha=8, compute=compute))
        norms = [p for n, p in peft_model.named_parameters() if "language_model" in n and "layer_norm" in n]
        assert norms and {p.dtype for p in norms} == {want}

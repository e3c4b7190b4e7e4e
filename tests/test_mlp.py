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


def test_only_a_frozen_plain_linear_and_relu_on_a_gpu_fuse():
    layer = _Layer()
    h = torch.randn(3, 6, dtype=torch.float64)
    assert not mlp.fuses(layer, h)  # the CPU keeps the module calls (and the golden values)
    assert torch.equal(mlp.feed_forward(layer, h), layer.fc2(torch.relu(layer.fc1(h))))
    if not torch.cuda.is_available():
        return
    layer = layer.cuda()
    assert mlp.fuses(layer, h.cuda())
    layer.activation_fn = torch.nn.GELU()
    assert not mlp.fuses(layer, h.cuda())
    layer.activation_fn = torch.nn.ReLU()
    layer.fc1.weight.requires_grad_(True)
    assert not mlp.fuses(layer, h.cuda())

"""The OPT decoder layer's feed-forward block, with the ReLU in the first product's epilogue on a GPU.

``fc2(relu(fc1(h)))`` costs, beside its two products, one full pass over the (rows, 4H)
activation for the ReLU, and its backward another for the ReLU's gradient. cuBLASLt can apply
the bias and the ReLU in the product's epilogue (``torch._addmm_activation``), so the forward
writes the activation once; the backward masks the gradient by the kept output as autograd's
ReLU does. ``torch._addmm_activation`` has no derivative of its own, hence ``LinearReLU``.
The values are those of ``relu(linear(h))``: the ReLU of the rounded sum is the rounded ReLU.

Only a frozen plain ``nn.Linear`` with a bias followed by ``nn.ReLU``, on a CUDA GPU, takes it
(OPT's layers; a LoRA-adapted fc1 keeps peft's forward); CPU runs keep the module calls, so the
golden values are unchanged.
"""

from __future__ import annotations

import torch

# The fused product where it applies (bench/scst_step.py --unfused-mlp measures without).
FUSED = True


class LinearReLU(torch.autograd.Function):
    """``relu(x @ weight.T + bias)`` with the bias and the ReLU in the product's epilogue; ``weight`` frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if ctx.needs_input_grad[1]:
            raise ValueError("LinearReLU is for a frozen weight; a trained one keeps the module's forward")
        x2 = x.reshape(-1, x.size(-1))
        y = torch._addmm_activation(bias, x2, weight.t())
        ctx.save_for_backward(y, weight)
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad.reshape(y.shape), y, 0)
        grad_x = (g @ weight).view(*grad.shape[:-1], weight.size(1)) if ctx.needs_input_grad[0] else None
        wide = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        grad_b = g.sum(0, dtype=wide).to(g.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def fusable(layer) -> bool:
    """Whether this layer's fc1 and activation can be one product (on any device): a plain frozen
    ``nn.Linear`` with a bias, then exactly ``nn.ReLU``. Not where fc1's forward does more than its
    product: a module with hooks (DeepSpeed ZeRO-3 gathers its partitioned weight in one, accelerate's
    offload moves it) or a ZeRO-3 parameter, which the fused call would read empty."""
    fc1 = layer.fc1
    return (
        type(fc1) is torch.nn.Linear
        and fc1.bias is not None
        and not fc1.weight.requires_grad
        and not hasattr(fc1.weight, "ds_id")
        and not (fc1._forward_pre_hooks or fc1._forward_hooks)
        and type(layer.activation_fn) is torch.nn.ReLU
    )


def fuses(layer, h: torch.Tensor) -> bool:
    """Whether ``feed_forward`` fuses this layer's fc1 and ReLU for rows ``h``: ``fusable``, on a CUDA GPU."""
    return FUSED and h.is_cuda and fusable(layer)


def feed_forward(layer, h: torch.Tensor) -> torch.Tensor:
    """``layer.fc2(layer.activation_fn(layer.fc1(h)))``, fused where ``fuses``."""
    if fuses(layer, h):
        return layer.fc2(LinearReLU.apply(h, layer.fc1.weight, layer.fc1.bias))
    return layer.fc2(layer.activation_fn(layer.fc1(h)))


def feed_forward_path(model, like: torch.Tensor) -> str:
    """Which feed-forward the OPT decoder of ``model`` (a BLIP-2 or PEFT model) runs on rows like ``like``."""
    from captune.ops.lm import unwrap

    layer = unwrap(model).language_model.model.decoder.layers[0]
    return "fc1 + ReLU in one product (ops.mlp)" if fuses(layer, like) else "fc1, then its activation"

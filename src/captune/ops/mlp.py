"""Feed-forward blocks with the activation in the first product's epilogue on a GPU: the OPT decoder's
(ReLU, exact) and the vision tower's (GELU in its tanh form, a choice: ``vision_feed_forward``).

``fc2(relu(fc1(h)))`` costs, beside its two products, one full pass over the (rows, 4H)
activation for the ReLU, and its backward another for the ReLU's gradient. cuBLASLt can apply
the bias and the ReLU in the product's epilogue (``torch._addmm_activation``), so the forward
writes the activation once; the backward masks the gradient by the kept output as autograd's
ReLU does. ``torch._addmm_activation`` has no derivative of its own, hence ``LinearReLU``.
The values are those of ``relu(linear(h))``: the ReLU of the rounded sum is the rounded ReLU.

Only a plain ``nn.Linear`` with a bias (frozen, in a step that trains) followed by ``nn.ReLU``, on a
CUDA GPU, takes it (OPT's layers; a LoRA-adapted fc1 keeps peft's forward); CPU runs keep the module
calls, so the golden values are unchanged.
"""

from __future__ import annotations

import torch

# The fused product where it applies (bench/scst_step.py --unfused-mlp measures without).
FUSED = True


def _epilogue_product(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``act(h @ weight.T + bias)`` with the bias and activation (ReLU, or GELU's tanh form) in cuBLASLt's
    epilogue, as (rows, out) over ``h``'s rows flattened."""
    return torch._addmm_activation(bias, h.reshape(-1, h.size(-1)), weight.t(), use_gelu=gelu)


def _rows_like(y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return y.view(*h.shape[:-1], y.size(-1))


class LinearReLU(torch.autograd.Function):
    """``relu(x @ weight.T + bias)`` with the bias and the ReLU in the product's epilogue; ``weight`` frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if ctx.needs_input_grad[1]:
            raise ValueError("LinearReLU is for a frozen weight; a trained one keeps the module's forward")
        y = _epilogue_product(x, weight, bias)
        ctx.save_for_backward(y, weight)
        return _rows_like(y, x)

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad.reshape(y.shape), y, 0)
        grad_x = (g @ weight).view(*grad.shape[:-1], weight.size(1)) if ctx.needs_input_grad[0] else None
        wide = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        grad_b = g.sum(0, dtype=wide).to(g.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def _plain(fc1) -> bool:
    """A plain ``nn.Linear`` with a bias whose forward is only its product. Not a module with hooks
    (DeepSpeed ZeRO-3 gathers its partitioned weight in one, accelerate's offload moves it) or a ZeRO-3
    parameter, which a fused call would read empty; not a LoRA-adapted layer (peft's class)."""
    return (
        type(fc1) is torch.nn.Linear
        and fc1.bias is not None
        and not hasattr(fc1.weight, "ds_id")
        and not (fc1._forward_pre_hooks or fc1._forward_hooks)
    )


def fusable(layer) -> bool:
    """Whether this layer's fc1 and activation can be one product (on any device) in a step that
    trains: ``_plain`` fc1 with a frozen weight, then exactly ``nn.ReLU``."""
    return _plain(layer.fc1) and not layer.fc1.weight.requires_grad and type(layer.activation_fn) is torch.nn.ReLU


def fuses(layer, h: torch.Tensor) -> bool:
    """Whether ``feed_forward`` fuses this layer's fc1 and ReLU for rows ``h``, on a CUDA GPU: ``fusable``,
    or without autograd (decoding) any ``_plain`` fc1 then ``nn.ReLU`` (a model without an adapter
    has weights that ask for gradients, which no step will take)."""
    fc1 = layer.fc1
    trains = torch.is_grad_enabled() and fc1.weight.requires_grad
    return FUSED and h.is_cuda and _plain(fc1) and type(layer.activation_fn) is torch.nn.ReLU and not trains


def feed_forward(layer, h: torch.Tensor) -> torch.Tensor:
    """``layer.fc2(layer.activation_fn(layer.fc1(h)))``, fused where ``fuses``."""
    if not fuses(layer, h):
        return layer.fc2(layer.activation_fn(layer.fc1(h)))
    fc1 = layer.fc1
    if torch.is_grad_enabled():
        return layer.fc2(LinearReLU.apply(h, fc1.weight, fc1.bias))
    return layer.fc2(_rows_like(_epilogue_product(h, fc1.weight, fc1.bias), h))


def feed_forward_path(model, like: torch.Tensor) -> str:
    """Which feed-forward the OPT decoder of ``model`` (a BLIP-2 or PEFT model) runs on rows like ``like``."""
    from captune.ops.lm import unwrap

    layer = unwrap(model).language_model.model.decoder.layers[0]
    return "fc1 + ReLU in one product (ops.mlp)" if fuses(layer, like) else "fc1, then its activation"


# transformers' GELU modules ("gelu", "gelu_pytorch_tanh") and torch's: those ``vision_feed_forward`` replaces
_GELUS = ("GELUActivation", "GELUTanh", "PytorchGELUTanh", "GELU")


def gelu_fusable(mlp) -> bool:
    """Whether a vision tower's MLP (``fc1``, ``activation_fn``, ``fc2``) can take ``vision_feed_forward``
    (without autograd): ``_plain`` fc1, then one of transformers' or torch's GELU modules."""
    act = getattr(mlp, "activation_fn", None)
    return _plain(mlp.fc1) and type(act).__name__ in _GELUS and isinstance(act, torch.nn.Module)


def vision_feed_forward(mlp, h: torch.Tensor) -> torch.Tensor:
    """``fc2(gelu_tanh(fc1(h)))``: on a GPU the bias and GELU in fc1's epilogue (cuBLASLt computes GELU in
    its tanh form, from the float32 sum before it is rounded), saving a pass over the (rows, 4H)
    activation; elsewhere the same tanh form, after the product. Not differentiable: for frozen
    features under ``torch.no_grad``. The tanh form is within 4.8e-4 of the exact (erf) GELU at any
    input: under half a bf16 rounding step of outputs of 0.125 or more."""
    fc1 = mlp.fc1
    if h.is_cuda:
        return mlp.fc2(_rows_like(_epilogue_product(h, fc1.weight, fc1.bias, gelu=True), h))
    return mlp.fc2(torch.nn.functional.gelu(fc1(h), approximate="tanh"))

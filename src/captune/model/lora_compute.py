"""LoRA's products in the model's 16-bit dtype, with fp32 master weights.

peft keeps the adapter's A and B in fp32 and casts every input activation to fp32
before ``B(A(dropout(x)))``: on a bf16 model that is a full-size fp32 copy of each
adapted layer's input per forward (and its gradient back), and fp32 products. On an
H200 those copies and products were about a fifth of the packed training step's GPU
time (bench/results/2026-12-01-h200-speed-probe.json). Mixed-precision training
(``torch.autocast``) runs them in 16 bits instead, keeping the fp32 weights and
fp32 gradients; this module does the same for the adapter alone, so the rest of the
model's arithmetic is untouched.

``LoraDelta`` is the adapter's contribution ``s * B(A(dropout(x)))`` as one autograd
function: A and B are rounded to the input's dtype for the products, the products
accumulate in fp32 (tensor cores do), the dropout mask is drawn once and kept as
booleans, and the weight gradients come back in fp32. Only plain ``nn.Linear`` bases of
16-bit weights on a GPU get it (``use_16bit_compute``); everything else keeps
peft's own forward, so CPU runs and the golden values are unchanged.
"""

from __future__ import annotations

import types

import torch


class LoraDelta(torch.autograd.Function):
    """``scaling * (dropout(x) @ A.T) @ B.T`` in ``x``'s dtype; A (r, in), B (out, r) fp32 leaves."""

    @staticmethod
    def forward(ctx, x, a, b, scaling: float, p: float, keep: torch.Tensor | None):  # noqa: PLR0913 (autograd)
        """``keep``: the dropout mask (True = kept, x's shape) or None; kept values scale by 1/(1-p)."""
        a16, b16 = a.to(x.dtype), b.to(x.dtype)
        if keep is not None:
            x = x * keep / (1 - p)
        h = x @ a16.t()
        ctx.save_for_backward(x, h, a16, b16, keep)
        ctx.scaling, ctx.p = scaling, p
        return (h @ b16.t()) * scaling

    @staticmethod
    def backward(ctx, grad):
        x, h, a16, b16, keep = ctx.saved_tensors
        g = grad * ctx.scaling
        g2, h2, x2 = g.reshape(-1, g.size(-1)), h.reshape(-1, h.size(-1)), x.reshape(-1, x.size(-1))
        grad_b = (g2.t() @ h2).float()
        gh = g @ b16
        grad_a = (gh.reshape(-1, gh.size(-1)).t() @ x2).float()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gh @ a16
            if keep is not None:
                grad_x = grad_x * keep / (1 - ctx.p)
        return grad_x, grad_a, grad_b, None, None, None


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``Linear.forward`` for the plain case, with the adapter through ``LoraDelta``."""
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or self.lora_variant:
        return self._captune_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        drop = self.lora_dropout[name]
        p = drop.p if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p) if p > 0 else None
        result = result + LoraDelta.apply(x, a, b, float(self.scaling[name]), p, keep)
    return result


def applies(module) -> bool:
    """A peft LoRA ``Linear`` over a plain 16-bit ``nn.Linear`` on a GPU, with fp32 adapter weights."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
        return False
    weight = module.base_layer.weight
    names = [n for n in module.active_adapters if n in module.lora_A]
    return (
        weight.is_cuda
        and weight.dtype in (torch.bfloat16, torch.float16)
        and bool(names)
        and all(module.lora_A[n].weight.dtype == torch.float32 for n in names)
    )


def use_16bit_compute(model, *, force: bool = False) -> int:
    """Route every LoRA layer that ``applies`` (or, with ``force``, every plain peft LoRA
    ``Linear``: for tests on the CPU) through ``LoraDelta``; the number of layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if not (applies(module) or (force and type(module) is LoraLinear)):
            continue
        if not hasattr(module, "_captune_peft_forward"):
            module._captune_peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed

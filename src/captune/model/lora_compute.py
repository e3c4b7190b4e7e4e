"""LoRA's products in the model's 16-bit dtype, with fp32 master weights.

peft keeps the adapter's A and B in fp32 and casts every input activation to fp32
before ``B(A(dropout(x)))``: on a bf16 model that is a full-size fp32 copy of each
adapted layer's input per forward (and its gradient back), and fp32 products. On an
H200 those copies and products were about a fifth of the packed training step's GPU
time (bench/results/2026-12-01-h200-speed-probe.json). Mixed-precision training
(``torch.autocast``) runs them in 16 bits instead, keeping the fp32 weights and
fp32 gradients; this module does the same for the adapter alone, so the rest of the
model's arithmetic is untouched.

``LoraLinear`` is a LoRA layer's whole output ``base(x) + s * B(A(dropout(x)))`` as one
autograd function: A and B are rounded to the input's dtype for the products, which
accumulate in fp32 (tensor cores do); the adapter's product is added in the base
product's epilogue (``addmm_``) and the scalings are applied to the rank-r tensors, so
beside the two matrix products only the dropout touches a full-size tensor; in the
backward the adapter's input gradient is added into the base's in place (no separate
sum by autograd); the dropout mask is drawn once and kept as booleans, and the weight
gradients come back in fp32. Only plain ``nn.Linear`` bases of frozen 16-bit weights on
a GPU with one active adapter get it (``use_16bit_compute``).

peft's 4-bit layers (bitsandbytes ``Linear4bit`` with a 16-bit compute dtype) get
``LoraOnOutput`` instead: bitsandbytes makes the base product with its own autograd, and
the adapter's product, in 16 bits, is added to it in its epilogue (``addmm``), where peft
clones the base output, casts the input to fp32 and adds an fp32 product cast back.

Everything else keeps peft's own forward, so CPU runs and the golden values are unchanged.
"""

from __future__ import annotations

import copy
import weakref

import torch


def _down(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, keep):
    """The adapter's first product in ``x``'s dtype: (x as rows, its dropped-out rows, h = dropout(x) A^T
    with the dropout's 1/(1-p), A and B in x's dtype)."""
    a16, b16 = a.to(x.dtype), b.to(x.dtype)
    x2 = x.reshape(-1, x.size(-1))
    xd = x2 * keep.reshape(x2.shape) if keep is not None else x2
    h = xd @ a16.t()
    if keep is not None:
        h = h * (1.0 / (1.0 - p))
    return x2, xd, h, a16, b16


class LoraLinear(torch.autograd.Function):
    """``x @ W.T + bias + scaling * (dropout(x) @ A.T) @ B.T`` in ``x``'s dtype: W the frozen base layer's
    weight, ``bias`` its bias (trained with ``lora.bias`` all or lora_only); A (r, in), B (out, r) fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, p: float, keep):  # noqa: PLR0913 (autograd)
        """``keep``: the dropout mask (True = kept, x's shape) or None; kept values scale by 1/(1-p)."""
        x2, xd, h, a16, b16 = _down(x, a, b, p, keep)
        y = torch.nn.functional.linear(x2, weight, bias)
        y.addmm_(h, b16.t(), alpha=scaling)
        ctx.save_for_backward(xd, h, a16, b16, keep, weight)
        ctx.scaling, ctx.p = scaling, p
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad):
        xd, h, a16, b16, keep, weight = ctx.saved_tensors
        s, inv = ctx.scaling, (1.0 / (1.0 - ctx.p) if keep is not None else 1.0)
        g = grad.reshape(-1, grad.size(-1))
        grad_b = (g.t() @ h).float() * s
        gh = (g @ b16) * s
        grad_a = (gh.t() @ xd).float() * inv
        grad_x = grad_bias = None
        if ctx.needs_input_grad[2]:  # lora.bias all / lora_only: the base layer's bias trains
            grad_bias = g.sum(0, dtype=torch.float32).to(g.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if keep is None:
                grad_x.addmm_(gh, a16)
            else:
                grad_x.add_(((gh * inv) @ a16).mul_(keep.reshape(grad_x.shape)))
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.size(-1))
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class LoraOnOutput(torch.autograd.Function):
    """``y + scaling * (dropout(x) @ A.T) @ B.T`` in ``x``'s dtype, for a base layer whose own product ``y``
    comes from elsewhere (bitsandbytes' 4-bit matmul, with its own autograd): the adapter's product is added
    to ``y`` in the product's epilogue (``addmm``, no clone of ``y``), and its input gradient returned for
    autograd to add to the base's."""

    @staticmethod
    def forward(ctx, y, x, a, b, scaling: float, p: float, keep):  # noqa: PLR0913 (autograd)
        _, xd, h, a16, b16 = _down(x, a, b, p, keep)
        out = torch.addmm(y.reshape(-1, y.size(-1)).to(x.dtype), h, b16.t(), alpha=scaling)
        ctx.save_for_backward(xd, h, a16, b16, keep)
        ctx.scaling, ctx.p, ctx.y_dtype = scaling, p, y.dtype
        return out.view(*y.shape)

    @staticmethod
    def backward(ctx, grad):
        xd, h, a16, b16, keep = ctx.saved_tensors
        s, inv = ctx.scaling, (1.0 / (1.0 - ctx.p) if keep is not None else 1.0)
        g = grad.reshape(-1, grad.size(-1))
        grad_b = (g.t() @ h).float() * s
        gh = (g @ b16) * s
        grad_a = (gh.t() @ xd).float() * inv
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = gh @ a16 if keep is None else ((gh * inv) @ a16).mul_(keep.reshape(xd.shape))
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.size(-1))
        return grad.to(ctx.y_dtype), grad_x, grad_a, grad_b, None, None, None


def _adapter(self, x: torch.Tensor, args, kwargs):
    """(A, B, scaling, dropout p, dropout mask) of the one active adapter, or None where peft's forward runs
    (several adapters, merged, disabled, a variant, extra arguments)."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    plain = not (self.disable_adapters or self.merged or self.lora_variant or args or kwargs)
    if not plain or len(names) != 1:
        return None
    name = names[0]
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p) if p > 0 else None
    return self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), p, keep


def _forward_on_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's bitsandbytes 4-bit ``Linear4bit.forward`` for the plain case, through ``LoraOnOutput``."""
    adapter = _adapter(self, x, args, kwargs)
    if adapter is None:
        return self._captune_peft_forward(x, *args, **kwargs)
    return LoraOnOutput.apply(self.base_layer(x), x, *adapter)


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``Linear.forward`` for the plain case (one active adapter), through ``LoraLinear``."""
    adapter = None if self.base_layer.weight.requires_grad else _adapter(self, x, args, kwargs)
    if adapter is None:  # (a trained base weight: peft's too)
        return self._captune_peft_forward(x, *args, **kwargs)
    base = self.base_layer
    return LoraLinear.apply(x, base.weight, base.bias, *adapter)


def _is_4bit(module) -> bool:
    """peft's LoRA layer over a bitsandbytes 4-bit ``Linear4bit`` (told by class, without importing bitsandbytes)."""
    kind = type(module)
    return kind.__name__ == "Linear4bit" and kind.__module__ == "peft.tuners.lora.bnb"


def applies(module) -> bool:
    """A peft LoRA ``Linear`` over a plain frozen 16-bit ``nn.Linear``, or peft's 4-bit ``Linear4bit`` over
    bitsandbytes' with a 16-bit compute dtype, on a GPU, with fp32 adapter weights."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    four = _is_4bit(module)
    if not four and (type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear):
        return False
    weight = module.base_layer.weight
    dtype = getattr(module.base_layer, "compute_dtype", None) if four else weight.dtype
    names = [n for n in module.active_adapters if n in module.lora_A]
    return (
        weight.is_cuda
        and dtype in (torch.bfloat16, torch.float16)
        and not weight.requires_grad
        and bool(names)
        and all(module.lora_A[n].weight.dtype == torch.float32 for n in names)
    )


class WeakForward:
    """``fn(module, *args, **kwargs)`` as a module's ``forward``, holding the module weakly. A bound method
    (or ``functools.partial``) stored on the module it is bound to is a reference cycle: the module, and
    on a GPU its weights, then outlive the last outside reference until Python's cycle collector runs."""

    __slots__ = ("_module", "fn")

    def __init__(self, module, fn):
        self._module = weakref.ref(module)
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.module(), *args, **kwargs)

    def module(self):
        module = self._module()
        if module is None:  # a shallow copy's (copy.copy, nn.DataParallel's replicas) outliving its original
            raise ReferenceError("this forward's LoRA layer is gone: a shallow copy of a patched model outlived it; "
                                 "deep-copy the model instead (copy.deepcopy)")  # fmt: skip
        return module

    def __deepcopy__(self, memo):  # a copied model's forward is bound to the copy, as a bound method's would be
        return WeakForward(copy.deepcopy(self.module(), memo), self.fn)

    def __reduce__(self):  # pickled (torch.save of a whole model) as a bound method would be
        return WeakForward, (self.module(), self.fn)


def route(module, forward) -> None:
    """``module`` through ``forward(module, x, ...)`` (``_forward`` or ``_forward_on_output``), peft's own
    forward kept as ``module._captune_peft_forward``; neither holds the module strongly."""
    own = vars(module).get("forward")  # an instance's own forward (accelerate's hooks set one) stays as it is
    module._captune_peft_forward = own if own is not None else WeakForward(module, type(module).forward)
    module.forward = WeakForward(module, forward)


def use_16bit_compute(model, *, force: bool = False) -> int:
    """Route every LoRA layer that ``applies`` (or, with ``force``, every plain peft LoRA
    ``Linear``: for tests on the CPU) through ``LoraLinear`` (``LoraOnOutput`` for 4-bit layers);
    the number of layers changed."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if not (applies(module) or (force and type(module) is LoraLinear)):
            continue
        if not hasattr(module, "_captune_peft_forward"):
            route(module, _forward_on_output if _is_4bit(module) else _forward)
            changed += 1
    return changed

"""The vision tower's fused kernels for frozen image features on a GPU (``model.vision_kernels``).

Beside its products and attention, a ViT-g forward spends a sixth of its GPU time on passes over
its (rows, 1408) and (rows, 6144) activations: the MLP's GELU, each residual addition, and the
layer norm that reads the sum right after. While features are computed, ``fused_vision`` runs

* each MLP as ``ops.mlp.vision_feed_forward``: the bias and GELU (its tanh form) in fc1's
  product, no separate GELU pass;
* the encoder as ``encoder_forward``: each residual addition and the layer norm after it (the
  next layer's first, or this layer's second) in one pass, ``add_norm`` (a Triton kernel): the sum
  is written once and read once instead of written, read back for the norm.

The sum is the one torch makes (its 16-bit rounding of the float32 sum); the norm is computed in
float32 as torch's, by a different summation order, so its 16-bit output may differ by one step.
``vision_kernels=plain`` keeps the checkpoint's modules as transformers runs them. CPU runs take
the plain path unless told otherwise (then the same arithmetic as torch ops), so the golden
values are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from captune.ops.lm import unwrap

try:  # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

VISION_KERNELS = "captune_vision_kernels"
NUM_WARPS = 4  # add_norm's warps a row (1408 columns in a 2048-wide block)
ADD_NORM = True  # the encoder's fused sums and norms where they apply (bench/speed_probe.py --only vision without)


def set_vision_kernels(model, choice: str) -> None:
    """Record ``model.vision_kernels`` (auto, fused or plain) on the model, as ``load_model`` does."""
    setattr(unwrap(model), VISION_KERNELS, choice)


def vision_kernels(blip) -> str:
    """The resolved choice, fused or plain: auto fuses for a 16-bit vision tower on a GPU (where the
    differences are under the rounding its activations get), plain elsewhere: a float32 tower, or a
    CPU, where fusing saves nothing."""
    choice = getattr(blip, VISION_KERNELS, "auto")
    if choice != "auto":
        return choice
    weight = blip.vision_model.embeddings.patch_embedding.weight
    return "fused" if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) else "plain"


if triton is not None:

    @triton.jit
    def _add_norm_kernel(A, H, W, B, S, X, cols, eps, BLOCK: tl.constexpr):  # noqa: PLR0913
        """One row: S = H + A (rounded as torch rounds it), X = layer_norm(S) * W + B, in float32."""
        row = tl.program_id(0).to(tl.int64) * cols
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        a = tl.load(A + row + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row + offs, mask=mask, other=0.0).to(tl.float32)
        s = (h + a).to(S.dtype.element_ty)
        tl.store(S + row + offs, s, mask=mask)
        v = s.to(tl.float32)
        mean = tl.sum(v, axis=0) / cols
        d = tl.where(mask, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / cols + eps)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + row + offs, (d * rstd * w + b).to(X.dtype.element_ty), mask=mask)


def _plain_norm(norm, like: torch.Tensor) -> bool:
    """An ``nn.LayerNorm`` over the last dim with weight and bias in the rows' dtype, no hooks."""
    return (
        type(norm) is torch.nn.LayerNorm
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (like.size(-1),)
        and norm.weight.dtype == like.dtype
        and not (norm._forward_pre_hooks or norm._forward_hooks)
    )


def add_norm(a: torch.Tensor, h: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` for the residual sum ``s = a + h``: one Triton pass on a GPU (``_plain_norm``
    norms, contiguous rows, no autograd), torch's two ops elsewhere."""
    fused = (
        ADD_NORM
        and triton is not None
        and a.is_cuda
        and not torch.is_grad_enabled()
        and a.shape == h.shape
        and a.dtype == h.dtype
        and a.is_contiguous()
        and h.is_contiguous()
        and _plain_norm(norm, h)
    )
    if not fused:
        s = a + h
        return s, norm(s)
    cols = h.size(-1)
    s, x = torch.empty_like(h), torch.empty_like(h)
    with torch.cuda.device(h.device):  # Triton launches on the current device
        _add_norm_kernel[(h.numel() // cols,)](
            a, h, norm.weight, norm.bias, s, x, cols, norm.eps, BLOCK=triton.next_power_of_2(cols), num_warps=NUM_WARPS
        )
    return s, x


def encoder_forward(encoder, inputs_embeds: torch.Tensor, attention_mask=None, **kwargs):
    """The vision encoder's layers as transformers runs them, each residual addition and the norm after
    it in one ``add_norm``. Where more is asked of it (a mask, attentions or hidden states) the
    encoder's own forward runs (also where the config asks for them: transformers records them by hooks on
    the layers, which this loop does not call)."""
    from transformers.modeling_outputs import BaseModelOutput

    config = getattr(encoder, "config", None)
    asked = [kwargs.get(k) or getattr(config, k, False) for k in ("output_attentions", "output_hidden_states")]
    if attention_mask is not None or any(asked):
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}  # as it was given
        return type(encoder).forward(encoder, inputs_embeds, **mask, **kwargs)
    layers = encoder.layers
    h = inputs_embeds
    x = layers[0].layer_norm1(h)
    for i, layer in enumerate(layers):
        attended = layer.self_attn(hidden_states=x)[0]
        h, x = add_norm(attended, h, layer.layer_norm2)
        out = layer.mlp(x)
        if i + 1 < len(layers):
            h, x = add_norm(out, h, layers[i + 1].layer_norm1)
        else:
            h = out + h
    return BaseModelOutput(last_hidden_state=h)


def _fusable_encoder(encoder) -> bool:
    """Layers as transformers builds them (two norms, attention, MLP), none with hooks of its own."""
    return all(
        all(hasattr(layer, part) for part in ("layer_norm1", "self_attn", "layer_norm2", "mlp"))
        and not (layer._forward_pre_hooks or layer._forward_hooks)
        for layer in encoder.layers
    )


@contextlib.contextmanager
def fused_vision(blip) -> Iterator[None]:
    """While features are computed (without autograd), the vision tower runs its fused kernels when
    ``vision_kernels`` says fused: each ``gelu_fusable`` MLP as ``vision_feed_forward``, the encoder as
    ``encoder_forward``. Their own forwards are put back after."""
    from captune.ops.mlp import gelu_fusable, vision_feed_forward

    patched = []
    try:
        if vision_kernels(blip) == "fused" and not torch.is_grad_enabled():
            encoder = blip.vision_model.encoder
            for layer in encoder.layers:
                if gelu_fusable(layer.mlp) and "forward" not in vars(layer.mlp):
                    layer.mlp.forward = functools.partial(vision_feed_forward, layer.mlp)
                    patched.append(layer.mlp)
            if _fusable_encoder(encoder) and "forward" not in vars(encoder):
                encoder.forward = functools.partial(encoder_forward, encoder)
                patched.append(encoder)
        yield
    finally:
        for module in patched:
            del module.forward


def vision_path(blip, like: torch.Tensor | None = None) -> str:
    """Which kernels the vision tower runs when features are computed (``captune bench`` records it)."""
    from captune.ops.mlp import gelu_fusable

    if vision_kernels(blip) != "fused":
        return "the checkpoint's modules"
    encoder = blip.vision_model.encoder
    parts = []
    if gelu_fusable(encoder.layers[0].mlp):
        parts.append("fc1 + GELU (tanh form) in one product")
    if _fusable_encoder(encoder):
        on_gpu = triton is not None and encoder.layers[0].layer_norm1.weight.is_cuda
        parts.append("residual sum + layer norm in one pass" + ("" if on_gpu else " (as torch ops here)"))
    return ", ".join(parts) or "the checkpoint's modules"

"""Attention of one new token over a static KV cache, as a Triton kernel on CUDA.

During decoding each (sequence, head) pair attends with one query to at most a few
dozen cached keys. PyTorch's SDPA kernels are built for long sequences and spend
most of their time on per-head overhead at this shape. This kernel gives each
(sequence, head) one program that streams its keys and values in small chunks with an
online softmax (few registers, so many programs per SM keep the loads in flight) and
writes the new token's key and value into the cache itself.

The cache is in two parts: the prompt's keys and values (image tokens + prompt), one row
per prompt, and the generated tokens', one row per sequence. When K sequences share one
prompt (K sampled captions per image in SCST) the prompt part is stored and read once
for all K. Elsewhere (CPU, no Triton) the same arithmetic runs through SDPA over the
joined cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

CHUNK = 16  # keys per chunk of the online softmax
NUM_WARPS = 1


if triton is not None:

    @triton.jit
    def _chunks(q, m_i, s_i, acc, k_base, v_base, skl, svl, length, offs_d, dmask, CHUNK: tl.constexpr):  # noqa: PLR0913
        # (a Triton helper's state goes in and out as arguments)
        """Fold keys/values 0..length-1 at ``k_base``/``v_base`` into the online softmax state."""
        offs_c = tl.arange(0, CHUNK)
        for start in range(0, length, CHUNK):
            offs = start + offs_c
            lmask = offs < length
            mask = lmask[:, None] & dmask[None, :]
            k = tl.load(k_base + offs[:, None] * skl + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            scores = tl.where(lmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            v = tl.load(v_base + offs[:, None] * svl + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            s_i = s_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        return m_i, s_i, acc

    @triton.jit
    def _decode_kernel(  # noqa: PLR0913 (a Triton kernel's arguments are its launch signature)
        q_ptr,
        k_ptr,
        v_ptr,
        kp_ptr,
        vp_ptr,
        kn_ptr,
        vn_ptr,
        o_ptr,
        pos_ptr,
        sq,  # (batch, head) strides of q, k, v (the new token) and the output
        sqh,
        sk,
        skh,
        sv,
        svh,
        so,
        soh,
        skp,  # strides of the prompt part (prompt row, head, slot)
        skph,
        skpl,
        svp,
        svph,
        svpl,
        skn,  # strides of the generated part (sequence, head, slot)
        sknh,
        sknl,
        svn,
        svnh,
        svnl,
        rep,
        prefix_len,
        dim,
        CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < dim
        q = tl.load(q_ptr + b * sq + h * sqh + offs_d, mask=dmask, other=0.0).to(tl.float32)
        k_now = tl.load(k_ptr + b * sk + h * skh + offs_d, mask=dmask, other=0.0)
        v_now = tl.load(v_ptr + b * sv + h * svh + offs_d, mask=dmask, other=0.0)
        slot = tl.load(pos_ptr) - prefix_len  # this token's slot in the generated part
        kn_base = kn_ptr + b * skn + h * sknh
        vn_base = vn_ptr + b * svn + h * svnh
        tl.store(kn_base + slot * sknl + offs_d, k_now.to(kn_ptr.dtype.element_ty), mask=dmask)
        tl.store(vn_base + slot * svnl + offs_d, v_now.to(vn_ptr.dtype.element_ty), mask=dmask)
        # the state starts from the new token itself (the softmax's max is then finite)
        m_i = tl.sum(k_now.to(tl.float32) * q, axis=0)
        s_i = m_i * 0.0 + 1.0
        acc = v_now.to(tl.float32)
        pb = b // rep
        kp_base = kp_ptr + pb * skp + h * skph
        vp_base = vp_ptr + pb * svp + h * svph
        m_i, s_i, acc = _chunks(q, m_i, s_i, acc, kp_base, vp_base, skpl, svpl, prefix_len, offs_d, dmask, CHUNK)
        m_i, s_i, acc = _chunks(q, m_i, s_i, acc, kn_base, vn_base, sknl, svnl, slot, offs_d, dmask, CHUNK)
        tl.store(o_ptr + b * so + h * soh + offs_d, (acc / s_i).to(o_ptr.dtype.element_ty), mask=dmask)


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def decode_attention(  # noqa: PLR0913 (the two halves of the cache, their keys and values)
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prompt: torch.Tensor,
    v_prompt: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """softmax(q K^T) V for the token at position ``pos`` (a 0-d long tensor, graph-static).

    q, k, v (B, H, 1, D): the new token's query (already scaled), key and value; ``k``/``v``
    are written into slot ``pos - P`` of ``k_new``/``v_new`` (B, H, N, D). ``k_prompt``/
    ``v_prompt`` (B / rep, H, P, D): the prompt's keys and values, row ``i // rep`` serving
    sequence i. Keys are the prompt's P slots, the generated slots before ``pos - P`` and
    the new token."""
    b, h, _, d = q.shape
    rep = b // k_prompt.size(0)
    prefix_len = k_prompt.size(2)
    if not available(q.device):
        return _reference(q, k, v, k_prompt, v_prompt, k_new, v_new, pos, rep)
    out = torch.empty_like(q)
    args = [q, k, v, k_prompt, v_prompt, k_new, v_new, out, pos]
    strides = [t.stride(i) for t in (q, k, v, out) for i in (0, 1)]
    strides += [t.stride(i) for t in (k_prompt, v_prompt, k_new, v_new) for i in (0, 1, 2)]
    _decode_kernel[(b, h)](
        *args, *strides, rep, prefix_len, d, CHUNK=CHUNK, BLOCK_D=triton.next_power_of_2(d), num_warps=NUM_WARPS
    )
    return out


def _reference(q, k, v, k_prompt, v_prompt, k_new, v_new, pos, rep: int) -> torch.Tensor:
    """The same through SDPA: the new token written into its slot, then the joined cache masked."""
    prefix_len = k_prompt.size(2)
    slot = (pos - prefix_len).view(1)
    k_new.index_copy_(2, slot, k.to(k_new.dtype))
    v_new.index_copy_(2, slot, v.to(v_new.dtype))
    if rep > 1:
        k_prompt, v_prompt = k_prompt.repeat_interleave(rep, 0), v_prompt.repeat_interleave(rep, 0)
    keys, values = torch.cat([k_prompt, k_new], 2), torch.cat([v_prompt, v_new], 2)
    mask = (torch.arange(keys.size(2), device=q.device) <= pos).view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=1.0)

"""Attention of one new token over a static KV cache, as a Triton kernel on CUDA.

During decoding each (sequence, head) pair attends with one query to at most a few
dozen cached keys. PyTorch's SDPA kernels are built for long sequences and spend
most of their time on per-head overhead at this shape. This kernel streams each
(sequence, head)'s keys and values in small chunks with an online softmax (few
registers, so many programs per SM keep the loads in flight) and writes the new token's
key and value into the cache itself; a program takes ``HEADS`` heads of one sequence
(``_decode_heads_kernel``; captioning at batch 2,048 on an H200: 1884.2 images/s against
1801.4 with one head a program, bench/results/2026-12-02-h200-captioning-decode-heads.json).

The cache is in two parts: the prompt's keys and values (image tokens + prompt), one row
per prompt, and the generated tokens', one row per sequence. When K sequences share one
prompt (K sampled captions per image in SCST) the prompt part is stored once for all K,
and a second kernel (``_prompt_kernel``) attends the K queries to it together, one
program per (prompt row, head) with the products on tensor cores; the per-sequence kernel
then folds in the generated tokens and the new one from that online-softmax state (one
layer at 1,280 sequences, 5 a prompt, on an H200: 0.2254 ms early + late in a caption
against 0.3005 for the per-sequence kernel alone). Elsewhere (CPU, no Triton) the same
arithmetic runs through SDPA over the joined cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

CHUNK = 8  # keys per chunk of the online softmax
NUM_WARPS = 1  # one warp per (sequence, head): the fastest at batch 2048 on an H200 (speed probe's sweep)
SPLIT_D = True  # a head's dims in two power-of-two parts (80 = 64 + 16) rather than one padded (128)
# sequences sharing a prompt row (SCST's K samples of an image): the prompt part by one program for all
SHARED = True
SHARED_MAX_ROWS = 16  # sequences per prompt row the prompt kernel takes (its tensor-core tile's rows)
# the prompt kernel's keys per chunk and warps: the fastest at 1,280 and 1,920 sequences (256 and 384
# images x 5) on an H200 (speed probe's shared_attention_sweep)
SHARED_CHUNK, SHARED_WARPS = 16, 1
# heads per program of the per-sequence kernel (greedy captioning, and SCST's generated tokens after the prompt
# kernel), and its warps: with one (sequence, head) a program, 1-warp blocks fill at most half of an SM's warp
# slots (32 resident blocks); 4 heads of a sequence a program, 1 warp, 8 keys a chunk was the fastest on two
# H200 leases (of 18 settings, then 27; greedy, one layer at 2,048 sequences, early + late in a caption: 0.315
# and 0.320 ms against 0.504 and 0.507; speed probe's decode_heads). ``CHUNK`` is shared with the one-head kernel.
HEADS, HEADS_WARPS = 4, 1
# the prefill's causal attention over the prompt rows (image tokens + prompt) as one Triton program per
# (sequence, head) that also writes the rows' keys and values into the cache, where the rows fit one tile;
# else SDPA, then the keys and values copied into the cache (``prefill_attention``)
PREFILL, PREFILL_MAX_ROWS, PREFILL_WARPS = True, 128, 4


if triton is not None:

    @triton.jit
    def _scaled(q, scale):
        """``q * scale`` rounded to q's dtype, as torch computes it (in float32, then rounded)."""
        return (q.to(tl.float32) * scale).to(q.dtype)

    @triton.jit
    def _part(base, offs, stride, offs_d, dmask, lmask):
        """Keys or values ``offs`` (a chunk of slots), dims ``offs_d``, as fp32 (masked: 0)."""
        mask = lmask[:, None] & dmask[None, :]
        return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _chunks(q1, q2, state, k_base, v_base, skl, svl, length, dims, CHUNK: tl.constexpr, D1: tl.constexpr,  # noqa: PLR0913
                D2: tl.constexpr):  # fmt: skip
        """Fold keys/values 0..length-1 at ``k_base``/``v_base`` into the online softmax ``state``.

        The head's dims are in two parts, D1 then D2 wide (80 = 64 + 16: no lane idles on padding;
        a D2 of 1 past ``dims`` is masked off)."""
        m_i, s_i, acc1, acc2 = state
        offs_c = tl.arange(0, CHUNK)
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2)
        d1mask, d2mask = offs_d1 < dims, offs_d2 < dims
        for start in range(0, length, CHUNK):
            offs = start + offs_c
            lmask = offs < length
            scores = tl.sum(_part(k_base, offs, skl, offs_d1, d1mask, lmask) * q1[None, :], axis=1)
            scores += tl.sum(_part(k_base, offs, skl, offs_d2, d2mask, lmask) * q2[None, :], axis=1)
            scores = tl.where(lmask, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            acc1 = acc1 * alpha + tl.sum(p[:, None] * _part(v_base, offs, svl, offs_d1, d1mask, lmask), axis=0)
            acc2 = acc2 * alpha + tl.sum(p[:, None] * _part(v_base, offs, svl, offs_d2, d2mask, lmask), axis=0)
            s_i = s_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        return m_i, s_i, acc1, acc2

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
        part_ptr,  # with PART: the prompt part's online-softmax state per (sequence, head) (_prompt_kernel)
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
        scale,  # q's scale, applied and rounded to q's dtype as torch's ``q * scale`` would (1.0: q is scaled)
        CHUNK: tl.constexpr,
        D1: tl.constexpr,
        D2: tl.constexpr,
        PART: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2)
        d1mask, d2mask = offs_d1 < dim, offs_d2 < dim
        q_base, k_base, v_base = q_ptr + b * sq + h * sqh, k_ptr + b * sk + h * skh, v_ptr + b * sv + h * svh
        q1 = _scaled(tl.load(q_base + offs_d1, mask=d1mask, other=0.0), scale).to(tl.float32)
        q2 = _scaled(tl.load(q_base + offs_d2, mask=d2mask, other=0.0), scale).to(tl.float32)
        k1 = tl.load(k_base + offs_d1, mask=d1mask, other=0.0)
        k2 = tl.load(k_base + offs_d2, mask=d2mask, other=0.0)
        v1 = tl.load(v_base + offs_d1, mask=d1mask, other=0.0)
        v2 = tl.load(v_base + offs_d2, mask=d2mask, other=0.0)
        slot = tl.load(pos_ptr) - prefix_len  # this token's slot in the generated part
        kn_base = kn_ptr + b * skn + h * sknh
        vn_base = vn_ptr + b * svn + h * svnh
        kind = kn_ptr.dtype.element_ty
        tl.store(kn_base + slot * sknl + offs_d1, k1.to(kind), mask=d1mask)
        tl.store(kn_base + slot * sknl + offs_d2, k2.to(kind), mask=d2mask)
        tl.store(vn_base + slot * svnl + offs_d1, v1.to(kind), mask=d1mask)
        tl.store(vn_base + slot * svnl + offs_d2, v2.to(kind), mask=d2mask)
        # the state starts from the new token itself (the softmax's max is then finite)
        m_i = tl.sum(k1.to(tl.float32) * q1, axis=0) + tl.sum(k2.to(tl.float32) * q2, axis=0)
        state = (m_i, m_i * 0.0 + 1.0, v1.to(tl.float32), v2.to(tl.float32))
        if PART:  # the prompt part was attended by _prompt_kernel: merge its state
            part = part_ptr + (b * tl.num_programs(1) + h) * (2 + dim)
            m_p, s_p = tl.load(part), tl.load(part + 1)
            m_new = tl.maximum(m_i, m_p)
            a_p, a_t = tl.exp(m_p - m_new), tl.exp(m_i - m_new)
            acc1 = tl.load(part + 2 + offs_d1, mask=d1mask, other=0.0) * a_p + state[2] * a_t
            acc2 = tl.load(part + 2 + offs_d2, mask=d2mask, other=0.0) * a_p + state[3] * a_t
            state = (m_new, s_p * a_p + a_t, acc1, acc2)
        else:
            pb = b // rep
            kp_base = kp_ptr + pb * skp + h * skph
            vp_base = vp_ptr + pb * svp + h * svph
            state = _chunks(q1, q2, state, kp_base, vp_base, skpl, svpl, prefix_len, dim, CHUNK, D1, D2)
        m_i, s_i, acc1, acc2 = _chunks(q1, q2, state, kn_base, vn_base, sknl, svnl, slot, dim, CHUNK, D1, D2)
        o_base = o_ptr + b * so + h * soh
        tl.store(o_base + offs_d1, (acc1 / s_i).to(o_ptr.dtype.element_ty), mask=d1mask)
        tl.store(o_base + offs_d2, (acc2 / s_i).to(o_ptr.dtype.element_ty), mask=d2mask)

    @triton.jit
    def _head_chunks(q1, q2, state, k_base, v_base, kh, kl, vh, vl, length, dims, offs_h,  # noqa: PLR0913
                     CHUNK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):  # fmt: skip
        """``_chunks`` for a program's heads at once: q (heads, D), keys and values (heads, CHUNK, D)."""
        m_i, s_i, acc1, acc2 = state
        offs_c = tl.arange(0, CHUNK)
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2)
        d1mask, d2mask = offs_d1 < dims, offs_d2 < dims
        heads = offs_h[:, None, None]
        for start in range(0, length, CHUNK):
            offs = start + offs_c
            lmask = offs < length
            at = offs[None, :, None]
            m1, m2 = lmask[None, :, None] & d1mask[None, None, :], lmask[None, :, None] & d2mask[None, None, :]
            k1 = tl.load(k_base + heads * kh + at * kl + offs_d1[None, None, :], mask=m1, other=0.0).to(tl.float32)
            k2 = tl.load(k_base + heads * kh + at * kl + offs_d2[None, None, :], mask=m2, other=0.0).to(tl.float32)
            scores = tl.sum(k1 * q1[:, None, :], axis=2) + tl.sum(k2 * q2[:, None, :], axis=2)
            scores = tl.where(lmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            v1 = tl.load(v_base + heads * vh + at * vl + offs_d1[None, None, :], mask=m1, other=0.0).to(tl.float32)
            v2 = tl.load(v_base + heads * vh + at * vl + offs_d2[None, None, :], mask=m2, other=0.0).to(tl.float32)
            acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * v1, axis=1)
            acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * v2, axis=1)
            s_i = s_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        return m_i, s_i, acc1, acc2

    @triton.jit
    def _decode_heads_kernel(  # noqa: PLR0913 (a Triton kernel's arguments are its launch signature)
        q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, kn_ptr, vn_ptr, o_ptr, pos_ptr, part_ptr,
        sq, sqh, sk, skh, sv, svh, so, soh,
        skp, skph, skpl, svp, svph, svpl, skn, sknh, sknl, svn, svnh, svnl,
        rep, prefix_len, dim, scale,
        CHUNK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, HP: tl.constexpr, PART: tl.constexpr,
    ):  # fmt: skip
        """``_decode_kernel`` for ``HP`` heads of one sequence per program (with ``PART``, the prompt part's
        state from ``_prompt_kernel`` merged in, as there)."""
        b = tl.program_id(0)
        offs_h = tl.program_id(1) * HP + tl.arange(0, HP)
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2)
        d1mask, d2mask = offs_d1 < dim, offs_d2 < dim
        m1, m2 = d1mask[None, :] & (offs_h[:, None] >= 0), d2mask[None, :] & (offs_h[:, None] >= 0)
        hq, hk, hv, ho = offs_h[:, None] * sqh, offs_h[:, None] * skh, offs_h[:, None] * svh, offs_h[:, None] * soh
        q1 = _scaled(tl.load(q_ptr + b * sq + hq + offs_d1[None, :], mask=m1, other=0.0), scale).to(tl.float32)
        q2 = _scaled(tl.load(q_ptr + b * sq + hq + offs_d2[None, :], mask=m2, other=0.0), scale).to(tl.float32)
        k1 = tl.load(k_ptr + b * sk + hk + offs_d1[None, :], mask=m1, other=0.0)
        k2 = tl.load(k_ptr + b * sk + hk + offs_d2[None, :], mask=m2, other=0.0)
        v1 = tl.load(v_ptr + b * sv + hv + offs_d1[None, :], mask=m1, other=0.0)
        v2 = tl.load(v_ptr + b * sv + hv + offs_d2[None, :], mask=m2, other=0.0)
        slot = tl.load(pos_ptr) - prefix_len
        kn_base, vn_base = kn_ptr + b * skn, vn_ptr + b * svn
        kind = kn_ptr.dtype.element_ty
        at_k, at_v = kn_base + offs_h[:, None] * sknh + slot * sknl, vn_base + offs_h[:, None] * svnh + slot * svnl
        tl.store(at_k + offs_d1[None, :], k1.to(kind), mask=m1)
        tl.store(at_k + offs_d2[None, :], k2.to(kind), mask=m2)
        tl.store(at_v + offs_d1[None, :], v1.to(kind), mask=m1)
        tl.store(at_v + offs_d2[None, :], v2.to(kind), mask=m2)
        m_i = tl.sum(k1.to(tl.float32) * q1, axis=1) + tl.sum(k2.to(tl.float32) * q2, axis=1)
        state = (m_i, m_i * 0.0 + 1.0, v1.to(tl.float32), v2.to(tl.float32))
        if PART:
            part = part_ptr + (b * tl.num_programs(1) * HP + offs_h) * (2 + dim)
            m_p, s_p = tl.load(part), tl.load(part + 1)
            m_new = tl.maximum(m_i, m_p)
            a_p, a_t = tl.exp(m_p - m_new), tl.exp(m_i - m_new)
            acc1 = tl.load(part[:, None] + 2 + offs_d1[None, :], mask=m1, other=0.0) * a_p[:, None]
            acc2 = tl.load(part[:, None] + 2 + offs_d2[None, :], mask=m2, other=0.0) * a_p[:, None]
            state = (m_new, s_p * a_p + a_t, acc1 + state[2] * a_t[:, None], acc2 + state[3] * a_t[:, None])
        else:
            pb = b // rep
            state = _head_chunks(q1, q2, state, kp_ptr + pb * skp, vp_ptr + pb * svp, skph, skpl, svph, svpl,
                                 prefix_len, dim, offs_h, CHUNK, D1, D2)  # fmt: skip
        m_i, s_i, acc1, acc2 = _head_chunks(q1, q2, state, kn_base, vn_base, sknh, sknl, svnh, svnl, slot, dim,
                                            offs_h, CHUNK, D1, D2)  # fmt: skip
        o_base = o_ptr + b * so + ho
        tl.store(o_base + offs_d1[None, :], (acc1 / s_i[:, None]).to(o_ptr.dtype.element_ty), mask=m1)
        tl.store(o_base + offs_d2[None, :], (acc2 / s_i[:, None]).to(o_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _prompt_kernel(  # noqa: PLR0913 (a Triton kernel's arguments are its launch signature)
        q_ptr, kp_ptr, vp_ptr, part_ptr,
        sq, sqh, skp, skph, skpl, svp, svph, svpl,
        rep, prefix_len, dim, heads, scale,
        CHUNK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """The prompt part of the attention of the ``rep`` sequences sharing prompt row ``pb`` (SCST's
        K samples of an image), for one head: each chunk of the prompt's keys and values read once
        for all of them, the products on tensor cores (``R`` rows, ``rep`` of them real). Writes
        each sequence's online-softmax state (max, sum, D accumulated values; fp32) to ``part_ptr``
        (sequence, head, 2 + D) for ``_decode_kernel`` to finish with the generated tokens."""
        pb = tl.program_id(0)
        h = tl.program_id(1)
        offs_r = tl.arange(0, R)
        rmask = offs_r < rep
        rows = pb * rep + offs_r
        offs_c = tl.arange(0, CHUNK)
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2)
        d1mask, d2mask = offs_d1 < dim, offs_d2 < dim
        q_rows = q_ptr + rows[:, None] * sq + h * sqh
        q1 = _scaled(tl.load(q_rows + offs_d1[None, :], mask=rmask[:, None] & d1mask[None, :], other=0.0), scale)
        kp_base, vp_base = kp_ptr + pb * skp + h * skph, vp_ptr + pb * svp + h * svph
        m_i = tl.full([R], float("-inf"), tl.float32)
        s_i = tl.zeros([R], tl.float32)
        acc1 = tl.zeros([R, D1], tl.float32)
        acc2 = tl.zeros([R, D2], tl.float32)
        for start in range(0, prefix_len, CHUNK):
            offs = start + offs_c
            lmask = offs < prefix_len
            k1 = tl.load(kp_base + offs[:, None] * skpl + offs_d1[None, :], mask=lmask[:, None] & d1mask[None, :],
                         other=0.0)  # fmt: skip
            scores = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            if D2 > 1:
                q2 = _scaled(tl.load(q_rows + offs_d2[None, :], mask=rmask[:, None] & d2mask[None, :], other=0.0),
                             scale)  # fmt: skip
                k2 = tl.load(kp_base + offs[:, None] * skpl + offs_d2[None, :],
                             mask=lmask[:, None] & d2mask[None, :], other=0.0)  # fmt: skip
                scores += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
            scores = tl.where(lmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            v1 = tl.load(vp_base + offs[:, None] * svpl + offs_d1[None, :], mask=lmask[:, None] & d1mask[None, :],
                         other=0.0)  # fmt: skip
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
            if D2 > 1:
                v2 = tl.load(vp_base + offs[:, None] * svpl + offs_d2[None, :],
                             mask=lmask[:, None] & d2mask[None, :], other=0.0)  # fmt: skip
                acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)
            s_i = s_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        part = part_ptr + (rows * heads + h) * (2 + dim)
        tl.store(part, m_i, mask=rmask)
        tl.store(part + 1, s_i, mask=rmask)
        tl.store(part[:, None] + 2 + offs_d1[None, :], acc1, mask=rmask[:, None] & d1mask[None, :])
        if D2 > 1:
            tl.store(part[:, None] + 2 + offs_d2[None, :], acc2, mask=rmask[:, None] & d2mask[None, :])

    @triton.jit
    def _rows(base, offs_t, st, offs_d, mask):
        return tl.load(base + offs_t[:, None] * st + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _prefill_kernel(  # noqa: PLR0913 (a Triton kernel's arguments are its launch signature)
        q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, o_ptr,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        skpb, skph, skpt, svpb, svph, svpt,
        rows, dim, scale,
        BT: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Causal attention of one (sequence, head)'s ``rows`` prompt rows in one tile (``BT`` rows, ``BD``
        dims, the padding masked): q scaled as torch would (``_scaled``), the products on tensor cores, the
        probabilities rounded to the values' dtype for their product (as flash attention does); the rows'
        keys and values stored in the cache."""
        b, h = tl.program_id(0), tl.program_id(1)
        offs_t = tl.arange(0, BT)
        offs_d = tl.arange(0, BD)
        tmask = offs_t < rows
        mask = tmask[:, None] & (offs_d < dim)[None, :]
        q = _scaled(_rows(q_ptr + b * sqb + h * sqh, offs_t, sqt, offs_d, mask), scale)
        k = _rows(k_ptr + b * skb + h * skh, offs_t, skt, offs_d, mask)
        v = _rows(v_ptr + b * svb + h * svh, offs_t, svt, offs_d, mask)
        at = offs_t[:, None]
        tl.store(kp_ptr + b * skpb + h * skph + at * skpt + offs_d[None, :], k.to(kp_ptr.dtype.element_ty), mask=mask)
        tl.store(vp_ptr + b * svpb + h * svph + at * svpt + offs_d[None, :], v.to(vp_ptr.dtype.element_ty), mask=mask)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # causal; a padding row (past ``rows``) sees the real rows, so no row is all -inf
        scores = tl.where((at >= offs_t[None, :]) & tmask[None, :], scores, float("-inf"))
        p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / tl.sum(p, axis=1)[:, None]
        tl.store(o_ptr + b * sob + h * soh + at * sot + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)


def dim_parts(dim: int, split: bool) -> tuple[int, int]:
    """The kernel's two widths for a head of ``dim``: split, the largest power of two in it and the
    rest rounded up (80 -> 64 + 16); unsplit, one power of two covering it (80 -> 128). A second
    part with nothing in it is 1 wide and masked off (Triton ranges are powers of two, at least 1)."""
    first = 1 << (dim.bit_length() - 1)
    if first == dim:
        return dim, 1
    if not split:
        return first * 2, 1
    return first, 1 << (dim - first - 1).bit_length()


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
    scale: float = 1.0,
) -> torch.Tensor:
    """softmax((q * scale) K^T) V for the token at position ``pos`` (a 0-d long tensor, graph-static).

    q, k, v (B, H, 1, D): the new token's query, key and value; ``q * scale`` is rounded to q's dtype
    as torch's product would be (the kernels scale it as they read it: no pass of its own); ``k``/``v``
    are written into slot ``pos - P`` of ``k_new``/``v_new`` (B, H, N, D). ``k_prompt``/
    ``v_prompt`` (B / rep, H, P, D): the prompt's keys and values, row ``i // rep`` serving
    sequence i. Keys are the prompt's P slots, the generated slots before ``pos - P`` and
    the new token."""
    b, h, _, d = q.shape
    rep = b // k_prompt.size(0)
    prefix_len = k_prompt.size(2)
    if not available(q.device):
        return _reference(q if scale == 1.0 else q * scale, k, v, k_prompt, v_prompt, k_new, v_new, pos, rep)
    out = torch.empty_like(q)
    d1, d2 = dim_parts(d, SPLIT_D)
    part = _prompt_part(q, k_prompt, v_prompt, rep, d1, d2, scale) if shares_prompt(rep, d1, d2) else None
    strides = [t.stride(i) for t in (q, k, v, out) for i in (0, 1)]
    strides += [t.stride(i) for t in (k_prompt, v_prompt, k_new, v_new) for i in (0, 1, 2)]
    args = [q, k, v, k_prompt, v_prompt, k_new, v_new, out, pos, out if part is None else part]
    if HEADS > 1 and HEADS & (HEADS - 1) == 0 and h % HEADS == 0:  # (Triton: powers of two)
        _decode_heads_kernel[(b, h // HEADS)](*args, *strides, rep, prefix_len, d, scale, CHUNK=CHUNK, D1=d1, D2=d2,
                                              HP=HEADS, PART=part is not None, num_warps=HEADS_WARPS)  # fmt: skip
        return out
    _decode_kernel[(b, h)](*args, *strides, rep, prefix_len, d, scale, CHUNK=CHUNK, D1=d1, D2=d2,
                           PART=part is not None, num_warps=NUM_WARPS)  # fmt: skip
    return out


def prefill_attention(q, k, v, k_prompt, v_prompt, scale: float = 1.0) -> torch.Tensor:
    """Attention of the prompt rows (B, H, T, D: causal; or the last row alone, T = 1 in ``q``: it sees
    every row) with ``q * scale`` rounded as torch's product; the rows' keys and values written into
    ``k_prompt``/``v_prompt`` (B, H, T, D). One Triton kernel where ``prefills``, else SDPA and two copies."""
    b, h, t, d = k.shape
    if prefills(q, k, v, k_prompt, v_prompt):
        out = torch.empty(b, t, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, T, H, D) in memory
        strides = [x.stride(i) for x in (q, k, v, out, k_prompt, v_prompt) for i in (0, 1, 2)]
        # the head's dims in one power-of-two width (80 -> 128, masked): split as 64 + 16, the 16-bit products
        # of the 16-wide part came out wrong on an H200, and the kernel faulted at 2,048 x 32 programs
        with torch.cuda.device(q.device):
            _prefill_kernel[(b, h)](q, k, v, k_prompt, v_prompt, out, *strides, t, d, scale,
                                    BT=max(16, triton.next_power_of_2(t)), BD=triton.next_power_of_2(d),
                                    PRECISION=_precision(q.dtype), num_warps=PREFILL_WARPS)  # fmt: skip
        return out
    from captune.ops.packing import sdpa_without_cudnn

    k_prompt.copy_(k)
    v_prompt.copy_(v)
    causal = q.size(2) == t and t > 1
    with sdpa_without_cudnn():  # cuDNN builds a graph per new batch shape, at no gain on 30-odd rows
        return F.scaled_dot_product_attention(
            q if scale == 1.0 else q * scale, k.to(q.dtype), v.to(q.dtype), is_causal=causal, scale=1.0
        )


def prefills(q, k, v, k_prompt, v_prompt) -> bool:
    """Whether ``prefill_attention`` runs its kernel: ``PREFILL``, a GPU with Triton, every row's query,
    at most ``PREFILL_MAX_ROWS`` rows, heads of at least 16 dims in a tile that fits (below), unit strides
    along the dims, one dtype, and no autograd (the kernel has no backward)."""
    t, d = k.size(2), k.size(3)
    return (
        PREFILL
        and available(q.device)
        and not torch.is_grad_enabled()
        and q.size(2) == t
        and t <= PREFILL_MAX_ROWS
        and d >= 16
        # a tile of at most 32 KB an operand: up to 128 x 128 in 16 bits, 64 x 128 in float32 (what the GPU
        # tests run; larger tiles would ask for more shared memory than a block gets, and fail to launch)
        and max(16, triton.next_power_of_2(t)) * triton.next_power_of_2(d) * q.element_size() <= 32768
        and all(x.stride(3) == 1 for x in (q, k, v, k_prompt, v_prompt))
        and k_prompt.shape == k.shape
        and q.dtype == k.dtype == v.dtype
    )


def _precision(dtype: torch.dtype) -> str:
    """The tensor-core products' input precision: exact for float32 models, the inputs' own for 16 bits."""
    return "ieee" if dtype == torch.float32 else "tf32"


def shares_prompt(rep: int, d1: int, d2: int) -> bool:
    """Whether the prompt part goes through ``_prompt_kernel``: prompt rows shared by 2 to
    ``SHARED_MAX_ROWS`` sequences (SCST's K samples), with dims its tensor-core products take."""
    return SHARED and 1 < rep <= SHARED_MAX_ROWS and d1 >= 16 and (d2 == 1 or d2 >= 16)


def _prompt_part(q, k_prompt, v_prompt, rep: int, d1: int, d2: int, scale: float = 1.0) -> torch.Tensor:
    """The prompt part's online-softmax state (sequence, head, 2 + D) from ``_prompt_kernel``."""
    b, h, _, d = q.shape
    part = torch.empty(b, h, 2 + d, device=q.device, dtype=torch.float32)
    strides = [q.stride(0), q.stride(1)] + [t.stride(i) for t in (k_prompt, v_prompt) for i in (0, 1, 2)]
    rows = max(16, 1 << (rep - 1).bit_length())
    _prompt_kernel[(k_prompt.size(0), h)](q, k_prompt, v_prompt, part, *strides, rep, k_prompt.size(2), d, h, scale,
                                          CHUNK=SHARED_CHUNK, D1=d1, D2=d2, R=rows, PRECISION=_precision(q.dtype),
                                          num_warps=SHARED_WARPS)  # fmt: skip
    return part


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

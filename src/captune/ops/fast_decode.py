"""Greedy and sampled captioning for OPT-based BLIP-2 with a static KV cache and CUDA graphs.

``generate`` spends most of a short caption's time outside the matrix products
(cache bookkeeping, logits processors, kernel launches). For the common case
captune evaluates - greedy decoding, one shared prompt, no repetition penalty -
this module runs the same arithmetic with a preallocated cache: one prefill over
image tokens + prompt, then a single-token step that is captured once as a CUDA
graph and replayed. It calls the model's own modules (layer norms, projections,
LoRA-wrapped q/k, MLP), so adapters apply unchanged; a test checks the tokens
equal ``generate``'s on the CPU. ``SamplingOPT`` runs the same step for K samples per
image (self-critical training): the token choice (temperature, top-k/top-p, a seeded
generator) happens outside the graph, so one graph per batch shape serves every step.

On a GPU, beside the products (captioning at batch 2,048 on an H200: 1860.5 and 1876.4 images/s before on
two leases, 2011.1 and 2010.4 after on a third, bench/results/2026-12-02-h200-captioning-prefill-kernel.json):

* the prefill's attention is one Triton kernel that also fills the prompt's cache
  (``decode_attention.prefill_attention``), and its last layer runs past its keys and values for the
  last row only (no later layer reads the others; on the CPU its float32 logits then differ from the
  whole layer's by rounding, about 3e-6 on tiny OPTs, with the same tokens and golden values);
* a pre-norm layer's residual sums each run with the norm after them in one pass (``FUSED_NORMS``);
* q's scale is applied by the decode kernels as they read q, rounded as torch's product would be;
* the cache is not cleared first (the kernels read only the slots written), and the first decode step
  runs eagerly as the graph capture's warm-up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from captune.ops import decode_attention as attention
from captune.ops.decode_attention import decode_attention, prefill_attention
from captune.ops.mlp import feed_forward
from captune.ops.vision import add_norm

# A pre-norm decoder's residual sums, each with the layer norm after it, in one pass on a GPU
# (``ops.vision.add_norm``: the sum as torch rounds it, the norm in float32 by another summation order, so
# its 16-bit output may differ by one step); torch's two ops elsewhere, and with this off.
FUSED_NORMS = True


class GreedyOPT:
    """Batched greedy decoding of ``lm`` (an ``OPTForCausalLM``) from input embeddings."""

    def __init__(
        self,
        lm,
        batch: int,
        prompt_len: int,
        max_new: int,
        use_graph: bool | None = None,
        prompt_rows: int | None = None,
    ):
        self.lm = lm
        self.dec = lm.model.decoder
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.pre_norm = cfg.do_layer_norm_before
        self.batch, self.prompt_len, self.max_new = batch, prompt_len, max_new
        p = next(lm.parameters())
        self.device, self.dtype = p.device, self.dec.layers[0].self_attn.v_proj.weight.dtype
        # the cache in two parts: the prompt's slots, one row per prompt (``prompt_rows``: sequences
        # that share a prompt share its row), and the generated tokens' slots, one row per sequence
        layers, rows = len(self.dec.layers), prompt_rows or batch
        prompt_shape = (layers, rows, self.heads, prompt_len, self.head_dim)
        new_shape = (layers, batch, self.heads, max_new, self.head_dim)
        # the Triton kernels read only the slots written (the prompt's by the prefill, each generated one
        # before it is read), so on a GPU the cache is not cleared first (tens of GB at batch 2,048); the
        # reference path masks the whole cache, and a masked slot must still hold a number
        alloc = torch.empty if attention.available(self.device) else torch.zeros
        self.k_prompt = alloc(prompt_shape, device=self.device, dtype=self.dtype)
        self.v_prompt = alloc(prompt_shape, device=self.device, dtype=self.dtype)
        self.k_new = alloc(new_shape, device=self.device, dtype=self.dtype)
        self.v_new = alloc(new_shape, device=self.device, dtype=self.dtype)
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.graph = None
        self.static_token = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.static_pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.static_logits = None

    # -- the layers -------------------------------------------------------------
    def _positions(self, pos: torch.Tensor) -> torch.Tensor:
        emb = self.dec.embed_positions
        return F.embedding(pos + getattr(emb, "offset", 2), emb.weight)

    def _attend(self, layer_idx: int, attn, h: torch.Tensor, pos: torch.Tensor | None, last_only: bool = False):
        """The attention block's output for rows ``h`` (B, T, H); ``last_only`` (the prefill's last layer):
        every row's keys and values into the cache, the output for the last row only (B, 1, H)."""
        b, t, _ = h.shape
        rows = h[:, -1:] if last_only else h
        q = attn.q_proj(rows).view(b, rows.size(1), self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        kp, vp = self.k_prompt[layer_idx], self.v_prompt[layer_idx]
        if pos is None:  # prefill of the prompt rows: positions 0..t-1, causal (the last row sees them all)
            out = prefill_attention(q, k, v, kp, vp, attn.scaling)
        else:  # one new token at ``pos``, written into its slot; attends to every filled slot (q scaled there)
            out = decode_attention(q, k, v, kp, vp, self.k_new[layer_idx], self.v_new[layer_idx], pos, attn.scaling)
        out = out.transpose(1, 2).reshape(b, rows.size(1), self.heads * self.head_dim)
        return attn.out_proj(out)

    def _forward(self, hidden: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """The next-token logits (B, vocab) of the last row. In the prefill (``pos`` None) the last layer
        runs past its keys and values for the last row only: no later layer reads the other rows."""
        hidden = self._pre_norm_layers(hidden, pos) if self.pre_norm else self._post_norm_layers(hidden, pos)
        if getattr(self.dec, "project_out", None) is not None:
            hidden = self.dec.project_out(hidden)
        return self.lm.lm_head(hidden[:, -1])

    def _pre_norm_layers(self, hidden: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Pre-norm layers (every OPT but OPT-350m): each residual sum with the norm after it, the next
        layer's first or this layer's second (``FUSED_NORMS``); the decoder's final norm applied."""
        layers = self.dec.layers
        final = getattr(self.dec, "final_layer_norm", None)
        x = layers[0].self_attn_layer_norm(hidden)
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            trim = last and pos is None
            attended = self._attend(i, layer.self_attn, x, pos, last_only=trim)
            if trim:
                hidden = hidden[:, -1:].contiguous()
            hidden, x = _add_norm(attended, hidden, layer.final_layer_norm)
            out = feed_forward(layer, x)
            after = final if last else layers[i + 1].self_attn_layer_norm
            if after is None:
                return hidden + out
            hidden, x = _add_norm(out, hidden, after)
        return x

    def _post_norm_layers(self, hidden: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Post-norm layers (OPT-350m): each sublayer's norm after its residual sum."""
        layers = self.dec.layers
        for i, layer in enumerate(layers):
            trim = i == len(layers) - 1 and pos is None
            attended = self._attend(i, layer.self_attn, hidden, pos, last_only=trim)
            if trim:
                hidden = hidden[:, -1:]
            hidden = layer.self_attn_layer_norm(hidden + attended)
            hidden = layer.final_layer_norm(hidden + feed_forward(layer, hidden))
        if getattr(self.dec, "final_layer_norm", None) is not None:
            hidden = self.dec.final_layer_norm(hidden)
        return hidden

    def _embed(self, token_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if getattr(self.dec, "project_in", None) is not None:
            token_embeds = self.dec.project_in(token_embeds)
        return token_embeds + self._positions(positions).to(token_embeds.dtype)

    def _step(self) -> torch.Tensor:
        tok = self.dec.embed_tokens(self.static_token).unsqueeze(1)
        hidden = self._embed(tok, self.static_pos.view(1))
        return self._forward(hidden, self.static_pos)

    # -- decoding ---------------------------------------------------------------
    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, *, eos_token_id: int, pad_token_id: int, min_new: int = 0) -> torch.Tensor:
        """New tokens for prompts given as embeddings (B, prompt_len, H); pads after EOS."""
        b, t, _ = embeds.shape
        assert b == self.batch and t == self.prompt_len
        hidden = self._embed(embeds, torch.arange(t, device=embeds.device))
        logits = self._forward(hidden, None)
        out = torch.full((b, self.max_new), pad_token_id, dtype=torch.long, device=embeds.device)
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        for n in range(self.max_new):
            if n < min_new:
                logits[:, eos_token_id] = float("-inf")
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out[:, n] = token
            done |= token == eos_token_id
            # every few steps, stop once all have ended (never before min_new: EOS is masked until then,
            # and skipping the check keeps the CPU free of waits on the GPU)
            if n == self.max_new - 1 or (n >= min_new and n % 4 == 3 and bool(done.all())):
                break
            self.static_token.copy_(token)
            self.static_pos.fill_(t + n)
            logits = self._replay(clone=False)  # read (argmax) before the next replay
        return out

    def _replay(self, clone: bool = True) -> torch.Tensor:
        """The next step's logits. The first call runs the step eagerly (its lazy initialisation is the
        capture's warm-up, and its logits are this step's) and then captures it; later calls replay the
        graph. Without ``clone`` the logits are the graph's own output, overwritten by the next replay."""
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            logits = self._step()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the cache is written once, above
                self.static_logits = self._step()
            return logits
        self.graph.replay()
        return self.static_logits.clone() if clone else self.static_logits


def _add_norm(a: torch.Tensor, h: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` for the residual sum ``s = h + a``: fused where ``FUSED_NORMS`` and ``add_norm`` apply."""
    if FUSED_NORMS:
        return add_norm(a, h, norm)
    s = h + a
    return s, norm(s)


class SamplingOPT(GreedyOPT):
    """K sampled captions per image: ``batch`` is images x K rows; each image is prefilled once."""

    def __init__(self, lm, images: int, k: int, prompt_len: int, max_new: int, use_graph: bool | None = None):
        super().__init__(lm, images * k, prompt_len, max_new, use_graph, prompt_rows=images)
        self.images, self.k = images, k

    @torch.no_grad()
    def sample(
        self,
        embeds: torch.Tensor,
        choose: Callable[[torch.Tensor, int], torch.Tensor],
        *,
        eos_token_id: int,
        pad_token_id: int,
        keep_logits: bool = False,
        min_new: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New tokens (images*K, max_new), row ``i*K + j`` sample j of image i; pads after EOS.

        ``choose(logits, n)`` picks step n's tokens from the raw logits (rows x vocab);
        with ``keep_logits`` the raw logits of every step come back too (rows, steps, vocab).
        ``min_new``: ``choose`` never ends a row before this step, so whether all rows have ended
        (a wait on the GPU) is not asked before it.
        """
        b, t, _ = embeds.shape
        assert b == self.images and t == self.prompt_len
        hidden = self._embed(embeds, torch.arange(t, device=embeds.device))
        logits = self._forward(hidden, None).repeat_interleave(self.k, 0)
        rows = self.batch
        out = torch.full((rows, self.max_new), pad_token_id, dtype=torch.long, device=embeds.device)
        kept = []
        done = torch.zeros(rows, dtype=torch.bool, device=embeds.device)
        for n in range(self.max_new):
            if keep_logits:
                kept.append(logits.float())
            token = choose(logits, n)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out[:, n] = token
            done |= token == eos_token_id
            if n == self.max_new - 1 or (n >= min_new and n % 4 == 3 and bool(done.all())):
                break
            self.static_token.copy_(token)
            self.static_pos.fill_(t + n)
            logits = self._replay()
        return out, (torch.stack(kept, 1) if keep_logits else None)

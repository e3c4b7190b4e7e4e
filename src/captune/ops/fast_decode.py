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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from captune.ops.decode_attention import decode_attention
from captune.ops.mlp import feed_forward
from captune.ops.packing import sdpa_without_cudnn


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
        self.k_prompt = torch.zeros(prompt_shape, device=self.device, dtype=self.dtype)
        self.v_prompt = torch.zeros(prompt_shape, device=self.device, dtype=self.dtype)
        self.k_new = torch.zeros(new_shape, device=self.device, dtype=self.dtype)
        self.v_new = torch.zeros(new_shape, device=self.device, dtype=self.dtype)
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.graph = None
        self.static_token = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.static_pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.static_logits = None

    # -- the layers -------------------------------------------------------------
    def _positions(self, pos: torch.Tensor) -> torch.Tensor:
        emb = self.dec.embed_positions
        return F.embedding(pos + getattr(emb, "offset", 2), emb.weight)

    def _attend(self, layer_idx: int, attn, h: torch.Tensor, pos: torch.Tensor | None, length: int | None):
        b, t, _ = h.shape
        q = (attn.q_proj(h) * attn.scaling).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        kp, vp = self.k_prompt[layer_idx], self.v_prompt[layer_idx]
        if pos is None:  # prefill of the prompt rows: positions 0..t-1, causal
            kp.copy_(k)
            vp.copy_(v)
            with sdpa_without_cudnn():  # cuDNN builds a graph per new batch shape, at no gain on 30-odd rows
                out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=1.0)
        else:  # one new token at ``pos``, written into its slot; attends to every filled slot
            out = decode_attention(q, k, v, kp, vp, self.k_new[layer_idx], self.v_new[layer_idx], pos)
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return attn.out_proj(out)

    def _forward(self, hidden: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        for i, layer in enumerate(self.dec.layers):
            residual = hidden
            h = layer.self_attn_layer_norm(hidden) if self.pre_norm else hidden
            hidden = residual + self._attend(i, layer.self_attn, h, pos, None)
            if not self.pre_norm:
                hidden = layer.self_attn_layer_norm(hidden)
            residual = hidden
            h = layer.final_layer_norm(hidden) if self.pre_norm else hidden
            h = feed_forward(layer, h)
            hidden = residual + h
            if not self.pre_norm:
                hidden = layer.final_layer_norm(hidden)
        if getattr(self.dec, "final_layer_norm", None) is not None:
            hidden = self.dec.final_layer_norm(hidden)
        if getattr(self.dec, "project_out", None) is not None:
            hidden = self.dec.project_out(hidden)
        return self.lm.lm_head(hidden[:, -1])

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
            logits = self._replay()
        return out

    def _replay(self) -> torch.Tensor:
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels (and lazy init) off the capture
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = self._step()
        self.graph.replay()
        return self.static_logits.clone()


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

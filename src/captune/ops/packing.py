"""Shared-prefix packing: every caption of an image trained against one image prefix.

An image with five references gives five training pairs whose first 32 positions
(the image tokens) are identical, and under causal attention their hidden states do
not depend on the caption. So each image's prefix is computed once and its captions
sit after it in separate slots that see the prefix and their own earlier tokens only,
at the positions they would have had alone. The loss and its gradient equal those of
the five pairs run separately (a test compares them), for about 40% of the tokens.

OPT decoders (learned absolute positions) run through captune's own layer loop; LLaMA decoders
(rotary positions) through their own forward, given the packed mask and each slot's position ids:
rotary attention depends only on the positions, so a caption placed after the shared prefix at
the positions it has alone attends exactly as alone (a test compares loss and gradients). Other
language models (T5) use ``ops.lm.lm_loss``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captune.model.family import opt_decoder
from captune.ops.batching import IGNORE, encode_texts, training_text
from captune.ops.lm import unwrap
from captune.ops.mlp import feed_forward


@dataclass
class PackedBatch:
    ids: torch.Tensor  # (G, K, T) caption slots, padded
    mask: torch.Tensor  # (G, K, T) 1 where a real token is
    labels: torch.Tensor  # (G, K, T) next-token targets within the slot, IGNORE elsewhere
    pairs: int = 0  # captions in the batch (counted on the CPU: no GPU sync per step)
    # Flat indices into (G, K, T-1) of the labelled positions and their targets, found on the
    # CPU: selecting them on the GPU with a boolean mask would wait for the GPU every step.
    keep: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __post_init__(self):
        if self.keep is None:
            target = self.labels[:, :, 1:]
            self.keep = (target != IGNORE).flatten().nonzero().squeeze(1)
            self.targets = target.flatten()[self.keep]

    def pinned(self) -> PackedBatch:
        """The batch in pinned host memory (made ahead of the step, by the thread that makes it)."""
        return PackedBatch(*(t.pin_memory() for t in (self.ids, self.mask, self.labels)), self.pairs,
                           self.keep.pin_memory(), self.targets.pin_memory())  # fmt: skip

    def to(self, device) -> PackedBatch:
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()  # an asynchronous copy: the CPU prepares the next batch meanwhile
            return t.to(device, non_blocking=True)

        return PackedBatch(
            move(self.ids), move(self.mask), move(self.labels), self.pairs, move(self.keep), move(self.targets)
        )


def pack_captions(tokenizer, captions: list[list[str]], *, prompt: str, max_text_tokens: int) -> PackedBatch:
    """Tokenize each image's captions into K slots of T tokens (labels masked as usual)."""
    texts = [training_text(c, prompt, tokenizer.eos_token) for caps in captions for c in caps]
    enc = encode_texts(
        tokenizer, texts, num_query_tokens=0, image_token_id=0, prompt=prompt, max_text_tokens=max_text_tokens
    )
    g, k, t = len(captions), max(len(c) for c in captions), enc.input_ids.size(1)
    ids = torch.full((g, k, t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((g, k, t), dtype=torch.long)
    labels = torch.full((g, k, t), IGNORE, dtype=torch.long)
    row = 0
    for gi, caps in enumerate(captions):
        n = len(caps)
        ids[gi, :n] = enc.input_ids[row : row + n]
        mask[gi, :n] = enc.attention_mask[row : row + n]
        labels[gi, :n] = enc.labels[row : row + n]
        row += n
    return PackedBatch(ids, mask, labels, sum(len(c) for c in captions))


@contextlib.contextmanager
def sdpa_without_cudnn():
    """SDPA may use any backend but cuDNN's. cuDNN builds a graph for each new input shape, and
    packed batches change shape with their longest caption: on an H100 that cost 2.5-3.8 s per
    new shape against 0.2 s for the memory-efficient kernel, at no better steady-state speed
    (bench/results/2026-11-27-h100-sdpa-backends.json)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def _attention_mask(q: int, slot_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (G, 1, L, L): prefix causal; each slot sees the prefix and itself, causally."""
    g, k, t = slot_mask.shape
    length = q + k * t
    dev = slot_mask.device
    pos = torch.arange(length, device=dev)
    slot = torch.where(pos < q, -1, (pos - q) // t)  # -1 for the prefix
    within = torch.where(pos < q, pos, (pos - q) % t)
    same_slot = slot.view(-1, 1) == slot.view(1, -1)
    causal = within.view(-1, 1) >= within.view(1, -1)
    allowed = (slot.view(1, -1) == -1) & ((slot.view(-1, 1) >= 0) | (pos.view(-1, 1) >= pos.view(1, -1)))
    allowed = allowed | (same_slot & causal & (slot.view(-1, 1) >= 0))
    real = torch.cat([torch.ones(g, q, dtype=torch.bool, device=dev), slot_mask.view(g, -1).bool()], dim=1)
    return (allowed.unsqueeze(0) & real.view(g, 1, length)).unsqueeze(1)


def packed_loss(model, features: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean next-token loss over every labelled caption token of the packed batch."""
    lm = unwrap(model).language_model
    if opt_decoder(lm) is None:
        return _packed_loss_rotary(lm, features, batch)
    g, k, t = batch.ids.shape
    q = features.size(1)
    hidden = packed_hidden(model, features, batch.ids, batch.mask)
    text = hidden[:, q:].reshape(g, k, t, -1)[:, :, :-1].reshape(g * k * (t - 1), -1)
    text = text.index_select(0, batch.keep)
    logits = lm.lm_head(decoder_output(lm.model.decoder, text)).float()
    return F.cross_entropy(logits, batch.targets)


def packed_hidden(model, prefix: torch.Tensor, ids: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """The OPT decoder layers' output (G, P + K*T, H), before its final norm, for G prefixes given as
    embeddings (G, P, H), each followed by K slots of T token ids (``ids``, ``slot_mask``: (G, K, T)).

    Each slot sees the prefix and its own earlier tokens only, at positions P..P+T-1 as if it were
    alone after the prefix; padding (``slot_mask`` 0) is never attended to. Cross-entropy packs the
    image tokens with each caption's prompt and text (``packed_loss``); SCST packs image tokens + prompt
    with each sampled continuation (``ops.scst``)."""
    lm = unwrap(model).language_model
    dec = lm.model.decoder
    g, k, t = ids.shape
    q = prefix.size(1)
    tok = dec.embed_tokens(ids.view(g, k * t))
    hidden = torch.cat([prefix.to(tok.dtype), tok], dim=1)
    dev = hidden.device
    positions = torch.cat([torch.arange(q, device=dev), q + torch.arange(t, device=dev).repeat(k)])
    emb = dec.embed_positions
    if dec.project_in is not None:
        hidden = dec.project_in(hidden)
    hidden = hidden + F.embedding(positions + getattr(emb, "offset", 2), emb.weight).to(hidden.dtype)
    mask = _attention_mask(q, slot_mask)
    with sdpa_without_cudnn():
        if _is_sharded(dec.layers[0]):  # FSDP units gather their weights in their own forward
            return _layer_forwards(dec, hidden, mask)
        return _layers(dec, hidden, mask, lm.config, model.training)


def decoder_output(dec, hidden: torch.Tensor) -> torch.Tensor:
    """What the OPT decoder applies after its layers (final norm, output projection), on any rows."""
    if dec.final_layer_norm is not None:
        hidden = dec.final_layer_norm(hidden)
    if dec.project_out is not None:
        hidden = dec.project_out(hidden)
    return hidden


def _packed_loss_rotary(lm, features: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``packed_loss`` for a LLaMA decoder: its own forward over the packed sequence, with the packed
    mask (additive, 4-D: HF uses it as given) and position ids restarting after the prefix in every
    slot, as in ``ops.lm.lm_loss``'s right-padded rows."""
    g, k, t = batch.ids.shape
    q = features.size(1)
    tok = lm.get_input_embeddings()(batch.ids.view(g, k * t))
    hidden = torch.cat([features.to(tok.dtype), tok], dim=1)
    dev = hidden.device
    positions = torch.cat([torch.arange(q, device=dev), q + torch.arange(t, device=dev).repeat(k)])
    mask = _attention_mask(q, batch.mask)
    additive = torch.zeros(mask.shape, dtype=hidden.dtype, device=dev).masked_fill(~mask, torch.finfo(hidden.dtype).min)
    with sdpa_without_cudnn():
        out = lm.model(
            inputs_embeds=hidden, attention_mask=additive, position_ids=positions.expand(g, -1), use_cache=False
        )
    text = out.last_hidden_state[:, q:].reshape(g, k, t, -1)[:, :, :-1].reshape(g * k * (t - 1), -1)
    logits = lm.lm_head(text.index_select(0, batch.keep)).float()
    return F.cross_entropy(logits, batch.targets)


def _layer_forwards(dec, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoder layers through their own ``forward`` (the same arithmetic as ``_layers``), with the
    packed mask as an additive one, which both eager and SDPA attention take."""
    additive = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
    additive = additive.masked_fill(~mask, torch.finfo(hidden.dtype).min)
    for layer in dec.layers:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _layers(dec, hidden: torch.Tensor, mask: torch.Tensor, config, training: bool) -> torch.Tensor:
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    pre_norm = config.do_layer_norm_before
    b, length, _ = hidden.shape
    for layer in dec.layers:
        attn = layer.self_attn
        residual = hidden
        h = layer.self_attn_layer_norm(hidden) if pre_norm else hidden
        qs = (attn.q_proj(h) * attn.scaling).view(b, length, heads, head_dim).transpose(1, 2)
        ks = attn.k_proj(h).view(b, length, heads, head_dim).transpose(1, 2)
        vs = attn.v_proj(h).view(b, length, heads, head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=1.0, dropout_p=attn.dropout if training else 0.0
        )
        a = attn.out_proj(a.transpose(1, 2).reshape(b, length, heads * head_dim))
        hidden = residual + F.dropout(a, p=layer.dropout, training=training)
        if not pre_norm:
            hidden = layer.self_attn_layer_norm(hidden)
        residual = hidden
        h = layer.final_layer_norm(hidden) if pre_norm else hidden
        h = feed_forward(layer, h)
        hidden = residual + F.dropout(h, p=layer.dropout, training=training)
        if not pre_norm:
            hidden = layer.final_layer_norm(hidden)
    return hidden


def _is_sharded(layer: torch.nn.Module) -> bool:
    """True while ``layer``'s weights are FSDP shards (not gathered)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in layer.parameters())

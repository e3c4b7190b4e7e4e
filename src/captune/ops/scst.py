"""Self-critical sequence training (SCST): the objective's arithmetic, with no training loop.

Per image K captions are sampled (``ops.sampling``) and rewarded (CIDEr-D,
``evaluation.cider``); the baseline is the mean reward of the image's other K-1
samples ("new SCST", Luo 2020; the advantages of an image then sum to zero) or the
greedy caption's reward (Rennie et al. 2017). The loss is REINFORCE on the sampled
tokens' log-probabilities from a teacher-forced forward of the language model on the
cached image features; positions after each caption's EOS are masked out.

Normalisation (``normalize``):

- ``"sequence"`` (default): ``-mean_i(A_i * sum_t log p_it)``. Its gradient is exactly
  the REINFORCE estimate of the gradient of the mean expected reward per caption, so
  the step size does not depend on caption length; under DDP the per-process means
  average to the global one, as in cross-entropy training.
- ``"token"``: ``-sum_i(A_i * sum_t log p_it) / n_tokens`` with ``n_tokens`` the batch's
  sampled tokens (self-critical.pytorch's ``RewardCriterion``). Same direction, scaled by
  1 / mean length, so the effective learning rate drifts as captions change length;
  pass ``n_tokens`` (the count over all processes) to keep it global under DDP.

Dividing each caption by its own length is not offered: it biases the gradient
(short captions with negative advantage are pushed down harder than long ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from captune.model.family import can_pack, is_encoder_decoder
from captune.ops.batching import IGNORE
from captune.ops.lm import embed_with_features, unwrap
from captune.ops.packing import decoder_output, packed_hidden
from captune.ops.sampling import SamplingSpec, warp

Normalize = Literal["sequence", "token"]


@dataclass
class TokenLogprobs:
    """Per-position values of the sampled tokens (zero where ``mask`` is False)."""

    logprobs: torch.Tensor  # (N, T) log p of each sampled token, with gradient
    entropy: torch.Tensor | None  # (N, T) entropy of the model's distribution there, or None


# Vocabulary-sized float32 tensors alive at once in ``sequence_logprobs`` (about 256 MB each): the rows'
# logits are taken this many elements at a time, so 25,600 sampled tokens x 50,272 do not need 5 GB apiece.
LOGIT_CHUNK_ELEMENTS = 2**26


def sequence_logprobs(
    model,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: bool = False,
    spec: SamplingSpec | None = None,
    pack: bool = True,
    positions: torch.Tensor | None = None,
) -> TokenLogprobs:
    """Teacher-forced log-probs of sampled ``tokens`` (images*K, T) given each image's features.

    ``features`` (images, Q, H) and the generation prompt ``input_ids``/``attention_mask``
    (images, P; ``batching.generation_prompt``) are per image; row ``i*K + j`` of
    ``tokens`` and ``mask`` is sample j of image i (``sampling.Samples``).

    With ``pack`` (and a model ``packs_samples`` accepts) each image's prefix (image tokens +
    prompt) runs once with its K continuations packed after it (``packing.packed_hidden``),
    about half the tokens of running each sample with its own copy of the prefix; the values
    and their gradients equal the unpacked path's (tests/test_scst.py). The vocabulary
    projection runs only at the sampled positions, ``LOGIT_CHUNK_ELEMENTS`` / vocabulary of them
    at a time, each chunk's logits recomputed in the backward instead of kept.

    With ``spec``, the log-probs (and entropy) are those of the distribution the sampler drew
    from (its temperature, top-k and top-p applied to the logits, ``sampling.warp``; its
    ``min_new_tokens`` is not), so that REINFORCE is on-policy for that distribution; greedy
    decoding of it is greedy decoding of the model. Without, they are the model's own.

    ``positions``: the flat indices of ``mask``'s True entries (``sampled_positions``), found by the
    caller from a copy on the CPU; then nothing here waits for the GPU (the prompt given on the CPU
    too), and the caller can do CPU work (SCST's rewards) while the forward runs. Without, they are
    found here, one wait.
    """
    blip = unwrap(model)
    if positions is None:
        positions = sampled_positions(mask)
    pack = pack and packs_samples(blip, attention_mask)  # read where it is: no wait for a mask on the CPU
    dev = features.device  # (from the CPU: staged at once, no wait for the queued work)
    input_ids, attention_mask = input_ids.to(dev, non_blocking=True), attention_mask.to(dev, non_blocking=True)
    k = tokens.size(0) // features.size(0)
    if k * features.size(0) != tokens.size(0):
        raise ValueError("tokens must hold the same number of samples for every image")
    lm = blip.language_model
    if pack:
        rows, head = _packed_rows(model, blip, features, input_ids, tokens, mask, k, positions), _opt_head(lm)
    else:
        rows, head = _unpacked_rows(blip, features, input_ids, attention_mask, tokens, mask, k, positions)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // lm.config.get_text_config().vocab_size)
    lp, ent = _token_values(head, rows, tokens.flatten().index_select(0, positions), spec, entropy, chunk)
    return TokenLogprobs(
        _scatter(lp, positions, tokens.shape), _scatter(ent, positions, tokens.shape) if entropy else None
    )


def sampled_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``mask``'s True entries (on ``mask``'s device; a wait when that is a GPU)."""
    return mask.flatten().nonzero().squeeze(1)


def _scatter(values: torch.Tensor, positions: torch.Tensor, shape) -> torch.Tensor:
    """``values`` at flat ``positions`` of a zero tensor of ``shape`` (differentiable; no wait)."""
    return values.new_zeros(shape.numel()).index_put((positions,), values).view(shape)


def _select(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Entries (N, T, ...) at flat (N*T) ``positions`` (no copy of the rest, no wait)."""
    t = rows.size(1)
    return rows[positions // t, positions % t]


def packs_samples(blip, attention_mask: torch.Tensor) -> bool:
    """Whether ``sequence_logprobs`` packs: an OPT decoder (``family.can_pack``) and a prompt without
    padding (one prompt for every image has none; the check reads the mask, one wait on the GPU)."""
    blip = unwrap(blip)
    if is_encoder_decoder(blip) or not can_pack(blip.language_model):
        return False
    return bool(attention_mask.all())


def _packed_rows(model, blip, features, input_ids, tokens, mask, k: int, positions) -> torch.Tensor:
    """Hidden states (sampled tokens, H) predicting each sampled token, from the packed forward."""
    prefix = embed_with_features(blip, input_ids, features)  # (images, P, H)
    g, p = prefix.shape[:2]
    t = tokens.size(1)
    s = max(t - 1, 1)  # a slot's last token predicts nothing (one slot token all the same when T is 1)
    slots, slot_mask = tokens.view(g, k, t)[:, :, :s].contiguous(), mask.view(g, k, t)[:, :, :s].contiguous()
    hidden = packed_hidden(model, prefix, slots, slot_mask)
    first = hidden[:, p - 1 : p].unsqueeze(1).expand(g, k, 1, hidden.size(-1))  # the prefix predicts token 0
    rest = hidden[:, p:].reshape(g, k, s, -1)[:, :, : t - 1]
    return _select(torch.cat([first, rest], dim=2).reshape(g * k, t, -1), positions)


def _opt_head(lm):
    dec = lm.model.decoder
    return lambda h: lm.lm_head(decoder_output(dec, h))


def _unpacked_rows(blip, features, input_ids, attention_mask, tokens, mask, k: int, positions):
    """Each sample run with its own copy of the prefix: (rows, head) with ``head`` mapping rows to
    logits (the encoder-decoder and other models' rows are logits already)."""
    feats = features.repeat_interleave(k, 0)
    ids, attn = input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0)
    prompt = embed_with_features(blip, ids, feats)
    lm = blip.language_model
    if is_encoder_decoder(blip):
        labels = tokens.masked_fill(~mask, IGNORE)
        dec_ids = lm.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = lm(inputs_embeds=prompt, attention_mask=attn, decoder_input_ids=dec_ids).logits
        return _select(logits, positions), _identity
    # sampled tokens are embedded on their own: one that happens to be the image token stays a token
    embeds = torch.cat([prompt, blip.get_input_embeddings()(tokens)], dim=1)
    full_attn = torch.cat([attn, mask.to(attn.dtype)], dim=1)
    p, t = ids.size(1), tokens.size(1)
    body = getattr(lm, "model", None)
    if body is not None and hasattr(lm, "lm_head") and hasattr(body, "decoder"):
        hidden = body(inputs_embeds=embeds, attention_mask=full_attn).last_hidden_state
        return _select(hidden[:, p - 1 : p - 1 + t], positions), lm.lm_head
    return _select(
        lm(inputs_embeds=embeds, attention_mask=full_attn).logits[:, p - 1 : p - 1 + t], positions
    ), _identity


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _token_values(head, rows: torch.Tensor, chosen: torch.Tensor, spec, entropy: bool, chunk: int):
    """Log-prob of each row's chosen token (and the entropy there), ``chunk`` rows at a time.

    Under autograd each chunk is checkpointed: only its rows are kept, and its logits are
    recomputed in the backward, so one chunk's vocabulary-sized tensors are alive at a time
    (the same arithmetic, row by row, as taking all rows at once)."""

    def values(h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = head(h)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        if spec is not None and spec.temperature > 0:
            logits = warp(logits, spec.min_new_tokens, spec, eos_token_id=-1)  # top-k / top-p: -inf outside
        logsm = torch.log_softmax(logits, dim=-1)
        lp = logsm.gather(1, c.unsqueeze(1)).squeeze(1)
        if not entropy:
            return (lp,)
        finite = logsm.masked_fill(torch.isinf(logsm), 0.0)  # tokens the warp removed: p = 0, no 0 * inf
        return lp, -(logsm.exp() * finite).sum(-1)

    keep = torch.is_grad_enabled() and rows.requires_grad
    parts = []
    for i in range(0, rows.size(0), chunk):
        h, c = rows[i : i + chunk], chosen[i : i + chunk]
        parts.append(checkpoint(values, h, c, use_reentrant=False) if keep else values(h, c))
    if not parts:  # no sampled token at all
        parts.append(values(rows, chosen))
    lp = torch.cat([p[0] for p in parts])
    return lp, (torch.cat([p[1] for p in parts]) if entropy else None)


def baseline(
    rewards: torch.Tensor, kind: Literal["mean_others", "greedy"] = "mean_others", greedy: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample baseline (images, K): the mean of the image's other K-1 rewards, or its greedy reward."""
    if kind == "greedy":
        if greedy is None or greedy.shape != rewards.shape[:1]:
            raise ValueError("the greedy baseline needs one greedy reward per image")
        return greedy.unsqueeze(1).expand_as(rewards).to(rewards.dtype)
    if kind != "mean_others":
        raise ValueError(f"unknown SCST baseline {kind!r}")
    k = rewards.size(1)
    if k < 2:
        raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def advantages(rewards: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Reward minus baseline, flattened to one value per sampled row (image-major, as the samples)."""
    return (rewards - base).reshape(-1)


def kl_to_start(logprobs: torch.Tensor, start_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || start) estimate on the sampled tokens: exp(d) - d - 1, d = start - policy.

    The "k3" estimator (Schulman 2020): non-negative and unbiased for tokens sampled from
    the policy. ``start_logprobs`` comes from the same forward with the starting adapter
    (e.g. PEFT's ``disable_adapter()`` for the base model), without gradient.
    """
    d = (start_logprobs.detach() - logprobs).masked_fill(~mask, 0.0)
    return (torch.exp(d) - d - 1.0) * mask


def policy_loss(
    token: TokenLogprobs,
    mask: torch.Tensor,
    adv: torch.Tensor,
    *,
    normalize: Normalize = "sequence",
    n_tokens: float | torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """REINFORCE loss -(A * sum of sampled log-probs), masked; minus an entropy bonus, plus a KL penalty.

    The bonus and the penalty are means over the sampled tokens (``n_tokens`` if given).
    """
    maskf = mask.to(token.logprobs.dtype)
    count = maskf.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=maskf.dtype, device=maskf.device)
    count = count.clamp_min(1.0)
    seq_logp = (token.logprobs * maskf).sum(1)
    weighted = adv.detach().to(seq_logp.dtype) * seq_logp
    if normalize == "sequence":
        loss = -weighted.mean()
    elif normalize == "token":
        loss = -weighted.sum() / count
    else:
        raise ValueError(f"unknown normalisation {normalize!r}")
    if entropy_coef:
        if token.entropy is None:
            raise ValueError("an entropy bonus needs sequence_logprobs(..., entropy=True)")
        loss = loss - entropy_coef * (token.entropy * maskf).sum() / count
    if kl_coef:
        if kl is None:
            raise ValueError("a KL penalty needs kl_to_start(...)")
        loss = loss + kl_coef * (kl * maskf).sum() / count
    return loss


def statistics(
    rewards: torch.Tensor,
    base: torch.Tensor,
    mask: torch.Tensor,
    token: TokenLogprobs | None = None,
    kl: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What an SCST step logs, as detached 0-dim tensors (call ``.item()`` when writing the log,
    so a step does not wait on the GPU): reward, baseline, advantage spread, caption length (tokens, EOS
    included), and entropy / KL per token when given."""
    adv = (rewards - base).detach()
    maskf = mask.float()
    count = maskf.sum().clamp_min(1.0)
    out = {
        "reward_mean": rewards.detach().float().mean(),
        "baseline_mean": base.detach().float().mean(),
        "advantage_std": adv.float().std(unbiased=False),
        "caption_length_mean": maskf.sum(1).mean(),
    }
    if token is not None and token.entropy is not None:
        out["entropy_mean"] = (token.entropy.detach() * maskf).sum() / count
    if kl is not None:
        out["kl_mean"] = (kl.detach() * maskf).sum() / count
    return out

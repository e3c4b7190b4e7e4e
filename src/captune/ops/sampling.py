"""K sampled captions per image from cached image features (the sampling half of SCST).

OPT language models go through the static-cache decoder (``fast_decode.SamplingOPT``:
each image prefilled once, its K rows decoded together, the step a CUDA graph on a
GPU); everything else (FlanT5, quantized layers) through HF ``generate(do_sample=True,
num_return_sequences=K)``. The token choice is transformers' own warpers in
``generate``'s order (minimum length, temperature, top-k, top-p; each only when set) and
one multinomial draw per step with the caller's generator (``draw``: ``torch.multinomial``'s
arithmetic without its waits on the GPU), so a run is reproducible from its seed;
temperature 0 is greedy decoding.

Sample in eval mode (no LoRA dropout): the CUDA graph captures the modules as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from captune.model.family import can_fast_decode, is_encoder_decoder
from captune.ops.batching import generation_prompt
from captune.ops.fast_decode import SamplingOPT
from captune.ops.generation import tidy_generated
from captune.ops.lm import embed_with_features, generate_from_features, unwrap


@dataclass(frozen=True)
class SamplingSpec:
    """How captions are sampled: K per image, temperature (0 = greedy), optional top-k / top-p."""

    k: int = 5
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: {self}")


@dataclass
class Samples:
    """Sampled captions; row ``i*K + j`` is sample j of image i."""

    tokens: torch.Tensor  # (images*K, max_new_tokens) long, pad_token_id after EOS
    mask: torch.Tensor  # same shape, bool: the sampled tokens up to and including EOS
    captions: list[str]  # decoded, special tokens and the prompt removed


def warp(logits: torch.Tensor, step: int, spec: SamplingSpec, eos_token_id: int) -> torch.Tensor:
    """Step ``step``'s logits as ``generate(do_sample=True)`` samples from them (float32; float64 stays float64)."""
    scores = logits if logits.dtype == torch.float64 else logits.float()
    if step < spec.min_new_tokens:
        scores = scores.clone() if scores is logits else scores  # ``float()`` copied already
        scores[:, eos_token_id] = float("-inf")
    if spec.temperature == 0:
        return scores
    if spec.temperature != 1.0:
        scores = TemperatureLogitsWarper(spec.temperature)(None, scores)
    if spec.top_k:
        scores = TopKLogitsWarper(spec.top_k)(None, scores)
    if spec.top_p < 1.0:
        scores = TopPLogitsWarper(spec.top_p)(None, scores)
    return scores


def choose(
    logits: torch.Tensor, step: int, spec: SamplingSpec, eos_token_id: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a multinomial draw from the warped logits."""
    scores = warp(logits, step, spec, eos_token_id)
    if spec.temperature == 0:
        return scores.argmax(-1)
    return draw(torch.softmax(scores, dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row drawn from ``probs`` (rows, vocab): ``torch.multinomial(probs, 1)``'s own
    arithmetic (argmax of p / q with q ~ Exp(1), the same draws from ``generator``), without its two
    validity checks, each a wait on the GPU (``.item()``) that would stall every sampling step.
    tests/test_sampling.py compares the two token for token."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def sequence_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True up to and including each row's first EOS (the whole row when it has none)."""
    is_eos = (tokens == eos_token_id).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS seen strictly before this position
    return before == 0


@torch.no_grad()
def sample_captions(model, tokenizer, features: torch.Tensor, spec: SamplingSpec, **options) -> Samples:
    """``spec.k`` sampled captions for each image of ``features`` (images, query tokens, hidden):
    ``sample_tokens`` (``options`` are its keywords: prompt, generator, decoders, fast), decoded.

    Pass the same ``decoders`` dict on every call of a training run: it holds one
    static-cache decoder (and CUDA graph) per batch shape, reused across steps.
    """
    tokens, mask = sample_tokens(model, tokenizer, features, spec, **options)
    captions = decode_samples(tokenizer, tokens, options.get("prompt", ""), unwrap(model))
    return Samples(tokens=tokens, mask=mask, captions=captions)


@torch.no_grad()
def sample_tokens(
    model,
    tokenizer,
    features: torch.Tensor,
    spec: SamplingSpec,
    *,
    prompt: str = "",
    generator: torch.Generator | None = None,
    decoders: dict | None = None,
    fast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec.k`` sampled token rows per image (row ``i*K + j`` sample j of image i), pad after EOS, and
    their mask, on the device and not decoded: nothing here waits for the GPU, so the caller can queue
    the next work (SCST's policy forward) while the samples are drawn."""
    blip = unwrap(model)
    seq2seq = is_encoder_decoder(blip)
    n = features.size(0)
    ids = generation_prompt(
        tokenizer,
        n,
        num_query_tokens=blip.config.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        prompt=prompt,
        seq2seq=seq2seq,
    )
    input_ids, attention = ids.input_ids.to(features.device), ids.attention_mask.to(features.device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if fast and not seq2seq and can_fast_decode(blip.language_model) and bool(ids.attention_mask.all()):
        decoders = {} if decoders is None else decoders
        key = (n, spec.k, input_ids.size(1), spec.max_new_tokens)
        if key not in decoders:
            decoders[key] = SamplingOPT(blip.language_model, n, spec.k, input_ids.size(1), spec.max_new_tokens)
        embeds = embed_with_features(blip, input_ids, features)
        tokens, _ = decoders[key].sample(
            embeds,
            lambda logits, step: choose(logits, step, spec, eos, generator),
            eos_token_id=eos,
            pad_token_id=pad,
            min_new=spec.min_new_tokens,
        )
    else:
        tokens = _generate_samples(model, features, input_ids, attention, spec, tokenizer, generator, seq2seq)
    mask = sequence_mask(tokens, eos)
    return tokens.masked_fill(~mask, pad), mask


def decode_samples(tokenizer, tokens: torch.Tensor | list, prompt: str, blip) -> list[str]:
    """Sampled token rows (pad after EOS) as captions: special tokens and the prompt removed."""
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [tidy_generated(t, "" if is_encoder_decoder(blip) else prompt) for t in texts]


def _generate_samples(model, features, input_ids, attention, spec, tokenizer, generator, seq2seq) -> torch.Tensor:
    """HF ``generate`` with sampling; its RNG is seeded from ``generator`` so runs repeat."""
    kwargs = {
        "max_new_tokens": spec.max_new_tokens,
        "min_new_tokens": spec.min_new_tokens,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "num_return_sequences": spec.k,
    }
    if spec.temperature == 0:
        kwargs |= {"do_sample": False, "num_beams": 1}
    else:
        kwargs |= {"do_sample": True, "temperature": spec.temperature, "top_k": spec.top_k, "top_p": spec.top_p}
    where = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=where).item())
    devices = [features.device] if features.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = generate_from_features(model, features, input_ids, attention, **kwargs)
    if seq2seq:
        out = out[:, 1:]  # the decoder start token
    if out.size(1) < spec.max_new_tokens:
        fill = torch.full((out.size(0), spec.max_new_tokens - out.size(1)), tokenizer.pad_token_id, dtype=out.dtype)
        out = torch.cat([out, fill.to(out.device)], dim=1)
    return out

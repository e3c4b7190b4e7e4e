"""Batched captioning from images or cached image features."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from captune.config import EvalConfig
from captune.model.family import can_fast_decode, is_encoder_decoder
from captune.ops.batching import generation_prompt
from captune.ops.fast_decode import GreedyOPT
from captune.ops.features import image_features
from captune.ops.lm import embed_with_features, generate_from_features, unwrap


def use_fast_path(blip, cfg: EvalConfig) -> bool:
    """Greedy, no repetition penalty, an OPT language model: the static-cache decoder applies."""
    return cfg.fast and cfg.num_beams == 1 and cfg.repetition_penalty == 1.0 and can_fast_decode(blip.language_model)


def generation_kwargs(cfg: EvalConfig, tokenizer) -> dict:
    kwargs = {
        "max_new_tokens": cfg.max_new_tokens,
        "min_new_tokens": cfg.min_new_tokens,
        "num_beams": cfg.num_beams,
        "do_sample": False,
        "repetition_penalty": cfg.repetition_penalty,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.num_beams > 1:
        kwargs["length_penalty"] = cfg.length_penalty
    if cfg.static_cache:  # the same tokens, preallocated: bench/instructblip_gpu.py times both
        kwargs["cache_implementation"] = "static"
    return kwargs


def tidy_generated(text: str, prompt: str = "") -> str:
    """A decoded generation as a caption: whitespace collapsed, the prompt it repeats removed.
    (``data.prepare.clean_caption`` is the reference side's: whitespace only.)"""
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :].strip()
    return text


@torch.no_grad()
def caption_features(
    model, tokenizer, features: torch.Tensor, cfg: EvalConfig, prompt: str = "", decoders: dict | None = None
) -> list[str]:
    """Captions for precomputed image features, ``cfg.batch_size`` images at a time.

    Greedy decoding of an OPT model goes through the static-cache decoder
    (``fast_decode``); everything else through ``generate``. One decoder (and one
    CUDA graph) serves every full batch of a call; it is dropped at the end so its
    KV cache does not outlive the call - unless the caller passes ``decoders`` to keep
    across calls (a stream of chunks): then every batch is ``cfg.batch_size`` images, a
    short one padded, so one decoder serves them all. On a GPU a batch's tokens are
    copied to the host and turned into text while the next batch is being generated.
    """
    blip = unwrap(model)
    fast = use_fast_path(blip, cfg)
    seq2seq = is_encoder_decoder(blip)
    kwargs = generation_kwargs(cfg, tokenizer)
    shared = decoders is not None
    decoders = {} if decoders is None else decoders
    prompts: dict[int, object] = {}  # one tokenized prompt per batch size
    captions: list[str] = []
    pending: list[tuple[torch.Tensor, torch.cuda.Event | None, int]] = []
    total, size = features.size(0), cfg.batch_size
    if fast and total and not shared:  # equal batches: one decoder shape, one CUDA graph capture per call
        size = math.ceil(total / math.ceil(total / size))

    def to_text(tokens: torch.Tensor, ready, real: int) -> None:
        if ready is not None:
            ready.synchronize()  # this batch's copy only; the GPU goes on with the next batch
        texts = tokenizer.batch_decode(tokens[:real].tolist(), skip_special_tokens=True)
        captions.extend(tidy_generated(t, "" if seq2seq else prompt) for t in texts)

    for start in range(0, total, size):
        feats = features[start : start + size]
        real = feats.size(0)
        if fast and (start or shared) and real < size:  # a short last batch is padded to the shape in use
            feats = torch.cat([feats, feats[-1:].expand(size - real, *feats.shape[1:])])
        n = feats.size(0)
        if n not in prompts:
            prompts[n] = generation_prompt(
                tokenizer,
                n,
                num_query_tokens=blip.config.num_query_tokens,
                image_token_id=blip.config.image_token_index,
                prompt=prompt,
                seq2seq=seq2seq,
            )
        ids = prompts[n]
        device = feats.device
        unpadded = bool(ids.attention_mask.all())  # checked on the CPU: no GPU sync
        input_ids, mask = ids.input_ids.to(device), ids.attention_mask.to(device)
        if fast and unpadded:
            new = _fast_greedy(blip, decoders, feats, input_ids, cfg, tokenizer)
        else:
            new = generate_from_features(model, feats, input_ids, mask, **kwargs)
        ready = None
        if new.device.type == "cuda":
            host = torch.empty(new.shape, dtype=new.dtype, pin_memory=True)
            host.copy_(new, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            new = host
        for done in pending:
            to_text(*done)
        pending = [(new, ready, real)]
    for done in pending:
        to_text(*done)
    return captions


def _fast_greedy(blip, decoders: dict, feats, input_ids, cfg: EvalConfig, tokenizer) -> torch.Tensor:
    b, t = input_ids.shape
    dec = decoders.get(b)
    if dec is None or dec.prompt_len != t:
        dec = decoders[b] = GreedyOPT(blip.language_model, b, t, cfg.max_new_tokens)
    embeds = embed_with_features(blip, input_ids, feats)
    return dec.generate(
        embeds,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        min_new=cfg.min_new_tokens,
    )


VISION_BATCH = 128  # images per vision-tower call: on an H200 ~954 images/s at 64 and 128, 928 at 256
PIECE_BATCHES = 4  # decoder batches of features held at a time


def caption_images(
    model,
    processor,
    images: Sequence[bytes],
    cfg: EvalConfig,
    prompt: str = "",
    device: torch.device | None = None,
    decoders: dict | None = None,
) -> list[str]:
    """Captions for encoded images: the features of a few decoder batches at a time, then batched
    generation. The features' own batches are at most ``VISION_BATCH`` images (the vision tower's
    pace does not grow past it, while the decoder's does up to thousands), and one features call over
    the piece lets each batch's JPEG decoding overlap the previous batch on the GPU. ``prompt`` is
    InstructBLIP's instruction as well (its Q-Former reads it). ``decoders``: as for
    ``caption_features``, kept by a caller that captions a stream of chunks."""
    out: list[str] = []
    piece = PIECE_BATCHES * cfg.batch_size
    for start in range(0, len(images), piece):
        feats = image_features(
            model,
            processor,
            images[start : start + piece],
            batch_size=min(cfg.batch_size, VISION_BATCH),
            device=device,
            instruction=prompt,
        )
        out.extend(caption_features(model, processor.tokenizer, feats, cfg, prompt, decoders))
    return out

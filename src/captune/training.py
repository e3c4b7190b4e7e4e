"""The LoRA training loop: masked labels, cached features, validation, best-adapter choice.

The loop trains on frozen image features (see ``features.py``) whenever only the
language model carries adapters, which is every LoRA preset captune has. Each
validation computes the loss and the CIDEr of generated captions on the
validation split; the adapter kept is the best by ``train.select``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captune.batching import encode_texts, training_text
from captune.config import Config
from captune.data.prepare import Example
from captune.features import image_features, lm_loss, unwrap
from captune.generation import caption_features
from captune.packing import pack_captions, packed_loss
from captune.packing import supported as packing_supported


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    samples_per_s: float = 0.0
    seconds: float = 0.0


def training_pairs(examples: list[Example], mode: str, rng: random.Random) -> list[tuple[int, str]]:
    """(image index, caption) pairs for one epoch."""
    if mode == "all":
        return [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
    if mode == "first":
        return [(i, ex.captions[0]) for i, ex in enumerate(examples)]
    return [(i, rng.choice(ex.captions)) for i, ex in enumerate(examples)]


def image_groups(examples: list[Example], order: list[int], batch_pairs: int) -> list[list[int]]:
    """Consecutive images of ``order`` grouped so each group holds about ``batch_pairs`` captions."""
    groups, current, pairs = [], [], 0
    for i in order:
        current.append(i)
        pairs += len(examples[i].captions)
        if pairs >= batch_pairs:
            groups.append(current)
            current, pairs = [], 0
    if current:
        groups.append(current)
    return groups


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


class JsonlLog:
    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, row: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@torch.no_grad()
def validation_loss(model, tokenizer, feats, examples, cfg: Config) -> float:
    """Mean caption loss over every validation (image, caption) pair (packed when possible)."""
    blip = unwrap(model)
    device = feats.device
    if cfg.train.pack and packing_supported(blip.language_model):
        total, count = 0.0, 0
        for group in image_groups(examples, list(range(len(examples))), cfg.eval.batch_size):
            batch = pack_captions(
                tokenizer,
                [examples[i].captions for i in group],
                prompt=cfg.model.prompt,
                max_text_tokens=cfg.train.max_text_tokens,
            )
            tokens = int((batch.labels[:, :, 1:] != -100).sum())
            total += float(packed_loss(model, feats[group], batch.to(device))) * tokens
            count += tokens
        return total / max(count, 1)
    pairs = [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
    total, count = 0.0, 0
    for start in range(0, len(pairs), cfg.eval.batch_size):
        chunk = pairs[start : start + cfg.eval.batch_size]
        text = encode_texts(
            tokenizer,
            [training_text(c, cfg.model.prompt, tokenizer.eos_token) for _, c in chunk],
            num_query_tokens=blip.config.num_query_tokens,
            image_token_id=blip.config.image_token_index,
            prompt=cfg.model.prompt,
            max_text_tokens=cfg.train.max_text_tokens,
        )
        tokens = int((text.labels[:, 1:] != -100).sum())
        loss = lm_loss(
            model,
            feats[[i for i, _ in chunk]],
            text.input_ids.to(device),
            text.attention_mask.to(device),
            text.labels.to(device),
        )
        total += float(loss) * tokens
        count += tokens
    return total / max(count, 1)


def train(
    model,
    processor,
    train_examples: list[Example],
    val_examples: list[Example],
    cfg: Config,
    *,
    log_path: Path | None = None,
    log: Callable[[str], None] = print,
    score_fn: Callable[[list[str], list[list[str]]], float] | None = None,
    feature_fn: Callable[[list[bytes]], torch.Tensor] | None = None,
) -> TrainResult:
    """Train the LoRA parameters of ``model`` (a PEFT model) in place; keep the best ones."""
    tcfg = cfg.train
    blip = unwrap(model)
    tokenizer = processor.tokenizer
    device = next(blip.parameters()).device
    torch.manual_seed(tcfg.seed)
    rng = random.Random(tcfg.seed)
    journal = JsonlLog(log_path)

    started = time.perf_counter()
    model.eval()  # no dropout while extracting frozen features
    if feature_fn is None:

        def feature_fn(images):
            return image_features(model, processor, images, batch_size=cfg.eval.batch_size, device=device)

    train_feats = feature_fn([e.image for e in train_examples])
    val_feats = feature_fn([e.image for e in val_examples]) if val_examples else None
    log(
        f"  image features: {len(train_examples)} train, {len(val_examples)} validation images "
        f"in {time.perf_counter() - started:.1f}s"
    )

    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=fused)
    packed = tcfg.pack and cfg.data.train_captions == "all" and packing_supported(blip.language_model)
    if packed:
        micro_per_epoch = len(image_groups(train_examples, list(range(len(train_examples))), tcfg.batch_size))
        log(f"  packing: each image's prefix shared by its {sum(len(e.captions) for e in train_examples)} captions")
    else:
        pairs_per_epoch = len(training_pairs(train_examples, cfg.data.train_captions, random.Random(0)))
        micro_per_epoch = math.ceil(pairs_per_epoch / tcfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tcfg.grad_accum)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps) if tcfg.epochs else tcfg.max_steps
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = _scheduler(optimizer, tcfg, total_steps)
    scaler = torch.amp.GradScaler("cuda") if blip.dtype == torch.float16 else None

    result = TrainResult(steps=0, best_step=0)
    best_value: float | None = None
    best_state = _lora_state(model)
    step, seen, t_loop = 0, 0, time.perf_counter()
    running: list[float] = []

    def validate(epoch: int) -> None:
        nonlocal best_value, best_state
        if val_feats is None or not len(val_examples):
            return
        model.eval()
        row: dict = {"type": "validation", "epoch": epoch, "step": step}
        row["loss"] = validation_loss(model, tokenizer, val_feats, val_examples, cfg)
        if score_fn is not None and tcfg.select != "loss":
            caps = caption_features(model, tokenizer, val_feats, cfg.eval, cfg.model.prompt)
            row["CIDEr"] = score_fn(caps, [e.captions for e in val_examples])
        journal.write(row)
        result.history.append(row)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("loss", "CIDEr"))
        log(f"  validation after epoch {epoch} (step {step}): {shown}")
        if tcfg.select == "last":
            return
        value = row["CIDEr"] if tcfg.select == "CIDEr" and "CIDEr" in row else -row["loss"]
        if best_value is None or value > best_value:
            best_value = value
            best_state = _lora_state(model)
            result.best_step = step
            result.best = {k: v for k, v in row.items() if k not in ("type",)}
        model.train()

    for epoch in range(1, epochs + 1):
        model.train()
        if packed:
            order = list(range(len(train_examples)))
            rng.shuffle(order)
            micro = image_groups(train_examples, order, tcfg.batch_size)
        else:
            pairs = training_pairs(train_examples, cfg.data.train_captions, rng)
            rng.shuffle(pairs)
            micro = [pairs[i : i + tcfg.batch_size] for i in range(0, len(pairs), tcfg.batch_size)]
        for m_idx, chunk in enumerate(micro):
            if packed:
                batch = pack_captions(
                    tokenizer,
                    [train_examples[i].captions for i in chunk],
                    prompt=cfg.model.prompt,
                    max_text_tokens=tcfg.max_text_tokens,
                ).to(device)
                loss = packed_loss(model, train_feats[torch.tensor(chunk, device=device)], batch)
                n_pairs = batch.pairs
            else:
                text = encode_texts(
                    tokenizer,
                    [training_text(c, cfg.model.prompt, tokenizer.eos_token) for _, c in chunk],
                    num_query_tokens=blip.config.num_query_tokens,
                    image_token_id=blip.config.image_token_index,
                    prompt=cfg.model.prompt,
                    max_text_tokens=tcfg.max_text_tokens,
                )
                loss = lm_loss(
                    model,
                    train_feats[[i for i, _ in chunk]],
                    text.input_ids.to(device),
                    text.attention_mask.to(device),
                    text.labels.to(device),
                )
                n_pairs = len(chunk)
            scaled = loss / tcfg.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            running.append(loss.detach())
            seen += n_pairs
            last_micro = m_idx == len(micro) - 1
            if (m_idx + 1) % tcfg.grad_accum and not last_micro:
                continue
            if scaler:
                scaler.unscale_(optimizer)
            if tcfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % tcfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_loop
                row = {
                    "type": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": float(torch.stack(running).mean()),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": seen / max(elapsed, 1e-9),
                    "elapsed_s": round(elapsed, 3),
                }
                if device.type == "cuda":
                    row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                running.clear()
                journal.write(row)
                result.history.append(row)
                log(
                    f"  step {step}/{total_steps} epoch {epoch} loss {row['loss']:.4f} "
                    f"lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s"
                )
            if step >= total_steps:
                break
        if tcfg.validate_every and (epoch % tcfg.validate_every == 0 or step >= total_steps):
            validate(epoch)
        if step >= total_steps:
            break

    if tcfg.select == "last" or best_value is None:
        result.best_step = step
    else:
        _load_lora_state(model, best_state)
        log(f"  kept the adapter from step {result.best_step} (best validation {tcfg.select})")
    model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - started
    result.samples_per_s = seen / max(time.perf_counter() - t_loop, 1e-9)
    return result

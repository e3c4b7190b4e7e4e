"""Training within the GPU's memory: halve the micro-batch on out-of-memory, same pairs per step."""

from __future__ import annotations

import copy
import gc
import shutil
from collections.abc import Callable
from pathlib import Path

from captune.config import Config
from captune.distributed import world
from captune.errors import UserError
from captune.model.lora import trainable_state
from captune.training.checkpoint import saved_micro_batch


def train_within_memory(cfg: Config, model, attempt: Callable, *, checkpoint_dir: Path, log: Callable[[str], None]):
    """``attempt(cfg)``; if the GPU runs out of memory, again from the start with half the
    micro-batch and twice the accumulation (the same pairs per optimizer step), down to one pair.
    Returns the result and the config that fitted. A resume uses the micro-batch its checkpoint
    was written with. Under several processes an out-of-memory error stops the run (the others
    could not follow a retry)."""
    import torch

    saved = saved_micro_batch(checkpoint_dir)
    if saved is not None:  # positions count micro-batches of the checkpoint's size
        sizes = (saved[0] or cfg.train.batch_size, saved[1] or cfg.train.grad_accum)
        if sizes != (cfg.train.batch_size, cfg.train.grad_accum):
            cfg = copy.deepcopy(cfg)
            cfg.train.batch_size, cfg.train.grad_accum = sizes
    initial = trainable_state(model)
    while True:
        try:
            return attempt(cfg), cfg
        except torch.OutOfMemoryError:
            t = cfg.train
            if world().distributed:
                raise
            if t.batch_size < 2:
                raise UserError(
                    "GPU out of memory in phase train even with one pair per micro-batch; use "
                    "model.quantization=4bit (or 8bit), a smaller model, or a GPU with more memory"
                ) from None
        # out of the except block: the failed attempt's frames (and their tensors) are released
        cfg = _halved(cfg, log)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # positions counted in old micro-batches
        _reset(model, initial)


def _halved(cfg: Config, log: Callable[[str], None]) -> Config:
    t = cfg.train
    smaller = copy.deepcopy(cfg)
    smaller.train.batch_size, smaller.train.grad_accum = t.batch_size // 2, t.grad_accum * 2
    log(
        f"  GPU out of memory at train.batch_size={t.batch_size}; starting again with "
        f"train.batch_size={smaller.train.batch_size} train.grad_accum={smaller.train.grad_accum} "
        f"(the same {t.batch_size * t.grad_accum} pairs per step)"
    )
    return smaller


def _reset(model, initial: dict) -> None:
    """The LoRA weights back to their initial values, gradients and cached GPU memory released."""
    import torch

    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in initial:
                v.copy_(initial[k])
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

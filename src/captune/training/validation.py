"""Validation during training: the loss, the CIDEr of generated captions (scored in the
background), and the selection of the best adapter with early stopping.

A validation's CIDEr is scored on the CPU (and in Java) while the GPU trains on: the scoring
runs in a thread, and the result is settled (logged, compared, the best adapter kept) when it
is ready, before any checkpoint, and before an early stop or the end. Under several processes
it is settled at once, so that every process takes the same decisions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from captune.config import Config
from captune.data.pairs import caption_counts, image_groups
from captune.distributed import world
from captune.evaluation.background import submit, timed
from captune.model.family import can_pack
from captune.model.lora import adapter_touches_vision
from captune.ops.features import project_queries
from captune.ops.generation import caption_features
from captune.ops.lm import unwrap
from captune.ops.packing import pack_captions, packed_loss
from captune.training.steps import flat_loss


@torch.no_grad()
def validation_loss(model, tokenizer, feats, examples, cfg: Config) -> float:
    """Mean caption loss over every validation (image, caption) pair (packed when possible)."""
    blip = unwrap(model)
    device = feats.device
    if cfg.train.pack and can_pack(blip.language_model):
        total, count = 0.0, 0
        counts = caption_counts(examples)
        for group in image_groups(counts, np.arange(len(counts)), cfg.eval.batch_size):
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
        loss, tokens = flat_loss(model, tokenizer, feats, chunk, cfg)
        total += float(loss) * tokens
        count += tokens
    return total / max(count, 1)


class Selection:
    """The best adapter so far by ``train.select`` (CIDEr, or the lowest loss; ``last`` keeps none),
    and how many validations have passed without a better one (for early stopping)."""

    def __init__(self, select: str, initial: dict):
        self.select = select
        self.best_value: float | None = None
        self.best_state = initial
        self.best_step = 0
        self.best: dict = {}
        self.stale = 0

    def restore(self, value: float | None, state: dict, step: int, best: dict, stale: int) -> None:
        self.best_value, self.best_state, self.best_step, self.best, self.stale = value, state, step, best, stale

    def consider(self, row: dict, state: dict) -> None:
        if self.select == "last":
            return
        value = row["CIDEr"] if self.select == "CIDEr" and "CIDEr" in row else -row["loss"]
        if self.best_value is not None and value <= self.best_value:
            self.stale += 1
        else:
            self.stale = 0
        if self.best_value is None or value > self.best_value:
            self.best_value = value
            self.best_state = state
            self.best_step = row["step"]
            self.best = {k: v for k, v in row.items() if k not in ("type",)}

    @property
    def chosen(self) -> bool:
        """A validation chose an adapter (else the last one stands)."""
        return self.select != "last" and self.best_value is not None


class Validator:
    """Runs validations and settles their scores into the log and the selection."""

    def __init__(self, model, tokenizer, cfg: Config, examples: list, feats, *, score_fn: Callable | None,
                 engine, selection: Selection, log):  # fmt: skip
        self.model, self.tokenizer, self.cfg, self.examples = model, tokenizer, cfg, examples
        self.vision = feats  # vision-tower outputs when the Q-Former trains, else the features
        self.feats = feats
        self.vision_trains = adapter_touches_vision(model)
        # under several processes every process must take the same decisions: settle at once
        self.score_fn, self.settle_now = score_fn, world().distributed
        self.engine, self.selection, self.log = engine, selection, log
        self.pending: list[tuple[dict, dict, Future, dict]] = []

    @property
    def has_data(self) -> bool:
        return self.feats is not None and bool(len(self.examples))

    def validate(self, epoch: int, step: int) -> None:
        """Loss now; CIDEr submitted to the background scorer (settled at once under several processes)."""
        model, cfg = self.model, self.cfg
        model.eval()
        if self.vision_trains:  # this step's Q-Former over the cached vision outputs
            blip = unwrap(model)
            with torch.no_grad():
                self.feats = torch.cat(
                    [project_queries(blip, self.vision[i : i + 256]) for i in range(0, len(self.vision), 256)]
                )
        row: dict = {"type": "validation", "epoch": epoch, "step": step}
        t0 = time.perf_counter()
        row["loss"] = validation_loss(model, self.tokenizer, self.feats, self.examples, cfg)
        times = {"loss": time.perf_counter() - t0}
        state = self.engine.snapshot() if cfg.train.select != "last" else {}
        if self.score_fn is not None and cfg.train.select != "loss":
            t0 = time.perf_counter()
            caps = caption_features(model, self.tokenizer, self.feats, cfg.eval, cfg.model.prompt)
            times["captions"] = time.perf_counter() - t0
            refs = [e.captions for e in self.examples]
            self.pending.append((row, times, submit(timed, self.score_fn, caps, refs), state))
            if self.settle_now:
                self.settle()
            else:  # said now, so the steps logged meanwhile do not seem to come before it
                self.log.validation_started(row)
        else:
            self._conclude(row, times, state)
        model.train()

    def scored(self) -> bool:
        """The oldest validation under way has its score (settling it will not wait)."""
        return bool(self.pending) and self.pending[0][2].done()

    def settle(self) -> None:
        """Finish the validations whose scoring is under way (waiting for it)."""
        while self.pending:
            row, times, future, state = self.pending.pop(0)
            row["CIDEr"], times["scoring"] = future.result()
            self._conclude(row, times, state)

    def _conclude(self, row: dict, times: dict, state: dict) -> None:
        row["seconds"] = {k: round(v, 3) for k, v in times.items()}
        self.log.validation(row, times)
        self.selection.consider(row, state)

    def close(self) -> None:
        """Wait for scores still under way (after an error: their results are dropped)."""
        for _, _, future, _ in self.pending:
            future.exception()

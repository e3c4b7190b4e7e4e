"""The plan of a training run: micro-batches per epoch, optimizer steps, and what is due when."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from captune.data import pairs
from captune.data.pairs import MicroBatches, caption_counts, image_groups


@dataclass(frozen=True)
class Plan:
    packed: bool  # each image's prefix shared by its captions (micro-batches are image groups)
    batch_size: int  # pairs per micro-batch (about that many, in image groups, when packed)
    grad_accum: int
    train_captions: str
    steps_per_epoch: int
    total_steps: int
    epochs: int
    checkpoint_every: int
    validate_every: int

    @classmethod
    def make(cls, examples: list, train_cfg, train_captions: str, packed: bool) -> Plan:
        t = train_cfg
        counts = caption_counts(examples)
        if packed:
            micro_per_epoch = len(image_groups(counts, np.arange(len(counts)), t.batch_size))
        else:
            pairs_per_epoch = int(counts.sum()) if train_captions == "all" else len(counts)
            micro_per_epoch = math.ceil(pairs_per_epoch / t.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
        total_steps = steps_per_epoch * t.epochs
        if t.max_steps:
            total_steps = min(total_steps, t.max_steps) if t.epochs else t.max_steps
        return cls(
            packed=packed,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            train_captions=train_captions,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            epochs=math.ceil(total_steps / steps_per_epoch),
            checkpoint_every=t.checkpoint_every,
            validate_every=t.validate_every,
        )

    def micro_batches(self, examples: list, rng: random.Random) -> MicroBatches:
        """One epoch's micro-batches in a shuffled order (a function of ``rng``'s state alone):
        image groups when packed, else (image, caption) pairs; held compact (``MicroBatches``)."""
        counts = caption_counts(examples)
        if self.packed:
            return image_groups(counts, pairs.shuffled(np.arange(len(counts)), rng), self.batch_size)
        codes = pairs.shuffled(pairs.training_pairs(counts, self.train_captions, rng), rng)
        return pairs.pair_batches(examples, codes, self.batch_size, pairs.pair_stride(counts))

    def is_boundary(self, micro: int, count: int) -> bool:
        """An optimizer step follows micro-batch ``micro`` of ``count`` (accumulation ends, or the epoch)."""
        return (micro + 1) % self.grad_accum == 0 or micro == count - 1

    def done(self, step: int) -> bool:
        return step >= self.total_steps

    def checkpoint_due(self, step: int, micro: int, count: int) -> bool:
        """A mid-epoch checkpoint (``train.checkpoint_every``); the epoch's end has its own."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and micro + 1 < count

    def validate_due(self, epoch: int, step: int) -> bool:
        return bool(self.validate_every) and (epoch % self.validate_every == 0 or self.done(step))

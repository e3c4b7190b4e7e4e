"""The plan of a training run: micro-batches per epoch, optimizer steps, and what is due when."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from captune.data.pairs import image_groups, training_pairs


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
        if packed:
            micro_per_epoch = len(image_groups(examples, list(range(len(examples))), t.batch_size))
        else:
            pairs_per_epoch = len(training_pairs(examples, train_captions, random.Random(0)))
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

    def micro_batches(self, examples: list, rng: random.Random) -> list[list]:
        """One epoch's micro-batches in a shuffled order (a function of ``rng``'s state alone):
        image groups when packed, else (image, caption) pairs."""
        if self.packed:
            order = list(range(len(examples)))
            rng.shuffle(order)
            return image_groups(examples, order, self.batch_size)
        pairs = training_pairs(examples, self.train_captions, rng)
        rng.shuffle(pairs)
        return [pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]

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

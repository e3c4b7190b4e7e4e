"""What one epoch trains on: (image, caption) pairs, image groups for packing, a process's share."""

from __future__ import annotations

import random

from captune.data.prepare import Example


def training_pairs(examples: list[Example], mode: str, rng: random.Random) -> list[tuple[int, str]]:
    """(image index, caption) pairs for one epoch."""
    if mode == "all":
        return [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
    if mode == "first":
        return [(i, ex.captions[0]) for i, ex in enumerate(examples)]
    return [(i, rng.choice(ex.captions)) for i, ex in enumerate(examples)]


def caption_counts(examples) -> list[int]:
    """Each example's number of captions: a split's own count (no text read), else counted."""
    if hasattr(examples, "caption_counts"):
        return examples.caption_counts().tolist()
    return [len(e.captions) for e in examples]


def image_groups(examples: list[Example], order: list[int], batch_pairs: int) -> list[list[int]]:
    """Consecutive images of ``order`` grouped so each group holds about ``batch_pairs`` captions."""
    counts = caption_counts(examples)
    groups, current, pairs = [], [], 0
    for i in order:
        current.append(i)
        pairs += counts[i]
        if pairs >= batch_pairs:
            groups.append(current)
            current, pairs = [], 0
    if current:
        groups.append(current)
    return groups


def rank_share(items: list, rank: int, size: int) -> list:
    """This process's part of a micro-batch (every process gets at least one item)."""
    part = items[rank::size]
    return part if part else items[:1]

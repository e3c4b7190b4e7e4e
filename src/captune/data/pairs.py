"""What one epoch trains on: (image, caption) pairs, image groups for packing, a process's share.

An epoch's micro-batches are held compact (``MicroBatches``): the shuffled items in one integer
array and each micro-batch's bounds, a micro-batch made a list only when it is asked for. A
million images' epoch costs a few MB, where lists of lists of Python integers cost about 80.
Pairs are codes ``image * stride + caption index`` until then. The orders are the ones the
list-based forms gave (``random.shuffle`` of a list, ``random.choice`` of a caption list): the
same seed trains on the same micro-batches.
"""

from __future__ import annotations

import array
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np


def caption_counts(examples) -> np.ndarray:
    """Each example's number of captions: a split's own count (no text read), else counted."""
    if hasattr(examples, "caption_counts"):
        return np.asarray(examples.caption_counts(), dtype=np.int64)
    return np.asarray([len(e.captions) for e in examples], dtype=np.int64)


def shuffled(values: np.ndarray, rng: random.Random) -> np.ndarray:
    """``values`` in the order ``rng.shuffle`` puts a list of them in, held as 8-byte integers
    throughout (``random.shuffle`` takes any mutable sequence; an ``array`` holds no objects)."""
    out = array.array("q", np.ascontiguousarray(values, dtype=np.int64).tobytes())
    rng.shuffle(out)
    return np.frombuffer(out, dtype=np.int64)


def pair_stride(counts: np.ndarray) -> int:
    return max(int(counts.max()) if len(counts) else 1, 1)


def training_pairs(counts: np.ndarray, mode: str, rng: random.Random) -> np.ndarray:
    """One epoch's (image, caption) pairs as codes ``image * pair_stride(counts) + caption``, in
    image order: every caption (``all``), the first, or one drawn by ``rng`` (``random``)."""
    stride, n = pair_stride(counts), len(counts)
    if mode == "all":
        images = np.repeat(np.arange(n, dtype=np.int64), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        return images * stride + (np.arange(len(images), dtype=np.int64) - starts)
    if mode == "first":
        return np.arange(n, dtype=np.int64) * stride
    picks = [rng.choice(range(c)) for c in counts.tolist()]  # what rng.choice(captions) draws
    return np.arange(n, dtype=np.int64) * stride + np.asarray(picks, dtype=np.int64)


class MicroBatches(Sequence):
    """An epoch's micro-batches: ``items`` cut at ``bounds`` (each batch's first item, then the
    end); a batch is the list of its items, or of ``decode``'s pairs for each code."""

    def __init__(self, items: np.ndarray, bounds: np.ndarray, decode: Callable[[list], list] | None = None):
        self.items, self.bounds, self.decode = items, bounds, decode

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            start, stop, step = k.indices(len(self))
            if step != 1:
                raise ValueError("micro-batches are sliced in order")
            return MicroBatches(self.items, self.bounds[start : max(start, stop) + 1], self.decode)
        k = k + len(self) if k < 0 else k
        if not 0 <= k < len(self):
            raise IndexError(k)
        part = self.items[self.bounds[k] : self.bounds[k + 1]].tolist()
        return part if self.decode is None else self.decode(part)

    def __iter__(self) -> Iterator[list]:
        return (self[k] for k in range(len(self)))


def image_groups(counts: np.ndarray, order: np.ndarray, batch_pairs: int) -> MicroBatches:
    """Consecutive images of ``order`` grouped so each group holds about ``batch_pairs`` captions
    (a group closes when it reaches them)."""
    order = np.asarray(order, dtype=np.int64)
    bounds, pairs = [0], 0
    for at, c in enumerate(counts[order].tolist(), 1):
        pairs += c
        if pairs >= batch_pairs:
            bounds.append(at)
            pairs = 0
    if bounds[-1] != len(order):
        bounds.append(len(order))
    return MicroBatches(order, np.asarray(bounds, dtype=np.int64))


def pair_batches(examples: Sequence, codes: np.ndarray, batch_size: int, stride: int) -> MicroBatches:
    """``codes`` in micro-batches of ``batch_size`` pairs, each given as (image index, caption)."""

    def decode(part: list[int]) -> list[tuple[int, str]]:
        return [(i, examples[i].captions[j]) for i, j in (divmod(c, stride) for c in part)]

    bounds = np.append(np.arange(0, len(codes), batch_size, dtype=np.int64), len(codes))
    return MicroBatches(codes, bounds if len(codes) else np.zeros(1, dtype=np.int64), decode)


def rank_share(items: list, rank: int, size: int) -> list:
    """This process's part of a micro-batch (every process gets at least one item)."""
    part = items[rank::size]
    return part if part else items[:1]

"""The training split's image features, fed to each micro-batch: resident on the device, or streamed.

``Resident`` holds the whole split on the device and indexes it (the fast path, used whenever the
split fits). ``Streamed`` reads a memory-mapped ``FeatureMap``: a background thread gathers the
rows of the next micro-batches on the CPU into pinned memory and copies them to the device on a
side stream, so device memory holds a few micro-batches' features whatever the split's size. Both
hand the step the same rows in the same order: losses and adapters are bit-identical
(tests/test_feature_feed.py pins it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import torch

from captune.distributed import all_agree
from captune.ops.feature_map import FeatureMap
from captune.training.ahead import Ahead

CPU_RESIDENT_BYTES = 256 << 20  # on a CPU the map is as fast as RAM; keep small splits whole anyway
DEVICE_SHARE = 0.25  # of the free device memory, when the split's features may stay whole


def choose_residence(setting: str, nbytes: int, device: torch.device) -> str:
    """``gpu`` or ``stream`` for ``train.feature_residence=setting`` and features of ``nbytes``: the
    same answer on every process (any process short of memory makes all stream)."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = nbytes <= DEVICE_SHARE * free
    else:
        fits = nbytes <= CPU_RESIDENT_BYTES
    return "gpu" if all_agree(fits) else "stream"


class Resident:
    """The whole split's features as one device tensor."""

    streamed = False

    def __init__(self, feats: torch.Tensor, device: torch.device):
        self.feats, self.device = feats, device

    def plan(self, batches: Sequence[list[int]]) -> None:
        """Nothing to fetch ahead."""

    def take(self, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` (in that order), indexed on the device through a pinned index."""
        index = torch.tensor(rows)
        if self.device.type == "cuda":
            index = index.pin_memory()
        return self.feats[index.to(self.device, non_blocking=True)]

    def stop(self) -> None:
        """Nothing under way."""


def load_rows(fmap: FeatureMap, device: torch.device | None, side, rows: list[int]):
    """Rows of ``fmap`` on ``device`` (copied on the ``side`` stream), and the event after which they are
    there; on a CPU (``device`` None) the rows and None."""
    if device is None:
        return fmap.rows(rows), None
    host = torch.empty((len(rows), *fmap.row_shape), dtype=fmap.dtype, pin_memory=True)
    fmap.rows(rows, out=host)
    with torch.cuda.stream(side):
        feats = host.to(device, non_blocking=True)  # the host allocator keeps `host` until copied
        done = torch.cuda.Event()
        done.record(side)
    return feats, done


class Streamed:
    """Rows from a memory map, fetched ``depth`` micro-batches ahead by a thread (see the module)."""

    streamed = True

    def __init__(self, fmap: FeatureMap, device: torch.device, depth: int = 3):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.fmap, self.device, self.depth = fmap, device, depth
        self.side = torch.cuda.Stream(device) if self.cuda else None
        # a new thread starts on device 0; under DDP ours may be another. (Neither callable holds this
        # object: a cycle through the thread's owner would keep the feed alive until the cycle collector.)
        setup = partial(torch.cuda.set_device, device) if self.cuda else None
        make = partial(load_rows, fmap, device if self.cuda else None, self.side)
        self.ahead = Ahead(make, depth=depth, name="captune-feature-feed", setup=setup)

    def plan(self, batches: Iterable[list[int]]) -> None:
        """Start fetching ``batches`` (each a list of rows), in the order ``take`` will ask for them;
        the thread takes them from ``batches`` as it goes (a lazy sequence or iterator is never listed)."""
        self.ahead.plan(map(list, batches))

    def take(self, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` (in that order) on the device: the next fetched micro-batch, or read now if
        it is not the one planned."""
        feats, done = self.ahead.take(list(rows))
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            feats.record_stream(stream)  # its memory is not reused until this stream is done with it
        return feats

    def stop(self) -> None:
        """Stop fetching (the epoch ended or training stopped early)."""
        self.ahead.stop()

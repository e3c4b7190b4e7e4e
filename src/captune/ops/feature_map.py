"""A split's frozen image features in shards on disk, written as computed, read through a memory map.

A map is a folder::

    layout.json        count, rows per shard, row shape, dtype (written with the first shard)
    shard-00000.bin    rows [0, R) as raw little-endian values, C order, no header
    shard-00001.bin    rows [R, 2R) ...
    manifest.json      the layout and the shard names: written last, when every shard is in place

Each shard is written under a temporary name and renamed once whole, so a killed computation leaves
only complete shards (a shard file of the wrong size is never trusted) and resumes from them. Rows
are never held whole in memory: a shard is appended batch by batch, and reading maps the files
(copy-on-write, so pages are loaded on demand and the kernel may drop them again).
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from captune.atomic import mkstemp_like_open, mode_for, write_atomic
from captune.ops.features import image_features

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _words(t: torch.Tensor) -> torch.Tensor:
    """``t`` (rows first) as a 2-D tensor of the widest integers that tile a row: index_select copies
    those fast (for bf16 it is tens of times slower, measured on the CPU)."""
    flat = t.view(t.size(0), -1)
    for word in (torch.int64, torch.int32, torch.int16):
        if (flat.size(1) * flat.element_size()) % word.itemsize == 0 and flat.element_size() <= word.itemsize:
            return flat.view(torch.uint8).view(word) if flat.size(1) else flat
    return flat.view(torch.uint8)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"feature maps hold {sorted(_DTYPES)}, not {name}")
    return name


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


class ShardWriter:
    """Writes rows [start, stop) of shard after shard, batch by batch, into map folder ``root``.

    ``count`` rows in all, ``rows_per_shard`` each (the last shard shorter). Several writers (one per
    process) may fill disjoint shards of one folder; ``finish`` (one process, once every shard is in
    place) writes the manifest."""

    def __init__(self, root: Path, count: int, rows_per_shard: int):
        if sys.byteorder != "little":  # the files are little-endian raw values
            raise RuntimeError("feature maps are written on little-endian machines only")
        self.root, self.count, self.rows_per_shard = Path(root), int(count), int(rows_per_shard)
        self.root.mkdir(parents=True, exist_ok=True)
        self.layout = self._read_layout()
        self._open: tuple[int, int, object, str] | None = None  # (shard, rows written, file, tmp path)

    @property
    def shards(self) -> int:
        return -(-self.count // self.rows_per_shard)

    def shard_rows(self, index: int) -> tuple[int, int]:
        start = index * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.count)

    def _read_layout(self) -> dict | None:
        path = self.root / "layout.json"
        if not path.is_file():
            return None
        layout = json.loads(path.read_text())
        if (layout["count"], layout["rows_per_shard"]) != (self.count, self.rows_per_shard):
            for old in self.root.glob("shard-*.bin"):  # another split's leftovers: start afresh
                old.unlink()
            path.unlink()
            return None
        return layout

    def _row_bytes(self) -> int:
        itemsize = torch.empty(0, dtype=_DTYPES[self.layout["dtype"]]).element_size()
        n = itemsize
        for d in self.layout["row_shape"]:
            n *= d
        return n

    def complete(self, index: int) -> bool:
        """Shard ``index`` is on disk whole (its size is that of its rows)."""
        if self.layout is None:
            return False
        path = self.root / shard_name(index)
        start, stop = self.shard_rows(index)
        return path.is_file() and path.stat().st_size == (stop - start) * self._row_bytes()

    def clear_temporaries(self, shards: Iterable[int]) -> None:
        """Remove half-written files of ``shards`` that a killed computation left (each process clears
        only its own shards', so none removes a file another is writing)."""
        for s in shards:
            for tmp in self.root.glob(f".{shard_name(s)}.*"):
                tmp.unlink(missing_ok=True)

    def missing(self, shards: Iterable[int] | None = None) -> list[int]:
        """Those of ``shards`` (default all) not yet on disk whole."""
        return [s for s in (range(self.shards) if shards is None else shards) if not self.complete(s)]

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Rows ``start``, ``start + 1``, ... (a CPU tensor); they may cross shard boundaries, and must
        follow on from the rows written before unless they begin a shard."""
        if self.layout is None:
            self.layout = {"count": self.count, "rows_per_shard": self.rows_per_shard,
                           "row_shape": list(rows.shape[1:]), "dtype": _dtype_name(rows.dtype)}  # fmt: skip
            write_atomic(self.root / "layout.json", json.dumps(self.layout))
        flat = rows.contiguous().view(rows.size(0), -1).view(torch.uint8).numpy()
        done = 0
        while done < rows.size(0):
            shard = (start + done) // self.rows_per_shard
            lo, hi = self.shard_rows(shard)
            if self._open is None or self._open[0] != shard:
                self._close(keep=False)
                if start + done != lo:
                    raise ValueError(f"rows of shard {shard} must start at row {lo}, not {start + done}")
                fd, tmp = mkstemp_like_open(f".{shard_name(shard)}.", self.root)
                self._open = (shard, 0, os.fdopen(fd, "wb"), tmp)
            _, written, f, tmp = self._open
            take = min(rows.size(0) - done, hi - (lo + written))
            f.write(flat[done : done + take].tobytes())
            self._open = (shard, written + take, f, tmp)
            done += take
            if lo + written + take == hi:
                self._close(keep=True)

    def _close(self, keep: bool) -> None:
        if self._open is None:
            return
        shard, _, f, tmp = self._open
        self._open = None
        f.close()
        if keep:
            os.chmod(tmp, mode_for(False))
            os.replace(tmp, self.root / shard_name(shard))
        else:
            Path(tmp).unlink(missing_ok=True)

    def abandon(self) -> None:
        """Drop a shard left half-written (an error mid-computation)."""
        self._close(keep=False)

    def finish(self) -> None:
        """The manifest, once every shard is whole: from then on the map can be opened."""
        self._close(keep=False)
        if self.layout is None:  # another process wrote the first shard
            self.layout = self._read_layout()
        gone = self.missing()
        if gone:
            raise RuntimeError(f"feature map {self.root}: shards {gone[:5]} are missing")
        if self.layout is None:  # an empty split
            self.layout = {"count": 0, "rows_per_shard": self.rows_per_shard, "row_shape": [], "dtype": "float32"}
        doc = {**self.layout, "shards": [shard_name(s) for s in range(self.shards)]}
        write_atomic(self.root / "manifest.json", json.dumps(doc, indent=1))


def _drop_pages(address: int, length: int) -> None:
    """madvise(MADV_DONTNEED) on a private, never-written file map: its pages leave the process and
    are read again (from the page cache) on the next access. A no-op where libc has no madvise."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL(None, use_errno=True).madvise
            _LIBC.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC and length:
        _LIBC(address, length, getattr(mmap, "MADV_DONTNEED", 4))


_LIBC = None


def is_complete(root: Path) -> bool:
    return (Path(root) / "manifest.json").is_file()


class FeatureMap:
    """The rows of a written map, memory-mapped: ``rows(index)`` gathers any rows on the CPU.

    Pages read through a map count in the process's resident memory until it lets them go (and a
    kernel may map a whole 2 MiB folio for one row's read), so after each gather the shards it read
    drop their pages (the kernel's page cache keeps the data; a later read faults it back in):
    resident memory stays bounded over an epoch of random reads, whatever the split's size."""

    def __init__(self, root: Path, release: bool = True):
        self.root = Path(root)
        self.release_pages = release
        doc = json.loads((self.root / "manifest.json").read_text())
        self.count, self.rows_per_shard = int(doc["count"]), int(doc["rows_per_shard"])
        self.row_shape, self.dtype = tuple(doc["row_shape"]), _DTYPES[doc["dtype"]]
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self._shards: list[torch.Tensor] = []
        for name in doc["shards"]:
            path = self.root / name
            # a private map (pages on demand, never written back) that keeps no file descriptor open:
            # a million-image split has a thousand shards
            flat = torch.from_file(str(path), shared=False, size=path.stat().st_size // itemsize, dtype=self.dtype)
            self._shards.append(flat.view(-1, *self.row_shape))
        self._words = [_words(t) for t in self._shards]

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.row_shape)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._shards)

    def rows(self, index: Sequence[int] | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``index`` (in that order) as one CPU tensor, into ``out`` (e.g. pinned memory) if given."""
        index = torch.as_tensor(index, dtype=torch.long)
        if out is None:
            out = torch.empty((index.numel(), *self.row_shape), dtype=self.dtype)
        if index.numel() == 0:
            return out
        flat = _words(out)  # whole rows as integers: a fast copy path
        shard = index // self.rows_per_shard
        first = int(shard[0])
        if bool((shard == first).all()):
            torch.index_select(self._words[first], 0, index - first * self.rows_per_shard, out=flat)
            touched = [first]
        else:  # by shard in row order into a buffer, then back into the asked order (index_copy_ is slow)
            order = torch.argsort(index, stable=True)
            ordered, counts = torch.unique_consecutive(shard[order], return_counts=True)
            local = index[order] - shard[order] * self.rows_per_shard
            buffer, at = torch.empty_like(flat), 0
            touched = ordered.tolist()
            for s, c in zip(touched, counts.tolist(), strict=True):
                torch.index_select(self._words[s], 0, local[at : at + c], out=buffer[at : at + c])
                at += c
            torch.index_select(buffer, 0, torch.argsort(order), out=flat)
        if self.release_pages:
            self.release(touched)
        return out

    def whole(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every row as one tensor on ``device``, filled shard by shard (no second whole copy)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        at = 0
        for part in self._shards:
            out[at : at + part.size(0)].copy_(part)
            at += part.size(0)
        self.release()
        return out

    def release(self, shards: Iterable[int] | None = None) -> None:
        """Let go of the pages read from ``shards`` (default all): they stay in the page cache, not
        in this process."""
        for s in range(len(self._shards)) if shards is None else shards:
            part = self._shards[s]
            _drop_pages(part.data_ptr(), part.numel() * part.element_size())


class DeviceRows:
    """A map's rows as a read-only, tensor-like sequence on ``device``: ``rows[a:b]`` and
    ``rows[list]`` read those rows from the map and move them, ``len``, ``size(0)``, ``shape``,
    ``device`` and ``dtype`` answer as the whole tensor's would. Validation and captioning, which
    take their images' features a batch at a time, read them this way from a split whose features
    are not held whole; what they compute is the same as from the whole tensor."""

    def __init__(self, fmap: FeatureMap, device: torch.device | str):
        self.fmap, self.device, self.dtype = fmap, torch.device(device), fmap.dtype

    def __len__(self) -> int:
        return len(self.fmap)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.fmap.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, i) -> torch.Tensor:
        if isinstance(i, slice):
            i = torch.arange(*i.indices(len(self)))
        elif isinstance(i, int):
            return self[i : i + 1][0] if i >= 0 else self[len(self) + i]
        return self.fmap.rows(torch.as_tensor(i, dtype=torch.long)).to(self.device)


class _Ranges(Sequence):
    """Rows [lo, hi) of several ranges of ``images``, end to end, as one sequence (slices read only
    their own images)."""

    def __init__(self, images: Sequence, ranges: list[tuple[int, int]]):
        self.images, self.ranges = images, ranges
        self.length = sum(hi - lo for lo, hi in ranges)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        if not isinstance(i, slice):
            return self[i : i + 1][0]
        start, stop, _ = i.indices(self.length)
        out, at = [], 0
        for lo, hi in self.ranges:
            a, b = max(start - at, 0), min(stop - at, hi - lo)
            if a < b:
                out.extend(self.images[lo + a : lo + b])
            at += hi - lo
        return out


def write_map(model, processor, images: Sequence, root: Path, *, rows_per_shard: int, batch_size: int = 64,
              device: torch.device | None = None, world=None, stage: str = "projected",
              keep: bool = False) -> torch.Tensor | None:  # fmt: skip
    """The features of ``images`` written into map folder ``root``: the shards not yet whole on disk
    (a killed computation resumes from its complete shards), computed in order, batch by batch, and
    appended to their shard files by a writer thread while the next batch runs.

    Under several processes (``world``) process r computes shards r, r + size, ... and writes them
    once; the main process writes the manifest when all are in place. ``rows_per_shard`` should be a
    multiple of ``batch_size``: then every batch is one a single process computing all images from
    the start would run, so the features do not depend on what was resumed or on the process count.
    With ``keep`` (alone, nothing resumed) the features are also returned whole on the device."""
    from captune.distributed import barrier

    many = world is not None and world.distributed
    rank, size = (world.rank, world.size) if many else (0, 1)
    writer = ShardWriter(root, len(images), rows_per_shard)
    mine = list(range(rank, writer.shards, size))
    writer.clear_temporaries(mine)
    todo = writer.missing(mine)
    keep = keep and not many and todo == mine and bool(mine)
    ranges = [writer.shard_rows(s) for s in todo]
    kept: list[torch.Tensor] = []
    if ranges:
        with _ShardSink(writer, ranges) as sink:

            def take(feats: torch.Tensor) -> None:
                if keep:
                    kept.append(feats)
                sink.put(feats)

            image_features(model, processor, _Ranges(images, ranges), batch_size=batch_size, device=device,
                           stage=stage, sink=take)  # fmt: skip
    barrier()
    if rank == 0:
        writer.finish()
    barrier()
    return torch.cat(kept) if keep else None


class _ShardSink:
    """Batches of rows of ``ranges`` (in order) written by a thread: the copy to the CPU and the file
    write overlap the next batch's computation; at most a few batches wait in between."""

    def __init__(self, writer: ShardWriter, ranges: list[tuple[int, int]]):
        self.writer, self.ranges = writer, list(ranges)
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="captune-feature-shards", daemon=True)

    def __enter__(self) -> _ShardSink:
        self.thread.start()
        return self

    def put(self, feats: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(feats)

    def _run(self) -> None:
        pieces = iter(self.ranges)
        lo, hi = next(pieces)
        while (feats := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the caller raises at its next put or on exit
            try:
                rows, done = feats.cpu(), 0
                while done < rows.size(0):
                    take = min(rows.size(0) - done, hi - lo)
                    self.writer.write_rows(lo, rows[done : done + take])
                    done, lo = done + take, lo + take
                    if lo == hi:
                        lo, hi = next(pieces, (hi, hi))
            except BaseException as exc:  # raised in the computing thread
                self.error = exc

    def __exit__(self, kind, exc, tb) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None or kind is not None:
            self.writer.abandon()
        if self.error is not None and kind is None:
            raise self.error

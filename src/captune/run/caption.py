"""Captioning image files as a stream (``captune caption``): memory bounded by one chunk.

Paths go in chunks of a few batches. The next chunk's files are read and checked in a
background thread (its decode checks in a small thread pool) while the GPU captions the
current one; one decoder (and CUDA graph) serves every chunk; each chunk's rows are
written as soon as they are made, to a temporary file beside the output that replaces it
only when every image is done.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from captune.atomic import mkstemp_like_open
from captune.data.files import read_images

Chunk = tuple[list[tuple[Path, bytes]], list[tuple[str, str]]]  # readable images, (path, why) skipped


class ChunkReader:
    """``read_images`` over consecutive chunks of ``paths``: the first ``first`` paths (default ``chunk``),
    then ``chunk`` at a time. ``head`` reads chunks here, one after another, up to the first with a
    readable image (before the model loads: nothing else runs meanwhile); ``start`` (or iterating) gives
    the rest, each read in the background while the one before is used (not while the model loads)."""

    def __init__(self, paths: list[Path], chunk: int, first: int | None = None, workers: int | None = None):
        self.paths, self.workers = paths, workers or max(1, min(8, os.cpu_count() or 1))
        self.spans, start, size = [], 0, first or chunk
        while start < len(paths):
            self.spans.append((start, min(start + size, len(paths))))
            start, size = self.spans[-1][1], chunk

    def _read(self, span: tuple[int, int]) -> Chunk:
        return read_images(self.paths[span[0] : span[1]], workers=self.workers)

    def head(self) -> list[Chunk]:
        got: list[Chunk] = []
        while self.spans and not (got and got[-1][0]):
            got.append(self._read(self.spans.pop(0)))
        return got

    def start(self) -> Iterator[Chunk]:
        """The chunks after the head, the first of them read from now on in the background (call it when
        the model has loaded: the head is captioned while it is read), each next one while one is used."""
        spans, self.spans = self.spans, []
        reader = ThreadPoolExecutor(1)
        ahead = reader.submit(self._read, spans[0]) if spans else None
        return self._rest(reader, ahead, spans)

    def _rest(self, reader: ThreadPoolExecutor, ahead, spans: list[tuple[int, int]]) -> Iterator[Chunk]:
        with reader:
            for i in range(len(spans)):
                got = ahead.result()
                if i + 1 < len(spans):
                    ahead = reader.submit(self._read, spans[i + 1])
                yield got

    def __iter__(self) -> Iterator[Chunk]:
        return self.start()


class RowWriter:
    """Caption rows in text, JSONL or CSV, to stdout or (atomically) to ``output``."""

    def __init__(self, fmt: str, output: str | None):
        self.fmt, self.output, self.tmp = fmt, Path(output) if output else None, None
        if self.output is None:
            self.out: TextIO = sys.stdout
        else:  # opened before any heavy work: an unwritable output fails at once
            fd, self.tmp = mkstemp_like_open(f".{self.output.name}.", self.output.parent)
            self.out = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.out) if fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["path", "caption"])

    def write(self, rows: list[tuple[Path, str]]) -> None:
        for path, caption in rows:
            if self.csv:
                self.csv.writerow([str(path), caption])
            elif self.fmt == "jsonl":
                self.out.write(json.dumps({"path": str(path), "caption": caption}) + "\n")
            else:
                self.out.write(f"{path}\t{caption}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tmp is not None:
            self.out.close()
            os.replace(self.tmp, self.output)
            self.tmp = None

    def abandon(self) -> None:
        if self.tmp is not None:
            self.out.close()
            Path(self.tmp).unlink(missing_ok=True)
            self.tmp = None


@dataclass
class CaptionStats:
    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0  # from the first file read to the last row written, less the model load (the caller's)


def caption_chunks(model, processor, chunks, cfg, prompt: str, write, stats: CaptionStats) -> None:
    """Caption each chunk's images and ``write`` its (path, caption) rows; one decoder for all chunks."""
    from captune.ops.generation import caption_images

    decoders: dict = {}
    for images, bad in chunks:
        stats.skipped += bad
        if images:
            caps = caption_images(model, processor, [b for _, b in images], cfg, prompt, decoders=decoders)
            write([(p, c) for (p, _), c in zip(images, caps, strict=True)])
            stats.images += len(images)

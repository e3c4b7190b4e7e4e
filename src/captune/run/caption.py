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


def read_chunks(paths: list[Path], chunk: int, workers: int | None = None) -> Iterator[Chunk]:
    """``read_images`` over consecutive chunks of ``paths``, each next chunk read while this one is used.
    The first chunk's reading starts at once, in the background (the caller loads the model meanwhile)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    reader = ThreadPoolExecutor(1)
    first = reader.submit(read_images, paths[:chunk], workers=workers) if paths else None
    return _chunks(reader, first, paths, chunk, workers)


def _chunks(reader: ThreadPoolExecutor, ahead, paths: list[Path], chunk: int, workers: int) -> Iterator[Chunk]:
    with reader:
        for start in range(0, len(paths), chunk):
            got = ahead.result()
            nxt = start + chunk
            ahead = reader.submit(read_images, paths[nxt : nxt + chunk], workers=workers) if nxt < len(paths) else None
            yield got


def readable_among(paths: list[Path], first: int = 8) -> bool:
    """Whether one of the first ``first`` paths is a readable image (checked here, in a moment)."""
    return bool(read_images(paths[:first])[0])


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

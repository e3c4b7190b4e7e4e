"""Caption image files: expand files, folders and globs; skip what cannot be read."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from captune.data.images import check_image
from captune.errors import UserError

T = TypeVar("T")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def collect_paths(patterns: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image paths from files, folders (recursively, by suffix) and globs, in a stable order."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        elif any(c in pattern for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                missing.append((pattern, "no file matches"))
            found += matches
        else:
            missing.append((pattern, "no such file or folder"))
    seen, unique = set(), []
    for p in found:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique, missing


def read_images(
    paths: list[Path], max_pixels: int = 50_000_000, workers: int = 1
) -> tuple[list[tuple[Path, bytes]], list[tuple[str, str]]]:
    """(path, bytes) of each readable image, in order, and (path, why) of the others; with
    ``workers`` > 1 the decode checks run in that many threads (Pillow decodes without the GIL)."""

    def one(p: Path) -> tuple[bytes | None, str | None]:
        try:
            data = p.read_bytes()
        except OSError as exc:
            return None, f"unreadable ({exc.strerror or exc})"
        return data, check_image(data, max_pixels)

    if workers > 1 and len(paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    ok, bad = [], []
    for p, (data, reason) in zip(paths, results, strict=True):
        if reason:
            bad.append((str(p), reason))
        else:
            ok.append((p, data))
    return ok, bad


def json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line is one line naming it."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n}: malformed JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{path} line {n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n}: expected a JSON object")
        yield n, row


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter), never more than one list held."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

"""Group, validate, sample and split a source into a local parquet cache, with bounded memory.

Cache layout (``DIR``)::

    manifest.json                  source, settings, counts, skipped items
    train-00000.parquet ...        image_id, image (bytes as they came), captions, digest (SHA-256)
    validation-00000.parquet ...
    test-00000.parquet ...

Preparation streams in two passes. The first reads the source once: each new image's bytes go
to an append-only spool file and its id, digest and captions to a SQLite table, so grouping,
merging and the split decision never hold images (nor, at a million images, their metadata) in
memory. The second writes each split's shards from the spool, one shard at a time. Both passes
work in ``.DIR.partial`` beside ``DIR``, renamed to ``DIR`` when complete, so an interrupted
prepare never leaves a cache that looks complete; a killed one restarts from its last committed
chunk of the first pass and its completed shards (same cache as an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import sqlite3
import sys
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from captune.atomic import public_modes, write_atomic
from captune.config import DataConfig
from captune.data.cache import Example, Split, open_split
from captune.data.images import check_image
from captune.data.sources import RawItem, Skip, given_splits, read_source
from captune.errors import UserError

__all__ = ["SPLITS", "Example", "Split", "load_split", "prepare"]

SPLITS = ("train", "validation", "test")
SHARD_ROWS = 500
ROW_GROUP_ROWS = 100  # a lazily read image costs one row group (~1.5 MB at 15 KB an image)
COMMIT_ITEMS = 2000  # source items per committed chunk of the first pass (what a restart redoes)
CACHE_VERSION = 1
_SPLIT_CODE = {None: 0, "train": 1, "validation": 2, "test": 3}


def clean_caption(text: str) -> str:
    return " ".join(text.split())


def caption_too_long(text: str, max_words: int) -> str | None:
    """Why a caption is dropped for its length, or None. Text over 64 characters a word is
    refused before it is split, so a multi-megabyte "caption" costs no more than its string."""
    if len(text) > 64 * max_words:
        return f"caption of {len(text)} characters, over 64 x data.max_caption_words={max_words}"
    words = len(text.split())
    if words > max_words:
        return f"caption of {words} words, over data.max_caption_words={max_words}"
    return None


def settings_of(cfg: DataConfig) -> dict:
    d = asdict(cfg)
    d.pop("train_captions")  # a training choice; the cache holds every caption
    d["cache_version"] = CACHE_VERSION
    return d


def _split_ids(ids, ratios: list[float], seed: int) -> dict[str, list]:
    """Shuffle with ``seed`` and cut by ``ratios``. ``ids`` may be positions (an ``array``): the
    shuffle's permutation depends only on the length, so positions split as the ids would."""
    order = array("q", ids) if isinstance(ids, array) else list(ids)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = round(n * ratios[0])
    n_val = round(n * ratios[1])
    if ratios[2] > 0 and n_train + n_val >= n and n >= 3:
        n_train = min(n_train, n - 2)  # keep at least one test image when one is asked for
    return {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


class _Progress:
    """One line of progress with images/s and ETA: redrawn on a terminal, every 30 s otherwise (a pass
    shorter than that prints nothing there: a log or a failing run's stderr stays one line)."""

    def __init__(self, label: str, total: int, enabled: bool, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.started = self.shown = time.perf_counter()
        self.tty = self.stream.isatty()
        self.printed = False

    def update(self, count: int, *, last: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not last and now - self.shown < (0.5 if self.tty else 30.0):
            return
        if last and not self.tty and not self.printed:
            return
        self.shown, self.printed = now, True
        rate = count / max(now - self.started, 1e-9)
        eta = f", ETA {(self.total - count) / rate:.0f}s" if self.total and rate > 0 and not last else ""
        line = f"  {self.label}: {count}/{self.total or '?'} images, {rate:.0f} images/s{eta}"
        self.stream.write(("\r" + line + ("\n" if last else "")) if self.tty else line + "\n")
        self.stream.flush()


_SCHEMA = """
create table if not exists groups (ord integer primary key, key text unique not null, digest text unique not null,
    split integer, off integer, len integer, captions text not null, ncaps integer not null);
create table if not exists skipped (n integer primary key, item text, reason text);
create table if not exists state (k text primary key, v text);
"""


class _Collector:
    """Raw items grouped into images: captions of one image together (by id, else by image hash),
    identical bytes under another id merged, bad images and captions skipped with their reason.

    State lives in SQLite (``db``) and new images' bytes in ``spool``; ``commit`` makes the
    items taken so far durable, so a restarted prepare goes on from there."""

    def __init__(self, cfg: DataConfig, folder: Path):
        self.cfg = cfg
        self.db = sqlite3.connect(folder / "groups.sqlite", isolation_level=None)
        self.db.executescript(_SCHEMA)
        self.db.execute("begin")
        state = dict(self.db.execute("select k, v from state"))
        self.consumed = int(state.get("consumed", 0))
        self.done = state.get("done") == "1"
        self.merged_duplicates = int(state.get("merged", 0))
        self.dropped = json.loads(state.get("dropped", '{"empty": 0, "repeated": 0}'))
        self.last_key = state.get("last_key")
        self.groups = self.db.execute("select count(*) from groups").fetchone()[0]
        self.want = cfg.num_images if cfg.sample == "first" else 0
        self.spool = open(folder / "images.spool", "a+b")  # noqa: SIM115 (closed by close())
        self.spool.truncate(int(state.get("spool", 0)))  # bytes written after the last commit go
        self.spool.seek(0, os.SEEK_END)

    def add(self, item: RawItem | Skip) -> bool:
        """Take one item; True once enough images are in (the stream may stop)."""
        self.consumed += 1
        if isinstance(item, Skip):
            self._skip(item.where, item.reason)
            return False
        digest = hashlib.sha256(item.image).hexdigest()
        key = item.image_id if item.image_id is not None else digest
        row = self.db.execute("select key from groups where key = ?", (key,)).fetchone()
        if row is None:
            other = self.db.execute("select key from groups where digest = ?", (digest,)).fetchone()
            if other is not None and other[0] != key:
                # Identical bytes under another id: one image, all references kept.
                key = other[0]
                self.merged_duplicates += 1
            else:
                if self.want and self.groups >= self.want and key != self.last_key:
                    self.consumed -= 1
                    return True
                reason = check_image(item.image, self.cfg.max_pixels)
                if reason is not None:
                    self._skip(item.where, reason)
                    return False
                off = self.spool.tell()
                self.spool.write(item.image)
                self.db.execute(
                    "insert into groups values (?, ?, ?, ?, ?, ?, '[]', 0)",
                    (self.groups, key, digest, _SPLIT_CODE[item.split], off, len(item.image)),
                )
                self.groups += 1
        self.last_key = key
        self._add_captions(key, item)
        return False

    def _skip(self, where: str, reason: str) -> None:
        self.db.execute("insert into skipped (item, reason) values (?, ?)", (where, reason))

    def _add_captions(self, key: str, item: RawItem) -> None:
        captions = json.loads(self.db.execute("select captions from groups where key = ?", (key,)).fetchone()[0])
        before = len(captions)
        for cap in item.captions:
            why = caption_too_long(cap, self.cfg.max_caption_words)
            if why:
                self._skip(f"{item.where} caption", why)
                continue
            cap = clean_caption(cap)
            if cap and cap not in captions:
                captions.append(cap)
            else:
                self.dropped["repeated" if cap else "empty"] += 1
        if len(captions) != before:
            self.db.execute(
                "update groups set captions = ?, ncaps = ? where key = ?", (json.dumps(captions), len(captions), key)
            )

    def commit(self, done: bool = False) -> None:
        """Make every item taken so far durable: the spool on disk first, then the table."""
        self.spool.flush()
        os.fsync(self.spool.fileno())
        state = {
            "consumed": self.consumed,
            "spool": self.spool.tell(),
            "merged": self.merged_duplicates,
            "dropped": json.dumps(self.dropped),
            "last_key": self.last_key,
            "done": "1" if done else "0",
        }
        self.db.executemany("insert or replace into state values (?, ?)", [(k, str(v)) for k, v in state.items()])
        self.db.execute("commit")
        self.db.execute("begin")
        self.done = done

    def skipped(self) -> list[dict]:
        return [{"item": i, "reason": r} for i, r in self.db.execute("select item, reason from skipped order by n")]

    def kept(self, strict: bool) -> tuple[array, list[dict]]:
        """Positions of the images with a caption (a seeded sample of them with ``data.sample=random``),
        checked, and every skipped item."""
        cfg = self.cfg
        skipped = self.skipped()
        kept = array("q")
        for ord_, key, ncaps in self.db.execute("select ord, key, ncaps from groups order by ord"):
            if ncaps:
                kept.append(ord_)
            else:
                skipped.append({"item": f"image {key}", "reason": "no non-empty caption"})
        if cfg.sample == "random" and cfg.num_images and len(kept) > cfg.num_images:
            # sample() draws by the population's length only: positions pick what the groups would
            kept = array("q", (kept[i] for i in random.Random(cfg.seed).sample(range(len(kept)), cfg.num_images)))
        if strict and skipped:
            first = "; ".join(f"{s['item']}: {s['reason']}" for s in skipped[:3])
            raise UserError(f"--strict: {len(skipped)} item(s) skipped, first: {first}")
        if len(kept) < 3:
            top = "; ".join(
                f"{len(items)} x {reason} (e.g. {items[0]})"
                for reason, items in list(skip_reasons(skipped).items())[:2]
            )
            raise UserError(
                f"data.source '{cfg.source}' gave {len(kept)} usable image(s); at least 3 are needed "
                f"(skipped {len(skipped)}{': ' + top if top else ''})"
            )
        return kept, skipped

    def splits_of(self, kept: array) -> tuple[dict[str, array], int]:
        """Each split's positions (by ``data.split_column`` or by ratios) and the references kept."""
        codes = bytearray(self.groups)
        ncaps = array("l", bytes(8 * self.groups)) if self.groups else array("l")
        for ord_, split, n in self.db.execute("select ord, split, ncaps from groups"):
            codes[ord_], ncaps[ord_] = split or 0, n
        references = sum(ncaps[i] for i in kept)
        if given_splits(self.cfg):
            return {s: array("q", (i for i in kept if codes[i] == _SPLIT_CODE[s])) for s in SPLITS}, references
        return _split_ids(kept, self.cfg.ratios, self.cfg.seed), references

    def rows(self, ords) -> list[tuple[str, bytes, list[str], str]]:
        """(image id, bytes, captions, digest) of the groups at ``ords``, in that order."""
        found = {}
        marks = ",".join("?" * len(ords))
        query = f"select ord, key, digest, off, len, captions from groups where ord in ({marks})"
        for ord_, key, digest, off, length, captions in self.db.execute(query, list(ords)):
            found[ord_] = (key, os.pread(self.spool.fileno(), length, off), json.loads(captions), digest)
        return [found[i] for i in ords]

    def close(self) -> None:
        if self.spool.closed:
            return
        try:
            self.spool.close()
        finally:
            self.db.close()


def _partial_dir(out_dir: Path, settings: dict, force: bool) -> Path:
    """``.DIR.partial`` beside ``DIR``, kept from an interrupted prepare of the same settings."""
    partial = out_dir.parent / f".{out_dir.name}.partial"
    mark = partial / "settings.json"
    if partial.is_dir() and (force or not mark.is_file() or json.loads(mark.read_text()) != settings):
        shutil.rmtree(partial)
    if not partial.is_dir():
        partial.mkdir(parents=True)
        write_atomic(mark, json.dumps(settings))
    return partial


def _read_items(collector: _Collector, items: Iterable[RawItem | Skip], progress: _Progress) -> None:
    """The first pass: every item into the collector, committed every ``COMMIT_ITEMS`` items."""
    if collector.done:
        return
    stream = itertools.islice(iter(items), collector.consumed, None)  # a restart skips what is committed
    for item in stream:
        if collector.add(item):
            break  # streaming stops once N images (with all their rows) are in
        if collector.consumed % COMMIT_ITEMS == 0:
            collector.commit()
        progress.update(collector.groups)
    collector.commit(done=True)
    progress.update(collector.groups, last=True)


def prepare(
    cfg: DataConfig,
    out_dir: Path,
    *,
    force: bool = False,
    strict: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    items: Iterable[RawItem | Skip] | None = None,
) -> dict:
    """Build (or reuse) the data cache for ``cfg`` in ``out_dir``; return its manifest.

    ``items`` replaces reading ``cfg.source`` (an in-memory dataset, see ``read_dataset``).
    """
    out_dir = Path(out_dir)
    settings = settings_of(cfg)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            log(f"  data cache reused: {out_dir}")
            return manifest
        raise UserError(f"{out_dir} holds data prepared with other settings; use --force to rebuild it")

    started = time.perf_counter()
    partial = _partial_dir(out_dir, settings, force)
    collector = _Collector(cfg, partial)
    try:
        reading = _Progress("reading", collector.want, progress)
        _read_items(collector, read_source(cfg) if items is None else items, reading)
        kept, skipped = collector.kept(strict)
        splits, references = collector.splits_of(kept)
        _write_shards(partial, splits, collector, _Progress("writing", len(kept), progress))
    except UserError:  # the same settings would fail the same way: no partial to resume from
        _discard(collector, partial)
        raise
    except (OSError, sqlite3.OperationalError) as exc:
        full = _full_disk(exc, partial)
        if full is None:
            raise
        _discard(collector, partial)  # its space is what the user must free: nothing kept
        raise full from None
    finally:
        collector.close()
    manifest = {
        "source": cfg.source,
        "revision": cfg.source.partition("@")[2] or None,
        "settings": settings,
        "counts": {s: len(ids) for s, ids in splits.items()},
        "images": len(kept),
        "references": references,
        "merged_duplicate_images": collector.merged_duplicates,
        "dropped_captions": collector.dropped,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _finish(partial, out_dir, manifest)
    log(
        f"  data: {len(kept)} images, {manifest['references']} references, "
        f"train/validation/test {manifest['counts']['train']}/{manifest['counts']['validation']}/"
        f"{manifest['counts']['test']}, skipped {len(skipped)}"
    )
    return manifest


def _discard(collector: _Collector, partial: Path) -> None:
    """Close the collector (its flush fails on a full disk too) and remove the partial preparation."""
    with contextlib.suppress(OSError, sqlite3.Error):
        collector.close()
    shutil.rmtree(partial, ignore_errors=True)


def _full_disk(exc: BaseException, partial: Path) -> OSError | None:
    """An out-of-space or read-only failure of the preparation as an ``OSError`` naming the cache
    folder (SQLite reports it as "database or disk is full"), or None for any other error."""
    import errno

    if isinstance(exc, OSError):
        return exc if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
    text = str(exc).lower()
    if "disk is full" in text:
        return OSError(errno.ENOSPC, "No space left on device", str(partial.parent))
    if "readonly database" in text or "read-only" in text:
        return OSError(errno.EROFS, "Read-only file system", str(partial.parent))
    return None


def _write_shards(folder: Path, splits: dict, collector: _Collector, progress: _Progress) -> None:
    """The second pass: each split's shards from the spool, one shard in memory at a time; a shard
    already complete (from an interrupted run) is kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = 0
    for split, ords in splits.items():
        for shard, start in enumerate(range(0, max(len(ords), 1), SHARD_ROWS)):
            path = folder / f"{split}-{shard:05d}.parquet"
            chunk = ords[start : start + SHARD_ROWS]
            done += len(chunk)
            if path.is_file():
                continue
            rows = collector.rows(chunk) if len(chunk) else []
            table = pa.table(
                {
                    "image_id": pa.array([r[0] for r in rows], pa.string()),
                    "image": pa.array([r[1] for r in rows], pa.binary()),
                    "captions": pa.array([r[2] for r in rows], pa.list_(pa.string())),
                    "digest": pa.array([r[3] for r in rows], pa.string()),
                }
            )
            tmp = folder / f".{path.name}.tmp"
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
            os.replace(tmp, path)
            progress.update(done)
    progress.update(done, last=True)


def _finish(partial: Path, out_dir: Path, manifest: dict) -> None:
    """The spool and table go; the manifest is written last and the folder renamed into place."""
    for name in ("images.spool", "groups.sqlite", "settings.json"):
        (partial / name).unlink(missing_ok=True)
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    public_modes(partial)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)


def load_split(data_dir: Path, split: str) -> Split:
    """The examples of ``split``, read lazily from the shards (image bytes only when asked for)."""
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise UserError(f"{data_dir} is not a prepared data cache; run 'captune data' first")
    return open_split(data_dir, split)


def skip_reasons(skipped: list[dict]) -> dict[str, list[str]]:
    """The skipped items grouped by reason, the most frequent reason first (items in source order)."""
    groups: dict[str, list[str]] = {}
    for entry in skipped:
        groups.setdefault(entry["reason"], []).append(entry["item"])
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def read_cache_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared data cache; run 'captune data' first")
    return json.loads(path.read_text())

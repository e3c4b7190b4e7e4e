"""Group, validate, sample and split a source into a local parquet cache.

Cache layout (``DIR``)::

    manifest.json                  source, settings, counts, skipped items
    train-00000.parquet ...        image_id, image (bytes as they came), captions
    validation-00000.parquet ...
    test-00000.parquet ...

The cache is written to a temporary folder beside ``DIR`` and renamed, so an
interrupted prepare never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from captune.atomic import staged_dir
from captune.config import DataConfig
from captune.data.images import check_image
from captune.data.sources import RawItem, Skip, read_source
from captune.errors import UserError

SPLITS = ("train", "validation", "test")
SHARD_ROWS = 500
CACHE_VERSION = 1


@dataclass
class Example:
    image_id: str
    image: bytes
    captions: list[str]


@dataclass
class _Group:
    image_id: str
    image: bytes
    digest: str
    captions: list[str] = field(default_factory=list)
    split: str | None = None


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


def _split_ids(ids: list[str], ratios: list[float], seed: int) -> dict[str, list[str]]:
    order = list(ids)
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


def _progress(count: int, total: int, started: float, stream=sys.stderr) -> None:
    if not stream.isatty():
        return
    rate = count / max(time.perf_counter() - started, 1e-9)
    stream.write(f"\r  preparing: {count}/{total or '?'} images, {rate:.0f} images/s")
    stream.flush()


class _Collector:
    """Raw items grouped into images: captions of one image together (by id, else by image hash),
    identical bytes under another id merged, bad images and captions skipped with their reason."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.groups: dict[str, _Group] = {}
        self.by_digest: dict[str, str] = {}
        self.skipped: list[dict] = []
        self.merged_duplicates = 0
        self.dropped = {"empty": 0, "repeated": 0}  # captions left out of an image that keeps others
        self.want = cfg.num_images if cfg.sample == "first" else 0
        self.last_key = None

    def add(self, item: RawItem | Skip) -> bool:
        """Take one item; True once enough images are in (the stream may stop)."""
        if isinstance(item, Skip):
            self.skipped.append({"item": item.where, "reason": item.reason})
            return False
        digest = hashlib.sha256(item.image).hexdigest()
        key = item.image_id if item.image_id is not None else digest
        if key not in self.groups:
            if digest in self.by_digest and self.by_digest[digest] != key:
                # Identical bytes under another id: one image, all references kept.
                key = self.by_digest[digest]
                self.merged_duplicates += 1
            else:
                if self.want and len(self.groups) >= self.want and key != self.last_key:
                    return True
                reason = check_image(item.image, self.cfg.max_pixels)
                if reason is not None:
                    self.skipped.append({"item": item.where, "reason": reason})
                    return False
                self.groups[key] = _Group(key, item.image, digest, split=item.split)
                self.by_digest[digest] = key
        self.last_key = key
        self._add_captions(self.groups[key], item)
        return False

    def _add_captions(self, group: _Group, item: RawItem) -> None:
        for cap in item.captions:
            why = caption_too_long(cap, self.cfg.max_caption_words)
            if why:
                self.skipped.append({"item": f"{item.where} caption", "reason": why})
                continue
            cap = clean_caption(cap)
            if cap and cap not in group.captions:
                group.captions.append(cap)
            else:
                self.dropped["repeated" if cap else "empty"] += 1

    def kept(self, strict: bool) -> list[_Group]:
        """The images with a caption (a seeded sample of them with ``data.sample=random``), checked."""
        cfg, skipped = self.cfg, self.skipped
        kept: list[_Group] = []
        for g in self.groups.values():
            if g.captions:
                kept.append(g)
            else:
                skipped.append({"item": f"image {g.image_id}", "reason": "no non-empty caption"})
        if cfg.sample == "random" and cfg.num_images and len(kept) > cfg.num_images:
            kept = random.Random(cfg.seed).sample(kept, cfg.num_images)
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
        return kept


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
    collector = _Collector(cfg)
    for item in read_source(cfg) if items is None else items:
        if collector.add(item):
            break  # streaming stops once N images (with all their rows) are in
        if progress and len(collector.groups) % 200 == 0:
            _progress(len(collector.groups), collector.want, started)
    if progress and sys.stderr.isatty():
        _progress(len(collector.groups), collector.want, started)
        sys.stderr.write("\n")
    kept, skipped = collector.kept(strict), collector.skipped
    by_id = {g.image_id: g for g in kept}
    if cfg.split_column:
        splits = {s: [g.image_id for g in kept if g.split == s] for s in SPLITS}
    else:
        splits = _split_ids([g.image_id for g in kept], cfg.ratios, cfg.seed)
    manifest = {
        "source": cfg.source,
        "revision": cfg.source.partition("@")[2] or None,
        "settings": settings,
        "counts": {s: len(ids) for s, ids in splits.items()},
        "images": len(kept),
        "references": sum(len(g.captions) for g in kept),
        "merged_duplicate_images": collector.merged_duplicates,
        "dropped_captions": collector.dropped,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_cache(out_dir, splits, by_id, manifest)
    log(
        f"  data: {len(kept)} images, {manifest['references']} references, "
        f"train/validation/test {manifest['counts']['train']}/{manifest['counts']['validation']}/"
        f"{manifest['counts']['test']}, skipped {len(skipped)}"
    )
    return manifest


def _write_cache(out_dir: Path, splits: dict, by_id: dict, manifest: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with staged_dir(out_dir) as tmp:
        for split, ids in splits.items():
            for shard, start in enumerate(range(0, max(len(ids), 1), SHARD_ROWS)):
                rows = [by_id[i] for i in ids[start : start + SHARD_ROWS]]
                table = pa.table(
                    {
                        "image_id": pa.array([g.image_id for g in rows], pa.string()),
                        "image": pa.array([g.image for g in rows], pa.binary()),
                        "captions": pa.array([g.captions for g in rows], pa.list_(pa.string())),
                    }
                )
                pq.write_table(table, tmp / f"{split}-{shard:05d}.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


def load_split(data_dir: Path, split: str) -> list[Example]:
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise UserError(f"{data_dir} is not a prepared data cache; run 'captune data' first")
    out: list[Example] = []
    for shard in sorted(data_dir.glob(f"{split}-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            out.append(Example(row["image_id"], row["image"], list(row["captions"])))
    return out


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

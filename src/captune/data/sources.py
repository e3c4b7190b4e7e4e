"""Readers for every supported source; each yields raw (id, image bytes, captions) items.

A reader does no grouping, validation or splitting; ``prepare`` does that once for
all sources. Readers yield ``RawItem`` or ``Skip`` (an item that cannot be read,
with the reason) and never raise for one bad row. Malformed container files
(JSON, CSV, JSONL) raise ``UserError`` naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captune.config import DataConfig
from captune.data.files import json_lines
from captune.errors import UserError


@dataclass
class RawItem:
    image: bytes
    captions: list[str]
    image_id: str | None = None
    where: str = ""
    split: str | None = None


@dataclass
class Skip:
    where: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


def parse_source(source: str) -> tuple[str, str]:
    kind, _, rest = source.partition(":")
    kinds = ("demo", "hub", "coco", "manifest", "imagefolder", "parquet", "arrow", "dataset")
    if kind not in kinds or not rest:
        shown = [k for k in kinds if k != "dataset"]  # dataset: names an in-memory Dataset, not typed by hand
        raise UserError(f"data.source '{source}' is not understood; use one of " + ", ".join(f"{k}:..." for k in shown))
    return kind, rest


def _as_captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    if isinstance(value, dict) and "raw" in value:  # some COCO dumps use {"raw": ...}
        return _as_captions(value["raw"])
    return []


def _image_bytes(value: Any) -> bytes | None:
    """Bytes of an image cell: raw bytes, a datasets Image dict, or a PIL image."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
        return None
    if hasattr(value, "save"):  # a decoded PIL image: re-encode losslessly
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None


def _read_file(path: Path, where: str) -> RawItem | Skip | bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return Skip(where, f"image file not found: {path}")
    except OSError as exc:
        return Skip(where, f"image file unreadable: {path} ({exc.strerror or exc})")


SPLIT_NAMES = {
    "train": "train",
    "restval": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}


HUB_SPLIT_COLUMN = "_hub_split"


def joined_splits(cfg: DataConfig) -> list[str]:
    """The source splits ``data.split`` joins with '+' (``train+validation+test``), or [] for one."""
    parts = [p.strip() for p in cfg.split.split("+")]
    return parts if len(parts) > 1 else []


def given_splits(cfg: DataConfig) -> bool:
    """True when the source says each image's split (``data.split_column`` or joined Hub splits):
    the ratios are not used."""
    return bool(cfg.split_column) or bool(joined_splits(cfg))


def _split_of(row: dict, cfg: DataConfig, label: str) -> str | None:
    """The split a row names in ``data.split_column`` (Karpathy's restval counts as train)."""
    if not cfg.split_column:
        return None
    if cfg.split_column not in row:
        raise UserError(f"{label}: no column '{cfg.split_column}'; set data.split_column")
    value = str(row[cfg.split_column]).strip().lower()
    if value not in SPLIT_NAMES:
        raise UserError(f"{label}: split value '{row[cfg.split_column]}' is not one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES[value]


# ------------------------------------------------------------------ demo


def read_demo(name: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    from captune.demo import world

    style = {"shapes-catalog": "catalog", "shapes-plain": "plain"}.get(name)
    if style is None:
        raise UserError(f"unknown demo source 'demo:{name}'; use demo:shapes-catalog or demo:shapes-plain")
    count = cfg.num_images or 1000
    for item in world.make_items(style, count, seed=cfg.seed + 7):
        yield RawItem(item["image"], item["captions"], item["image_id"], item["image_id"])


# ------------------------------------------------------------------ tables


def _rows_to_items(rows: Iterator[dict], cfg: DataConfig, label: str) -> Iterator[RawItem | Skip]:
    for i, row in enumerate(rows):
        where = f"{label} row {i}"
        check_columns(row, label, {cfg.image_column: "data.image_column", cfg.caption_column: "data.caption_column"})
        data = _image_bytes(row[cfg.image_column])
        if data is None:
            yield Skip(where, "no image bytes in this row")
            continue
        image_id = None
        if cfg.id_column:
            if cfg.id_column not in row:
                raise UserError(f"{label}: no column '{cfg.id_column}'; set data.id_column")
            image_id = str(row[cfg.id_column])
        yield RawItem(data, _as_captions(row[cfg.caption_column]), image_id, where, _split_of(row, cfg, label))


def read_hub(spec: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    """A Hub dataset in streaming mode; images are read as bytes, never re-encoded."""
    import datasets

    name, _, revision = spec.partition("@")
    splits = joined_splits(cfg)
    for split in splits or [cfg.split]:
        ds = _open_hub(datasets, name, split, revision, cfg)
        if not splits:
            yield from _rows_to_items(iter(ds), cfg, f"hub:{name}")
            continue
        # each Hub split is the split of its rows (Karpathy's, in jxie/coco_captions)
        rows = ({**row, HUB_SPLIT_COLUMN: split} for row in ds)
        yield from _rows_to_items(rows, dataclasses.replace(cfg, split_column=HUB_SPLIT_COLUMN), f"hub:{name}")


def _open_hub(datasets, name: str, split: str, revision: str, cfg: DataConfig):
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True, revision=revision or None)
    except Exception as exc:  # datasets raises many types for "cannot reach the Hub"
        raise UserError(
            f"cannot open Hub dataset '{name}' split '{split}' ({type(exc).__name__}); "
            "check the name and your internet connection, or download it and use "
            "parquet:PATH / arrow:PATH"
        ) from None
    if ds.features is not None:
        needed = {cfg.image_column: "data.image_column", cfg.caption_column: "data.caption_column"}
        check_columns(dict(ds.features), f"hub:{name}", needed)
    return ds.cast_column(cfg.image_column, datasets.Image(decode=False))


def read_parquet(pattern: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise UserError(f"parquet:{pattern}: no such file")
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception:
            raise UserError(f"{f}: not a readable parquet file") from None
        for batch in pf.iter_batches(batch_size=256):
            yield from _rows_to_items(iter(batch.to_pylist()), cfg, f)


def read_arrow(path: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception:
        raise UserError(f"arrow:{path}: not a dataset saved with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise UserError(f"arrow:{path}: no split '{cfg.split}'; splits are {', '.join(ds)}")
        ds = ds[cfg.split]
    needed = {cfg.image_column: "data.image_column", cfg.caption_column: "data.caption_column"}
    check_columns(dict(ds.features), f"arrow:{Path(path).name}", needed)
    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    yield from _rows_to_items(iter(ds), cfg, path)


def read_dataset(ds: Any, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    """Rows of an in-memory ``datasets.Dataset``; an Image column is read as bytes, never re-encoded."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"a DatasetDict has splits {', '.join(ds)}; pass one of them, e.g. ds['{cfg.split}']")
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"expected a datasets.Dataset or a source string, got {type(ds).__name__}")
    for column in (cfg.image_column, cfg.caption_column):
        if column not in ds.column_names:
            raise UserError(
                f"the dataset has no column '{column}'; columns are {', '.join(ds.column_names)}; "
                "pass image_column= / caption_column="
            )
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    yield from _rows_to_items(iter(ds), cfg, "dataset")


def _in_memory_only(fingerprint: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    raise UserError(
        f"data.source 'dataset:{fingerprint}' was an in-memory datasets.Dataset; pass it again "
        "(captune.run_recipe(..., data=ds) or captune.prepare_data(ds, ...)), or save it and use arrow:DIR"
    )
    yield  # a generator, like the other readers


# ------------------------------------------------------------------ files


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None


def read_coco(annotations: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    path = Path(annotations)
    doc = _load_json(path)
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        raise UserError(f"{path}: not COCO caption format (needs 'images' and 'annotations' lists)")
    root = Path(cfg.images) if cfg.images else path.parent
    caps: dict[str, list[str]] = {}
    for ann in doc["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            caps.setdefault(str(ann["image_id"]), []).extend(_as_captions(ann.get("caption")))
    listed = {str(img["id"]) for img in doc["images"] if isinstance(img, dict) and "id" in img}
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            yield Skip(f"{path} images[{i}]", "entry lacks 'id' or 'file_name'")
            continue
        where = f"{path} image {img['id']}"
        data = _read_file(root / img["file_name"], where)
        if isinstance(data, Skip):
            yield data
            continue
        yield RawItem(data, caps.get(str(img["id"]), []), str(img["id"]), where)
    for image_id in sorted(caps.keys() - listed):  # annotations whose image is not in 'images': say so, not drop
        yield Skip(f"{path} annotations of image {image_id}", "annotations for an image id missing from 'images'")


def _read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a JSONL or CSV file with their line numbers."""
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    with handle:
        try:
            if path.suffix == ".jsonl":
                yield from json_lines(path, handle)
            elif path.suffix == ".csv":
                reader = csv.DictReader(handle)
                for row in reader:
                    yield reader.line_num, row
            else:
                raise UserError(f"{path}: expected a .jsonl or .csv file")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise UserError(f"{path}: malformed CSV ({exc})") from None


def _csv_captions(row: dict, column: str) -> list[str]:
    """Captions from a row: a list, a JSON list in a string, or several caption* columns."""
    value = row.get(column)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = json.loads(value)
            if isinstance(parsed, list):
                return _as_captions(parsed)
        except (json.JSONDecodeError, RecursionError):
            pass
    found = _as_captions(value)
    if column in row:
        extra = sorted(k for k in row if k and k != column and k.startswith(column))
        found += [row[k] for k in extra if isinstance(row[k], str)]
    return found


CAPTION_LIKE = ("caption", "captions", "text", "sentence", "sentences", "description", "label", "prompt")


def check_columns(row: dict, label: str, needed: dict[str, str | None]) -> None:
    """Columns the config names must exist (checked on the first row); say which ones do.

    ``needed`` maps a column name to the config key that chose it (None: fixed by the layout). Without this, a wrong
    caption column reads as "every row has no caption" and ends with 0 usable images.
    """
    for column, key in needed.items():
        if column in row:
            continue
        present = [str(k) for k in row]
        guess = ""
        if key == "data.caption_column":
            guess = next((c for c in CAPTION_LIKE if c in present), "")
        fix = f"set {key}={guess}" if guess else f"set {key} to one of them"
        if key is None:
            fix = f"the imagefolder layout needs a '{column}' column"
        raise UserError(f"no column '{column}' in {label}; columns are {', '.join(present)}; {fix}")


def _read_listing(path: Path, cfg: DataConfig, file_column: str, file_key: str) -> Iterator[RawItem | Skip]:
    for n, (line, row) in enumerate(_read_rows(path)):
        if n == 0:
            check_columns(row, path.name, {file_column: file_key, cfg.caption_column: "data.caption_column"})
        where = f"{path} line {line}"
        name = row.get(file_column)
        if not isinstance(name, str) or not name:
            yield Skip(where, f"no '{file_column}' value")
            continue
        data = _read_file(path.parent / name, where)
        if isinstance(data, Skip):
            yield data
            continue
        image_id = str(row[cfg.id_column]) if cfg.id_column and row.get(cfg.id_column) else None
        yield RawItem(
            data, _csv_captions(row, cfg.caption_column), image_id or name, where, _split_of(row, cfg, str(path))
        )


def read_manifest_file(path: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    yield from _read_listing(Path(path), cfg, cfg.image_column, "data.image_column")


def read_imagefolder(folder: str, cfg: DataConfig) -> Iterator[RawItem | Skip]:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"imagefolder:{folder}: folder not found")
    for name in ("metadata.jsonl", "metadata.csv"):
        if (root / name).is_file():
            yield from _read_listing(root / name, cfg, "file_name", None)
            return
    raise UserError(f"imagefolder:{folder}: needs metadata.jsonl or metadata.csv with file_name")


READERS = {
    "demo": read_demo,
    "hub": read_hub,
    "parquet": read_parquet,
    "arrow": read_arrow,
    "coco": read_coco,
    "manifest": read_manifest_file,
    "imagefolder": read_imagefolder,
    "dataset": _in_memory_only,
}


def read_source(cfg: DataConfig) -> Iterator[RawItem | Skip]:
    kind, rest = parse_source(cfg.source)
    return READERS[kind](rest, cfg)

"""Caption files people have, read for ``captune score``.

Predictions: captune's JSONL (``{"image_id", "caption"[, "references"][, "image"]}`` a line)
or a COCO results file (a JSON array of ``{"image_id", "caption"}``, what the COCO server
and most caption repositories write). References: captune's JSONL (``{"image_id",
"captions": [...]}``) or COCO caption annotations (``{"images": [...], "annotations":
[{"image_id", "caption"}, ...]}``, e.g. ``captions_val2014.json``).

Duplicate image ids in predictions are an error that names them: silently keeping one of
two captions for an image would score a caption set nobody chose.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from captune.data.files import json_lines
from captune.errors import UserError


@dataclass
class CaptionSet:
    """Predictions with their references, and what was noticed while reading them."""

    predictions: dict[str, str]
    references: dict[str, list[str]] = field(default_factory=dict)
    # image id -> image file (for CLIPScore): a row's "image" path or a COCO file_name
    images: dict[str, str] = field(default_factory=dict)
    empty_captions: list[str] = field(default_factory=list)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return path.read_text(encoding="utf-8", errors="replace")


def _whole_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None


def _jsonl_rows(path: Path, text: str):
    for n, row in json_lines(path, text.splitlines()):
        yield f"line {n}", row


def _rows(path: Path):
    """(where, row) pairs from a JSON array, or from JSONL; plus the whole document if it is an object."""
    text = _read_text(path)
    head = text.lstrip()[:1]
    if head == "[":
        doc = _whole_json(path, text)
        for n, row in enumerate(doc):
            if not isinstance(row, dict):
                raise UserError(f"{path} entry {n}: expected a JSON object")
            yield f"entry {n}", row
        return
    yield from _jsonl_rows(path, text)


def read_predictions(path: Path) -> CaptionSet:
    """Predictions (JSONL or a COCO results array); references inline when the JSONL has them."""
    out = CaptionSet(predictions={})
    seen: Counter[str] = Counter()
    for where, row in _rows(path):
        if "image_id" not in row or "caption" not in row:
            raise UserError(f"{path} {where}: needs 'image_id' and 'caption'")
        key = str(row["image_id"])
        seen[key] += 1
        caption = "" if row["caption"] is None else str(row["caption"])
        out.predictions[key] = caption
        if row.get("references"):
            out.references[key] = [str(r) for r in row["references"]]
        if row.get("image"):
            out.images[key] = str(row["image"])
    duplicates = [k for k, c in seen.items() if c > 1]
    if duplicates:
        shown = ", ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise UserError(f"{path}: {len(duplicates)} image id(s) have more than one caption: {shown}; keep one each")
    if not out.predictions:
        raise UserError(f"{path}: no captions to score")
    out.empty_captions = [k for k, c in out.predictions.items() if not c.strip()]
    return out


def read_references(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """References (captune JSONL or COCO caption annotations) and, for COCO, each image's file name."""
    text = _read_text(path)
    if text.lstrip()[:1] == "{":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # several objects: JSONL
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply") from None
        if isinstance(doc, dict) and "annotations" in doc:
            return _coco_references(path, doc)
    refs: dict[str, list[str]] = {}
    for where, row in _jsonl_rows(path, text):
        if "image_id" not in row or not isinstance(row.get("captions"), list):
            raise UserError(f"{path} {where}: needs 'image_id' and a 'captions' list")
        refs[str(row["image_id"])] = [str(c) for c in row["captions"]]
    return refs, {}


def _coco_references(path: Path, doc: dict) -> tuple[dict[str, list[str]], dict[str, str]]:
    annotations = doc.get("annotations")
    if not isinstance(annotations, list):
        raise UserError(f"{path}: 'annotations' must be a list of {{image_id, caption}}")
    refs: dict[str, list[str]] = {}
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise UserError(f"{path} annotation {n}: needs 'image_id' and 'caption'")
        refs.setdefault(str(ann["image_id"]), []).append(str(ann["caption"]))
    files = {
        str(im["id"]): str(im["file_name"])
        for im in doc.get("images") or []
        if isinstance(im, dict) and "id" in im and "file_name" in im
    }
    return refs, files


def image_files(found: CaptionSet, coco_files: dict[str, str], folder: str | None, base: Path) -> list[Path]:
    """Each predicted image's file, for CLIPScore: a row's "image", a COCO file_name or <id>.jpg/.png in folder.

    Relative paths are taken from ``folder`` when given, else from ``base`` (the predictions' folder).
    """
    root = Path(folder) if folder else base
    out, missing = [], []
    for key in found.predictions:
        named = found.images.get(key) or coco_files.get(key)
        candidates = [root / named] if named else [root / f"{key}{ext}" for ext in (".jpg", ".jpeg", ".png")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(key)
        else:
            out.append(hit)
    if missing:
        raise UserError(
            f"CLIPScore needs the images; none found for image id(s) {', '.join(missing[:5])} under {root} "
            "(give --images DIR, an 'image' path per line, or COCO annotations with file_name)"
        )
    return out

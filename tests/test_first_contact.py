"""What a new user sees: one right line for each wrong input (issue 20)."""

from __future__ import annotations

import json

from captune.cli import main
from tests.conftest import jpeg_bytes
from tests.test_data import _coco_captions_copy


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("captune: error: "), err
    return err.removeprefix("captune: error: ")


def test_imagefolder_with_a_text_column_says_which_column(tmp_path, capsys):
    root = tmp_path / "pets"
    root.mkdir()
    rows = []
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 50, 9, 9)))
        rows.append({"file_name": f"{i}.jpg", "text": f"a pet number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "cache"
    assert main(["data", "prepare", "--source", f"imagefolder:{root}", "--out", str(out)]) == 2
    assert _error(capsys) == (
        "no column 'caption' in metadata.jsonl; columns are file_name, text; set data.caption_column=text"
    )
    argv = ["data", "prepare", "--source", f"imagefolder:{root}", "--out", str(out), "--caption-column", "text"]
    assert main(argv) == 0


def test_manifest_and_hub_columns(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.csv").write_text("path,sentence\na.jpg,a red box\n")
    assert main(["data", "prepare", "--source", f"manifest:{tmp_path / 'm.csv'}", "--out", str(tmp_path / "c")]) == 2
    expected = "no column 'image' in m.csv; columns are path, sentence; set data.image_column to one of them"
    assert _error(capsys) == expected
    repo = _coco_captions_copy(tmp_path / "coco_captions")
    argv = ["data", "prepare", "--source", f"hub:{repo}", "--out", str(tmp_path / "h"), "--caption-column", "text"]
    assert main(argv) == 2
    err = _error(capsys)
    assert err.startswith(f"no column 'text' in hub:{repo}; columns are image, filename, cocoid, caption")
    assert err.endswith("set data.caption_column=caption")


def test_imagefolder_not_found(tmp_path, capsys):
    argv = ["data", "prepare", "--source", f"imagefolder:{tmp_path / 'nope'}", "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    assert _error(capsys) == f"imagefolder:{tmp_path / 'nope'}: folder not found"

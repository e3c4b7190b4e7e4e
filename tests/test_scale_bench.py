"""bench/scale.py: the synthetic source it makes, and (slow) a tiny run of every phase."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("scale_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = module  # its worker function is pickled by module name
    spec.loader.exec_module(module)
    return module


def test_source_is_unique_jpegs_with_five_captions(tmp_path):
    made = _bench().make_source(tmp_path, 30)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == made["images"] == 30
    assert all(len(set(r["caption"])) == 5 for r in rows)
    data = [(tmp_path / r["file_name"]).read_bytes() for r in rows]
    assert len({hashlib.sha256(d).digest() for d in data}) == 30  # scenes repeat, bytes never
    assert all(d[:3] == b"\xff\xd8\xff" for d in data)
    assert 8_000 < made["mean_jpeg_bytes"] < 25_000  # COCO-like small JPEGs, ~15 KB


@pytest.mark.slow
def test_every_phase_runs_and_reports_its_peak(tmp_path):
    bench, out = _bench(), tmp_path / "scale.json"
    bench.make_source(tmp_path / "src", 120)  # a source kept from an earlier run, reused (--source)
    assert bench.main(["--images", "120", "--eval-images", "6", "--steps", "2", "--work", str(tmp_path / "w"),
                       "--source", str(tmp_path / "src"), "--out", str(out)]) == 0  # fmt: skip
    text = out.read_text()
    assert str(tmp_path) not in text and "$WORK/run" in text and "--source $SOURCE" in text  # no local path
    doc = json.loads(text)
    assert doc["source"]["reused"] and 8_000 < doc["source"]["mean_jpeg_bytes"] < 25_000
    assert list(doc["phases"]) == ["data", "baseline", "train", "finetuned", "compare", "report"]
    assert all(p["peak_rss_mb"] > 50 and p["seconds"] > 0 for p in doc["phases"].values())
    assert doc["counts"] == {"train": 108, "validation": 6, "test": 6} and doc["references"] == 600
    assert doc["date"] and doc["cpu"] and doc["versions"]["torch"]
    assert doc["command"].startswith("python bench/scale.py")


def test_source_in_parallel_blocks_is_the_same_kind(tmp_path):
    made = _bench().make_source(tmp_path, 2100, jobs=2)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"images/{i // 1000:04d}/{i:07d}.jpg" for i in range(2100)]
    assert made["jobs"] == 2 and 8_000 < made["mean_jpeg_bytes"] < 25_000


def test_a_reused_source_is_checked(tmp_path):
    bench = _bench()
    bench.make_source(tmp_path / "src", 5)
    with pytest.raises(SystemExit, match="holds 5 images, not --images 6"):
        bench.reuse_source(tmp_path / "src", 6)
    with pytest.raises(SystemExit, match="no metadata.jsonl"):
        bench.reuse_source(tmp_path, 5)
    with pytest.raises(SystemExit, match="is inside --work"):
        bench.main(["--images", "5", "--work", str(tmp_path), "--source", str(tmp_path / "src"), "--out", "x.json"])


def test_a_phase_peak_is_its_own_not_the_forking_bench_process(tmp_path):
    """ru_maxrss of a forked and exec'd child keeps the parent's RSS at the fork: a small phase
    read as this process's size (the 1M bench's compare and report read 459 MB)."""
    held = bytearray(400 << 20)
    held[::4096] = b"\x01" * len(held[::4096])  # resident, not just reserved
    phase = _bench().run_phase(tmp_path, ["recipes"], tmp_path)
    assert 20 < phase["peak_rss_mb"] < 300 and len(held)

"""bench/scale_gpu.py at its CPU size: features once into the sharded cache, the 5k job's split
resident, one epoch streamed from the map, and the figures the acceptance reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_scale_bench_writes_its_figures(tmp_path):
    out, work = tmp_path / "scale.json", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "scale_gpu.py"), "--tiny", "--images", "40", "--compare-steps",
           "4", "--shard-rows", "16", "--out", str(out), "--work", str(work)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert {"gpu", "date", "torch", "transformers", "peft", "command"} <= doc.keys()
    assert doc["features"]["images"] == 40 and doc["features"]["shards"] == 3  # 16 + 16 + 8 rows
    assert doc["resident_5k"]["residence"] == "gpu" and doc["resident_5k"]["steps"] == 4
    streamed = doc["streamed"]
    assert streamed["residence"] == "stream" and streamed["pairs"] == 200 and streamed["steps"] > 4
    assert streamed["samples_per_s_steady"] > 0 and "samples_per_s_ratio" in doc["acceptance"]
    assert "streamed from disk" in done.stdout and not work.exists()  # the cache is removed afterwards

"""``captune eval RUN eval.KEY=VALUE``: a new decoding of a finished run, in a folder of its own (issue 20)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captune.cli import main
from captune.config import load_config


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_eval_overrides_decode_again_into_a_new_folder(demo_run, tmp_path, capsys):
    run = tmp_path / "demo"
    shutil.copytree(demo_run, run)
    before = _digests(run)
    assert main(["eval", str(run), "eval.num_beams=3", "eval.max_new_tokens=12"]) == 0
    out = run / "eval-max_new_tokens-12,num_beams-3"
    for rel in ("baseline/metrics.json", "finetuned/metrics.json", "comparison.json", "config.yaml"):
        assert (out / rel).is_file(), rel
    after = _digests(run)
    assert {k: v for k, v in after.items() if not k.startswith(out.name + "/")} == before  # the run's own: as they were
    saved = (out / "config.yaml").read_text()
    assert "num_beams: 3" in saved and "max_new_tokens: 12" in saved
    assert json.loads((out / "comparison.json").read_text())["rows"]
    assert f"{out} (the run's own outputs are unchanged)" in capsys.readouterr().out
    # run again: complete, skipped
    assert main(["eval", str(run), "eval.num_beams=3", "eval.max_new_tokens=12"]) == 0
    assert "[baseline] complete, skipped" in capsys.readouterr().out


def test_eval_overrides_outside_eval_are_one_line_naming_the_key(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config("demo").to_yaml())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    argv = [sys.executable, "-m", "captune.cli", "eval", str(run), "eval.num_beams=3", "train.lr=1e-3"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("captune: error: train.lr: only eval.* keys can be changed on an existing run")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing made


def test_redecode_folder_names():
    from captune.run.redecode import folder_name

    assert folder_name([("eval.num_beams", 3)]) == "eval-num_beams-3"
    odd = folder_name([("eval.split", "a b/c")])
    assert odd.startswith("eval-") and "/" not in odd and " " not in odd
    assert folder_name([("eval.split", "a b/c")]) != folder_name([("eval.split", "a-b-c")])

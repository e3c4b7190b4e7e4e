"""A run killed with SIGKILL during training completes on re-run with the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from captune.evaluation.metrics import OFFICIAL

ARGS = [
    "data.num_images=60",
    "train.epochs=3",
    "train.checkpoint_every=2",
    "eval.bootstrap=100",
    "report.examples=2",
    "model.device=cpu",
]


def _run(out, wait=True, extra=()):
    cmd = [sys.executable, "-m", "captune.cli", "run", "demo", "--out", str(out), *ARGS, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out_text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out_text[-2000:]
        return out_text
    return proc


def test_sigkill_during_training_then_rerun(tmp_path):
    whole = tmp_path / "whole"
    _run(whole)
    killed = tmp_path / "killed"
    proc = _run(killed, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not any((killed / "checkpoints").glob("step-*/state.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    log = _run(killed)
    assert "resuming from step-" in log
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    ma = json.loads((whole / "finetuned" / "metrics.json").read_text())
    mb = json.loads((killed / "finetuned" / "metrics.json").read_text())
    ma, mb = ({k: m[k] for k in OFFICIAL} for m in (ma, mb))
    assert ma == mb
    leftovers = [p for p in killed.rglob(".*") if p.name.startswith(".") and ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_sigkill_mid_epoch_with_streamed_features_then_rerun(tmp_path):
    """Features streamed from the sharded cache (train.feature_residence=stream): killed once a
    mid-epoch checkpoint is written, the re-run resumes there and ends with the adapter of an
    uninterrupted run that kept its features on the device."""
    whole = tmp_path / "whole"
    _run(whole)
    killed = tmp_path / "killed"
    stream = ["train.feature_residence=stream"]
    proc = _run(killed, wait=False, extra=stream)
    deadline = time.time() + 300
    while time.time() < deadline and not any((killed / "checkpoints").glob("step-*/state.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    log = _run(killed, extra=stream)
    assert "resuming from step-" in log and "streamed from disk" in log
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [str(p) for p in killed.rglob(".*")] == []


def test_sigkill_at_random_points_of_every_phase(tmp_path):
    """Kill `captune run` at seeded random moments across the whole run, re-run each time; the final
    adapter and metrics equal an uninterrupted run's, and every file left is complete."""
    import json
    import random

    whole = tmp_path / "whole"
    started = time.time()
    _run(whole)
    duration = time.time() - started
    killed = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    for fraction in sorted(rng.uniform(0.05, 0.95) for _ in range(4)):
        proc = _run(killed, wait=False)
        time.sleep(duration * fraction / 2)  # later runs skip finished phases, so aim early
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    _run(killed)
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for side in ("baseline", "finetuned"):
        ma = json.loads((whole / side / "metrics.json").read_text())
        mb = json.loads((killed / side / "metrics.json").read_text())
        ma, mb = ({k: m[k] for k in OFFICIAL} for m in (ma, mb))
        assert ma == mb, side
    assert json.loads((killed / "comparison.json").read_text())["rows"]
    hidden = [str(p) for p in killed.rglob(".*")]
    assert hidden == []

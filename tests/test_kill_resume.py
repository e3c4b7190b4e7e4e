"""A run killed with SIGKILL during training completes on re-run with the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

ARGS = [
    "data.num_images=60",
    "train.epochs=3",
    "train.checkpoint_every=2",
    "eval.bootstrap=100",
    "report.examples=2",
    "model.device=cpu",
]


def _run(out, wait=True):
    cmd = [sys.executable, "-m", "captune.cli", "run", "demo", "--out", str(out), *ARGS]
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

    ma = json.loads((whole / "finetuned" / "metrics.json").read_text())["metrics"]
    mb = json.loads((killed / "finetuned" / "metrics.json").read_text())["metrics"]
    assert ma == mb
    leftovers = [p for p in killed.rglob(".*") if p.name.startswith(".") and ".tmp-" in p.name]
    assert leftovers == []

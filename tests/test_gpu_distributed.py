"""Two-GPU tests (marker gpu): each engine's launch on CUDA (NCCL, fused AdamW), and a DeepSpeed
ZeRO-3 run killed mid-training and resumed, loading the whole-tensor checkpoint back into the
partitions with AdamW's step count on the GPU as fused AdamW keeps it.

    python -m pytest -m gpu tests/test_gpu_distributed.py
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.test_distributed import _env, _killed_at_first_checkpoint, _port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

# validation by loss: no Java on the GPU machines; LoRA dropout off so that runs can match
SETTINGS = [
    "data.num_images=120", "train.epochs=2", "train.batch_size=32", "lora.dropout=0",
    "train.select=loss", "train.checkpoint_every=2", "train.log_every=1",
]  # fmt: skip
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate")


def _launch(config: str, run) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, config),
        "--num_processes", "2", "--main_process_port", str(_port()), "-m", "captune.cli", "train", str(run),
    ]  # fmt: skip


def _losses(run) -> tuple[list[float], list[float]]:
    """The training loss of every step and the validation losses, from RUN/logs/train.jsonl."""
    rows = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"], [r["loss"] for r in rows if r["type"] == "validation"]


@pytest.mark.parametrize("config", ["multi-gpu.yaml", "fsdp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_each_engine_trains_on_two_gpus_like_the_others(tmp_path, config):
    """Every shipped config trains the demo on two GPUs: the first step's loss is the first
    engine's (the same weights, batch and token weighting), and the losses fall."""
    from captune.cli import main

    run = tmp_path / "run"
    assert main(["data", str(run), "--recipe", "demo", *SETTINGS]) == 0
    done = subprocess.run(_launch(config, run), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path.parent / "engines-reference"
    if not (reference / "logs").is_dir():  # the first engine's run is the others' reference
        shutil.copytree(run, reference, dirs_exist_ok=True)
    (ours, ours_val), (theirs, _) = _losses(run), _losses(reference)
    print(json.dumps({"config": config, "train": ours, "validation": ours_val}))
    # the first step runs the same weights on the same batch: the same loss up to bf16 kernels
    assert ours[0] == pytest.approx(theirs[0], rel=2e-3)
    assert len(ours) == len(theirs) and ours[-1] < ours[0] and ours_val[-1] < ours_val[0]


def test_zero3_run_killed_then_resumed_on_two_gpus(tmp_path):
    from captune.cli import main

    run = tmp_path / "killed"
    assert main(["data", str(run), "--recipe", "demo", *SETTINGS]) == 0
    whole = tmp_path / "whole"
    shutil.copytree(run, whole)
    done = subprocess.run(_launch("deepspeed-zero3.yaml", whole), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _killed_at_first_checkpoint(_launch("deepspeed-zero3.yaml", run), run)
    done = subprocess.run(_launch("deepspeed-zero3.yaml", run), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step-" in done.stdout
    (ours, ours_val), (theirs, theirs_val) = _losses(run), _losses(whole)
    print(json.dumps({"resumed": [ours, ours_val], "uninterrupted": [theirs, theirs_val]}))
    # the resumed run's steps after the checkpoint are the uninterrupted run's (bf16 kernels aside)
    assert ours_val == pytest.approx(theirs_val, rel=1e-2)

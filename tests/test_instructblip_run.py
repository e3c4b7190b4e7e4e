"""A whole captune run on a tiny InstructBLIP (LLaMA language model) from its model folder."""

from __future__ import annotations

import json

import pytest

from captune.cli import main


@pytest.mark.slow  # ~60-100 s on 2 shared cores (Java scoring included)
def test_instructblip_run_learns(tiny_instructblip_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "demo",
        "--out",
        str(out),
        f"model.name_or_path={tiny_instructblip_dir}",
        "model.prompt=a photo of",
        "data.num_images=40",
        "train.epochs=4",
        "train.lr=0.01",
        "train.log_every=2",
        "eval.max_new_tokens=8",
        "eval.bootstrap=50",
        "report.examples=2",
    ]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in log if r["type"] == "validation"]
    train = [r["loss"] for r in log if r["type"] == "train"]
    assert val[-1] < 0.85 * val[0] and train[-1] < 0.7 * train[0], (train, val)
    for phase in ("baseline", "finetuned"):
        metrics = json.loads((out / phase / "metrics.json").read_text())
        assert {"BLEU-4", "METEOR", "CIDEr"} <= set(metrics)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "gate_proj" in adapter["target_modules"] and "o_proj" in adapter["target_modules"]
    assert len(list((out / "features").iterdir())) == 1  # one fingerprint: one instruction for every phase

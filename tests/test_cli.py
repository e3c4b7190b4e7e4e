"""The console script: user errors are one line and exit code 2."""

import subprocess
import sys

import pytest

from captune.cli import main


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "nosuch"], "unknown recipe 'nosuch'"),
        (["run", "demo", "train.lr=abc"], "train.lr: expected a number"),
        (["run", "demo", "nosuch.key=1"], "nosuch: unknown section"),
        (["run", "demo", "eval.num_beams=0"], "eval.num_beams: must be 1 or more"),
        (["train", "/nonexistent/run"], "is not a run folder"),
        (["score", "/nonexistent.jsonl"], "file not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captune: error:") and needle in err
    assert len(err.splitlines()) == 1


def test_console_script_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "captune.cli", "run", "demo", "train.lr=abc"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "captune: error: train.lr: expected a number, got 'abc'"


def test_coco_recipe_stops_at_once_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["run", "coco5k", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs the Hugging Face Hub" in err and "jxie/coco_captions" in err


def test_score_command(tmp_path, capsys):
    import json

    p = tmp_path / "p.jsonl"
    p.write_text(
        "\n".join(
            json.dumps({"image_id": i, "caption": c, "references": [c, "something else"]})
            for i, c in enumerate(["a dog", "a red bus", "two cats"])
        )
    )
    assert main(["score", str(p), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


def test_score_with_separate_references(tmp_path, capsys):
    import json

    p = tmp_path / "p.jsonl"
    r = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps({"image_id": i, "caption": c}) for i, c in enumerate(["a dog", "a bus"])))
    r.write_text(
        "\n".join(
            json.dumps({"image_id": i, "captions": [c, "other words"]}) for i, c in enumerate(["a dog", "a red bus"])
        )
    )
    assert main(["score", str(p), "--references", str(r)]) == 0
    out = capsys.readouterr().out
    assert "CIDEr" in out and "METEOR   unavailable" in out
    assert "single-reference scores (first reference per image)" in out
    assert main(["score", str(p)]) == 2  # no references anywhere
    assert "no references" in capsys.readouterr().err


def test_eval_prompt_is_removed_from_captions():
    from captune.config import EvalConfig, ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.generation import caption_images

    loaded = load_model(ModelConfig(device="cpu"))
    images = [it["image"] for it in world.make_items("plain", 4, seed=3)]
    caps = caption_images(loaded.model, loaded.processor, images, EvalConfig(max_new_tokens=8), prompt="a photo of")
    assert len(caps) == 4 and not any(c.startswith("a photo of") for c in caps)
    beams = caption_images(loaded.model, loaded.processor, images, EvalConfig(max_new_tokens=8, num_beams=3))
    assert len(beams) == 4 and all(beams)

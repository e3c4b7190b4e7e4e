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


def _score(*argv):
    """`captune score` in its own process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "captune.cli", "score", *map(str, argv)], capture_output=True, text=True, timeout=300
    )


def test_score_coco_results_against_coco_annotations(tmp_path, capsys):
    import json

    from captune.evaluation.metrics import score_captions

    refs = {1: ["a dog on a couch", "a brown dog lying down"], 2: ["a red bus on a street", "a bus"], 3: ["two cats"]}
    annotations = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in refs],
        "annotations": [{"image_id": i, "id": 10 * i + n, "caption": c} for i in refs for n, c in enumerate(refs[i])],
    }
    results = [{"image_id": 1, "caption": "a dog lying on a couch"}, {"image_id": 2, "caption": "a bus"}]
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps(results))
    done = _score(tmp_path / "res.json", "--references", tmp_path / "ann.json", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["images"] == 2 and doc["empty_captions"] == 0
    direct = score_captions({"1": results[0]["caption"], "2": results[1]["caption"]}, {"1": refs[1], "2": refs[2]})
    assert doc["metrics"] == pytest.approx(direct.corpus, abs=1e-12)
    # the same captions as captune JSONL give the same numbers
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({**r, "references": refs[r["image_id"]]}) for r in results))
    assert main(["score", str(tmp_path / "p.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == doc["metrics"]


def test_score_duplicate_ids_are_one_line_naming_them(tmp_path):
    import json

    rows = [{"image_id": 7, "caption": "a dog"}, {"image_id": 8, "caption": "a cat"}, {"image_id": 7, "caption": "x"}]
    (tmp_path / "res.json").write_text(json.dumps(rows))
    (tmp_path / "refs.jsonl").write_text("\n".join(json.dumps({"image_id": i, "captions": ["a dog"]}) for i in (7, 8)))
    done = _score(tmp_path / "res.json", "--references", tmp_path / "refs.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "more than one caption: 7;" in err


def test_score_counts_empty_captions(tmp_path, capsys):
    import json

    rows = [
        {"image_id": "a", "caption": ""},
        {"image_id": "b", "caption": "a red bus"},
        {"image_id": "c", "caption": " "},
    ]
    (tmp_path / "p.jsonl").write_text(
        "\n".join(json.dumps({**r, "references": ["a red bus on a street"]}) for r in rows)
    )
    assert main(["score", str(tmp_path / "p.jsonl")]) == 0
    assert "2 empty caption(s), scored as empty: a, c" in capsys.readouterr().out
    assert main(["score", str(tmp_path / "p.jsonl"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["empty_captions"] == 2 and doc["images"] == 3

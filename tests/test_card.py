"""The pushed model card: metadata the Hub parses, no local path anywhere in the upload folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from captune.cli import main
from captune.config import load_config
from captune.evaluation.compare import compare


def _metrics(scale: float) -> dict:
    ids = ["a", "b", "c"]
    doc = {"image_ids": ids, "per_image": {}}
    for k, metric in enumerate(("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")):
        doc[metric] = scale * (0.1 + k / 10)
        doc["per_image"][metric] = [scale * (0.1 + k / 10)] * 3
    doc["seed_compatible"] = {"metrics": {"BLEU-4": 0.2 * scale}, "protocol": "first reference", "unavailable": {}}
    return doc


def make_run(root: Path, overrides: list[str]) -> Path:
    """A finished run folder without training: config, adapter files, comparison."""
    cfg = load_config("demo", overrides)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(cfg.to_yaml())
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": cfg.model.name_or_path}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (adapter / "preprocessor_config.json").write_text("{}")
    (root / "comparison.json").write_text(json.dumps(compare(_metrics(1.0), _metrics(1.5), samples=20)))
    return root


@pytest.fixture
def local_model(tmp_path) -> Path:
    """A local copy of a base model whose own card says apache-2.0."""
    folder = tmp_path / "models" / "blip2-copy"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    return folder


def _no_local_paths(folder: Path, *paths: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            text = f.read_bytes().decode("utf-8", "replace")
            for p in paths:
                assert str(p) not in text, (f.name, p)


def test_card_metadata_parses_with_model_index(tmp_path, local_model, capsys):
    data = tmp_path / "pets"
    run = make_run(
        tmp_path / "run",
        [f"model.name_or_path={local_model}", f"data.source=imagefolder:{data}", "eval.num_beams=3"],
    )
    out = tmp_path / "staged"
    argv = ["push", str(run), "--repo", "me/pets", "--dry-run", "--out", str(out), "--base-model", "org/blip2-x"]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/blip2-x"
    assert card.data.license == "apache-2.0"  # from the base model's own card, not always mit
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-to-text"
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "pets"
    comparison = json.loads((run / "comparison.json").read_text())
    expected = {r["metric"]: round(r["finetuned"], 4) for r in comparison["rows"]}
    assert {r.metric_name: r.metric_value for r in results} == expected
    assert {(r.dataset_name, r.dataset_split, r.task_type) for r in results} == {
        ("imagefolder:pets", "test", "image-to-text")
    }
    text = card.text
    assert "Single-reference scores (first reference per image)" in text and "eed-comparable" not in text
    assert "seed notebook" not in text
    assert "Intended use and limitations" in text and "num_beams 3" in text and "peft " in text
    assert 'PeftModel.from_pretrained(base, "me/pets")' in text and 'from_pretrained("org/blip2-x")' in text
    assert "https://huggingface.co/org/blip2-x" in text and "github.com" not in text
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/blip2-x"
    staged_cfg = (out / "captune_config.yaml").read_text()
    assert "name_or_path: org/blip2-x" in staged_cfg and "source: imagefolder:pets" in staged_cfg
    _no_local_paths(out, tmp_path, local_model)


def test_card_for_a_hub_dataset_and_model(tmp_path):
    run = make_run(
        tmp_path / "run", ["model.name_or_path=Salesforce/blip2-opt-2.7b", "data.source=hub:someone/captions"]
    )
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo", "me/x", "--dry-run", "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "Salesforce/blip2-opt-2.7b" and card.data.license == "mit"
    assert card.data.datasets == ["someone/captions"]
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.dataset_type for r in results} == {"someone/captions"}


def test_demo_base_is_refused_for_push_and_flagged_by_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = make_run(tmp_path / "run", [])
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo", "me/x", "--dry-run", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("captune: warning: a push would be refused") and "builtin:demo" in err
    card = (out / "README.md").read_text()
    assert "huggingface.co/builtin" not in card and "base_model" not in card.split("---")[1]
    assert "PeftModel.from_pretrained" not in card  # no snippet nobody can run
    assert ModelCard.load(out / "README.md").data.license == "other"
    assert main(["push", str(run), "--repo", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("captune: error: not pushing: the base model builtin:demo")


def test_local_base_without_hub_id_is_refused(tmp_path, local_model, capsys):
    run = make_run(tmp_path / "run", [f"model.name_or_path={local_model}"])
    assert main(["push", str(run), "--repo", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base-model OWNER/NAME" in err and str(tmp_path) not in err
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo", "me/x", "--dry-run", "--out", str(out)]) == 0
    _no_local_paths(out, tmp_path, local_model)
    assert main(["push", str(run), "--repo", "me/x", "--base-model", "./models/x"]) == 2
    assert "is not a Hub model id" in capsys.readouterr().err


def test_hub_base_model_config_key(tmp_path, local_model):
    run = make_run(tmp_path / "run", [f"model.name_or_path={local_model}", "hub.base_model=org/blip2-y"])
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo", "me/x", "--dry-run", "--out", str(out)]) == 0
    assert ModelCard.load(out / "README.md").data.base_model == "org/blip2-y"


def test_title_and_description_follow_an_overridden_source(tmp_path, local_model):
    from captune import summary

    demo = load_config("demo")
    assert summary.title(demo) == "demo" and summary.description(demo) == demo.description
    mine = load_config("demo", [f"data.source=imagefolder:{tmp_path}/pets"])
    assert summary.title(mine) == "demo recipe on imagefolder:pets"
    assert "Offline CPU demo" not in summary.description(mine) and str(tmp_path) not in summary.description(mine)
    run = make_run(tmp_path / "run", [f"data.source=imagefolder:{tmp_path}/pets"])
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo", "me/x", "--dry-run", "--out", str(out), "--base-model", "o/b"]) == 0
    card = (out / "README.md").read_text()
    assert "product-catalog" not in card and "imagefolder:pets" in card
    assert "product-catalog" not in (out / "captune_config.yaml").read_text()

"""The whole demo pipeline at reduced size, through the CLI, on the shipped base model."""

import json

import pytest

from captune.cli import main
from captune.evaluation.metrics import OFFICIAL
from tests.conftest import SMALL


def test_run_folder_layout(demo_run):
    for rel in [
        "config.yaml",
        "data/manifest.json",
        "baseline/predictions.jsonl",
        "baseline/metrics.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "finetuned/metrics.json",
        "finetuned/predictions.jsonl",
        "comparison.json",
        "comparison.md",
        "report/index.html",
        "report/report.md",
        "logs/train.jsonl",
        "timings.json",
    ]:
        assert (demo_run / rel).is_file(), rel
    leftovers = [p.name for p in demo_run.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_metrics_and_comparison(demo_run):
    for side in ("baseline", "finetuned"):
        doc = json.loads((demo_run / side / "metrics.json").read_text())
        assert set(OFFICIAL) <= set(doc) and all(isinstance(doc[k], float) for k in OFFICIAL)
        rows = [json.loads(x) for x in (demo_run / side / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == doc["images"] > 0
        assert all(len(r["references"]) == 3 and isinstance(r["caption"], str) for r in rows)
    comp = json.loads((demo_run / "comparison.json").read_text())
    assert [r["metric"] for r in comp["rows"]] == list(OFFICIAL)
    for r in comp["rows"]:
        assert r["change"] == pytest.approx(r["finetuned"] - r["baseline"])
        assert 0 < r["p_value"] <= 1 and len(r["change_ci"]) == 2
        # every interval is of the number beside it (METEOR included) and contains it
        assert r["interval_of"] == "corpus score", r["metric"]
        assert r["baseline_ci"][0] <= r["baseline"] <= r["baseline_ci"][1], r["metric"]
        assert r["finetuned_ci"][0] <= r["finetuned"] <= r["finetuned_ci"][1], r["metric"]
        assert r["change_ci"][0] <= r["change"] <= r["change_ci"][1], r["metric"]


def test_attribute_accuracy_in_run_folder_summary_and_report(demo_run):
    from captune.demo.attributes import ATTRIBUTES, attribute_accuracy

    for side in ("baseline", "finetuned"):
        doc = json.loads((demo_run / side / "attributes.json").read_text())
        rows = [json.loads(x) for x in (demo_run / side / "predictions.jsonl").read_text().splitlines()]
        assert doc == attribute_accuracy(rows) and set(doc["share"]) == set(ATTRIBUTES)
    comp = json.loads((demo_run / "comparison.json").read_text())
    assert [r["attribute"] for r in comp["attributes"]["rows"]] == [*ATTRIBUTES, "all five"]
    assert "Attribute accuracy" in (demo_run / "comparison.md").read_text()
    page = (demo_run / "report" / "index.html").read_text()
    assert "id='attributes'" in page and "Attribute accuracy" in (demo_run / "report" / "report.md").read_text()


def test_no_caption_has_a_space_before_punctuation(demo_run):
    for side in ("baseline", "finetuned"):
        for line in (demo_run / side / "predictions.jsonl").read_text().splitlines():
            caption = json.loads(line)["caption"]
            assert " ," not in caption and " ." not in caption, caption


def test_training_log_and_adapter_loads(demo_run):
    from peft import PeftConfig

    rows = [json.loads(x) for x in (demo_run / "logs" / "train.jsonl").read_text().splitlines()]
    assert any(r["type"] == "train" for r in rows)
    assert [r["epoch"] for r in rows if r["type"] == "validation"] == [1, 2]
    cfg = PeftConfig.from_pretrained(str(demo_run / "adapter"))
    assert cfg.r == 16


def test_report_has_table_plots_gallery(demo_run):
    page = (demo_run / "report" / "index.html").read_text()
    assert 'id="metrics"' in page and "<svg" in page and "data:image/" in page
    assert "CIDEr" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_rerun_skips_complete_phases(demo_run, capsys):
    assert main(["run", "demo", "--out", str(demo_run), *SMALL]) == 0
    out = capsys.readouterr().out
    for phase in ("data", "baseline", "train", "finetuned", "compare", "report"):
        assert f"[{phase}] complete, skipped" in out


def test_changed_config_needs_force(demo_run, capsys):
    assert main(["run", "demo", "--out", str(demo_run), *SMALL, "train.epochs=3"]) == 2
    assert "different config" in capsys.readouterr().err


def test_phase_subcommands_on_the_run_folder(demo_run, capsys):
    assert main(["compare", str(demo_run), "--force"]) == 0
    assert "| CIDEr |" in capsys.readouterr().out
    assert main(["report", str(demo_run), "--force"]) == 0

"""The public Python API, called only through ``import captune``."""

from __future__ import annotations

import io
import pydoc

import pytest
from PIL import Image

import captune

SMALL = {"data.num_images": 60, "train.epochs": 2, "eval.bootstrap": 200, "report.examples": 4}


@pytest.fixture(scope="session")
def api_run(tmp_path_factory) -> captune.RunResult:
    """One reduced demo run through ``captune.run``, shared by the tests below."""
    return captune.run_recipe("demo", SMALL, out=tmp_path_factory.mktemp("api") / "demo", quiet=True)


def test_help_lists_the_public_calls():
    text = pydoc.render_doc(captune, renderer=pydoc.plaintext)
    import inspect

    calls = [n for n in captune.__all__ if inspect.isfunction(getattr(captune, n))]
    assert {"run_recipe", "load_model", "caption", "score", "prepare_data", "push"} <= set(calls)
    listing = {line.split("(")[0].strip(): line for line in captune.__doc__.splitlines() if "(" in line}
    for name in calls:
        assert len(listing[name].split(")", 1)[1].strip()) > 20, name  # a one-line description beside it
    for name in captune.__all__:
        assert getattr(captune, name).__doc__, name
    assert "prepare_data" in text and "UserError" in text


def test_calls_survive_subpackage_imports():
    """Importing a subpackage sets it as an attribute of captune: no public call may share its name."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(captune.__path__):
        importlib.import_module(f"captune.{info.name}") if info.ispkg else None
    for name in captune.__all__:
        assert not isinstance(getattr(captune, name), type(captune)), name


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, captune; print(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_full_demo_run(api_run):
    r = api_run
    assert {"data", "baseline", "train", "finetuned", "compare", "report"} <= set(r.timings)
    assert {"config", "data", "adapter", "comparison", "report", "baseline", "finetuned"} <= set(r.paths)
    assert set(r.metrics) == {"baseline", "finetuned"} and "CIDEr" in r.metrics["finetuned"]
    rows = {row["metric"]: row for row in r.comparison["rows"]}
    assert rows["CIDEr"]["finetuned"] == pytest.approx(r.finetuned["CIDEr"])
    assert "change_ci" in rows["CIDEr"]
    assert "<table>" in r._repr_html_() and ">CIDEr<" in r._repr_html_()
    assert "| CIDEr |" in r._repr_markdown_()
    assert len(r.predictions("baseline")) == r.comparison["images"] == 6
    again = captune.RunResult.from_folder(r.root)
    assert again.comparison == r.comparison and again.config == r.config
    gallery = r.gallery(4)
    assert len(gallery) == 4 and gallery._repr_html_().count("data:image/") == 4
    assert gallery.items[0]["baseline"] in gallery._repr_html_()
    for shown in (r, gallery, r.data):  # the plain-text repr stays short (no image bytes, no manifest dump)
        assert len(repr(shown)) < 400, repr(shown)[:100]


def test_rerun_skips_and_selected_phases(api_run, tmp_path):
    logs: list[str] = []
    captune.run_recipe("demo", SMALL, out=api_run.root, log=logs.append)
    assert sum("complete, skipped" in line for line in logs) == 6  # every phase (SCST is off: said so apart)
    part = captune.run_recipe("demo", ["data.num_images=30"], out=tmp_path / "part", phases=["data"], quiet=True)
    assert list(part.timings) == ["data"] and part.comparison is None
    assert "no comparison yet" in part._repr_markdown_()


def test_errors_are_the_cli_messages(tmp_path, capsys):
    from captune.cli import main

    with pytest.raises(captune.ConfigError) as exc:
        captune.run_recipe("demo", {"train.epochz": 1}, out=tmp_path / "x", quiet=True)
    assert main(["run", "demo", "--out", str(tmp_path / "x"), "train.epochz=1"]) == 2
    assert capsys.readouterr().err.strip() == f"captune: error: {exc.value}"
    with pytest.raises(captune.UserError, match="unknown phase"):
        captune.run_recipe("demo", out=tmp_path / "y", phases=["trian"], quiet=True)
    with pytest.raises(captune.UserError, match="not a run folder"):
        captune.load_model(tmp_path)


def _test_images(run: captune.RunResult) -> tuple[list[str], list[bytes]]:
    rows = run.data.split(run.config.eval.split)
    return [r["image_id"] for r in rows], [r["image"] for r in rows]


def test_load_adapter_and_caption_pil_images(api_run):
    from peft import PeftModel

    ids, data = _test_images(api_run)
    pil = [Image.open(io.BytesIO(b)) for b in data]
    captioner = captune.load_model(api_run.root)
    model, processor = captioner
    assert isinstance(model, PeftModel) and processor is captioner.processor
    assert repr(captioner).startswith("Captioner(PeftModel")
    stored = {r["image_id"]: r["caption"] for r in api_run.predictions("finetuned")}
    assert captune.caption(pil, captioner) == [stored[i] for i in ids]
    with model.disable_adapter():
        base = {r["image_id"]: r["caption"] for r in api_run.predictions("baseline")}
        assert captioner.caption(pil) == [base[i] for i in ids]
    merged = captune.load_model(api_run.root, merged=True)
    assert not isinstance(merged.model, PeftModel)
    assert merged.caption(data) == [stored[i] for i in ids]


def test_caption_accepts_paths_bytes_and_a_dataset(api_run, tmp_path):
    import datasets

    ids, data = _test_images(api_run)
    captioner = captune.load_model(api_run.root)
    want = captune.caption(data, captioner)
    paths = []
    for i, b in zip(ids, data, strict=True):
        (tmp_path / f"{i}.png").write_bytes(b)
        paths.append(tmp_path / f"{i}.png")
    assert captune.caption([str(p) for p in paths], captioner, batch_size=2) == want
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths]}).cast_column("image", datasets.Image())
    assert captune.caption(ds, captioner) == want
    assert captune.caption(ds["image"], captioner) == want
    assert captune.caption(paths, api_run.root) == want  # a run folder loads its model
    with pytest.raises(captune.UserError, match="image 1: cannot read a int"):
        captune.caption([data[0], 3], captioner)
    with pytest.raises(captune.UserError, match="file not found"):
        captune.caption([tmp_path / "missing.png"], captioner)


def test_score_lists_and_dicts():
    preds = ["two red circles on the left", "a blue square", "three green triangles at the top"]
    refs = [
        ["two red circles on the left", "pair of red discs on the left"],
        "one big blue square in the middle",
        ["three small green triangles at the top"],
    ]
    s = captune.score(preds, refs, bootstrap=200)
    assert set(s.metrics) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert set(s.per_image) == {"0", "1", "2"}
    assert s.per_image["0"]["ROUGE-L"] == pytest.approx(1.0)
    assert s.per_image["1"]["ROUGE-L"] < 1.0
    for metric, (lo, hi) in s.intervals.items():
        assert lo <= s.metrics[metric] + 1e-9 and s.metrics[metric] <= hi + 1e-9 or metric == "METEOR"
    assert s.intervals["CIDEr"][0] < s.intervals["CIDEr"][1]
    by_id = captune.score(dict(enumerate(preds)), dict(enumerate(refs)), bootstrap=0)
    assert by_id.metrics == s.metrics and by_id.intervals == {}
    assert "| CIDEr |" in s._repr_markdown_() and "<table>" in s._repr_html_()
    with pytest.raises(captune.UserError, match="3 predictions but 2 reference lists"):
        captune.score(preds, refs[:2])


def _shapes_dataset(n: int):
    import datasets

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rows = {"id": [], "image": [], "caption": []}
    for i in range(n):
        img = Image.new("RGB", (24, 24), colours[i % 4])
        img.putpixel((i % 24, i // 24), (255, 255, 255))  # every image distinct
        rows["id"].append(f"img{i}")
        rows["image"].append(img)
        rows["caption"].append([f"image {i} in colour {i % 4}", f"picture number {i}"])
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


def test_prepare_data_from_a_dataset(tmp_path):
    ds = _shapes_dataset(20)
    lines: list[str] = []
    data = captune.prepare_data(ds, tmp_path / "cache", num_images=0, id_column="id", log=lines.append)
    assert sum(data.counts.values()) == 20 and data.counts["train"] == 16 and not data.skipped
    assert data.manifest["source"].startswith("dataset:") and data.manifest["references"] == 40
    rows = data.split("train") + data.split("validation") + data.split("test")
    assert sorted(r["image_id"] for r in rows) == sorted(ds["id"])
    assert list(data.rows("train")) == data.split("train")  # one at a time, the same rows
    with pytest.raises(captune.UserError, match="use one of"):
        data.rows("dev")  # at the call, not at the first row
    first = next(r for r in rows if r["image_id"] == "img3")
    assert first["captions"] == ["image 3 in colour 3", "picture number 3"]
    assert Image.open(io.BytesIO(first["image"])).getpixel((3, 0)) == (255, 255, 255)
    again = captune.prepare_data(ds, tmp_path / "cache", num_images=0, id_column="id", log=lines.append)
    assert again.manifest == data.manifest and "reused" in lines[-1]
    with pytest.raises(captune.UserError, match="no column 'text'"):
        captune.prepare_data(ds, tmp_path / "c2", caption_column="text", quiet=True)
    with pytest.raises(captune.ConfigError, match="data.colour"):
        captune.prepare_data(ds, tmp_path / "c3", colour=1, quiet=True)


def test_run_on_an_in_memory_dataset(tmp_path, capsys):
    from captune.cli import main

    ds = _shapes_dataset(12)
    over = {"data.num_images": 0, "data.id_column": "id"}
    r = captune.run_recipe("demo", over, out=tmp_path / "mem", phases="data", data=ds, quiet=True)
    assert r.config.data.source == f"dataset:{ds._fingerprint}"
    again = captune.prepare_data(ds, r.root / "data", num_images=0, id_column="id", quiet=True)
    assert sum(again.counts.values()) == 12 and again.manifest == r.data.manifest
    logs: list[str] = []
    forced = captune.run_recipe("demo", over, out=r.root, phases="data", data=ds, force=True, log=logs.append)
    assert forced.data.manifest["source"] == r.config.data.source and "[data] done in" in logs[-1]
    assert main(["data", str(r.root), "--force"]) == 2
    assert "was an in-memory datasets.Dataset" in capsys.readouterr().err

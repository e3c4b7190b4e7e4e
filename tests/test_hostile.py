"""Hostile and odd inputs: each works or is a user error (exit 2, one line); nothing else escapes."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captune.cli import main
from captune.config import DataConfig, load_config
from captune.data.images import check_image
from captune.data.prepare import prepare
from captune.errors import UserError
from tests.conftest import jpeg_bytes

FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])

keys = st.sampled_from(
    [
        "train.lr",
        "train.epochs",
        "data.ratios",
        "lora.target_modules",
        "eval.num_beams",
        "model.dtype",
        "nosuch.key",
        "train",
        "a.b.c",
        "hub.repo_id",
        "data.source",
    ]
)
values = st.one_of(
    st.text(max_size=30),
    st.integers(-(10**6), 10**6).map(str),
    st.floats().map(str),
    st.sampled_from(["[]", "[1, 2]", "{a: 1}", "null", "true", "~", "[0.8,0.1,0.1]", "'x'"]),
)


@FAST
@given(keys, values)
def test_any_override_is_accepted_or_a_user_error(key, value):
    try:
        load_config("demo", [f"{key}={value}"])
    except UserError as exc:
        assert "\n" not in str(exc)


@FAST
@given(st.binary(max_size=4096))
def test_any_bytes_are_an_image_or_a_reason(data):
    reason = check_image(data, 10_000_000)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)


@FAST
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=2000))
def test_any_manifest_text_prepares_or_fails_clearly(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("m")
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 60, 9, 9)))
    (root / "m.jsonl").write_text(text, encoding="utf-8")
    try:
        prepare(
            DataConfig(source=f"manifest:{root / 'm.jsonl'}", num_images=0),
            root / "cache",
            progress=False,
            log=lambda m: None,
        )
    except UserError as exc:
        assert "\n" not in str(exc)


@FAST
@given(
    st.lists(
        st.one_of(
            st.text(max_size=300), st.just(""), st.just(" \t\n"), st.binary(max_size=50).map(repr), st.just("é" * 5000)
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_captions_are_cleaned_or_skipped(tmp_path_factory, captions):
    root = tmp_path_factory.mktemp("c")
    rows = []
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 50, 1, 1)))
        rows.append({"image": f"{i}.jpg", "caption": captions if i else "fine caption"})
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    try:
        manifest = prepare(
            DataConfig(source=f"manifest:{root / 'm.jsonl'}", num_images=0),
            root / "cache",
            progress=False,
            log=lambda m: None,
        )
    except UserError:
        return
    assert manifest["images"] >= 1


@FAST
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(string.printable, max_size=10)),
        lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
        max_leaves=20,
    )
)
def test_any_coco_json_prepares_or_fails_clearly(tmp_path_factory, doc):
    root = tmp_path_factory.mktemp("j")
    (root / "a.json").write_text(json.dumps(doc))
    try:
        prepare(
            DataConfig(source=f"coco:{root / 'a.json'}", num_images=0),
            root / "cache",
            progress=False,
            log=lambda m: None,
        )
    except UserError as exc:
        assert "\n" not in str(exc)


# ------------------------------------------------------------------ offline


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["caption", "IMAGE", "--model", "Salesforce/blip2-opt-2.7b"], "cannot get model 'Salesforce/blip2-opt-2.7b'"),
        (["data", "prepare", "--source", "hub:jxie/coco_captions", "--out", "OUT"], "cannot open Hub dataset"),
        (["run", "coco5k-seed", "--out", "OUT"], "needs the Hugging Face Hub"),
    ],
)
def test_offline_commands_say_what_is_missing(argv, needle, tmp_path, monkeypatch, capsys):
    from captune.demo import world

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    image = tmp_path / "x.png"
    image.write_bytes(world.make_items("plain", 1, seed=0)[0]["image"])
    argv = [str(image) if a == "IMAGE" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_gpu_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path):
    import torch

    import captune.run.phases as pipeline

    def boom(run, force=False):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(pipeline.PHASE_FUNCS, "data", boom)
    assert main(["run", "demo", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captune: error: GPU out of memory in phase data (train.batch_size=32, eval.batch_size=80)")
    assert "train.batch_size=16" in err and "\n" not in err


# ------------------------------------------------------------------ safe loading


def test_pickle_only_checkpoints_are_refused(tmp_path, tiny_model_dir):
    import shutil

    from captune.model.load import resolve_model_path

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="safetensors only"):
        resolve_model_path(str(folder))


def test_dataset_loading_scripts_are_not_run(tmp_path):
    folder = tmp_path / "scripted"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "scripted.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(UserError, match="cannot open Hub dataset"):
        prepare(
            DataConfig(source=f"hub:{folder}", num_images=0), tmp_path / "cache", progress=False, log=lambda m: None
        )
    assert not marker.exists()


# ------------------------------------------------------------------ bounded memory and time


def test_hostile_inputs_stay_within_memory_and_time(tmp_path):
    """Alias bombs, decompression bombs, a 20 MB caption and 200k-deep JSON, each in a fresh process:
    each gives its promised outcome within 256 MiB of extra peak memory and 10 s."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "hostile" / "bounded_cases.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["case"]: r for r in map(json.loads, (x for x in done.stdout.splitlines() if x.startswith("{")))}
    expected = {
        "yaml alias bomb recipe": "user error: recipe",
        "yaml alias bomb override": "user error: override 'lora.target_modules': the YAML expands",
        "png claiming 60000x60000": "reason: image is a decompression bomb",
        "jpeg claiming 65000x65000": "reason: image is a decompression bomb",
        "20 MB caption": "ok",
        "COCO JSON nested 200k deep": "user error:",
        "manifest line nested 200k deep": "user error:",
    }
    assert set(rows) == set(expected)
    for case, start in expected.items():
        row = rows[case]
        assert row["outcome"].startswith(start), row
        assert row["mib"] < 256 and row["s"] < 10, row
    assert rows["COCO JSON nested 200k deep"]["outcome"].endswith("JSON nested too deeply")
    manifest = json.loads((tmp_path / "c1" / "manifest.json").read_text())
    assert any("over 64 x data.max_caption_words=200" in s["reason"] for s in manifest["skipped"])

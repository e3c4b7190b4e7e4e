"""A wrong --adapter / --model costs one line at once (exit 2), before any model loads."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from captune.cli import main


@pytest.fixture
def image(tmp_path):
    from captune.demo import world

    path = tmp_path / "a.png"
    path.write_bytes(world.make_items("plain", 1, seed=1)[0]["image"])
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("captune: error:"), err
    return err


@pytest.mark.parametrize("command", ["caption", "serve", "serve-adapter-only"])
def test_wrong_adapter_folder(command, tmp_path, image, capsys):
    head = {"caption": ["caption", str(image)], "serve": ["serve", "--model", "builtin:demo"]}.get(command, ["serve"])
    t0 = time.perf_counter()
    assert main([*head, "--adapter", str(tmp_path / "runs" / "demo" / "adaptr")]) == 2
    assert "folder not found" in _one_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([*head, "--adapter", str(tmp_path / "empty")]) == 2
    assert "no adapter_config.json" in _one_line(capsys)
    assert time.perf_counter() - t0 < 5  # no model was loaded


def test_offline_hub_adapter_is_quick(tmp_path, image, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert main(["caption", str(image), "--adapter", "someone/no-such-adapter"]) == 2
    assert "cannot be reached" in _one_line(capsys)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens there: the quick check says no
    assert main(["serve", "--model", "builtin:demo", "--adapter", "someone/no-such-adapter"]) == 2
    assert "cannot be reached" in _one_line(capsys)
    assert time.perf_counter() - t0 < 10


def test_offline_caption_model_names_the_option(tmp_path, image, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["caption", str(image), "--model", "Salesforce/blip2-opt-2.7b"]) == 2
    err = _one_line(capsys)
    assert "set --model to that folder" in err and "model.name_or_path" not in err


def test_run_folder_as_adapter(tiny_model_dir, tmp_path, image, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=r"^language_model\..*\.q_proj$"))
    run = tmp_path / "run"
    peft.save_pretrained(run / "adapter")
    argv = ["caption", str(image), "--model", str(tiny_model_dir), "--format", "jsonl", "--device", "cpu"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main([*argv, "--adapter", str(run), "--max-new-tokens", "3"]) == 0
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]  # known noise, silenced
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == [str(image)]


def test_caption_rate_counts_the_first_chunks_reading(tiny_model_dir, image, capsys, monkeypatch):
    """The first chunk is read before the model loads; its reading is captioning time all the same (the
    rate once excluded it: a single chunk's files would have been read for free)."""
    import captune.run.caption as caption
    from captune.bench import parse_caption_report

    real = caption.read_images

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(caption, "read_images", slow)
    argv = ["caption", str(image), "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    assert main(argv) == 0
    found = parse_caption_report(capsys.readouterr().err)
    assert found is not None and found["images"] == 1 and found["seconds"] >= 1.0


def test_no_readable_image_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import captune.model.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(b"not an image")
    assert main(["caption", str(tmp_path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "captune: error: no readable image among the given paths"


def test_a_readable_image_after_the_first_few_unreadable_ones_is_captioned(tiny_model_dir, image, tmp_path, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.jpg").write_bytes(b"not an image")
    (folder / "z.png").write_bytes(image.read_bytes())
    argv = ["caption", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"]
    assert main([*argv, "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == [str(folder / "z.png")]
    assert captured.err.count("captune: skipped") == 10

"""What a new user sees: one right line for each wrong input (issue 20)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from captune.cli import main
from tests.conftest import jpeg_bytes
from tests.test_data import _coco_captions_copy


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("captune: error: "), err
    return err.removeprefix("captune: error: ")


def test_imagefolder_with_a_text_column_says_which_column(tmp_path, capsys):
    root = tmp_path / "pets"
    root.mkdir()
    rows = []
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 50, 9, 9)))
        rows.append({"file_name": f"{i}.jpg", "text": f"a pet number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "cache"
    assert main(["data", "prepare", "--source", f"imagefolder:{root}", "--out", str(out)]) == 2
    assert _error(capsys) == (
        "no column 'caption' in metadata.jsonl; columns are file_name, text; set data.caption_column=text"
    )
    argv = ["data", "prepare", "--source", f"imagefolder:{root}", "--out", str(out), "--caption-column", "text"]
    assert main(argv) == 0


def test_manifest_and_hub_columns(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.csv").write_text("path,sentence\na.jpg,a red box\n")
    assert main(["data", "prepare", "--source", f"manifest:{tmp_path / 'm.csv'}", "--out", str(tmp_path / "c")]) == 2
    expected = "no column 'image' in m.csv; columns are path, sentence; set data.image_column to one of them"
    assert _error(capsys) == expected
    repo = _coco_captions_copy(tmp_path / "coco_captions")
    argv = ["data", "prepare", "--source", f"hub:{repo}", "--out", str(tmp_path / "h"), "--caption-column", "text"]
    assert main(argv) == 2
    err = _error(capsys)
    assert err.startswith(f"no column 'text' in hub:{repo}; columns are image, filename, cocoid, caption")
    assert err.endswith("set data.caption_column=caption")


def test_imagefolder_not_found(tmp_path, capsys):
    argv = ["data", "prepare", "--source", f"imagefolder:{tmp_path / 'nope'}", "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    assert _error(capsys) == f"imagefolder:{tmp_path / 'nope'}: folder not found"


@pytest.fixture
def group_umask(monkeypatch):
    """umask 002 (a shared group folder), read afresh by captune.atomic."""
    import os

    from captune import atomic

    old = os.umask(0o002)
    monkeypatch.setattr(atomic, "_UMASK", None)
    yield
    os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_follow_the_umask(tmp_path, group_umask, capsys):
    import torch

    from captune.atomic import staged_dir, write_atomic
    from captune.ops.feature_map import ShardWriter
    from tests.test_card import make_run

    write_atomic(tmp_path / "a.json", "{}")
    from safetensors.torch import save_file

    with staged_dir(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"w": torch.zeros(1)}, tmp / "sub" / "model.safetensors")  # safetensors writes 0600
    shards = ShardWriter(tmp_path / "f", 2, 2)
    shards.write_rows(0, torch.zeros(2, 3))
    shards.finish()
    assert _mode(tmp_path / "a.json") == 0o664 and _mode(tmp_path / "folder") == 0o775
    assert _mode(tmp_path / "folder" / "sub") == 0o775
    assert _mode(tmp_path / "folder" / "sub" / "model.safetensors") == 0o664
    assert {_mode(p) for p in (tmp_path / "f").iterdir()} == {0o664}  # shards, layout and manifest
    run = make_run(tmp_path / "run", [])
    out = tmp_path / "staged"
    assert main(["push", str(run), "--repo", "me/x", "--dry-run", "--out", str(out)]) == 0
    assert _mode(out) == 0o775 and {_mode(p) for p in out.iterdir()} == {0o664}


@pytest.mark.parametrize("command", ["merge", "push"])
def test_merge_and_push_of_a_missing_run_do_not_suggest_recipe(command, tmp_path, capsys):
    extra = ["--out", str(tmp_path / "m")] if command == "merge" else ["--repo", "me/x"]
    assert main([command, str(tmp_path / "nonexist"), *extra]) == 2
    err = _error(capsys)
    assert err == (
        f"{tmp_path / 'nonexist'}: folder not found; {command} needs a trained run folder "
        "(made by 'captune run RECIPE --out RUN')"
    )


def _closed_pipe(argv: list[str]) -> subprocess.CompletedProcess:
    """Run the console script with its stdout already closed by the reader (like ``| head -0``)."""
    import os
    import sys

    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    try:
        return subprocess.run(
            [sys.executable, "-m", "captune.cli", *argv], stdout=write, stderr=subprocess.PIPE, text=True, env=env
        )
    finally:
        os.close(write)


def test_broken_pipe_exits_quietly(tmp_path, capsys):
    from tests.test_card import make_run

    cache = tmp_path / "cache"
    assert main(["data", "prepare", "--source", "demo:shapes-plain", "--num-images", "20", "--out", str(cache)]) == 0
    run = make_run(tmp_path / "run", [])
    for argv in (
        ["data", "inspect", str(cache), "--json"],
        ["data", "inspect", str(cache)],
        ["push", str(run), "--repo", "me/x", "--dry-run"],
    ):
        done = _closed_pipe(argv)
        assert done.returncode == 141 and done.stderr == "", (argv, done.stderr[-500:])


def test_impossible_lora_targets_stop_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "demo", "--out", str(out), "lora.target_modules=[foo]"]) == 2
    err = _error(capsys)
    assert err.startswith("lora.target_modules ['foo'] match no linear layer of the language model")
    assert "q_proj" in err and "fc1" in err
    assert not out.exists()  # no data prep, no baseline, no partial run folder


def test_lora_targets_checked_on_the_meta_device(tiny_t5_dir):
    import pytest as _pytest

    from captune.config import LoraConfig, ModelConfig
    from captune.errors import UserError
    from captune.model.lora import check_targets

    model = ModelConfig(name_or_path=str(tiny_t5_dir))
    check_targets(model, LoraConfig(target_modules="all-linear"))
    check_targets(model, LoraConfig(target_modules=["q", "v"]))
    with _pytest.raises(UserError, match="its linear layers are named: k, lm_head, o, q, v, wi_0, wi_1, wo"):
        check_targets(model, LoraConfig(target_modules=["q_proj"]))


def test_no_seed_jargon_for_users(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "coco5k-seed" in out and "seed notebook" not in out and "blip2-lora-coco5k notebook" in out
    from captune.evaluation.seed_metrics import UNAVAILABLE

    assert not [why for why in UNAVAILABLE.values() if "seed" in why]
    assert "seed's" not in _help([], capsys) and "seed recipe" not in _help(["bench"], capsys)


def test_list_override_without_brackets_suggests_them(capsys):
    assert main(["run", "demo", "data.ratios=0.5,0.5"]) == 2
    assert _error(capsys) == (
        "data.ratios: expected a list of numbers, got '0.5,0.5'; write a list in brackets: data.ratios=[0.5,0.5]"
    )


def test_merge_keeps_an_existing_out_without_force(tmp_path, capsys):
    from tests.test_card import make_run

    run = make_run(tmp_path / "run", [])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(run), "--out", str(out)]) == 2
    expected = f"--out {out} already exists and is not empty; add --force to replace it, or choose another"
    assert _error(capsys) == expected
    assert (out / "keep.txt").read_text() == "mine"


def test_compare_and_report_of_a_finished_run_show_their_result(tmp_path, capsys):
    from tests.test_card import make_run

    run = make_run(tmp_path / "run", [])
    (run / "report").mkdir()
    (run / "report" / "index.html").write_text("<html></html>")
    assert main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "complete, skipped" in out and "| CIDEr | 0.5000 | 0.7500 |" in out
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"report: {run / 'report' / 'index.html'}")
    from tests.test_card import _metrics

    for side, scale in (("baseline", 1.0), ("finetuned", 1.5)):
        (run / side).mkdir()
        (run / side / "metrics.json").write_text(json.dumps(_metrics(scale)))
    assert main(["compare", str(run), "--force"]) == 0
    assert capsys.readouterr().out.count("| CIDEr |") == 1  # shown once when the phase runs


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_data_actions_and_defaults(capsys):
    text = _help(["data"], capsys)
    assert "captune data prepare --source SOURCE --out DIR" in text and "captune data inspect DIR" in text
    text = " ".join(_help(["caption"], capsys).split())
    assert "(default: 32)" in text and "(default: builtin:demo)" in text and "(default: )" not in text
    assert "(default: None)" not in text


def test_config_command_lists_every_key_with_default_and_doc(capsys):
    import dataclasses

    from captune.config import Config

    assert main(["config", "demo", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    keys = [line.split(" = ")[0] for line in lines if not line.startswith(" ")]
    expected = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            expected += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
        else:
            expected.append(section.name)
    assert keys == expected
    assert "train.epochs = 3  (default 2)" in lines
    assert lines[lines.index("train.epochs = 3  (default 2)") + 1].strip() == "Passes over the training pairs."
    assert "eval.num_beams = 1  (default)" in lines


def test_inspect_names_the_skipped_files(tmp_path, capsys):
    root = tmp_path / "src"
    root.mkdir()
    rows = []
    for i in range(4):
        (root / f"ok{i}.jpg").write_bytes(jpeg_bytes((i * 40, 5, 5)))
        rows.append({"image": f"ok{i}.jpg", "caption": f"a box {i}"})
    (root / "broken.jpg").write_bytes(b"not an image")
    rows += [{"image": "broken.jpg", "caption": "x"}, {"image": "gone.jpg", "caption": "x"}]
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cache = tmp_path / "cache"
    assert main(["data", "prepare", "--source", f"manifest:{root / 'm.jsonl'}", "--out", str(cache)]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"      1  not an image file\n         {root / 'm.jsonl'} line 5\n" in out
    assert f"{root / 'm.jsonl'} line 6" in out


def test_too_few_images_names_the_reason_and_an_example(tmp_path, capsys):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes())
    (root / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "x"}) + "\n" + '{"image": "b.jpg"}\n')
    assert main(["data", "prepare", "--source", f"manifest:{root / 'm.jsonl'}", "--out", str(tmp_path / "c")]) == 2
    err = _error(capsys)
    assert "gave 1 usable image(s)" in err and "1 x image file not found" in err and "data inspect" not in err


def test_demo_model_on_other_captions_warns_with_the_unknown_share(tmp_path, capsys):
    root = tmp_path / "pets"
    root.mkdir()
    rows = []
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 40, 9, 9)))
        rows.append({"file_name": f"{i}.jpg", "caption": f"a fluffy tabby kitten sleeping on a red sofa {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    assert main(["data", str(run), "--recipe", "demo", f"data.source=imagefolder:{root}", "data.num_images=0"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("warning:"))
    assert "of the training words are unknown to the builtin:demo model" in line and "kitten" in line
    share = int(line.split("%")[0].removeprefix("warning: "))
    assert 40 <= share <= 95


def test_demo_captions_raise_no_unknown_word_warning(tmp_path, capsys):
    from captune.demo.vocabulary import unknown_words
    from captune.demo.world import make_items

    captions = [c for item in make_items("catalog", 50, seed=3) for c in item["captions"]]
    seen, unknown = unknown_words(captions)
    assert seen > 500 and not unknown


def test_orphan_annotations_and_dropped_captions_are_counted(tmp_path, image_folder, capsys):
    doc = json.loads((image_folder / "captions.json").read_text())
    doc["annotations"] += [{"image_id": 999, "caption": "an image nobody listed"}]
    doc["annotations"] += [{"image_id": 100, "caption": "   "}, {"image_id": 100, "caption": "caption 0 of image 0"}]
    (image_folder / "captions.json").write_text(json.dumps(doc))
    cache = tmp_path / "cache"
    argv = ["data", "prepare", "--source", f"coco:{image_folder / 'captions.json'}", "--out", str(cache)]
    assert main([*argv, "--num-images", "0"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "captions    dropped 1 empty, 1 repeated on the same image" in out
    assert "annotations for an image id missing from 'images'" in out and "annotations of image 999" in out


def test_rerun_after_a_user_error_takes_the_corrected_config(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "a red box"}) + "\n")
    out = tmp_path / "run"
    argv = ["run", "demo", "--out", str(out), f"data.source=manifest:{tmp_path / 'm.jsonl'}"]
    assert main(argv) == 2
    assert "set data.caption_column=text" in _error(capsys)
    assert main([*argv, "data.caption_column=text"]) == 2  # now the data itself is too small
    assert "gave 1 usable image(s)" in _error(capsys)
    assert "caption_column: text" in (out / "config.yaml").read_text()


def test_deepspeed_cpu_notice_is_silenced(capsys):
    import logging

    assert main(["recipes"]) == 0
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("a real DeepSpeed warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["a real DeepSpeed warning"]


def test_run_prints_the_comparison_once(tmp_path, capsys):
    """`captune run` shows the table when the compare phase makes it, and again only when that phase was
    skipped (a finished run), not twice."""
    out = tmp_path / "run"
    small = ["data.num_images=30", "train.epochs=1", "eval.bootstrap=20", "report.examples=2"]
    assert main(["run", "demo", "--out", str(out), *small]) == 0
    first = capsys.readouterr().out
    assert first.count("| metric | baseline | fine-tuned | change |") == 1
    assert first.count(f"report: {out / 'report' / 'index.html'}") == 1
    assert main(["run", "demo", "--out", str(out), *small]) == 0  # every phase complete: skipped
    again = capsys.readouterr().out
    assert again.count("| metric | baseline | fine-tuned | change |") == 1
    assert again.count(f"report: {out / 'report' / 'index.html'}") == 1

"""Captioning files, merging, Hub push (up to the network) and token hygiene."""

import json

from captune.cli import main
from tests.conftest import FAKE_TOKEN, jpeg_bytes


def test_caption_folder_with_a_corrupt_file(tmp_path, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    from captune.demo import world

    for i, item in enumerate(world.make_items("plain", 3, seed=5)):
        (folder / f"ok{i}.png").write_bytes(item["image"])
    (folder / "broken.jpg").write_bytes(jpeg_bytes(size=(200, 200))[:300])
    (folder / "notes.txt").write_text("not an image, ignored by suffix")
    assert main(["caption", str(folder), "--format", "jsonl", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == ["ok0.png", "ok1.png", "ok2.png"]
    assert all(r["caption"].strip() for r in rows)
    assert "broken.jpg" in err and "skipped" in err


def test_caption_csv_and_missing_paths(tmp_path, capsys):
    from captune.demo import world

    (tmp_path / "a.png").write_bytes(world.make_items("plain", 1, seed=1)[0]["image"])
    out = tmp_path / "caps.csv"
    assert (
        main(
            [
                "caption",
                str(tmp_path / "*.png"),
                str(tmp_path / "nope.jpg"),
                "--format",
                "csv",
                "--output",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert out.read_text().splitlines()[0] == "path,caption"
    assert "nope.jpg: no such file" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "nope.jpg")]) == 2


def test_merge_matches_base_plus_adapter(demo_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from captune.config import EvalConfig
    from captune.data.prepare import load_split
    from captune.model.load import BUILTIN_DEMO, resolve_model_path
    from captune.ops.generation import caption_images

    assert main(["merge", str(demo_run), "--out", str(tmp_path / "merged")]) == 0
    merged = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    proc = Blip2Processor.from_pretrained(tmp_path / "merged")
    base = Blip2ForConditionalGeneration.from_pretrained(resolve_model_path(BUILTIN_DEMO))
    tuned = PeftModel.from_pretrained(base, str(demo_run / "adapter")).eval()
    images = [e.image for e in load_split(demo_run / "data", "test")]
    cfg = EvalConfig(batch_size=16, max_new_tokens=20)
    assert caption_images(merged, proc, images, cfg) == caption_images(tuned, proc, images, cfg)
    assert not any(k for k in merged.state_dict() if "lora" in k)
    with torch.no_grad():
        assert merged.language_model.lm_head.weight.shape == base.language_model.lm_head.weight.shape


def test_push_dry_run_writes_card_and_adapter(demo_run, tmp_path, capsys):
    out = tmp_path / "staged"
    assert main(["push", str(demo_run), "--repo", "someone/demo-catalog", "--dry-run", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "captune_config.yaml",
        "comparison.json",
    } <= names
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "model-index:" in card
    assert "| CIDEr |" in card and "huggingface.co/builtin" not in card  # the demo base is not on the Hub


def test_push_calls_hub_up_to_the_network(demo_run, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            from pathlib import Path

            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["push", str(demo_run), "--repo", "someone/demo", "--private", "--base-model", "org/base"]) == 0
    assert calls[0] == ("init", FAKE_TOKEN)
    assert calls[1] == ("create_repo", "someone/demo", True, True, "model")
    assert calls[2][0] == "upload_folder" and "README.md" in calls[2][2] and "adapter_model.safetensors" in calls[2][2]
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_push_without_token_is_one_clear_line(demo_run, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["push", str(demo_run), "--repo", "someone/demo", "--base-model", "org/base"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "captune: error: no Hugging Face token: set HF_TOKEN or run 'hf auth login', then push again"


def test_planted_token_is_nowhere(demo_run, tmp_path, monkeypatch, capsys):
    """The demo run was made with HF_TOKEN set; add a report and a dry-run push, then search everything."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["report", str(demo_run), "--force"]) == 0
    assert main(["push", str(demo_run), "--repo", "someone/demo", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err
    for path in demo_run.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_caption_stream_in_chunks_equals_one_pass(tmp_path):
    """captune caption reads and captions files chunk by chunk, one decoder kept across chunks (a short
    chunk padded to its batch): the captions equal one pass over all the images, skipped files named."""
    from captune.config import EvalConfig, ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.generation import caption_images
    from captune.run.caption import CaptionStats, ChunkReader, caption_chunks

    items = world.make_items("plain", 7, seed=11)
    paths = []
    for i, item in enumerate(items):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(item["image"])
    (tmp_path / "bad.jpg").write_bytes(jpeg_bytes(size=(64, 64))[:200])
    paths.insert(3, tmp_path / "bad.jpg")
    loaded = load_model(ModelConfig(device="cpu"))
    cfg = EvalConfig(batch_size=2, max_new_tokens=8)
    rows, stats = [], CaptionStats()
    chunks = list(ChunkReader(paths, chunk=3, workers=2))
    assert [len(images) for images, _ in chunks] == [3, 2, 2]  # the bad file is in the second chunk
    caption_chunks(loaded.model, loaded.processor, chunks, cfg, "", rows.extend, stats)
    expected = caption_images(loaded.model, loaded.processor, [it["image"] for it in items], cfg)
    assert [c for _, c in rows] == expected
    assert [p.name for p, _ in rows] == [f"{i}.png" for i in range(7)]
    assert stats.images == 7 and [w for w, _ in stats.skipped] == [str(tmp_path / "bad.jpg")]


def test_read_images_in_threads_keeps_order_and_reasons(tmp_path):
    from captune.data.files import read_images
    from captune.demo import world

    paths = []
    for i, item in enumerate(world.make_items("plain", 5, seed=2)):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(item["image"])
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths[1:1] = [tmp_path / "empty.jpg", tmp_path / "gone.jpg"]
    assert read_images(paths, workers=4) == read_images(paths)
    ok, bad = read_images(paths, workers=4)
    assert [p.name for p, _ in ok] == [f"{i}.png" for i in range(5)]
    assert [(w.rsplit("/", 1)[1], why.split(" ")[0]) for w, why in bad] == [
        ("empty.jpg", "zero-byte"),
        ("gone.jpg", "unreadable"),
    ]


def test_caption_output_appears_whole_or_not_at_all(tmp_path):
    import os

    from captune.atomic import mode_for
    from captune.run.caption import RowWriter

    out = tmp_path / "caps.csv"
    w = RowWriter("csv", str(out))
    w.write([(tmp_path / "a.png", "a dog")])
    assert not out.exists()  # rows go to a temporary beside it
    w.abandon()
    assert not out.exists() and os.listdir(tmp_path) == []
    w = RowWriter("csv", str(out))
    w.write([(tmp_path / "a.png", "a dog"), (tmp_path / "b.png", 'a "red" bus')])
    w.finish()
    w.abandon()  # after finish: nothing to undo
    assert out.read_text().splitlines() == [
        "path,caption",
        f"{tmp_path / 'a.png'},a dog",
        f'{tmp_path / "b.png"},"a ""red"" bus"',
    ]
    assert os.stat(out).st_mode & 0o777 == mode_for(False) and os.listdir(tmp_path) == ["caps.csv"]


def test_chunk_reader_reads_a_head_then_the_rest_ahead(tmp_path):
    """captune caption reads its first chunk (one batch, while nothing else runs) up to the first readable
    image; the rest are bigger chunks, each read while the one before is used."""
    from captune.run.caption import ChunkReader

    paths = []
    for i in range(9):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(jpeg_bytes() if i > 2 else b"not an image")
    reader = ChunkReader(paths, chunk=3, first=2, workers=2)
    head = reader.head()  # 0-1 unreadable, then 2-4: a readable one
    assert [(len(ok), len(bad)) for ok, bad in head] == [(0, 2), (2, 1)]
    assert [len(ok) for ok, _ in reader] == [3, 1] and list(reader) == []
    assert [len(ok) for ok, _ in ChunkReader(paths, chunk=4)] == [1, 4, 1]  # (the first 3 unreadable)
    assert ChunkReader([], chunk=3).head() == [] and list(ChunkReader([], chunk=3)) == []


def test_chunk_reader_start_reads_the_next_chunk_at_once(tmp_path, monkeypatch):
    """After the model loads, the chunk after the head is read while the head is captioned: ``start``
    submits its read before any chunk is asked for (a lazy generator would read it only after)."""
    import threading

    import captune.run.caption as caption

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(jpeg_bytes())
    reader = caption.ChunkReader(paths, chunk=3, first=1, workers=1)
    assert [len(ok) for ok, _ in reader.head()] == [1]
    reading = threading.Event()
    real = caption.read_images

    def spy(*args, **kwargs):
        reading.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(caption, "read_images", spy)
    rest = reader.start()
    assert reading.wait(10)
    assert [len(ok) for ok, _ in rest] == [3]

"""CLIPScore / RefCLIPScore on a tiny CLIP built from config, against a direct computation."""

import json
import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A 2-layer CLIP with a character-level BPE tokenizer, saved like a Hub checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_clip")
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>")
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root)
    proc.save_pretrained(root)
    return root


def _images(n):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_clipscore_equals_the_papers_formula(tiny_clip_dir):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from captune.evaluation.clipscore import clip_score

    images = _images(5)
    captions = ["a red circle", "two blue squares", "a dog", "", "small green shapes on the left"]
    refs = [["a red disc", "one circle"], ["blue squares"], ["a cat", "a dog sits"], ["nothing"], ["green"]]
    got = clip_score(images, captions, refs, str(tiny_clip_dir), device="cpu", batch=2)
    assert not got.unavailable and set(got.per_image) == {"CLIPScore", "RefCLIPScore"}

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip_dir)

    def unit(x):
        x = x if hasattr(x, "norm") else x.pooler_output
        x = x[0].double()
        return x / x.norm()

    def text(t):
        with torch.no_grad():
            return unit(model.get_text_features(**proc(text=[("A photo depicts " + t).strip()], return_tensors="pt")))

    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        with torch.no_grad():
            v = unit(model.get_image_features(**proc(images=[img], return_tensors="pt")))
        c = text(cap)
        clip_s = 2.5 * max(float(c @ v), 0.0)
        best = max(0.0, max(float(c @ text(r)) for r in refs[i]))
        ref_s = 0.0 if clip_s + best == 0 else 2 * clip_s * best / (clip_s + best)
        assert got.per_image["CLIPScore"][i] == pytest.approx(clip_s, abs=1e-5)
        assert got.per_image["RefCLIPScore"][i] == pytest.approx(ref_s, abs=1e-5)
    assert got.corpus["CLIPScore"] == pytest.approx(np.mean(got.per_image["CLIPScore"]), abs=1e-12)
    assert math.isfinite(got.corpus["RefCLIPScore"])


def test_missing_clip_is_one_line_and_off_is_silent(tmp_path):
    from captune.evaluation.clipscore import clip_score

    images, caps = _images(1), ["a dog"]
    missing = clip_score(images, caps, None, str(tmp_path / "no_such_clip"), device="cpu")
    assert not missing.corpus and len(missing.unavailable["CLIPScore"].splitlines()) == 1
    for off in ("", "none"):
        assert clip_score(images, caps, None, off).unavailable == {}


def test_auto_without_cached_weights_says_how_to_get_them(monkeypatch, tmp_path):
    from captune.evaluation.clipscore import clip_score

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    got = clip_score(_images(1), ["a dog"], None, "auto", device="cpu")
    why = got.unavailable["CLIPScore"]
    assert "openai/clip-vit-base-patch32 is not on disk" in why and "eval.clip_model" in why


def test_score_command_with_clip_model(tiny_clip_dir, tmp_path, capsys):
    from captune.cli import main

    for n, img in enumerate(_images(3)):
        img.save(tmp_path / f"im{n}.png")
    ann = {
        "images": [{"id": n, "file_name": f"im{n}.png"} for n in range(3)],
        "annotations": [{"image_id": n, "caption": c} for n, c in enumerate(["a red dot", "blue", "two cats"])],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": n, "caption": "a red dot"} for n in range(3)]))
    argv = ["score", str(tmp_path / "res.json"), "--references", str(tmp_path / "ann.json"), "--json"]
    assert main([*argv, "--clip-model", str(tiny_clip_dir), "--images", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"CLIPScore", "RefCLIPScore", "CIDEr", "METEOR"} <= set(doc["metrics"])
    assert main([*argv, "--clip-model", str(tmp_path / "nope"), "--images", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "CLIPScore" in doc["unavailable"] and "CIDEr" in doc["metrics"]


def test_clipscore_rows_get_intervals_and_p_values():
    from captune.evaluation.compare import compare, markdown_table

    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.8, 120)
    t = b + rng.normal(0.05, 0.02, 120)

    def doc(v):
        return {"CLIPScore": float(v.mean()), "per_image": {"CLIPScore": list(v)}, "image_ids": list(range(120))}

    row = compare(doc(b), doc(t), samples=1000, seed=0)["rows"][0]
    assert row["metric"] == "CLIPScore" and row["interval_of"] == "corpus score"
    assert row["change_ci"][0] <= row["change"] <= row["change_ci"][1] and row["p_at_floor"]
    assert "| CLIPScore |" in markdown_table(compare(doc(b), doc(t), samples=100, seed=0))


class _CountedImages:
    """A sequence of encoded images that counts the ones read."""

    def __init__(self, images):
        import io

        self.data, self.read = [], 0
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            self.data.append(buf.getvalue())

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        got = self.data[i]
        self.read += len(got) if isinstance(i, slice) else 1
        return got


def test_unavailable_clip_reads_no_image_and_images_are_read_a_batch_at_a_time(tiny_clip_dir, tmp_path):
    """The run's scoring once decoded every test image before finding CLIP absent (1-2 s of a job's
    scoring for 500 images, and a whole split in memory)."""
    from captune.evaluation.clipscore import add_clip_scores, clip_score
    from captune.evaluation.metrics import Scores

    images = _CountedImages(_images(5))
    scores = Scores(corpus={}, per_image={}, unavailable={}, image_ids=[], bleu_stats=[], meteor_stats=[])
    note = add_clip_scores(scores, images, ["a dog"] * 5, [["a cat"]] * 5, str(tmp_path / "no_such_clip"))
    assert note.startswith("CLIPScore unavailable") and images.read == 0
    got = clip_score(images, ["a dog"] * 5, None, str(tiny_clip_dir), device="cpu", batch=2)
    assert len(got.per_image["CLIPScore"]) == 5 and images.read == 5


def test_auto_without_cached_weights_imports_no_torch(tmp_path):
    """The run's scoring process imports no torch: with CLIP off disk, "auto" said so only after
    importing transformers (and torch: ~0.5 GB and seconds in that process)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    code = (
        "import sys\n"
        "from captune.evaluation.clipscore import clip_score\n"
        "got = clip_score(['not read'], ['a dog'], None, 'auto')\n"
        "print('torch' in sys.modules, 'not on disk' in got.unavailable['CLIPScore'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr[-1500:]

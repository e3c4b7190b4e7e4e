"""Shared fixtures: a tiny BLIP-2 built from config (random weights) and small datasets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

FAKE_TOKEN = "hf_captuneFakeTokenForLeakTests0123456789"
SMALL = ["data.num_images=60", "train.epochs=2", "eval.bootstrap=200", "report.examples=4"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One reduced demo run shared by the tests that read a run folder (HF_TOKEN planted)."""
    import os

    from captune.cli import main

    out = tmp_path_factory.mktemp("run") / "demo"
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    try:
        assert main(["run", "demo", "--out", str(out), *SMALL]) == 0
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BLIP-2 + processor saved in HF format."""
    from transformers import Blip2ForConditionalGeneration

    from captune.demo.base_model import DemoBuildSpec, build_config, build_processor

    spec = DemoBuildSpec(vision_hidden=32, qformer_hidden=32, text_hidden=32, layers=1, query_tokens=4)
    torch.manual_seed(0)
    processor = build_processor(spec)
    tok = processor.tokenizer
    cfg = build_config(spec, vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(cfg)
    out = tmp_path_factory.mktemp("tiny_blip2")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    img = Image.new(mode, size, colour if mode == "RGB" else 128)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Six small JPEGs with a COCO annotation file and a manifest beside them."""
    root = tmp_path / "imgs"
    root.mkdir()
    images, anns = [], []
    for i in range(6):
        name = f"im{i}.jpg"
        (root / name).write_bytes(jpeg_bytes((40 * i, 100, 200 - 30 * i)))
        images.append({"id": 100 + i, "file_name": name})
        for j in range(3):
            anns.append({"image_id": 100 + i, "caption": f"caption {j} of image {i}"})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BLIP-2 with a T5 (encoder-decoder) language model, saved in HF format."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    from captune.demo.base_model import DemoBuildSpec, build_config, build_processor

    torch.manual_seed(0)
    spec = DemoBuildSpec(vision_hidden=32, qformer_hidden=32, text_hidden=32, layers=1, query_tokens=4)
    processor = build_processor(spec, seq2seq=True)
    tok = processor.tokenizer
    opt_cfg = build_config(spec, vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    text = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    cfg = Blip2Config(
        vision_config=opt_cfg.vision_config.to_dict(),
        qformer_config=opt_cfg.qformer_config.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=spec.query_tokens,
        image_token_index=opt_cfg.image_token_index,
    )
    model = Blip2ForConditionalGeneration(cfg)
    out = tmp_path_factory.mktemp("tiny_blip2_t5")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_instructblip_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised InstructBLIP with a LLaMA language model, saved in HF format."""
    from captune.demo.instructblip import build_tiny_instructblip

    torch.manual_seed(0)
    return build_tiny_instructblip(tmp_path_factory.mktemp("tiny_instructblip"), "llama")


@pytest.fixture(scope="session")
def tiny_instructblip_t5_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised InstructBLIP with a T5 (encoder-decoder) language model."""
    from captune.demo.instructblip import build_tiny_instructblip

    torch.manual_seed(0)
    return build_tiny_instructblip(tmp_path_factory.mktemp("tiny_instructblip_t5"), "t5")

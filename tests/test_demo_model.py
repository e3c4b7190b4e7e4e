"""The demo base model: shipped, loadable like any checkpoint, and rebuildable by project code."""

import json

import pytest
import torch

from captune.demo import world
from captune.demo.base_model import DemoBuildSpec, build_demo_model
from captune.model.load import BUILTIN_DEMO, demo_model_dir, resolve_model_path


def test_shipped_model_is_small_and_loads_with_from_pretrained():
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = resolve_model_path(BUILTIN_DEMO)
    size = sum(p.stat().st_size for p in demo_model_dir().iterdir())
    assert size < 10 * 1024 * 1024
    model = Blip2ForConditionalGeneration.from_pretrained(path)
    proc = Blip2Processor.from_pretrained(path)
    assert model.config.image_token_index == proc.tokenizer.convert_tokens_to_ids("<image>")
    meta = json.loads((demo_model_dir() / "captune_demo.json").read_text())
    assert meta["spec"] == DemoBuildSpec().__dict__
    assert meta["losses"][-1] < meta["losses"][0] / 3  # pre-training did learn


def test_build_code_produces_a_working_checkpoint(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    spec = DemoBuildSpec(
        images=96,
        epochs=2,
        batch_size=32,
        vision_hidden=32,
        qformer_hidden=32,
        text_hidden=32,
        layers=1,
        query_tokens=4,
    )
    out = build_demo_model(tmp_path / "m", spec, log=lambda m: None)
    meta = json.loads((out / "captune_demo.json").read_text())
    assert meta["losses"][-1] < meta["losses"][0]
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    assert model.config.num_query_tokens == 4
    # deterministic: the same spec builds the same weights
    again = build_demo_model(tmp_path / "m2", spec, log=lambda m: None)
    m2 = Blip2ForConditionalGeneration.from_pretrained(again)
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items(), strict=False):
        assert torch.equal(a, b), n


def test_caption_styles_describe_the_same_scene():
    import random

    scene = world.sample_scene(random.Random(1))
    plain, catalog = world.captions(scene, "plain"), world.captions(scene, "catalog")
    assert len(plain) >= 3 and len(catalog) >= 3
    assert scene.colour in plain[0] and scene.colour not in catalog[0]
    with pytest.raises(ValueError):
        world.captions(scene, "nope")

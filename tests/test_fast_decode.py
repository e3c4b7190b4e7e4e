"""The static-cache greedy decoder gives generate()'s tokens."""

import dataclasses

import pytest
import torch

from captune.config import EvalConfig, ModelConfig
from captune.demo import world
from captune.model.load import load_model
from captune.ops.features import image_features
from captune.ops.generation import caption_features


@pytest.fixture(scope="module")
def demo():
    loaded = load_model(ModelConfig(device="cpu"))
    images = [it["image"] for it in world.make_items("catalog", 12, seed=11)]
    return loaded, image_features(loaded.model, loaded.processor, images)


@pytest.mark.parametrize("prompt, min_new, n", [("", 0, 12), ("a photo of", 0, 12), ("", 9, 12), ("", 0, 11)])
def test_fast_greedy_equals_generate(demo, prompt, min_new, n):
    loaded, feats = demo
    feats = feats[:n]  # 11 images in batches of 5: equal batches of 4, the last padded
    slow = EvalConfig(batch_size=5, max_new_tokens=14, min_new_tokens=min_new, fast=False)
    fast = dataclasses.replace(slow, fast=True)
    tok = loaded.processor.tokenizer
    assert caption_features(loaded.model, tok, feats, fast, prompt) == caption_features(
        loaded.model, tok, feats, slow, prompt
    )


def test_fast_greedy_with_lora(demo):
    from captune.config import LoraConfig
    from captune.model.lora import attach_lora

    loaded, feats = demo
    torch.manual_seed(0)
    model = attach_lora(load_model(ModelConfig(device="cpu")).model, LoraConfig(target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a non-trivial adapter
    model.eval()
    tok = loaded.processor.tokenizer
    slow = EvalConfig(batch_size=6, max_new_tokens=12, fast=False)
    assert caption_features(model, tok, feats, dataclasses.replace(slow, fast=True)) == caption_features(
        model, tok, feats, slow
    )


def test_greedy_captioning_takes_the_fast_path(demo, monkeypatch):
    """caption_features must route greedy OPT decoding through GreedyOPT (and beams through generate)."""
    from captune.ops import fast_decode

    loaded, feats = demo
    calls = []
    original = fast_decode.GreedyOPT.generate

    def spy(self, *args, **kwargs):
        calls.append(self.batch)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fast_decode.GreedyOPT, "generate", spy)
    tok = loaded.processor.tokenizer
    caption_features(loaded.model, tok, feats, EvalConfig(batch_size=5, max_new_tokens=8))
    assert calls == [4, 4, 4]  # 12 images in equal batches: one decoder shape
    calls.clear()
    caption_features(loaded.model, tok, feats[:11], EvalConfig(batch_size=5, max_new_tokens=8))
    assert calls == [4, 4, 4]  # the last batch padded to the shape in use
    caption_features(loaded.model, tok, feats, EvalConfig(batch_size=5, max_new_tokens=8, num_beams=2))
    caption_features(loaded.model, tok, feats, EvalConfig(batch_size=5, max_new_tokens=8, fast=False))
    assert calls == [4, 4, 4]


@pytest.mark.parametrize("pre_norm, proj_dim", [(False, 16), (True, 16), (False, 32)])
def test_greedy_opt_equals_generate_on_other_layouts(pre_norm, proj_dim):
    """Post-norm layers (OPT-350m) and embeddings projected in and out: the prefill's trimmed last layer
    and the decode steps give generate()'s tokens (the demo model is pre-norm, without projections)."""
    from transformers import OPTConfig, OPTForCausalLM

    from captune.ops.fast_decode import GreedyOPT

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, do_layer_norm_before=pre_norm, word_embed_proj_dim=proj_dim, init_std=0.2,
    )  # fmt: skip
    lm = OPTForCausalLM(cfg).eval()
    embeds = torch.randn(3, 6, proj_dim)
    want = lm.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(3, 6, dtype=torch.long), max_new_tokens=9, min_new_tokens=9,
        do_sample=False, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    dec = GreedyOPT(lm, 3, 6, 9)
    got = dec.generate(embeds, eos_token_id=2, pad_token_id=1, min_new=9)
    assert want[:, -9:].tolist() == got.tolist()
    # the prefill's logits themselves (the trimmed last layer gives only the first token, a weak check alone)
    with torch.no_grad():
        prefill = dec._forward(dec._embed(embeds, torch.arange(6)), None)
        assert torch.allclose(prefill, lm(inputs_embeds=embeds).logits[:, -1], atol=1e-5, rtol=1e-5)

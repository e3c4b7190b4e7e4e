"""Shared-prefix packing gives the loss and gradients of the unpacked pairs."""

import torch

from captune.config import LoraConfig, ModelConfig
from captune.demo import world
from captune.model.load import load_model
from captune.model.lora import attach_lora
from captune.ops.batching import encode_texts, training_text
from captune.ops.features import image_features
from captune.ops.lm import lm_loss
from captune.ops.packing import pack_captions, packed_loss


def _setup():
    loaded = load_model(ModelConfig(device="cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraConfig(target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    items = world.make_items("catalog", 3, seed=2)
    feats = image_features(model, loaded.processor, [it["image"] for it in items])
    caps = [it["captions"][: 3 - i] for i, it in enumerate(items)]  # 3, 2 and 1 captions
    return model, loaded.processor.tokenizer, feats, caps


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_equals_unpacked_loss_and_gradients():
    model, tok, feats, caps = _setup()
    model.eval()  # no dropout, so both paths are deterministic
    for prompt in ("", "a photo of"):
        flat = [c for cs in caps for c in cs]
        index = [i for i, cs in enumerate(caps) for _ in cs]
        blip = model.get_base_model()
        text = encode_texts(
            tok,
            [training_text(c, prompt, tok.eos_token) for c in flat],
            num_query_tokens=blip.config.num_query_tokens,
            image_token_id=blip.config.image_token_index,
            prompt=prompt,
        )
        model.zero_grad()
        ref = lm_loss(model, feats[index], text.input_ids, text.attention_mask, text.labels)
        ref.backward()
        ref_grads = _grads(model)
        model.zero_grad()
        packed = pack_captions(tok, caps, prompt=prompt, max_text_tokens=40)
        assert packed.pairs == len(flat)
        loss = packed_loss(model, feats, packed)
        loss.backward()
        assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
        for name, grad in _grads(model).items():
            assert torch.allclose(grad, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_bench_synthetic_packed_batch_labels_all_but_bos():
    """The batch captune bench and the speed probe train on: BOS unlabelled, every other token a
    target, the same ids for the same call, features cycled over the images."""
    from captune.bench import synthetic_packed_batch
    from captune.ops.batching import IGNORE

    feats = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    packed, f = synthetic_packed_batch(feats, 5, 2, 6)
    again, _ = synthetic_packed_batch(feats, 5, 2, 6)
    assert packed.ids.shape == (5, 2, 6) and torch.equal(packed.ids, again.ids)
    assert (packed.labels[:, :, 0] == IGNORE).all() and torch.equal(packed.labels[:, :, 1:], packed.ids[:, :, 1:])
    assert packed.pairs == 10 and len(packed.targets) == 5 * 2 * 5
    assert torch.equal(f[3], feats[0]) and torch.equal(f[4], feats[1])

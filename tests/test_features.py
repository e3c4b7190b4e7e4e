"""The cached-feature path computes what the full BLIP-2 forward computes."""

import torch

from captune.ops.batching import encode_texts, generation_prompt, training_text
from captune.ops.features import image_features, pixel_values
from captune.ops.lm import generate_from_features, lm_loss
from tests.conftest import jpeg_bytes


def _load(tiny_model_dir):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, Blip2Processor.from_pretrained(tiny_model_dir)


def test_cached_feature_loss_equals_full_forward(tiny_model_dir):
    model, proc = _load(tiny_model_dir)
    images = [jpeg_bytes((200, 10, 10)), jpeg_bytes((10, 200, 10)), jpeg_bytes((10, 10, 200))]
    tok = proc.tokenizer
    text = encode_texts(
        tok,
        [
            training_text(c, "", tok.eos_token)
            for c in ("a red circle", "one blue square", "there are two green triangles")
        ],
        num_query_tokens=model.config.num_query_tokens,
        image_token_id=model.config.image_token_index,
    )
    with torch.no_grad():
        full = model(
            pixel_values=pixel_values(proc, images),
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            labels=text.labels,
        ).loss
        feats = image_features(model, proc, images)
        cached = lm_loss(model, feats, text.input_ids, text.attention_mask, text.labels)
    assert torch.allclose(full, cached, atol=1e-5), (full, cached)


def test_generation_from_features_equals_model_generate(tiny_model_dir):
    model, proc = _load(tiny_model_dir)
    images = [jpeg_bytes((200, 10, 10)), jpeg_bytes((10, 10, 200))]
    g = generation_prompt(
        proc.tokenizer, 2, num_query_tokens=model.config.num_query_tokens, image_token_id=model.config.image_token_index
    )
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=proc.tokenizer.eos_token_id,
        pad_token_id=proc.tokenizer.pad_token_id,
    )
    ours = generate_from_features(model, image_features(model, proc, images), g.input_ids, g.attention_mask, **kwargs)
    with torch.no_grad():
        theirs = model.generate(
            pixel_values=pixel_values(proc, images), input_ids=g.input_ids, attention_mask=g.attention_mask, **kwargs
        )
    assert torch.equal(ours, theirs[:, g.input_ids.size(1) :])

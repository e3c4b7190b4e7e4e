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


def test_qformer_matmul_auto_is_tf32_only_for_16_bit_models_and_restores_the_flag(tiny_model_dir):
    from captune.ops.features import qformer_matmul, qformer_precision, set_qformer_matmul
    from captune.run.feature_cache import model_fingerprint

    model, proc = _load(tiny_model_dir)
    assert qformer_matmul(model) == "fp32"  # an fp32 model: its features are not rounded to 16 bits
    fp32_key = model_fingerprint(model, proc, "tiny")
    model.language_projection.to(torch.bfloat16)
    assert qformer_matmul(model) == "tf32"
    assert model_fingerprint(model, proc, "tiny") != fp32_key  # TF32 features are cached apart
    set_qformer_matmul(model, "fp32")
    assert qformer_matmul(model) == "fp32"
    set_qformer_matmul(model, "tf32")
    before = torch.backends.cuda.matmul.allow_tf32
    with qformer_precision(model):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_load_model_records_the_qformer_matmul_choice(tiny_model_dir):
    from captune.config import ModelConfig
    from captune.model.load import load_model
    from captune.ops.features import qformer_matmul

    loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", qformer_matmul="tf32"))
    assert qformer_matmul(loaded.model) == "tf32"

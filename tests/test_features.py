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


def test_vision_kernels_auto_fuse_only_a_16_bit_tower_on_a_gpu_and_key_the_cache(tiny_model_dir):
    from captune.ops.vision import fused_vision, set_vision_kernels, vision_kernels, vision_path
    from captune.run.feature_cache import model_fingerprint

    model, proc = _load(tiny_model_dir)
    assert vision_kernels(model) == "plain"  # float32, on the CPU
    plain_key = model_fingerprint(model, proc, "tiny")
    model.vision_model.to(torch.bfloat16)
    assert vision_kernels(model) == "plain"  # 16-bit, but on a CPU: fusing would save nothing here
    model.vision_model.to(torch.float32)
    set_vision_kernels(model, "fused")
    assert vision_kernels(model) == "fused" and model_fingerprint(model, proc, "tiny") != plain_key
    assert vision_path(model) == (
        "fc1 + GELU (tanh form) in one product, residual sum + layer norm in one pass (as torch ops here)"
    )
    encoder = model.vision_model.encoder
    modules = [encoder] + [layer.mlp for layer in encoder.layers]
    with fused_vision(model):
        assert not any("forward" in vars(m) for m in modules)  # with autograd on: the modules' own
    with torch.no_grad(), fused_vision(model):
        assert all("forward" in vars(m) for m in modules)
    assert not any("forward" in vars(m) for m in modules)  # the modules' own forwards are back
    set_vision_kernels(model, "plain")
    assert vision_path(model) == "the checkpoint's modules"


def _tower(tiny_model_dir):
    """The tiny model with MLP weights of order 1, where GELU's two forms part (at init both are ~x/2)."""
    model, proc = _load(tiny_model_dir)
    torch.manual_seed(0)
    for layer in model.vision_model.encoder.layers:
        torch.nn.init.normal_(layer.mlp.fc1.weight, std=0.5)
        torch.nn.init.normal_(layer.mlp.fc2.weight, std=0.5)
    return model, proc


def test_fused_vision_features_are_the_towers_with_the_tanh_form(tiny_model_dir):
    """vision_kernels=fused on a CPU: the vision tower's output is exactly that of the same tower whose
    GELUs are the tanh form (the encoder's own loop rewritten: the same sums and norms, in order)."""
    from captune.ops.vision import set_vision_kernels

    model, proc = _tower(tiny_model_dir)
    images = [jpeg_bytes((200, 10, 10)), jpeg_bytes((10, 200, 10))]
    plain = image_features(model, proc, images, stage="vision")
    set_vision_kernels(model, "fused")
    got = image_features(model, proc, images, stage="vision")
    set_vision_kernels(model, "plain")
    for layer in model.vision_model.encoder.layers:
        layer.mlp.activation_fn = torch.nn.GELU(approximate="tanh")
    tanh = image_features(model, proc, images, stage="vision")
    assert torch.equal(got, tanh) and not torch.equal(got, plain)


def test_encoder_forward_equals_the_encoders_own_and_defers_to_it_when_more_is_asked(tiny_model_dir):
    from captune.ops.vision import encoder_forward

    model, _ = _tower(tiny_model_dir)
    encoder = model.vision_model.encoder
    x = torch.randn(2, 5, model.config.vision_config.hidden_size)
    with torch.no_grad():
        own = encoder(inputs_embeds=x).last_hidden_state
        assert torch.equal(encoder_forward(encoder, x).last_hidden_state, own)
        deferred = encoder_forward(encoder, x, output_hidden_states=True)
    assert torch.equal(deferred.last_hidden_state, own)


def test_load_model_records_the_vision_kernels_choice(tiny_model_dir):
    from captune.config import ModelConfig
    from captune.model.load import load_model
    from captune.ops.vision import vision_kernels

    loaded = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", vision_kernels="fused"))
    assert vision_kernels(loaded.model) == "fused"


def test_encoder_forward_defers_when_the_config_asks_for_outputs(tiny_model_dir, monkeypatch):
    """transformers records hidden states and attentions with hooks on the layers, which the fused loop does
    not call: where the config asks for them, the encoder's own forward runs."""
    from captune.ops.vision import encoder_forward

    model, _ = _load(tiny_model_dir)
    encoder = model.vision_model.encoder
    calls = []
    own = type(encoder).forward
    monkeypatch.setattr(type(encoder), "forward", lambda self, *a, **k: calls.append(1) or own(self, *a, **k))
    x = torch.randn(1, 3, model.config.vision_config.hidden_size)
    with torch.no_grad():
        encoder_forward(encoder, x)
        assert calls == []
        monkeypatch.setattr(encoder.config, "output_hidden_states", True)
        encoder_forward(encoder, x)
    assert calls == [1]


def test_fused_vision_puts_every_forward_back_when_patching_fails(tiny_model_dir, monkeypatch):
    import pytest

    import captune.ops.mlp as mlp
    from captune.ops.vision import fused_vision, set_vision_kernels

    model, _ = _load(tiny_model_dir)
    set_vision_kernels(model, "fused")
    seen = []

    def flaky(m):
        seen.append(m)
        if len(seen) == 2:
            raise RuntimeError("an odd MLP")
        return True

    monkeypatch.setattr(mlp, "gelu_fusable", flaky)
    with pytest.raises(RuntimeError, match="odd MLP"), torch.no_grad(), fused_vision(model):
        pass
    encoder = model.vision_model.encoder
    assert not any("forward" in vars(m) for m in [encoder, *(layer.mlp for layer in encoder.layers)])

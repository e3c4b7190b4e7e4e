"""InstructBLIP (LLaMA and T5 language models): loading, the instruction-aware Q-Former, label
masking, cached-feature loss and captions against the model's own, LoRA presets, fallbacks."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from captune.config import EvalConfig, LoraConfig, ModelConfig
from captune.model.family import language_family
from captune.model.instruct import instruction, qformer_inputs
from captune.model.load import load_model
from captune.ops.batching import IGNORE, encode_seq2seq, encode_texts, generation_prompt, training_text
from captune.ops.features import image_features, pixel_values, project_queries
from captune.ops.generation import caption_features, use_fast_path
from captune.ops.lm import lm_loss
from tests.conftest import jpeg_bytes

PROMPT = "a photo of"
IMAGES = [jpeg_bytes((200, 30, 30)), jpeg_bytes((30, 200, 30), (50, 20)), jpeg_bytes((20, 20, 220), (30, 60))]
CAPTIONS = ["two small red circles", "a big green square on the left", "one blue triangle"]


def _load(path, prompt=PROMPT):
    return load_model(ModelConfig(name_or_path=str(path), device="cpu", dtype="fp32", prompt=prompt))


@pytest.fixture(scope="module")
def llama(tiny_instructblip_dir):
    return _load(tiny_instructblip_dir)


@pytest.fixture(scope="module")
def t5(tiny_instructblip_t5_dir):
    return _load(tiny_instructblip_t5_dir)


def test_load_picks_instructblip_classes_and_family(llama, t5):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    for loaded, family in ((llama, "llama"), (t5, "t5")):
        assert isinstance(loaded.model, InstructBlipForConditionalGeneration)
        assert isinstance(loaded.processor, InstructBlipProcessor)
        assert language_family(loaded.model) == family
        text, ids = instruction(loaded.model)
        assert text == PROMPT and ids == loaded.processor.qformer_tokenizer(PROMPT)["input_ids"]


def test_blip2_family_unchanged(tiny_model_dir, tiny_t5_dir):
    blip2 = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    assert language_family(blip2.model) == "opt" and instruction(blip2.model) is None
    assert language_family(load_model(ModelConfig(name_or_path=str(tiny_t5_dir), device="cpu")).model) == "t5"


def test_unknown_checkpoint_kind_is_a_user_error(tmp_path):
    from captune.errors import UserError

    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="'llava' checkpoint"):
        load_model(ModelConfig(name_or_path=str(tmp_path), device="cpu"))


def test_llama_label_masking(llama):
    """LLaMA conventions: <s> first, no </s> from the tokenizer (captune appends it), left padding by
    default; training rows are right-padded and only caption + EOS are labelled."""
    tok = llama.processor.tokenizer
    assert tok.padding_side == "left"
    assert tok("red")["input_ids"] == [tok.bos_token_id, tok.convert_tokens_to_ids("red")]
    texts = [training_text(c, PROMPT, tok.eos_token) for c in CAPTIONS]
    cfg = llama.model.config
    batch = encode_texts(
        tok, texts, num_query_tokens=cfg.num_query_tokens, image_token_id=cfg.image_token_index, prompt=PROMPT
    )
    q = cfg.num_query_tokens
    for row, caption in enumerate(CAPTIONS):
        ids = batch.input_ids[row]
        assert (ids[:q] == cfg.image_token_index).all()
        assert ids[q] == tok.bos_token_id  # right padding for training: BOS right after the image tokens
        labelled = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert labelled == tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pads = batch.attention_mask[row] == 0
        assert (ids[pads] == tok.pad_token_id).all() and (batch.labels[row][pads] == IGNORE).all()
    assert tok.padding_side == "left"  # restored


def test_features_follow_the_instruction(llama):
    """The Q-Former reads the prompt: features equal the model's with the processor's qformer tokens,
    and change with the prompt; the cache key changes with it."""
    from captune.run.feature_cache import model_fingerprint

    model, proc = llama.model, llama.processor
    feats = image_features(model, proc, IMAGES, batch_size=2)
    enc = proc(images=[Image.open(io.BytesIO(b)) for b in IMAGES], text=[PROMPT] * 3, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_image_features(
            pixel_values=enc["pixel_values"],
            qformer_input_ids=enc["qformer_input_ids"],
            qformer_attention_mask=enc["qformer_attention_mask"],
        ).pooler_output
    torch.testing.assert_close(feats, ref, atol=1e-6, rtol=0)
    other = image_features(model, proc, IMAGES, batch_size=2, instruction="a drawing of")
    assert (other - feats).abs().max() > 1e-5  # small at random init, 100x float error
    key = model_fingerprint(model, proc, llama.source)
    other_model = _load(llama.source, prompt="a drawing of").model
    assert model_fingerprint(other_model, proc, llama.source) != key
    torch.testing.assert_close(image_features(other_model, proc, IMAGES), other, atol=1e-6, rtol=0)


def test_trainable_qformer_path_reads_the_instruction(llama):
    model, proc = llama.model, llama.processor
    vision = image_features(model, proc, IMAGES, stage="vision")
    with torch.no_grad():
        projected = project_queries(model, vision)
    torch.testing.assert_close(projected, image_features(model, proc, IMAGES), atol=1e-5, rtol=0)


def _model_batch(loaded, seq2seq: bool):
    tok, cfg = loaded.processor.tokenizer, loaded.model.config
    common = {"num_query_tokens": cfg.num_query_tokens, "image_token_id": cfg.image_token_index, "prompt": PROMPT}
    if seq2seq:
        return encode_seq2seq(tok, CAPTIONS, batch_size=len(CAPTIONS), **common)
    return encode_texts(tok, [training_text(c, PROMPT, tok.eos_token) for c in CAPTIONS], **common)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_cached_feature_loss_equals_model_loss(which, request):
    loaded = request.getfixturevalue(which)
    model, proc = loaded.model, loaded.processor
    batch = _model_batch(loaded, which == "t5")
    feats = image_features(model, proc, IMAGES)
    pv = pixel_values(proc, IMAGES)
    with torch.no_grad():
        own = model(
            pixel_values=pv,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            **qformer_inputs(model, len(IMAGES), pv.device),
        ).loss
        ours = lm_loss(model, feats, batch.input_ids, batch.attention_mask, batch.labels)
    assert abs(float(own) - float(ours)) < 1e-5, (float(own), float(ours))


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_captions_equal_hf_generate(which, request):
    """Captions from cached features (with the instruction read by the Q-Former) equal HF ``generate``."""
    loaded = _load(request.getfixturevalue(f"tiny_instructblip{'_t5' if which == 't5' else ''}_dir"))
    model, proc = loaded.model, loaded.processor
    tok, cfg = proc.tokenizer, model.config
    with torch.no_grad():  # the random T5 prefers <pad> everywhere; words make the comparison telling
        model.language_model.lm_head.weight[tok.pad_token_id] = 0
    ecfg = EvalConfig(batch_size=2, max_new_tokens=8, min_new_tokens=2)
    assert not use_fast_path(model, ecfg)  # LLaMA and T5 go through HF generate
    ours = caption_features(model, tok, image_features(model, proc, IMAGES), ecfg, PROMPT)
    seq2seq = which == "t5"
    ids = generation_prompt(
        tok,
        len(IMAGES),
        num_query_tokens=cfg.num_query_tokens,
        image_token_id=cfg.image_token_index,
        prompt=PROMPT,
        seq2seq=seq2seq,
    )
    pv = pixel_values(proc, IMAGES)
    out = model.generate(
        pixel_values=pv,
        input_ids=ids.input_ids,
        attention_mask=ids.attention_mask,
        max_new_tokens=8,
        min_new_tokens=2,
        do_sample=False,
        num_beams=1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **qformer_inputs(model, len(IMAGES), pv.device),
    )
    new = out if seq2seq else out[:, ids.input_ids.size(1) :]
    theirs = [" ".join(t.split()) for t in tok.batch_decode(new, skip_special_tokens=True)]
    assert ours == theirs
    assert any(ours)


def test_llama_lora_presets_and_frozen_features(tiny_instructblip_dir):
    from captune.model.lora import adapter_touches_vision, attach_lora

    expected = {
        "seed": {"q_proj", "k_proj"},
        "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
        "all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    }
    for preset, names in expected.items():
        loaded = _load(tiny_instructblip_dir)
        before = image_features(loaded.model, loaded.processor, IMAGES)
        peft = attach_lora(loaded.model, LoraConfig(target_modules=preset))
        wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft.named_parameters() if "lora_A" in n}
        assert wrapped == names, preset
        assert not adapter_touches_vision(peft)
        trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
        with torch.no_grad():  # a trained adapter changes the LM, never the features
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        torch.testing.assert_close(image_features(peft, loaded.processor, IMAGES), before, atol=0, rtol=0)


def test_llama_packs_and_captions_through_generate(llama, t5):
    from captune.model.family import can_fast_decode, can_pack

    lm = llama.model.language_model
    assert can_pack(lm) and not can_fast_decode(lm)  # rotary positions pack exactly; no OPT decoder
    assert not use_fast_path(llama.model, EvalConfig())
    assert not can_pack(t5.model.language_model)


def test_llama_packed_equals_unpacked_loss_and_gradients(tiny_instructblip_dir):
    """Shared-prefix packing with rotary positions: each caption slot after the one image prefix at
    the positions it has alone; loss and LoRA gradients equal the unpacked pairs' (``lm_loss``)."""
    from captune.model.lora import attach_lora
    from captune.ops.packing import pack_captions, packed_loss

    loaded = _load(tiny_instructblip_dir)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraConfig(target_modules="all-linear", dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    tok, blip = loaded.processor.tokenizer, model.get_base_model()
    feats = image_features(model, loaded.processor, IMAGES)
    caps = [CAPTIONS, CAPTIONS[:2], ["one red circle on the left edge"]]  # 3, 2 and 1 captions, unequal lengths
    flat = [c for cs in caps for c in cs]
    index = [i for i, cs in enumerate(caps) for _ in cs]

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return out

    text = encode_texts(
        tok,
        [training_text(c, PROMPT, tok.eos_token) for c in flat],
        num_query_tokens=blip.config.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        prompt=PROMPT,
    )
    ref = lm_loss(model, feats[index], text.input_ids, text.attention_mask, text.labels)
    ref.backward()
    ref_grads = grads()
    packed = pack_captions(tok, caps, prompt=PROMPT, max_text_tokens=40)
    loss = packed_loss(model, feats, packed)
    loss.backward()
    assert abs(float(loss) - float(ref)) < 1e-5, (float(loss), float(ref))
    for name, grad in grads().items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_lora_training_on_cached_features_learns(which, request):
    """captune's training loss (``training.flat_loss`` on cached features) drives a LoRA adapter
    down on a planted pairing of images and captions, for both language models."""
    from captune.config import Config
    from captune.model.lora import attach_lora
    from captune.training.steps import flat_loss

    loaded = _load(request.getfixturevalue(f"tiny_instructblip{'_t5' if which == 't5' else ''}_dir"))
    torch.manual_seed(0)
    peft = attach_lora(loaded.model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
    feats = image_features(peft, loaded.processor, IMAGES)
    cfg = Config()
    cfg.model.prompt = PROMPT
    chunk = list(enumerate(CAPTIONS))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=2e-2)
    peft.train()
    losses = []
    for _ in range(15):
        loss, tokens = flat_loss(peft, loaded.processor.tokenizer, feats, chunk, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert tokens == sum(len(c.split()) + 1 for c in CAPTIONS)  # caption words + EOS, nothing else
    assert losses[-1] < 0.25 * losses[0], losses[::3]


@pytest.mark.parametrize(
    ("arch", "family", "billions"),
    [("instructblip-vicuna-7b", "llama", (7.8, 8.0)), ("instructblip-flan-t5-xl", "t5", (3.9, 4.1))],
)
def test_real_instructblip_architectures_build_from_config(arch, family, billions):
    """The benchmark architectures (random weights, built on the meta device: no memory, no time)."""
    from captune.model.architectures import ARCHITECTURES, blip2_config, model_class

    assert arch in ARCHITECTURES
    cfg = blip2_config(arch)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    assert type(model).__name__ == "InstructBlipForConditionalGeneration"
    assert language_family(model) == family
    assert cfg.num_query_tokens == 32 and cfg.vision_config.num_hidden_layers == 39
    assert cfg.qformer_config.num_hidden_layers == 12 and cfg.qformer_config.hidden_size == 768
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < total < billions[1], total
    assert cfg.image_token_index < model.language_model.get_input_embeddings().num_embeddings


def test_instructblip_recipes():
    from captune.config import load_config

    vicuna = load_config("coco5k-instructblip")
    assert vicuna.model.name_or_path == "Salesforce/instructblip-vicuna-7b"
    assert vicuna.model.quantization == "4bit" and vicuna.model.prompt and vicuna.train.pack
    t5 = load_config("coco5k-instructblip-flan-t5")
    assert t5.model.name_or_path == "Salesforce/instructblip-flan-t5-xl" and t5.model.dtype == "bf16"


def test_caption_images_uses_its_prompt_as_the_instruction(llama, monkeypatch):
    """``captune caption --prompt`` loads the model without one; the prompt given reaches the Q-Former."""
    import captune.ops.generation as generation

    bare = load_model(ModelConfig(name_or_path=llama.source, device="cpu", dtype="fp32"))  # instruction ""
    seen = []

    def spy(*args, **kwargs):
        out = image_features(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(generation, "image_features", spy)
    generation.caption_images(bare.model, bare.processor, IMAGES, EvalConfig(batch_size=4, max_new_tokens=2), PROMPT)
    expected = image_features(llama.model, llama.processor, IMAGES)  # recorded instruction: PROMPT
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)
    assert (image_features(bare.model, bare.processor, IMAGES) - expected).abs().max() > 1e-5


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_static_cache_gives_the_same_captions(which, request):
    """``eval.static_cache`` preallocates HF generate's KV cache (LLaMA and T5 caption through HF
    generate); the captions are the dynamic cache's, token for token."""
    from dataclasses import replace

    loaded = _load(request.getfixturevalue(f"tiny_instructblip{'_t5' if which == 't5' else ''}_dir"))
    model, proc = loaded.model, loaded.processor
    tok = proc.tokenizer
    with torch.no_grad():  # the random T5 prefers <pad> everywhere; words make the comparison telling
        model.language_model.lm_head.weight[tok.pad_token_id] = 0
    feats = image_features(model, proc, IMAGES)
    ecfg = EvalConfig(batch_size=2, max_new_tokens=8, min_new_tokens=3)
    dynamic = caption_features(model, tok, feats, ecfg, PROMPT)
    static = caption_features(model, tok, feats, replace(ecfg, static_cache=True), PROMPT)
    assert static == dynamic and all(dynamic)
    from captune.ops.generation import generation_kwargs

    assert generation_kwargs(replace(ecfg, static_cache=True), tok)["cache_implementation"] == "static"
    assert "cache_implementation" not in generation_kwargs(ecfg, tok)


def test_t5_says_it_trains_unpacked(tiny_instructblip_t5_dir):
    """train.pack is on by default; an encoder-decoder (T5) cannot share a decoder prefix, so
    training says it runs unpacked instead of silently ignoring the setting."""
    from captune.config import Config
    from captune.data.prepare import Example
    from captune.model.lora import attach_lora
    from captune.training import train

    loaded = _load(tiny_instructblip_t5_dir)
    cfg = Config()
    cfg.model.prompt = PROMPT
    cfg.train.max_steps, cfg.train.validate_every, cfg.train.select, cfg.train.batch_size = 1, 0, "last", 4
    assert cfg.train.pack and cfg.data.train_captions == "all"
    said = []
    pairs = enumerate(zip(IMAGES, CAPTIONS, strict=True))
    examples = [Example(str(i), img, [c, c + " again"]) for i, (img, c) in pairs]
    train(attach_lora(loaded.model, cfg.lora), loaded.processor, examples, [], cfg, log=said.append)
    assert any("packing: off, a t5 language model trains unpacked" in line for line in said), said


def test_preflight_target_check_builds_the_instructblip_class(tiny_instructblip_dir, monkeypatch):
    """``check_targets`` (before any work) builds the checkpoint's own class on the meta device, not
    a BLIP-2 from an InstructBLIP config (which warned on every InstructBLIP run), and names LLaMA's
    layers when a target is missing."""
    from captune.errors import UserError
    from captune.model import architectures
    from captune.model.lora import check_targets

    built = []
    real = architectures.model_class

    def spy(config):
        built.append(real(config).__name__)
        return real(config)

    monkeypatch.setattr(architectures, "model_class", spy)
    cfg = ModelConfig(name_or_path=str(tiny_instructblip_dir))
    check_targets(cfg, LoraConfig(target_modules="all-linear"))
    assert built == ["InstructBlipForConditionalGeneration"]
    with pytest.raises(UserError, match="its linear layers are named: down_proj, gate_proj"):
        check_targets(cfg, LoraConfig(target_modules=["out_proj"]))

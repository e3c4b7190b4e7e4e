"""Label masking: only caption tokens (and EOS) are trained on."""

import pytest
import torch

from captune.demo.base_model import build_tokenizer
from captune.ops.batching import IGNORE, encode_texts, training_text

Q = 4
IMG = 3


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_tokens(["<image>"], special_tokens=True)
    return t


def _texts(tok, prompt=""):
    return [training_text(c, prompt, tok.eos_token) for c in ("a red circle", "two small blue squares on the left")]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_only_caption_tokens_are_labelled(tok, side, prompt):
    b = encode_texts(tok, _texts(tok, prompt), num_query_tokens=Q, image_token_id=IMG, prompt=prompt, padding_side=side)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
    # image placeholders lead every row and are never labelled
    assert (b.input_ids[:, :Q] == IMG).all()
    assert (b.labels[:, :Q] == IGNORE).all()
    # padding is never labelled
    assert (b.labels[b.attention_mask == 0] == IGNORE).all()
    for row, caption in zip(range(2), ("a red circle", "two small blue squares on the left"), strict=False):
        labelled = b.labels[row][b.labels[row] != IGNORE].tolist()
        expected = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labelled == expected


def test_labels_match_input_positions(tok):
    b = encode_texts(tok, _texts(tok), num_query_tokens=Q, image_token_id=IMG)
    keep = b.labels != IGNORE
    assert torch.equal(b.labels[keep], b.input_ids[keep])


def test_truncation_keeps_layout(tok):
    b = encode_texts(tok, _texts(tok), num_query_tokens=Q, image_token_id=IMG, max_text_tokens=4)
    assert b.input_ids.size(1) == Q + 4


def test_same_layout_as_blip2_processor(tiny_model_dir):
    """Our encoding equals what Blip2Processor produces for the same texts."""
    from transformers import Blip2Processor

    proc = Blip2Processor.from_pretrained(tiny_model_dir)
    texts = ["a red circle", "two small blue squares"]
    ours = encode_texts(
        proc.tokenizer,
        texts,
        num_query_tokens=proc.num_query_tokens,
        image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"),
        with_labels=False,
    )
    from PIL import Image

    theirs = proc(images=[Image.new("RGB", (8, 8))] * 2, text=texts, padding="longest", return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])


# ------------------------------------------------------------------ FlanT5 (encoder-decoder) layout

CAPTIONS = ("a red circle", "two small blue squares on the left")


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_seq2seq_labels_are_caption_and_eos_only(tiny_t5_dir, prompt):
    """Encoder: image tokens + prompt exactly as Blip2Processor lays them out; decoder labels: caption + EOS."""
    from transformers import Blip2Processor

    from captune.ops.batching import encode_seq2seq, label_tokens

    proc = Blip2Processor.from_pretrained(tiny_t5_dir)
    tok = proc.tokenizer
    image = tok.convert_tokens_to_ids("<image>")
    b = encode_seq2seq(
        tok, list(CAPTIONS), batch_size=2, num_query_tokens=proc.num_query_tokens, image_token_id=image, prompt=prompt
    )
    from PIL import Image

    ref = proc(images=[Image.new("RGB", (8, 8))] * 2, text=[prompt] * 2, return_tensors="pt")
    assert torch.equal(b.input_ids, ref["input_ids"]) and torch.equal(b.attention_mask, ref["attention_mask"])
    # the prompt lives in the encoder only; T5 puts no BOS in front and </s> after the text
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert b.input_ids[0, proc.num_query_tokens :].tolist() == prompt_ids + [tok.eos_token_id]
    for row, caption in enumerate(CAPTIONS):
        labelled = b.labels[row][b.labels[row] != IGNORE].tolist()
        assert labelled == tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert (b.labels[row][len(labelled) :] == IGNORE).all()  # right padding, never labelled
    assert image not in b.labels
    assert label_tokens(b.labels, seq2seq=True) == int((b.labels != IGNORE).sum())


def test_seq2seq_truncation_keeps_eos(tiny_t5_dir):
    from transformers import Blip2Processor

    from captune.ops.batching import encode_seq2seq

    proc = Blip2Processor.from_pretrained(tiny_t5_dir)
    tok = proc.tokenizer
    b = encode_seq2seq(tok, list(CAPTIONS), batch_size=2, num_query_tokens=4, image_token_id=9, max_text_tokens=4)
    assert b.labels.size(1) == 4 and (b.labels[:, 3] == tok.eos_token_id).all()


def test_seq2seq_cached_feature_loss_equals_full_model(tiny_t5_dir):
    """lm_loss on cached features equals Blip2ForConditionalGeneration's own loss for a FlanT5-style model."""
    import io

    from PIL import Image

    from captune.config import ModelConfig
    from captune.demo import world
    from captune.model.load import load_model
    from captune.ops.batching import encode_seq2seq
    from captune.ops.features import image_features
    from captune.ops.lm import lm_loss

    loaded = load_model(ModelConfig(name_or_path=str(tiny_t5_dir), device="cpu"))
    blip, proc = loaded.model, loaded.processor
    items = world.make_items("catalog", 3, seed=1)
    feats = image_features(blip, proc, [it["image"] for it in items])
    b = encode_seq2seq(
        proc.tokenizer,
        [it["captions"][0] for it in items],
        batch_size=3,
        num_query_tokens=proc.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        prompt="a photo of",
    )
    ours = lm_loss(blip, feats, b.input_ids, b.attention_mask, b.labels)
    pil = [Image.open(io.BytesIO(it["image"])) for it in items]
    ref = proc(images=pil, text=["a photo of"] * 3, return_tensors="pt")
    with torch.no_grad():
        theirs = blip(**ref, labels=b.labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)

"""Label masking: only caption tokens (and EOS) are trained on."""

import pytest
import torch

from captune.batching import IGNORE, encode_texts, training_text
from captune.demo.base_model import build_tokenizer

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

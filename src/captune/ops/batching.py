"""Turn captions into model inputs with correctly masked labels.

BLIP-2 in transformers 5.x expects ``num_query_tokens`` image placeholder tokens
before the text (the processor prepends them after padding the text). The model
slices its logits to ``labels.size(1)``, so labels must span the whole
``input_ids``. Every position that is not a caption token is -100: image
placeholders, padding, BOS and the prompt. The seed notebook trained on all of
them; this module is where that is fixed, and its tests pin it down.

FlanT5 (encoder-decoder) checkpoints lay text out differently: the encoder reads
the image placeholders and the prompt (with the tokenizer's end-of-sequence mark,
as ``Blip2Processor`` encodes it), and the decoder is trained on the caption plus
EOS, with padding at -100. ``encode_seq2seq`` builds that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class TextBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None


def training_text(caption: str, prompt: str, eos_token: str) -> str:
    """The text a caption is trained on: prompt, caption, end of sequence."""
    caption = " ".join(caption.split())
    body = f"{prompt} {caption}" if prompt else caption
    return f"{body}{eos_token}"


def _leading_special_count(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (BOS for OPT: 1)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special)):
        if with_special[i : i + len(without)] == without:
            return i
    return 0


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens the prompt occupies after the leading special tokens."""
    if not prompt:
        return 0
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_texts(
    tokenizer,
    texts: list[str],
    *,
    num_query_tokens: int,
    image_token_id: int,
    prompt: str = "",
    max_text_tokens: int | None = None,
    padding_side: str = "right",
    with_labels: bool = True,
) -> TextBatch:
    """Tokenize ``texts`` as ``Blip2Processor`` does and build masked labels.

    The layout per row is ``[<image> x Q] + padded text``; with right padding the
    pads follow the text, with left padding they sit between image tokens and BOS,
    exactly as the processor lays them out.
    """
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(
            texts,
            padding="longest",
            truncation=max_text_tokens is not None,
            max_length=max_text_tokens,
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side = old_side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.size(0)
    image = torch.full((n, num_query_tokens), image_token_id, dtype=ids.dtype)
    input_ids = torch.cat([image, ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(image), mask], dim=1)
    labels = None
    if with_labels:
        text_labels = ids.clone()
        text_labels[mask == 0] = IGNORE
        # Leading specials and the prompt start at the first attended text position.
        skip = _leading_special_count(tokenizer) + prompt_length(tokenizer, prompt)
        first = mask.float().argmax(dim=1)  # first attended position in each row
        cols = torch.arange(ids.size(1)).unsqueeze(0)
        head = (cols >= first.unsqueeze(1)) & (cols < (first + skip).unsqueeze(1))
        text_labels[head] = IGNORE
        labels = torch.cat([torch.full_like(image, IGNORE), text_labels], dim=1)
    return TextBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def encode_seq2seq(
    tokenizer,
    captions: list[str] | None,
    *,
    batch_size: int,
    num_query_tokens: int,
    image_token_id: int,
    prompt: str = "",
    max_text_tokens: int | None = None,
) -> TextBatch:
    """Encoder-decoder layout: encoder ``[<image> x Q] + prompt tokens`` (the tokenizer's own
    special tokens, e.g. T5's trailing ``</s>``); decoder labels ``caption + EOS`` padded with -100.

    ``labels`` has its own length (the decoder's), unlike the decoder-only layout.
    """
    enc = tokenizer([prompt] * batch_size, return_tensors="pt", padding="longest")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    image = torch.full((batch_size, num_query_tokens), image_token_id, dtype=ids.dtype)
    input_ids = torch.cat([image, ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(image), mask], dim=1)
    labels = None
    if captions is not None:
        if len(captions) != batch_size:
            raise ValueError("one caption per row")
        limit = None if max_text_tokens is None else max(1, max_text_tokens - 1)
        rows = [
            tokenizer(" ".join(c.split()), add_special_tokens=False)["input_ids"][:limit] + [tokenizer.eos_token_id]
            for c in captions
        ]
        width = max(len(r) for r in rows)
        labels = torch.full((batch_size, width), IGNORE, dtype=ids.dtype)
        for i, r in enumerate(rows):
            labels[i, : len(r)] = torch.tensor(r, dtype=ids.dtype)
    return TextBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def label_tokens(labels: torch.Tensor, seq2seq: bool) -> int:
    """How many positions a batch's loss is taken over."""
    return int(((labels if seq2seq else labels[:, 1:]) != IGNORE).sum())


def generation_prompt(
    tokenizer, batch_size: int, *, num_query_tokens: int, image_token_id: int, prompt: str = "", seq2seq: bool = False
) -> TextBatch:
    """Inputs for ``generate``: image tokens, BOS and the optional prompt (or the encoder's input)."""
    if seq2seq:
        return encode_seq2seq(
            tokenizer,
            None,
            batch_size=batch_size,
            num_query_tokens=num_query_tokens,
            image_token_id=image_token_id,
            prompt=prompt,
        )
    return encode_texts(
        tokenizer,
        [prompt] * batch_size,
        num_query_tokens=num_query_tokens,
        image_token_id=image_token_id,
        padding_side="left",
        with_labels=False,
    )

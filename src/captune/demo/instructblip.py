"""Tiny InstructBLIP checkpoints (LLaMA or T5 language model) built from config, offline.

The real classes at a small size: ``InstructBlipForConditionalGeneration`` and an
``InstructBlipProcessor`` whose ``qformer_tokenizer`` is a BERT-style word-level fast
tokenizer ([CLS] text [SEP]), saved with ``save_pretrained`` so captune loads them with
``from_pretrained`` like ``Salesforce/instructblip-vicuna-7b``. The LLaMA tokenizer keeps
LLaMA's conventions: BOS before the text, no EOS appended, left padding by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from captune.demo import world
from captune.demo.base_model import IMAGE_SIZE, build_tokenizer


def _word_tokenizer(specials: list[str], template: str, **tokens):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokens["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    used = [s for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=f"{template} $B", special_tokens=[(s, vocab[s]) for s in used]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **tokens)


def llama_tokenizer():
    """LLaMA-style: <s> before the text, no </s> after it, left padding."""
    return _word_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>"],
        "<s> $A",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )


def qformer_tokenizer():
    """BERT-style, as InstructBLIP's Q-Former tokenizer: [CLS] text [SEP], [PAD] = 0."""
    return _word_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        "[CLS] $A [SEP]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def build_processor(lm: str, query_tokens: int):
    from transformers import BlipImageProcessor, InstructBlipProcessor

    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    tokenizer = llama_tokenizer() if lm == "llama" else build_tokenizer(seq2seq=True)
    return InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer(), num_query_tokens=query_tokens)


def _text_config(lm: str, tok, hidden: int, layers: int):
    from transformers import LlamaConfig, T5Config

    if lm == "llama":
        return LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
            # At the default 0.02 a 32-wide random LM head caps logits near 0.6: no adapter could
            # fit anything. A wider init leaves the LoRA room to learn (tests check that it does).
            initializer_range=0.2,
        )
    return T5Config(
        vocab_size=len(tok),
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=hidden * 2,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )


def build_tiny_instructblip(out: Path, lm: str = "llama", *, hidden: int = 32, layers: int = 1, query_tokens: int = 4):
    """Save a randomly initialised tiny InstructBLIP (``lm`` = llama or t5) and its processor to ``out``."""
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    if lm not in ("llama", "t5"):
        raise ValueError(f"lm must be llama or t5, not {lm!r}")
    processor = build_processor(lm, query_tokens)
    tok = processor.tokenizer
    vision = InstructBlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    qformer = InstructBlipQFormerConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        encoder_hidden_size=hidden,
        cross_attention_frequency=1,
        vocab_size=len(processor.qformer_tokenizer),
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=_text_config(lm, tok, hidden, layers).to_dict(),
        num_query_tokens=query_tokens,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # visible query tokens: zeros would make every image's features alike
        model.query_tokens.normal_(0, 0.5)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

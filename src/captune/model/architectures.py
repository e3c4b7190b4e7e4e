"""Configurations of real BLIP-2 and InstructBLIP checkpoints, written out so benchmarks need no download.

The values are those of the published ``config.json`` files; weights built from
them are random, which leaves speed and memory unchanged when output length is
pinned.
"""

from __future__ import annotations


def _flan_t5_xl():
    from transformers import T5Config

    return T5Config(
        vocab_size=32128,
        d_model=2048,
        d_kv=64,
        d_ff=5120,
        num_layers=24,
        num_heads=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.1,
    )


# The vision side every BLIP-2 / InstructBLIP checkpoint here shares: EVA ViT-g/14 at 224 px and the
# 12-layer Q-Former cross-attending to it every second layer.
VIT_G = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_hidden_layers=39,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    qkv_bias=True,
)
QFORMER = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    encoder_hidden_size=1408,
    cross_attention_frequency=2,
)


def instructblip_config(name: str):
    """InstructBLIP: BLIP-2's ViT-g and Q-Former (which also reads the instruction, through BERT's
    vocabulary plus one token, 30,523) with Vicuna-7B (LLaMA 7B) or FlanT5-XL."""
    from transformers import (
        InstructBlipConfig,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
    )

    vision = InstructBlipVisionConfig(**VIT_G)
    qformer = InstructBlipQFormerConfig(vocab_size=30523, **QFORMER)
    if name == "instructblip-vicuna-7b":
        # LLaMA's 32,000 tokens + [PAD] (32,001, the published vocabulary) + <image> at 32,001.
        text = LlamaConfig(
            vocab_size=32002,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        image_token_index = 32001
    else:
        text, image_token_index = _flan_t5_xl(), 32100
    return InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=image_token_index,
    )


def model_class(config):
    """The ``...ForConditionalGeneration`` class that builds ``config`` (BLIP-2 or InstructBLIP)."""
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    return (
        InstructBlipForConditionalGeneration if config.model_type == "instructblip" else Blip2ForConditionalGeneration
    )


def blip2_config(name: str):
    """The config of architecture ``name`` (one of ``ARCHITECTURES``), BLIP-2 or InstructBLIP."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    if name.startswith("instructblip-") and name in ARCHITECTURES:
        return instructblip_config(name)

    vision = Blip2VisionConfig(**VIT_G)
    qformer = Blip2QFormerConfig(**QFORMER)
    if name in ("blip2-opt-2.7b", "blip2-opt-6.7b"):
        big = name.endswith("6.7b")
        text = OPTConfig(
            vocab_size=50272,
            hidden_size=4096 if big else 2560,
            num_hidden_layers=32,
            ffn_dim=16384 if big else 10240,
            num_attention_heads=32,
            max_position_embeddings=2048,
            word_embed_proj_dim=4096 if big else 2560,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=50118,
            dropout=0.1,
        )
        return Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=32,
            image_token_index=50265,
        )
    if name == "blip2-flan-t5-xl":
        text = _flan_t5_xl()
        return Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=32,
            image_token_index=32100,
        )
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")


ARCHITECTURES = (
    "blip2-opt-2.7b",
    "blip2-opt-6.7b",
    "blip2-flan-t5-xl",
    "instructblip-vicuna-7b",
    "instructblip-flan-t5-xl",
)

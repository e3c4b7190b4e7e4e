"""What kind of BLIP-2 / InstructBLIP a model is: its language-model family, and which of captune's
fast paths (shared-prefix packing, the static-cache greedy decoder) its language model supports.

Every question of this kind is answered here, once: the OPT decoder lookup, encoder-decoder or not."""

from __future__ import annotations

# Decoder-only language models whose layers are named like LLaMA's (q/k/v/o_proj, gate/up/down_proj).
LLAMA_LIKE = ("llama", "mistral", "qwen2")


def is_encoder_decoder(blip) -> bool:
    """True for checkpoints whose language model is an encoder-decoder (FlanT5)."""
    return getattr(blip.config, "use_decoder_only_language_model", True) is False


def language_family(model) -> str:
    """``t5`` (encoder-decoder), ``opt``, ``llama`` (Vicuna), or the text model's own ``model_type``."""
    config = model.config
    if is_encoder_decoder(model):
        return "t5"
    text = getattr(config, "text_config", None)
    kind = getattr(text, "model_type", "opt") if text is not None else "opt"
    return "llama" if kind in LLAMA_LIKE else kind


def opt_decoder(lm):
    """The OPT decoder (``lm.model.decoder``, with learned positions) of a language model, else None."""
    dec = getattr(getattr(lm, "model", None), "decoder", None)
    return dec if dec is not None and hasattr(dec, "embed_positions") else None


def can_pack(lm) -> bool:
    """Shared-prefix packing is exact for OPT decoders (learned absolute positions, captune's layer
    loop) and LLaMA decoders (rotary positions from position ids, the model's own forward)."""
    if not hasattr(lm, "lm_head"):
        return False
    return opt_decoder(lm) is not None or getattr(lm.config, "model_type", "") == "llama"


def can_fast_decode(lm) -> bool:
    """The static-cache greedy decoder runs OPT decoders with plain floating-point projections
    (not 8-bit/4-bit layers)."""
    if opt_decoder(lm) is None or not hasattr(lm, "lm_head"):
        return False
    return all(layer.self_attn.v_proj.weight.dtype.is_floating_point for layer in opt_decoder(lm).layers)

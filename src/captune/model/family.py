"""What kind of BLIP-2 / InstructBLIP a model is: its language-model family."""

from __future__ import annotations

# Decoder-only language models whose layers are named like LLaMA's (q/k/v/o_proj, gate/up/down_proj).
LLAMA_LIKE = ("llama", "mistral", "qwen2")


def language_family(model) -> str:
    """``t5`` (encoder-decoder), ``opt``, ``llama`` (Vicuna), or the text model's own ``model_type``."""
    config = model.config
    if getattr(config, "use_decoder_only_language_model", True) is False:
        return "t5"
    text = getattr(config, "text_config", None)
    kind = getattr(text, "model_type", "opt") if text is not None else "opt"
    return "llama" if kind in LLAMA_LIKE else kind

"""What kind of BLIP-2 a model is: its language-model family and what its fast paths support."""

from __future__ import annotations


def language_family(model) -> str:
    return "t5" if getattr(model.config, "use_decoder_only_language_model", True) is False else "opt"

"""InstructBLIP's instruction: the prompt the Q-Former reads beside the image.

In InstructBLIP the Q-Former attends to the instruction's tokens (``qformer_input_ids``)
as well as to the image, so an image's features depend on the prompt. captune has one
prompt per run (``model.prompt``): ``load_model`` records it on the model, tokenized by
the processor's ``qformer_tokenizer``, and every path that computes features (cached
features, a trainable Q-Former over cached vision outputs, the feature-cache key) reads
it from there, so training, validation and evaluation see the same features. BLIP-2
models have no instruction; these helpers leave them alone.
"""

from __future__ import annotations

import torch

ATTRIBUTE = "captune_instruction"


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_instruct(model) -> bool:
    """True for InstructBLIP models (their Q-Former has word embeddings for the instruction)."""
    return getattr(_base(model).config, "model_type", "") == "instructblip"


def qformer_ids(processor, text: str) -> list[int]:
    """The Q-Former tokens of ``text``, as ``InstructBlipProcessor`` encodes them."""
    return list(processor.qformer_tokenizer(text)["input_ids"])


def set_instruction(model, processor, text: str) -> None:
    """Record the run's instruction on an InstructBLIP ``model`` (a no-op for BLIP-2)."""
    if is_instruct(model):
        setattr(_base(model), ATTRIBUTE, (text, qformer_ids(processor, text)))


def instruction(model) -> tuple[str, list[int]] | None:
    """The recorded (text, Q-Former token ids), or None for BLIP-2.

    An InstructBLIP model loaded outside ``load_model`` has none: that is a programming
    error (its features would silently ignore the prompt), so it raises."""
    if not is_instruct(model):
        return None
    found = getattr(_base(model), ATTRIBUTE, None)
    if found is None:
        raise RuntimeError("InstructBLIP model without an instruction; call captune.model.instruct.set_instruction")
    return found


def qformer_inputs(
    model, batch: int, device: torch.device, processor=None, text: str | None = None
) -> dict[str, torch.Tensor]:
    """``qformer_input_ids``/``qformer_attention_mask`` for ``batch`` images: the recorded
    instruction, or ``text`` (tokenized with ``processor``) when given. Empty for BLIP-2."""
    if not is_instruct(model):
        return {}
    ids = qformer_ids(processor, text) if text is not None else instruction(model)[1]
    row = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0).expand(batch, -1)
    return {"qformer_input_ids": row, "qformer_attention_mask": torch.ones_like(row)}

"""The language-model half of BLIP-2 (and InstructBLIP) run on cached image features.

The language model runs on ``inputs_embeds`` with the features scattered into the
image-token positions, which is exactly what ``Blip2ForConditionalGeneration`` does
internally (its tests compare the two paths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from captune.model.family import is_encoder_decoder
from captune.ops.batching import IGNORE


def unwrap(model):
    """The ``Blip2``/``InstructBlipForConditionalGeneration`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def embed_with_features(blip, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    embeds = blip.get_input_embeddings()(input_ids)
    mask = (input_ids == blip.config.image_token_index).unsqueeze(-1)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def lm_loss(
    model,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Caption loss from cached features; equals the full model's loss on the same batch.

    The vocabulary projection runs only where a label exists (caption tokens and
    EOS, about a quarter of the positions): the image and prompt positions need
    hidden states, not logits, which saves most of the LM head and its fp32 logits.
    """
    blip = unwrap(model)
    embeds = embed_with_features(blip, input_ids, features)
    lm = blip.language_model
    if is_encoder_decoder(blip):  # FlanT5: labels are the decoder's; it shifts them right itself
        decoder_input_ids = lm.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = lm(inputs_embeds=embeds, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    target = labels[:, 1:]
    keep = target != IGNORE
    body = getattr(lm, "model", None)  # OPTModel, LlamaModel: the decoder stack with its final norm
    if body is not None and hasattr(lm, "lm_head"):
        hidden = body(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = lm.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, target[keep])
    logits = lm(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def generate_from_features(
    model, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """New token ids only (the prompt is cut off), as ``Blip2...generate`` would produce."""
    blip = unwrap(model)
    embeds = embed_with_features(blip, input_ids, features)
    if is_encoder_decoder(blip):  # the decoder's output starts at its start token, not after a prompt
        return blip.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
    out = blip.language_model.generate(
        inputs_embeds=embeds, attention_mask=attention_mask, input_ids=input_ids, **kwargs
    )
    return out[:, input_ids.size(1) :]

"""LoRA presets per language-model family, attaching adapters, and the trainable state."""

from __future__ import annotations

import torch

from captune.config import LoraConfig
from captune.errors import UserError
from captune.model.family import language_family
from captune.model.load import is_quantized

# LoRA presets per language-model family. The seed's choice (q_proj/k_proj) only
# matches OPT attention; T5 names its projections q/k/v/o and wi/wo; LLaMA (Vicuna, in
# InstructBLIP) q/k/v/o_proj and gate/up/down_proj.
PRESETS = {
    "opt": {
        "seed": ["q_proj", "k_proj"],
        "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "all-linear": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    },
    "llama": {
        "seed": ["q_proj", "k_proj"],
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "t5": {
        "seed": ["q", "k"],
        "attention": ["q", "k", "v", "o"],
        "all-linear": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    },
}


def prepare_kbit_training(model) -> None:
    """k-bit training preparation for the language model: every base weight frozen; its
    non-quantized 16-bit parameters (embeddings, layer norms, LM head) in fp32 so the
    adapter trains on stable activations. The vision side keeps its dtype (it runs once per image)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.language_model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def target_modules(model, lora: LoraConfig) -> list[str]:
    if isinstance(lora.target_modules, list):
        return list(lora.target_modules)
    family = language_family(model)
    if family not in PRESETS:
        raise UserError(
            f"lora.target_modules={lora.target_modules}: captune has no preset for a '{family}' language model; "
            "list the module names instead (lora.target_modules=[q_proj,v_proj])"
        )
    return PRESETS[family][lora.target_modules]


QFORMER_TARGETS = ["query", "key", "value"]


def adapter_touches_vision(model) -> bool:
    """True when a LoRA layer sits outside the language model: image features then change as it trains."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(
        isinstance(m, BaseTunerLayer) and ".language_model." not in f".{name}." for name, m in model.named_modules()
    )


def attach_lora(model, lora: LoraConfig):
    """Wrap ``model`` with trainable LoRA adapters: on the language model, or (preset qformer) on the
    Q-Former's self- and cross-attention query/key/value projections."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if lora.target_modules == "qformer":
        if is_quantized(model):
            prepare_kbit_training(model)
        pattern = r"^qformer\..*\.attention\.(" + "|".join(QFORMER_TARGETS) + r")$"
        config = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias, target_modules=pattern
        )
        return get_peft_model(model, config)
    names = target_modules(model, lora)
    lm_prefix = "language_model."
    leaves = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if n.startswith(lm_prefix) and isinstance(m, torch.nn.Linear)  # bitsandbytes layers are Linear too
    }
    missing = [t for t in names if t not in leaves]
    present = [t for t in names if t in leaves]
    if not present or (isinstance(lora.target_modules, list) and missing):
        raise UserError(
            f"lora.target_modules {missing or names} match no linear layer of the language model; "
            f"its linear layers are named: {', '.join(sorted(leaves))}"
        )
    if is_quantized(model):
        prepare_kbit_training(model)
    # Anchor the names to the language model so the vision tower and Q-Former stay frozen
    # (their projections must not pick up adapters through a shared name).
    pattern = r"^language_model\..*\.(" + "|".join(present) + r")$"
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=pattern,
    )
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state(model) -> dict:
    """Copies of the trainable (LoRA) parameters, by name: what a best-adapter snapshot holds."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

"""LoRA presets per language-model family, attaching adapters, and the trainable state."""

from __future__ import annotations

from pathlib import Path

import torch

from captune.config import LoraConfig, ModelConfig
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


def prepare_kbit_training(model, *, upcast: bool = False) -> None:
    """k-bit training preparation: every base weight frozen. The language model's non-quantized 16-bit
    parameters (embeddings, layer norms, LM head) go to fp32, as peft's ``prepare_model_for_kbit_training``
    does, with ``upcast`` (lora.compute=fp32) or when they are fp16, whose range a residual stream can
    overflow. In bf16 they stay: the checkpoint was loaded in bf16, so an fp32 copy adds nothing to the
    weights; it only moves the residual stream, attention and LM head to fp32, which the bf16 model's
    training does not do (blip2-opt-2.7b's 4-bit packed step on an H200: 1119.7 samples/s and 34.6 GB with
    the upcast, 1452.6 and 25.0 GB without; bench/README). The vision side keeps its dtype (it runs once per
    image)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.language_model.parameters():
        if p.dtype == torch.float16 or (upcast and p.dtype == torch.bfloat16):
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
            prepare_kbit_training(model, upcast=lora.compute == "fp32")
        pattern = r"^qformer\..*\.attention\.(" + "|".join(QFORMER_TARGETS) + r")$"
        config = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias, target_modules=pattern
        )
        return get_peft_model(model, config)
    present = _present_targets(model, lora)
    if is_quantized(model):
        prepare_kbit_training(model, upcast=lora.compute == "fp32")
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


def _present_targets(model, lora: LoraConfig) -> list[str]:
    """The target names found among the language model's linear layers; a UserError naming those
    layers when an explicit name is missing (or a preset matches nothing)."""
    names = target_modules(model, lora)
    leaves = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if n.startswith("language_model.") and isinstance(m, torch.nn.Linear)  # bitsandbytes layers are Linear too
    }
    missing = [t for t in names if t not in leaves]
    present = [t for t in names if t in leaves]
    if not present or (isinstance(lora.target_modules, list) and missing):
        raise UserError(
            f"lora.target_modules {missing or names} match no linear layer of the language model; "
            f"its linear layers are named: {', '.join(sorted(leaves))}"
        )
    return present


def check_targets(model_cfg: ModelConfig, lora: LoraConfig) -> None:
    """Fail before any work when lora.target_modules names no layer of the model.

    The model is built from its config.json on the meta device (no weights read, no memory
    used), so the check costs about a second even for a large checkpoint. A Hub model not yet
    downloaded is left to the check in ``attach_lora``: nothing is fetched here.
    """
    if lora.target_modules == "qformer":
        return
    config_file = _local_config(model_cfg)
    if config_file is None:
        return
    from transformers import AutoConfig

    from captune.model import architectures

    config = AutoConfig.from_pretrained(config_file.parent)  # BLIP-2 or InstructBLIP, by model_type
    if config.model_type not in ("blip-2", "instructblip"):
        return  # the loader names what it is
    with torch.device("meta"):
        model = architectures.model_class(config)(config)
    _present_targets(model, lora)


def _local_config(model_cfg: ModelConfig) -> Path | None:
    """config.json of the model when it is on this machine (builtin, a folder, or the Hub cache)."""
    from captune.model.load import BUILTIN_DEMO, demo_model_dir

    name = model_cfg.name_or_path
    local = demo_model_dir() if name == BUILTIN_DEMO else Path(name).expanduser()
    if local.exists():
        return local / "config.json" if (local / "config.json").is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json", revision=model_cfg.revision, local_files_only=True))
    except Exception:  # not downloaded yet, or not a Hub id: preflight and the loader say so
        return None


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state(model) -> dict:
    """Copies of the trainable (LoRA) parameters, by name: what a best-adapter snapshot holds."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

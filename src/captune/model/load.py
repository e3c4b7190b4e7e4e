"""Load BLIP-2 and InstructBLIP checkpoints and processors and pick their precision.

Models load with ``from_pretrained`` from a local folder or the Hub (safetensors
only). ``builtin:demo`` resolves to the demo base model folder shipped with the
package; it is then loaded exactly like any other checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from captune import launch
from captune.config import ModelConfig
from captune.errors import UserError

BUILTIN_DEMO = "builtin:demo"


@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    source: str


def demo_model_dir() -> Path:
    return Path(__file__).parents[1] / "demo" / "base"


def resolve_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is cuda but no CUDA GPU is visible; run on a GPU machine or set model.device=cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        from captune.distributed import world

        device = torch.device("cuda", world().local_rank)  # one GPU per process under a launcher
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        if choice in ("bf16", "fp16"):
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]
        return torch.float32
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def resolve_model_path(name_or_path: str, revision: str | None = None, option: str = "model.name_or_path") -> str:
    """A local folder holding the checkpoint, downloading from the Hub when needed.

    ``option`` names the setting in messages (``--model`` for ``caption``)."""
    if name_or_path == BUILTIN_DEMO:
        path = demo_model_dir()
        if not (path / "config.json").is_file():
            raise UserError(f"the demo base model is missing from {path}; rebuild it with 'captune demo-build'")
        return str(path)
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model folder {local} has no config.json; is it a transformers checkpoint?")
        if not any(local.glob("*.safetensors")):
            raise UserError(
                f"model folder {local} has no .safetensors weights; captune loads safetensors only "
                "(convert the checkpoint with transformers' save_pretrained)"
            )
        return str(local)
    if name_or_path.count("/") != 1 or name_or_path.startswith(("/", ".")):
        raise UserError(f"{option} '{name_or_path}' is neither a local folder nor a Hub id (OWNER/NAME)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:  # already downloaded: no network, no retry loop
        return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    fix = f"download it elsewhere ('hf download {name_or_path}') and set {option} to that folder"
    from captune.online import hub_reachable

    if not hub_reachable(timeout=3.0):
        raise UserError(f"cannot get model '{name_or_path}': the Hugging Face Hub cannot be reached; {fix}")
    try:
        return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # unknown repo, gated, ...
        raise UserError(f"cannot get model '{name_or_path}' from the Hub ({type(exc).__name__}); {fix}") from None


def model_classes(path: str) -> tuple[type, type]:
    """The model and processor classes for a checkpoint folder, by its config's ``model_type``:
    BLIP-2 (``blip-2``) or InstructBLIP (``instructblip``), whose Q-Former also reads the prompt."""
    import json

    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2Processor,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    try:
        kind = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {Path(path) / 'config.json'} ({type(exc).__name__})") from None
    if kind == "instructblip":
        return InstructBlipForConditionalGeneration, InstructBlipProcessor
    if kind == "blip-2":
        return Blip2ForConditionalGeneration, Blip2Processor
    raise UserError(
        f"model {path} is a '{kind}' checkpoint; captune adapts BLIP-2 (blip-2) and InstructBLIP (instructblip) models"
    )


def load_model(cfg: ModelConfig, *, device: torch.device | None = None) -> Loaded:
    from captune.model.instruct import set_instruction
    from captune.ops.features import set_qformer_matmul
    from captune.ops.triton_warmup import warm_triton_key
    from captune.ops.vision import set_vision_kernels

    path = resolve_model_path(cfg.name_or_path, cfg.revision)
    model_class, processor_class = model_classes(path)
    device = device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    warm_triton_key(device)  # the first kernel's install hash, off the path while the weights load
    processor = processor_class.from_pretrained(path)
    quant = quantization_config(cfg, device, dtype)
    # On a GPU the weights go straight from the safetensors files to the device.
    placement = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    launch.keep_every_process_loading()
    if quant is not None:
        placement["quantization_config"] = quant
    model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False, **placement)
    if model.config.image_token_index is None:
        # Older checkpoints predate image tokens; the processor's token is the one to use.
        model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    if device.type != "cuda":
        model.to(device)
    model.eval()
    set_instruction(model, processor, cfg.prompt)
    set_qformer_matmul(model, cfg.qformer_matmul)
    set_vision_kernels(model, cfg.vision_kernels)
    return Loaded(model, processor, device, dtype, path)


# Only the language model is quantized: the vision tower and Q-Former run once per image
# (their outputs are cached) and keep their precision; the LM head stays unquantized too.
UNQUANTIZED = ["vision_model", "qformer", "query_tokens", "language_projection", "lm_head"]


def quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """A ``BitsAndBytesConfig`` for model.quantization, or None; clear errors where it cannot work."""
    if cfg.quantization == "none":
        return None
    if device.type != "cuda":
        raise UserError(
            f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes); use model.quantization=none"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"model.quantization={cfg.quantization} needs bitsandbytes: pip install 'captune[quant]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=UNQUANTIZED,
    )


def is_quantized(model) -> bool:
    return any(getattr(model, a, False) for a in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"))

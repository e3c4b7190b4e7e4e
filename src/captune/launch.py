"""What the launcher said: the one reader of torchrun's and accelerate's environment variables.

captune does not start processes itself; ``torchrun`` or ``accelerate launch`` do, and tell
each process its place (``WORLD_SIZE``, ``LOCAL_RANK``) and, for accelerate, the engine its
config chose (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED`` and the DeepSpeed
settings). Everything else in captune asks this module.
"""

from __future__ import annotations

import os

from captune.errors import UserError


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def world_size() -> int:
    """How many processes the launcher says it started (1 outside torchrun / accelerate launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def uses_fsdp() -> bool:
    """accelerate's FSDP config is in force."""
    return _flag("ACCELERATE_USE_FSDP")


def uses_deepspeed() -> bool:
    """accelerate's DeepSpeed config is in force (DeepSpeed then forms the process group itself)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def keep_every_process_loading() -> None:
    """Under accelerate's FSDP config transformers would load the weights on process 0 only
    (FSDP_CPU_RAM_EFFICIENT_LOADING) and leave the others empty; captune shards the language model
    itself after every process has loaded the whole model."""
    if uses_fsdp():
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def zero_stage() -> int | None:
    """The ZeRO stage of an ``accelerate launch`` with a DeepSpeed config; None for other launches."""
    if not uses_deepspeed():
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() not in ("", "none"):
        raise UserError(
            "captune builds the DeepSpeed config from the recipe (train.*); set zero_stage in the accelerate "
            "config (configs/accelerate/deepspeed-zero3.yaml) instead of deepspeed_config_file"
        )
    for what in ("OPTIMIZER", "PARAM"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what}_DEVICE", "none").lower()
        if device not in ("", "none"):
            raise UserError(
                f"DeepSpeed offload ({what.lower()} to {device}) is not supported by captune; set "
                f"offload_{what.lower()}_device: none (ZeRO-3 or FSDP shard a model too large for one GPU)"
            )
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("2", "3"):
        raise UserError(f"captune runs DeepSpeed ZeRO stage 2 or 3, not {stage}; set zero_stage: 2 or 3")
    return int(stage)


def engine(choice: str) -> str:
    """``ddp``, ``fsdp``, ``zero2`` or ``zero3``: the configured one, or with ``auto`` what accelerate's
    launch config says (FSDP, DeepSpeed and its ZeRO stage), else DDP."""
    stage = zero_stage()
    if choice != "auto":
        return choice
    if stage is not None:
        return f"zero{stage}"
    return "fsdp" if uses_fsdp() else "ddp"

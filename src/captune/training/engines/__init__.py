"""Training engines: one class per way of running the step (one process, DDP, FSDP, ZeRO-2/3).

``make_engine`` picks the engine the launch asks for and refuses, in one line, what it cannot
train. The training loop talks only to the ``Engine`` protocol (``single.py``).
"""

from __future__ import annotations

import torch

from captune import launch
from captune.distributed import World
from captune.errors import UserError
from captune.training.engines.single import Engine, SingleEngine

__all__ = ["Engine", "SingleEngine", "check_engine", "make_engine"]


def check_engine(kind: str, *, vision_trains: bool, dtype: torch.dtype, quantized: bool = False) -> None:
    """One line for what an engine cannot train: a trained Q-Former (its query tokens are read
    directly, which FSDP and ZeRO-3 shard), quantized weights outside DDP, and, under DeepSpeed,
    fp16 weights."""
    if quantized and kind in ("fsdp", "zero2", "zero3"):
        raise UserError(
            "a quantized model (model.quantization) trains under DDP only in captune; launch with "
            "configs/accelerate/multi-gpu.yaml or torchrun, or shard the bf16 model with fsdp.yaml"
        )
    if vision_trains and kind in ("fsdp", "zero3"):
        raise UserError(
            f"{'FSDP' if kind == 'fsdp' else 'ZeRO-3'} shards the model's weights, and lora.target_modules=qformer "
            "trains the Q-Former, whose query tokens it reads directly; use DDP (train.distributed=ddp) for this preset"
        )
    if kind in ("zero2", "zero3") and dtype == torch.float16:
        raise UserError("captune runs DeepSpeed on bf16 or fp32 models; set model.dtype=bf16")


def make_engine(
    model,
    *,
    train_cfg,
    world: World,
    dtype: torch.dtype,
    device: torch.device,
    vision_trains: bool,
    quantized: bool,
    log,
) -> Engine:
    """The engine for this launch (``single`` for one process), checked against what it must train."""
    kind = launch.engine(train_cfg.distributed) if world.distributed else "single"
    check_engine(kind, vision_trains=vision_trains, dtype=dtype, quantized=quantized)
    clip = train_cfg.max_grad_norm
    if kind == "single":
        return SingleEngine(model, dtype=dtype, max_grad_norm=clip)
    if kind == "ddp":
        from captune.training.engines.ddp import DDPEngine

        return DDPEngine(model, dtype=dtype, max_grad_norm=clip, device=device)
    if kind == "fsdp":
        from captune.training.engines.fsdp import FSDPEngine

        return FSDPEngine(model, dtype=dtype, max_grad_norm=clip, size=world.size, log=log)
    from captune.training.engines.zero import ZeroEngine

    return ZeroEngine(model, train_cfg=train_cfg, size=world.size, stage=int(kind[-1]), log=log)

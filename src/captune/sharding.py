"""Fully sharded training (PyTorch FSDP2) of the language model, for models one GPU cannot hold.

Under ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (or with
``train.distributed=fsdp`` under torchrun) each decoder layer of the language model
becomes its own FSDP unit and the rest of the language model (embeddings, final norm,
head) one more, so each GPU holds 1/N of the language model's weights between uses
and gathers a layer only while it computes. The vision tower and Q-Former are frozen
and computed once before training (cached features), so they are left whole on each
GPU and never communicated. Checkpoints hold whole tensors (gathered from the shards),
so a run resumes under any number of processes, sharded or not. LoRA gradients are reduce-scattered, i.e. averaged like
DDP's, so captune's token weighting carries over unchanged.

Validation and evaluation call layers' parts directly (the static-cache decoder), so
they run inside ``gathered``: every unit is gathered for the duration, which needs the
whole language model on each GPU for that time (13.4 GB for OPT-6.7B in bf16).
"""

from __future__ import annotations

import contextlib
import os

import torch

from captune.errors import UserError


def engine(choice: str) -> str:
    """``ddp``, ``fsdp``, ``zero2`` or ``zero3``: the configured one, or with ``auto`` what accelerate's
    launch config says (FSDP, DeepSpeed and its ZeRO stage), else DDP."""
    from captune.zero import launched_stage

    stage = launched_stage()
    if choice != "auto":
        return choice
    if stage is not None:
        return f"zero{stage}"
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"


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
        raise UserError("captune runs DeepSpeed on bf16 or fp32 models; set model.dtype=bfloat16")


def shard_language_model(root: torch.nn.Module, blip) -> None:
    """FSDP units: every decoder layer, then ``root`` (the training-loss module) holding the rest of
    the language model; parameters outside the language model are left alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = blip.language_model
    layers = getattr(getattr(getattr(lm, "model", None), "decoder", None), "layers", None)
    if layers is None:
        raise UserError(
            "FSDP in captune shards OPT-style language models; use DDP (configs/accelerate/multi-gpu.yaml) "
            "for this model"
        )
    dtype = layers[0].fc1.weight.dtype
    # LoRA weights are kept in fp32 by PEFT, the base in bf16: gathered in the base's dtype, with
    # gradients reduced in fp32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    inside = {id(p) for p in lm.parameters()}
    fully_shard(root, mp_policy=policy, ignored_params={p for p in root.parameters() if id(p) not in inside})


def units(module: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(layer: torch.nn.Module) -> bool:
    """True while ``layer``'s weights are shards (not gathered)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in layer.parameters())


@contextlib.contextmanager
def gathered(module: torch.nn.Module):
    """Every FSDP unit in ``module`` gathered (plain parameters) until the block ends."""
    found = units(module)
    for unit in found:  # the root first: it initialises the others
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in found:
            unit.set_reshard_after_forward(True)
            unit.reshard()


def set_gradient_sync(module: torch.nn.Module, sync: bool) -> None:
    """Accumulate gradients locally (False) or reduce them at the next backward (True)."""
    for unit in units(module):
        unit.set_requires_gradient_sync(sync)


def whole(state: dict) -> dict:
    """``state`` with every FSDP shard replaced by the whole tensor (a collective)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def whole_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with whole tensors, loadable under any number of processes."""
    doc = optimizer.state_dict()
    doc["state"] = {i: whole(st) for i, st in doc["state"].items()}
    return doc


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) cut to this process's shard when ``param`` is an FSDP shard, else
    as it is (a collective for shards: every process calls it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def shard_optimizer_state(optimizer) -> None:
    """After loading whole tensors into the optimizer of sharded parameters: cut each parameter's
    state to its process's shard, as the optimizer would have made it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = like(p, v)

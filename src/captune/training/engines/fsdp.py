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

import torch

from captune.errors import UserError
from captune.model.family import opt_decoder
from captune.training.engines.single import SingleEngine


def shard_language_model(root: torch.nn.Module, blip) -> None:
    """FSDP units: every decoder layer, then ``root`` (the training-loss module) holding the rest of
    the language model; parameters outside the language model are left alone."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = blip.language_model
    layers = getattr(opt_decoder(lm), "layers", None)
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


class FSDPEngine(SingleEngine):
    """The language model's decoder layers sharded over the processes (FSDP2); LoRA gradients
    reduce-scattered, i.e. averaged like DDP's; whole tensors gathered for checkpoints."""

    name = "fsdp"

    def __init__(self, model, *, dtype: torch.dtype, max_grad_norm: float, size: int, log):
        super().__init__(model, dtype=dtype, max_grad_norm=max_grad_norm)
        self.size, self.log = size, log

    def prepare(self, module: torch.nn.Module, blip) -> None:
        shard_language_model(module, blip)
        self.module = module
        self.log(f"  FSDP: the language model sharded over {self.size} processes")

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager:
        set_gradient_sync(self.module, sync)
        return contextlib.nullcontext()

    def gathered(self) -> contextlib.AbstractContextManager:
        return gathered(self.module)

    def whole(self, state: dict) -> dict:
        return whole(state)

    def _local(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return like(param, value)

    def optimizer_state(self) -> dict:
        return whole_optimizer_state(self.optimizer)

    def load_optimizer_state(self, doc: dict) -> None:
        self.optimizer.load_state_dict(doc)
        shard_optimizer_state(self.optimizer)

    def adapter_to_save(self) -> dict | None:
        return self.trainable_state()

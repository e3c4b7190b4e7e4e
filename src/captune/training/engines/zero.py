"""DeepSpeed ZeRO-2 and ZeRO-3 for captune's training loop.

Under ``accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml`` (or
``deepspeed-zero3.yaml``; or ``train.distributed=zero2|zero3`` under torchrun) the
training module goes through ``deepspeed.initialize`` with captune's own AdamW:

- ZeRO-2 partitions the trainable (LoRA) parameters' optimizer state and gradients over
  the processes; every process holds the whole model.
- ZeRO-3 also partitions every weight of the model; each module gathers its weights
  while it computes. Validation and evaluation inside training run on the gathered
  model (``gathered``), as under FSDP.

captune keeps its loop: the engine runs the backward, reduces the gradients at
captune's accumulation boundaries, clips them (``train.max_grad_norm``) and steps the
optimizer; captune steps the learning-rate schedule and weights each process's loss by
its share of the labelled tokens, as under DDP. Checkpoints hold whole tensors (the
adapter and AdamW's per-parameter state gathered from the partitions) in the format DDP
and FSDP runs write, so a run resumes under any process count and any engine.
"""

from __future__ import annotations

import contextlib

import torch

from captune.errors import UserError
from captune.model.family import opt_decoder


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError("DeepSpeed is not installed; pip install 'captune[deepspeed]' (or deepspeed)") from None
    return deepspeed


def config(train_cfg, world_size: int, stage: int) -> dict:
    """The DeepSpeed config for captune's loop: fp32 trainable weights (LoRA; the frozen base keeps
    its dtype), captune's accumulation and clipping, and no logging of DeepSpeed's own."""
    return {
        "train_micro_batch_size_per_gpu": max(1, train_cfg.batch_size // world_size),
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": float(train_cfg.max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as in single-GPU runs
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def wrap(module: torch.nn.Module, optimizer, train_cfg, world_size: int, stage: int, external=()):
    """``module`` as a DeepSpeed engine with ``optimizer`` partitioned; ``external`` are parameters the
    module's forward reads outside their own modules (ZeRO-3 gathers them with the module)."""
    deepspeed = _deepspeed()
    template = optimizer.state_dict()["param_groups"]
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=config(train_cfg, world_size, stage)
    )
    if stage == 3:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in external:
            register_external_parameter(engine.module, p)
    engine.captune_param_groups = template  # the torch-format groups for whole-state checkpoints
    return engine


def _gathered_params(params, modifier_rank: int | None = None):
    """ZeRO-3's partitioned ones among ``params`` whole for a block (a no-op for other parameters);
    with ``modifier_rank``, that process's values are partitioned back on leaving."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=modifier_rank)


@contextlib.contextmanager
def gathered(engine):
    """Every weight whole until the block ends, with ZeRO-3's per-module hooks off meanwhile (they
    would partition weights again after each module; validation reads some directly)."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:  # ZeRO-2: weights are whole already
        yield
        return
    with _gathered_params(engine.module.parameters()):
        for p in engine.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable weights (gathered from ZeRO-3 partitions; a collective)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    with _gathered_params(p for _, p in named):
        return {k: p.detach().clone() for k, p in named}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the trainable weights, ZeRO-3 partitions included (a collective)."""
    params = dict(model.named_parameters())
    with _gathered_params([params[k] for k in state], modifier_rank=0), torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def _inner(engine):
    return engine.optimizer.optimizer  # torch's AdamW, stepping the flat fp32 partitions


def whole_optimizer_state(engine, params: list[torch.Tensor]) -> dict:
    """AdamW's state dict as torch writes it for ``params`` (whole tensors, indices in that order),
    gathered from the partitions: every process calls it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _inner(engine)
    groups = [
        {**{k: v for k, v in now.items() if k != "params"}, "params": saved["params"]}
        for saved, now in zip(engine.captune_param_groups, inner.param_groups, strict=True)
    ]
    if not inner.state:  # no optimizer step yet
        return {"state": {}, "param_groups": groups}
    step = next(iter(inner.state.values()))["step"]
    state = {}
    for i, p in enumerate(params):
        st = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        state[i] = {"step": step.detach().clone().cpu(), **{k: v.cpu() for k, v in st.items()}}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(engine, params: list[torch.Tensor], doc: dict) -> None:
    """Load a whole-tensor AdamW state dict (from any engine and process count) into the partitions."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _inner(engine)
    for group, saved in zip(inner.param_groups, doc["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    if not doc["state"]:
        return
    step = float(next(iter(doc["state"].values()))["step"])
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    zero3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    # ZeRO-3 hands AdamW each flat partition only while it steps; ZeRO-2 keeps them in its groups
    flats = zero3 if zero3 is not None else [f for g in inner.param_groups for f in g["params"]]
    for flat in flats:
        inner.state[flat] = {
            "step": torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-2: point each parameter's fragment at the new state
        link()
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, doc["state"][i][key].to(p.device, torch.float32), key)


class ZeroEngine:
    """DeepSpeed ZeRO-2 (optimizer state and gradients partitioned) or ZeRO-3 (weights too): the
    engine runs the backward, reduces at captune's accumulation boundaries, clips and steps."""

    description = None

    def __init__(self, model, *, train_cfg, size: int, stage: int, log):
        self.model, self.train_cfg, self.size, self.stage, self.log = model, train_cfg, size, stage, log
        self.name = f"zero{stage}"
        self.optimizer = None
        self.params: list[torch.Tensor] = []
        self.module = None  # the DeepSpeed engine, once wrapped
        self.blip = None
        self._resumed_optimizer: dict | None = None  # loaded into the partitions once they exist

    def prepare(self, module: torch.nn.Module, blip) -> None:
        self.blip = blip

    def attach(self, optimizer, params: list[torch.Tensor]) -> None:
        self.optimizer, self.params = optimizer, params

    def wrap(self, module: torch.nn.Module, *, packed: bool):
        # the packed step reads the position table directly (not through its module's forward)
        dec = opt_decoder(self.blip.language_model)
        external = [dec.embed_positions.weight] if packed and dec is not None else []
        self.module = wrap(module, self.optimizer, self.train_cfg, self.size, self.stage, external)
        if self._resumed_optimizer is not None:
            load_optimizer_state(self.module, self.params, self._resumed_optimizer)
        self.log(f"  DeepSpeed ZeRO-{self.stage} over {self.size} processes")
        return self.module

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager:
        self.module.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.module.step()  # clips (train.max_grad_norm), steps AdamW, clears the gradients

    def gathered(self) -> contextlib.AbstractContextManager:
        return gathered(self.module)

    def snapshot(self) -> dict:
        from captune.model.lora import trainable_state as snapshot

        return snapshot(self.model)

    def whole(self, state: dict) -> dict:
        return state

    def trainable_state(self) -> dict:
        return trainable_state(self.model)

    def load_trainable(self, state: dict) -> None:
        if self.module is None:  # not partitioned yet
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in state.items():
                    params[k].copy_(v.to(params[k].dtype))
        else:
            load_trainable_state(self.model, state)

    def optimizer_state(self) -> dict:
        return whole_optimizer_state(self.module, self.params)

    def load_optimizer_state(self, doc: dict) -> None:
        self._resumed_optimizer = doc

    def scaler_state(self) -> dict | None:
        return None

    def load_scaler_state(self, doc: dict | None) -> None:
        pass

    def adapter_to_save(self) -> dict | None:
        return trainable_state(self.model) if self.stage == 3 else None

"""The engine protocol, and the single-process engine the others extend.

An engine is what differs between one process, DDP, FSDP and DeepSpeed ZeRO: how the
training module is wrapped, how gradients are synchronised under accumulation, how the
backward and the optimizer step run, how the whole weights are seen for validation, and
how trainable and optimizer state become whole tensors (the one checkpoint format) and go
back. The training loop calls only these methods and never asks which engine it has.

Collective methods (``trainable_state``, ``optimizer_state``, ``gathered``, ``adapter_to_save``,
``load_trainable``) are called by every process in the same order; none hides behind "if main".
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from captune.model.lora import trainable_state


class Engine(Protocol):
    name: str
    description: str | None

    def prepare(self, module: torch.nn.Module, blip) -> None: ...
    def attach(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None: ...
    def wrap(self, module: torch.nn.Module, *, packed: bool) -> torch.nn.Module: ...
    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def gathered(self) -> contextlib.AbstractContextManager: ...
    def snapshot(self) -> dict: ...
    def whole(self, state: dict) -> dict: ...
    def trainable_state(self) -> dict: ...
    def load_trainable(self, state: dict) -> None: ...
    def optimizer_state(self) -> dict: ...
    def load_optimizer_state(self, doc: dict) -> None: ...
    def scaler_state(self) -> dict | None: ...
    def load_scaler_state(self, doc: dict | None) -> None: ...
    def adapter_to_save(self) -> dict | None: ...


class SingleEngine:
    """One process: plain backward (through the fp16 loss scaler when the model is fp16), clipping,
    AdamW step. The base the DDP and FSDP engines extend."""

    name = "single"
    description: str | None = None

    def __init__(self, model, *, dtype: torch.dtype, max_grad_norm: float):
        self.model = model  # the PEFT model whose trainable parameters are the adapter
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.Tensor] = []
        self.module: torch.nn.Module | None = None

    def prepare(self, module: torch.nn.Module, blip) -> None:
        """Before the optimizer is built (FSDP shards here)."""

    def attach(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        self.optimizer, self.params = optimizer, params

    def wrap(self, module: torch.nn.Module, *, packed: bool) -> torch.nn.Module:
        """The module the loop calls for the loss (after the optimizer state is restored)."""
        self.module = module
        return module

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; ``sync`` marks an accumulation boundary."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        """Unscale, clip, step and clear the gradients."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gathered(self) -> contextlib.AbstractContextManager:
        """The whole weights for the block (validation reads some of them directly)."""
        return contextlib.nullcontext()

    def snapshot(self) -> dict:
        """The trainable parameters as this process holds them (a best-adapter snapshot)."""
        return trainable_state(self.model)

    def whole(self, state: dict) -> dict:
        """A snapshot as whole tensors."""
        return state

    def trainable_state(self) -> dict:
        """The trainable parameters as whole tensors."""
        return self.whole(self.snapshot())

    def load_trainable(self, state: dict) -> None:
        """Copy whole tensors into the trainable parameters."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(self._local(params[k], v.to(params[k].dtype)))

    def _local(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, doc: dict) -> None:
        self.optimizer.load_state_dict(doc)

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler else None

    def load_scaler_state(self, doc: dict | None) -> None:
        if self.scaler and doc:
            self.scaler.load_state_dict(doc)

    def adapter_to_save(self) -> dict | None:
        """Whole adapter tensors when the model's own parameters are not (else None: save the model)."""
        return None

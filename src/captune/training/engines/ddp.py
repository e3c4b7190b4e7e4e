"""PyTorch DistributedDataParallel: the LoRA gradients averaged across processes."""

from __future__ import annotations

import contextlib
import warnings

import torch

from captune.training.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    name = "ddp"

    def __init__(self, model, *, dtype: torch.dtype, max_grad_norm: float, device: torch.device):
        super().__init__(model, dtype=dtype, max_grad_norm=max_grad_norm)
        self.device = device

    def wrap(self, module: torch.nn.Module, *, packed: bool) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # the model's buffers are constants (position ids): no broadcast from process 0 each step
        # (torch 2.13 renames the flag and warns; the new one would still sync at start)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.module = DDP(module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)
        return self.module

    def accumulating(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.module.no_sync()

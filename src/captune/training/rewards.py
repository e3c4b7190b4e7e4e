"""SCST's rewards, made on the CPU while the GPU runs the policy's forward.

A step samples K captions per image, rewards them (decoding the tokens and scoring CIDEr-D
are CPU work), then runs the teacher-forced forward of the sampled tokens and the backward.
The forward does not need the rewards (only the loss does), so the step copies the samples
to the CPU once they are drawn (its one wait on the GPU), queues the whole forward (the
sampled positions found on the CPU copy: nothing in it waits), and only then decodes and
scores the captions, while the GPU computes. The arithmetic is the same in either order.

The rewards are made in the thread that queues the forward, not beside it: a second Python
thread would hold the GIL between the forward's kernel launches (measured on an H200: the
forward and backward took 0.78 s beside a reward thread against 0.66 s without), and the
GPU would wait for the launches.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from captune.ops.sampling import decode_samples
from captune.ops.scst import advantages, baseline, sampled_positions


class Drawn:
    """Sampled tokens copied to the CPU (waiting for the GPU to finish drawing them), with their
    flat sampled positions on the device for ``sequence_logprobs``."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor):
        self.tokens, self.mask = tokens.cpu(), mask.cpu()
        self.positions = sampled_positions(self.mask).to(tokens.device, non_blocking=True)


class Rewards:
    """``later(tokens, images)``: a ``Pending`` reward of each row of ``tokens`` (on the CPU; pad after
    EOS), row i against the references of corpus image ``images[i]``, decoded and scored when first
    asked for."""

    def __init__(self, scorer, tokenizer, blip, prompt: str):
        self.scorer, self.tokenizer, self.blip, self.prompt = scorer, tokenizer, blip, prompt
        self.last_score_s = 0.0  # the last reward's decoding and scoring, seconds

    def later(self, tokens: torch.Tensor, images: np.ndarray) -> Pending:
        return Pending(self, tokens, images)

    def score(self, tokens: torch.Tensor, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        t0 = time.perf_counter()
        captions = decode_samples(self.tokenizer, tokens, self.prompt, self.blip)
        scores = self.scorer.score(captions, images)
        self.last_score_s = time.perf_counter() - t0
        return captions, scores


class Pending:
    """One batch's rewards, made by the first ``result()``."""

    def __init__(self, rewards: Rewards, tokens: torch.Tensor, images: np.ndarray):
        self.rewards, self.tokens, self.images = rewards, tokens, images
        self._result: tuple[list[str], np.ndarray] | None = None

    def result(self) -> tuple[list[str], np.ndarray]:
        if self._result is None:
            self._result = self.rewards.score(self.tokens, self.images)
        return self._result


class Advantages:
    """A step's advantages, made when first asked for: the SCST loss asks once the policy's forward is
    queued, so the rewards (a ``Pending``, and the greedy captions' when that is the baseline) are made
    only then. Keeps ``rewards`` and ``base`` (images, K) for the step's log."""

    def __init__(self, pending: Pending, greedy: Pending | None, shape: tuple[int, int], kind: str, device):
        self.pending, self.greedy, self.shape, self.kind, self.device = pending, greedy, shape, kind, device
        self.rewards = self.base = self.values = None

    def __call__(self) -> torch.Tensor:
        if self.values is None:
            self.rewards = self._tensor(self.pending).view(self.shape)
            greedy = self._tensor(self.greedy) if self.greedy is not None else None
            self.base = baseline(self.rewards, self.kind, greedy)
            self.values = advantages(self.rewards, self.base)
        return self.values

    def _tensor(self, pending: Pending) -> torch.Tensor:
        return torch.tensor(pending.result()[1], dtype=torch.float32).to(self.device, non_blocking=True)

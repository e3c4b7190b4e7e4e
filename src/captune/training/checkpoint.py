"""Checkpoints: the adapter, the best adapter, optimizer, scheduler, RNG and the loop's position.

A checkpoint folder ``step-NNNNNNNN`` is complete once its ``state.json`` exists (it is written
under a temporary name and renamed). Tensors are whole (not shards or partitions), so any
engine and any number of processes can resume from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Position:
    """Where the loop is: the next micro-batch of an epoch whose order ``epoch_rng`` fixes."""

    step: int = 0  # optimizer steps taken
    seen: int = 0  # pairs trained on
    epoch: int = 1
    next_micro: int = 0  # micro-batches of ``epoch`` already done
    epoch_rng: tuple | None = None  # the random.Random state the epoch's order comes from


def rng_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(doc) -> tuple:
    return (doc[0], tuple(doc[1]), doc[2])


def latest_checkpoint(root: Path | None) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (complete = state.json present)."""
    if root is None or not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def saved_micro_batch(root: Path | None) -> tuple[int, int] | None:
    """(train.batch_size, train.grad_accum) the newest checkpoint was written with; positions count
    micro-batches of that size, so a resume must use it."""
    last = latest_checkpoint(root)
    if last is None:
        return None
    st = json.loads((last / "state.json").read_text())
    return st.get("batch_size"), st.get("grad_accum")


class Checkpointer:
    """Writes and restores checkpoints under ``root`` (None: no checkpoints), keeping the last ``keep``."""

    def __init__(self, root: Path | None, keep: int, *, main: bool):
        self.root, self.keep, self.main = root, keep, main

    def save(self, engine, scheduler, selection, history: list, pos: Position, plan) -> Path | None:
        """Every process calls this (whole tensors are gathered collectively); the main one writes."""
        if self.root is None:
            return None
        trainable = engine.trainable_state()
        best = engine.whole(selection.best_state)
        optimizer_state = engine.optimizer_state()
        if not self.main:
            return None
        state = {
            "step": pos.step,
            "seen": pos.seen,
            "epoch": pos.epoch,
            "next_micro": pos.next_micro,
            "epoch_rng": rng_state_to_json(pos.epoch_rng),
            "best_value": selection.best_value,
            "best_step": selection.best_step,
            "best": selection.best,
            "history": history,
            "stale": selection.stale,
            # the micro-batch in use (a fallback after running out of GPU memory may have halved
            # it): positions above count micro-batches of this size
            "batch_size": plan.batch_size,
            "grad_accum": plan.grad_accum,
        }
        extra = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "scaler": engine.scaler_state()}
        return self._write(pos.step, trainable, best, extra, state)

    def _write(self, step: int, trainable: dict, best: dict, extra: dict, state: dict) -> Path:
        from safetensors.torch import save_file

        from captune.atomic import staged_dir

        target = self.root / f"step-{step:08d}"
        with staged_dir(target) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
            )
            save_file({k: v.contiguous().cpu() for k, v in best.items()}, str(tmp / "best.safetensors"))
            torch.save(
                {
                    **extra,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                tmp / "optimizer.pt",
            )
            (tmp / "state.json").write_text(json.dumps(state))
        for old in sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def restore(self, engine, scheduler, selection, device: torch.device) -> tuple[Position, list, Path] | None:
        """Load the newest checkpoint into the engine, scheduler, selection and RNGs (before the
        engine wraps the module); returns the position, the history and the folder, or None."""
        folder = latest_checkpoint(self.root)
        if folder is None:
            return None
        from safetensors.torch import load_file

        st = json.loads((folder / "state.json").read_text())
        engine.load_trainable(load_file(str(folder / "trainable.safetensors"), device=str(device)))
        best_state = load_file(str(folder / "best.safetensors"), device=str(device))
        extra = torch.load(folder / "optimizer.pt", weights_only=True, map_location=device)
        engine.load_optimizer_state(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        engine.load_scaler_state(extra["scaler"])
        torch.set_rng_state(extra["torch_rng"].cpu())
        if extra["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in extra["cuda_rng"]])
        selection.restore(st["best_value"], best_state, st["best_step"], st["best"], st.get("stale", 0))
        pos = Position(st["step"], st["seen"], st["epoch"], st["next_micro"], rng_state_from_json(st["epoch_rng"]))
        return pos, st["history"], folder

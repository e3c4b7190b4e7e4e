"""Where training progress goes: ``RUN/logs/train.jsonl``, accelerate's trackers (TensorBoard,
Weights & Biases, MLflow, ...) when asked, a progress bar on a terminal, and the console.

``TrainLog`` is the one log of a training run: the main process writes and prints, the others
stay silent (but take part in the collective that averages the logged loss)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

from captune.console import _active, around_bar
from captune.errors import UserError

# tracker name (as accelerate spells it) -> the package it needs
KNOWN_TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def flat_config(doc: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists and None as text (tracker hparams)."""
    out: dict = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """accelerate's experiment trackers, fed the same rows as the JSONL log (main process only)."""

    def __init__(self, names: list[str], project_dir: Path | None, config: dict, run_name: str = "captune"):
        self.accelerator = None
        if not names:
            return
        missing = [n for n in names if importlib.util.find_spec(KNOWN_TRACKERS[n]) is None]
        if missing:
            pkgs = " ".join(KNOWN_TRACKERS[n] for n in missing)
            raise UserError(f"train.trackers asks for {', '.join(missing)}; install it first: pip install {pkgs}")
        if project_dir is None:
            raise UserError("train.trackers needs a run folder to write to")
        from accelerate import Accelerator

        project_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(log_with=names, project_dir=str(project_dir))
        self.accelerator.init_trackers(run_name, config=flat_config(config))

    def log(self, row: dict) -> None:
        if self.accelerator is None:
            return
        kind = row.get("type", "train")
        values = {
            f"{kind}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")
        }
        self.accelerator.log(values, step=int(row["step"]))

    def close(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is no terminal but a progress bar renders)."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    ip = shell.get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


class ProgressBar:
    """A tqdm bar over optimizer steps with loss, lr, samples/s and GPU memory; ETA from tqdm.

    ``auto`` shows it on a terminal and in Jupyter (tqdm.auto: a widget with ipywidgets,
    else a text bar in the cell's output)."""

    def __init__(self, mode: str, total: int, initial: int = 0, stream=None):
        stream = stream or sys.stderr
        self.bar = None
        if mode == "on" or (mode == "auto" and (getattr(stream, "isatty", lambda: False)() or in_notebook())):
            import warnings

            with warnings.catch_warnings():  # tqdm warns when Jupyter lacks ipywidgets, then falls back to text
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=stream, dynamic_ncols=True, leave=True)
            _active.append(self.bar)

    def update(self, step: int, row: dict | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        if row is not None:
            post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "samples/s": f"{row['samples_per_s']:.0f}"}
            if "gpu_mem_gb" in row:
                post["GPU"] = f"{row['gpu_mem_gb']:.1f}GB"
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def write(self, log, message: str) -> None:
        """Log a line through ``log`` without tearing the bar."""
        around_bar(log)(message)

    def step_line(self, log, message: str) -> None:
        """A per-step console line: only when no bar is shown (logs, CI); the bar's postfix has the same figures."""
        if self.bar is None:
            log(message)

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(ValueError):
                _active.remove(self.bar)
            self.bar.close()
            self.bar = None


def eta(elapsed: float, done: int, left: int) -> str:
    """Remaining time at the pace so far (validation time included), as 1h02m03s / 4m05s / 6s."""
    if done <= 0:
        return "?"
    seconds = int(elapsed / done * left)
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _quiet(message: str) -> None:
    pass


class JsonlLog:
    """``train.jsonl``: rewritten with the rows so far (a resumed run's history), then appended to."""

    def __init__(self, path: Path | None, rows: list[dict] | None = None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows or []))

    def write(self, row: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class TrainLog:
    """The rows of a run (``history``) to the JSONL file, the trackers, the bar and the console."""

    def __init__(self, *, path: Path | None, history: list[dict], train_cfg, config: dict, total_steps: int,
                 position, say, main: bool):  # fmt: skip
        self.history = history
        self.journal = JsonlLog(path if main else None, history)
        self.trackers = Trackers(train_cfg.trackers if main else [], path.parent if path else None, config)
        self.bar = ProgressBar(train_cfg.progress if main else "off", total_steps, initial=position.step)
        self.say = say if main else _quiet
        self.log_every, self.total_steps = train_cfg.log_every, total_steps
        self.first_step, self.first_seen = position.step, position.seen
        self.started = time.perf_counter()
        self.running: list = []  # this process's micro-batch losses since the last logged step

    def record(self, row: dict) -> None:
        self.journal.write(row)
        self.trackers.log(row)
        self.history.append(row)

    def micro_batch(self, loss) -> None:
        self.running.append(loss.detach())

    def optimizer_step(self, pos, epoch: int, lr: float, device) -> None:
        """A train row at the first step, every ``train.log_every`` steps and at the last (the loss
        averaged over the processes: every process calls this). The first step's row puts the
        warm-up's start on the report's loss and learning-rate curves."""
        if pos.step % self.log_every and pos.step not in (1, self.total_steps):
            self.bar.update(pos.step)
            return
        import torch

        from captune.distributed import all_mean

        elapsed = time.perf_counter() - self.started
        row = {
            "type": "train",
            "step": pos.step,
            "epoch": epoch,
            "loss": all_mean(float(torch.stack(self.running).mean())),
            "lr": lr,
            # this process's pace: pairs since it started (a resumed run's earlier pairs not counted)
            "samples_per_s": (pos.seen - self.first_seen) / max(elapsed, 1e-9),
            "elapsed_s": round(elapsed, 3),
        }
        if device.type == "cuda":
            row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        self.running.clear()
        self.record(row)
        self.bar.update(pos.step, row)
        self.bar.step_line(
            self.say,
            f"  step {pos.step}/{self.total_steps} epoch {epoch} loss {row['loss']:.4f} "
            f"lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s "
            f"ETA {eta(elapsed, pos.step - self.first_step, self.total_steps - pos.step)}"
            + (f" GPU {row['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in row else ""),
        )

    def validation_started(self, row: dict) -> None:
        """A validation whose CIDEr is being scored in the background: its loss now, the rest once scored."""
        self.bar.write(
            self.say,
            f"  validation after epoch {row['epoch']} (step {row['step']}): loss {row['loss']:.4f}, "
            "CIDEr scoring in the background",
        )

    def validation(self, row: dict, times: dict) -> None:
        self.record(row)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("loss", "CIDEr"))
        took = ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
        self.bar.write(self.say, f"  validation after epoch {row['epoch']} (step {row['step']}): {shown} ({took})")

    def close(self) -> None:
        self.bar.close()
        self.trackers.close()

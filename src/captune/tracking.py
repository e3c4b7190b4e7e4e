"""Where training progress goes besides ``RUN/logs/train.jsonl``: accelerate's trackers
(TensorBoard, Weights & Biases, MLflow, ...) when asked, and a progress bar on a terminal."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
        """Log a line without tearing the bar."""
        if self.bar is None:
            log(message)
        else:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

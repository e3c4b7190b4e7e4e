"""The run folder: its layout and resolved config, the models a run loads, and its timings.

Each phase reads only what earlier phases wrote in the run folder and writes its
own outputs atomically (a temporary folder or file, then a rename), so a phase
whose output exists is complete and is skipped unless forced.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from captune.atomic import write_atomic
from captune.config import Config, config_from_dict, load_yaml
from captune.console import around_bar
from captune.distributed import barrier, world
from captune.errors import UserError

PHASES = ("data", "baseline", "train", "finetuned", "scst", "compare", "report")


# temp files of write_atomic / the feature cache, left only by a killed process
STALE_FILE_PREFIXES = (".config.yaml.", ".timings.json.", ".comparison.", ".features.")


class Run:
    """A run folder with its resolved config and a lazily loaded model."""

    def __init__(self, root: Path, cfg: Config, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.cfg = cfg
        # lines from any phase or thread (the background baseline scoring) clear a shown progress bar first
        self.log = around_bar(log)
        self._loaded = None
        self._tuned = None
        self._store = None
        self.overlap = False  # score the baseline in the background while training
        self._pending: list = []
        self._unwritten: dict[str, float] = {}

    # -- config ---------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, cfg: Config | None, *, force: bool = False, log: Callable[[str], None] = print) -> Run:
        root = Path(root)
        saved = root / "config.yaml"
        if cfg is None:
            if not saved.is_file():
                raise UserError(
                    f"{root} is not a run folder (no config.yaml); start one with "
                    "'captune run RECIPE --out RUN' or pass --recipe"
                )
            cfg = config_from_dict(load_yaml(saved.read_text(), str(saved)))
        elif saved.is_file() and not force and any(_holds_results(p) for p in root.iterdir()):
            # (a folder with only its config, left by a run that stopped at a user error, takes the new one)
            if load_yaml(saved.read_text(), str(saved)) != cfg.to_dict():
                raise UserError(
                    f"{root} holds a run with a different config; use --force to redo it "
                    "with the new one, or choose another --out"
                )
        run = cls(root, cfg, log)
        w = world()
        if w.is_main:
            run.remove_stale_temporaries()
            if not saved.is_file() or force or load_yaml(saved.read_text(), str(saved)) != cfg.to_dict():
                write_atomic(saved, cfg.to_yaml())
        else:
            run.log = lambda message: None  # one process talks
        barrier()  # the other processes open the folder once the main one has set it up
        return run

    def remove_stale_temporaries(self) -> None:
        """Temp folders and files left by a killed process (never a complete output) are removed."""
        folders = [self.root, self.root / "checkpoints", self.root / "checkpoints-scst", *self.root.glob("features/*")]
        for folder in folders:
            if not folder.is_dir():
                continue
            for p in folder.glob(".*"):
                if ".tmp-" in p.name and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_file() and p.name.startswith(STALE_FILE_PREFIXES):
                    p.unlink(missing_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def done(self, phase: str) -> bool:
        return {
            "data": self.path("data", "manifest.json"),
            "baseline": self.path("baseline", "metrics.json"),
            "train": self.path("adapter", "adapter_config.json"),
            "finetuned": self.path("finetuned", "metrics.json"),
            "scst": self.path("finetuned-scst", "metrics.json"),
            "compare": self.path("comparison.json"),
            "report": self.path("report", "index.html"),
        }[phase].is_file()

    def note_time(self, what: str, seconds: float) -> None:
        """A time written to timings.json with the next phase's (the run's start-up: a folder whose
        first phase failed holds no timings, so it stays free for a corrected config)."""
        self._unwritten[what] = seconds

    def record_time(self, phase: str, seconds: float) -> None:
        if not world().is_main:
            return
        path = self.path("timings.json")
        doc = json.loads(path.read_text()) if path.is_file() else {"phases": {}}
        for what, value in self._unwritten.items():
            doc["phases"][what] = round(value, 3)
        self._unwritten.clear()
        doc["phases"][phase] = round(seconds, 3)
        doc["device"] = describe_device()
        write_atomic(path, json.dumps(doc, indent=2))

    # -- model ----------------------------------------------------------------
    def join(self) -> None:
        """Wait for background scoring and features writes; re-raise a scoring error."""
        if self._store is not None:
            self._store.flush()
        while self._pending:
            name, future = self._pending.pop(0)
            self.record_time(name, future.result()[0])

    def in_background(self, name: str, fn, *args) -> None:
        """``fn(*args)`` on the background scorer, returning ``(seconds, lines)``: the lines are logged
        when it is done, and ``join`` records its time."""
        from captune.evaluation.background import submit

        future = submit(fn, *args)
        future.add_done_callback(self._said)
        self._pending.append((name, future))

    def _said(self, future) -> None:
        if not future.cancelled() and future.exception() is None:
            for line in future.result()[1]:
                self.log(line)

    def features(self, images, *, digests=None, stream: bool = False):
        """Frozen image features from RUN/features (computed once per model and image set, in shards):
        a device tensor, or with ``stream`` the memory-mapped ``FeatureMap``. ``images`` is read in
        order, a batch at a time; with their SHA-256 ``digests`` (or an ``ImageColumn``) the cache
        is looked up without reading any."""
        from captune.run.feature_cache import FeatureStore, model_fingerprint

        loaded = self.base()
        if self._store is None:
            key = model_fingerprint(loaded.model, loaded.processor, loaded.source)
            self._store = FeatureStore(self.path("features"), key)
        bs, device = self.cfg.eval.batch_size, loaded.device
        return self._store.get(loaded.model, loaded.processor, images, digests=digests, batch_size=bs, device=device,
                               world=world(), stream=stream)  # fmt: skip

    def tuned(self):
        """The base model with the run's adapter (the one training left in memory, else loaded)."""
        if self._tuned is None:
            from peft import PeftModel

            self._tuned = PeftModel.from_pretrained(self.base().model, str(self.path("adapter")))
            self._tuned.eval()
        return self._tuned

    def keep_tuned(self, model) -> None:
        """The model training adapted, kept for the fine-tuned evaluation."""
        self._tuned = model

    def forget_models(self) -> None:
        """Drop the loaded models (after sharded training they are shards): later phases load again."""
        self._loaded = self._tuned = None

    def base(self):
        if self._loaded is None:
            from captune.model.load import load_model

            gc.collect()  # a model dropped earlier (FSDP shards after training) gives its memory back
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()
            t0 = time.perf_counter()
            self._loaded = load_model(self.cfg.model)
            self.log(
                f"  model loaded from {self._loaded.source} on {self._loaded.device} "
                f"({str(self._loaded.dtype).replace('torch.', '')}) in {time.perf_counter() - t0:.1f}s"
            )
        return self._loaded


def describe_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def _holds_results(entry: Path) -> bool:
    """True for what a run made; not its config, nor a preparation interrupted part-way
    (``.data.partial``: resumed only under the same settings, discarded under others)."""
    return entry.name != "config.yaml" and not (entry.name.startswith(".") and entry.name.endswith(".partial"))

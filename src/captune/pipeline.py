"""The phases of a run and the run folder they share.

Each phase reads only what earlier phases wrote in the run folder and writes its
own outputs atomically (a temporary folder or file, then a rename), so a phase
whose output exists is complete and is skipped unless forced.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from captune.atomic import staged_dir, write_atomic
from captune.config import Config, config_from_dict, load_yaml
from captune.data.prepare import load_split, prepare
from captune.data.sources import parse_source
from captune.demo import attributes
from captune.distributed import all_agree, barrier, gather_strided_objects, world
from captune.errors import UserError

PHASES = ("data", "baseline", "train", "finetuned", "compare", "report")
# temp files of write_atomic / the feature cache, left only by a killed process
STALE_FILE_PREFIXES = (".config.yaml.", ".timings.json.", ".comparison.", ".features.")


# ------------------------------------------------------------------ run folder


class Run:
    """A run folder with its resolved config and a lazily loaded model."""

    def __init__(self, root: Path, cfg: Config, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.cfg = cfg
        self.log = log
        self._loaded = None
        self._tuned = None
        self._store = None
        self.overlap = False  # score the baseline in the background while training
        self._pending: list = []

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
        elif saved.is_file() and not force:
            if load_yaml(saved.read_text(), str(saved)) != cfg.to_dict():
                raise UserError(
                    f"{root} holds a run with a different config; use --force to redo it "
                    "with the new one, or choose another --out"
                )
        run = cls(root, cfg, log)
        w = world()
        if w.is_main:
            run.remove_stale_temporaries()
            if not saved.is_file() or force:
                write_atomic(saved, cfg.to_yaml())
        else:
            run.log = lambda message: None  # one process talks
        barrier()  # the other processes open the folder once the main one has set it up
        return run

    def remove_stale_temporaries(self) -> None:
        """Temp folders and files left by a killed process (never a complete output) are removed."""
        folders = [self.root, self.root / "checkpoints", *self.root.glob("features/*")]
        for folder in folders:
            if not folder.is_dir():
                continue
            for p in folder.glob(".*"):
                if ".tmp-" in p.name and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_file() and p.name.startswith(
                    (".config.yaml.", ".timings.json.", ".comparison.", ".features.")
                ):
                    p.unlink(missing_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def done(self, phase: str) -> bool:
        return {
            "data": self.path("data", "manifest.json"),
            "baseline": self.path("baseline", "metrics.json"),
            "train": self.path("adapter", "adapter_config.json"),
            "finetuned": self.path("finetuned", "metrics.json"),
            "compare": self.path("comparison.json"),
            "report": self.path("report", "index.html"),
        }[phase].is_file()

    def record_time(self, phase: str, seconds: float) -> None:
        if not world().is_main:
            return
        path = self.path("timings.json")
        doc = json.loads(path.read_text()) if path.is_file() else {"phases": {}}
        doc["phases"][phase] = round(seconds, 3)
        doc["device"] = describe_device()
        write_atomic(path, json.dumps(doc, indent=2))

    # -- model ----------------------------------------------------------------
    def join(self) -> None:
        """Wait for background scoring and features writes; re-raise a scoring error."""
        if self._store is not None:
            self._store.flush()
        while self._pending:
            name, _, future = self._pending.pop(0)
            self.record_time(f"{name} scoring (overlapped with training)", future.result())

    def features(self, images: list[bytes]):
        """Frozen image features from RUN/features (computed once per model and image set)."""
        from captune.run.feature_cache import FeatureStore, model_fingerprint

        loaded = self.base()
        if self._store is None:
            key = model_fingerprint(loaded.model, loaded.processor, loaded.source)
            self._store = FeatureStore(self.path("features"), key)
        bs, device = self.cfg.eval.batch_size, loaded.device
        return self._store.get(loaded.model, loaded.processor, images, batch_size=bs, device=device, world=world())

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


# ------------------------------------------------------------------ preflight


def _hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def preflight(cfg: Config) -> None:
    """Cheap checks that fail at once, before any heavy step."""
    from captune.model.load import BUILTIN_DEMO, resolve_device

    kind, _ = parse_source(cfg.data.source)
    needs_hub = []
    if kind == "hub":
        needs_hub.append(f"dataset {cfg.data.source}")
    name = cfg.model.name_or_path
    if name != BUILTIN_DEMO and not Path(name).expanduser().exists():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                name, revision=cfg.model.revision, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
            )
        except Exception:
            needs_hub.append(f"model {name}")
    if needs_hub and not _hub_reachable():
        raise UserError(
            f"recipe '{cfg.name}' needs the Hugging Face Hub for {' and '.join(needs_hub)}, and the Hub "
            "cannot be reached; run it on a machine with internet, or download them and point "
            "data.source / model.name_or_path at local copies"
        )
    resolve_device(cfg.model.device)


# ------------------------------------------------------------------ phases


def phase_data(run: Run, force: bool = False) -> None:
    prepare(run.cfg.data, run.path("data"), force=force, log=run.log)


def _eval_examples(run: Run):
    examples = load_split(run.path("data"), run.cfg.eval.split)
    if run.cfg.eval.max_images:
        examples = examples[: run.cfg.eval.max_images]
    if not examples:
        raise UserError(f"the {run.cfg.eval.split} split is empty; change data.ratios")
    return examples


def evaluate(run: Run, model, processor, out_name: str) -> None:
    """Caption the eval split with ``model``; write predictions.jsonl and metrics.json.

    Scoring runs on the CPU (and in Java). When ``run.overlap`` is set, the baseline's
    scoring goes on in a background thread while the GPU trains; ``run.join()``
    waits for it before anything reads its metrics.
    """
    from captune.model.lora import adapter_touches_vision
    from captune.ops.features import image_features
    from captune.ops.generation import caption_features

    examples = _eval_examples(run)
    t0 = time.perf_counter()
    if adapter_touches_vision(model):  # a trained Q-Former: the cached base features do not apply
        loaded = run.base()
        images = [e.image for e in examples]
        feats = image_features(model, processor, images, batch_size=run.cfg.eval.batch_size, device=loaded.device)
    else:
        feats = run.features([e.image for e in examples])
    w = world()
    if w.distributed:  # each process captions every size-th image; the main one gathers them once
        mine = list(range(w.rank, len(examples), w.size))
        part = caption_features(model, processor.tokenizer, feats[mine], run.cfg.eval, run.cfg.model.prompt)
        captions = gather_strided_objects(part, len(examples))
        if not w.is_main:
            return
    else:
        captions = caption_features(model, processor.tokenizer, feats, run.cfg.eval, run.cfg.model.prompt)
    gen_s = time.perf_counter() - t0
    run.log(f"  {out_name}: {len(examples)} images captioned in {gen_s:.1f}s")
    if run.overlap and out_name == "baseline":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        run._pending.append(
            (out_name, time.perf_counter(), pool.submit(_score_and_write, run, examples, captions, out_name, gen_s))
        )
        pool.shutdown(wait=False)
        run.log(f"  {out_name}: scoring in the background")
        return
    _score_and_write(run, examples, captions, out_name, gen_s)


def _score_and_write(run: Run, examples, captions: list[str], out_name: str, gen_s: float) -> float:
    from captune.evaluation.metrics import score_captions
    from captune.evaluation.seed_metrics import seed_compatible

    t1 = time.perf_counter()
    preds = {e.image_id: c for e, c in zip(examples, captions, strict=True)}
    refs = {e.image_id: e.captions for e in examples}
    scores = score_captions(preds, refs, spice=True)
    seed = seed_compatible(preds, refs)
    score_s = time.perf_counter() - t1
    # The official metrics are top-level keys (the run-folder contract); the rest describes them.
    doc = {
        **scores.corpus,
        "split": run.cfg.eval.split,
        "images": len(examples),
        "references": sum(len(e.captions) for e in examples),
        "unavailable": scores.unavailable,
        "seed_compatible": seed,
        "seconds": {"generation": round(gen_s, 3), "scoring": round(score_s, 3)},
        "image_ids": scores.image_ids,
        "per_image": scores.per_image,
        "bleu_stats": scores.bleu_stats,
    }
    with staged_dir(run.path(out_name)) as tmp:
        with (tmp / "predictions.jsonl").open("w") as f:
            for e, c in zip(examples, captions, strict=True):
                f.write(json.dumps({"image_id": e.image_id, "caption": c, "references": e.captions}) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=2))
        attributes.write_side(tmp, run.cfg.data.source, examples, captions)  # demo runs: attributes.json
    shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.corpus.items())
    run.log(f"  {out_name}: scored in {score_s:.1f}s: {shown}")
    return score_s


def phase_baseline(run: Run, force: bool = False) -> None:
    loaded = run.base()
    evaluate(run, loaded.model, loaded.processor, "baseline")


def _cider_fn():
    from captune.evaluation.metrics import score_captions

    def score(captions: list[str], refs: list[list[str]]) -> float:
        ids = [str(i) for i in range(len(captions))]
        scores = score_captions(
            dict(zip(ids, captions, strict=True)), dict(zip(ids, refs, strict=True)), metrics=("CIDEr",)
        )
        return scores.corpus["CIDEr"]

    return score


def phase_train(run: Run, force: bool = False) -> None:
    import torch

    from captune.model.lora import attach_lora, count_parameters
    from captune.training import train

    if force:
        shutil.rmtree(run.path("checkpoints"), ignore_errors=True)
    loaded = run.base()
    torch.manual_seed(run.cfg.train.seed)  # LoRA's A matrices are initialised from this
    model = attach_lora(loaded.model, run.cfg.lora)
    trainable, total = count_parameters(model)
    run.log(f"  LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    train_ex = load_split(run.path("data"), "train")
    val_ex = load_split(run.path("data"), "validation")

    def attempt(cfg):
        return train(
            model,
            loaded.processor,
            train_ex,
            val_ex,
            cfg,
            log_path=run.path("logs", "train.jsonl"),
            log=run.log,
            score_fn=_cider_fn(),
            feature_fn=run.features,
            checkpoint_dir=run.path("checkpoints"),
        )

    result, used = train_within_memory(run, model, attempt)
    sharded = result.adapter_state is not None
    if sharded:  # the loaded language model is FSDP shards now: later phases load the model again
        run._loaded = run._tuned = None
    else:
        run._tuned = model
    if not world().is_main:
        return
    t0 = time.perf_counter()
    with staged_dir(run.path("adapter")) as tmp:
        model.save_pretrained(tmp, **({"state_dict": result.adapter_state} if sharded else {}))
        loaded.processor.save_pretrained(tmp)
        (tmp / "captune_config.yaml").write_text(used.to_yaml())
        (tmp / "training.json").write_text(
            json.dumps(
                {
                    "steps": result.steps,
                    "best_step": result.best_step,
                    "best_validation": result.best,
                    "stopped_early": result.stopped_early,
                    "samples_per_s": result.samples_per_s,
                    "seconds": result.seconds,
                },
                indent=2,
            )
        )
    run.log(f"  adapter written to {run.path('adapter')} in {time.perf_counter() - t0:.1f}s")


def train_within_memory(run: Run, model, attempt: Callable):
    """``attempt(cfg)`` with the run's config; if the GPU runs out of memory, again from the start
    with half the micro-batch and twice the accumulation (the same pairs per optimizer step),
    down to one pair. Returns the result and the config that fitted. Under several processes an
    out-of-memory error stops the run (the others could not follow a retry)."""
    import torch

    from captune.training import latest_checkpoint

    cfg = run.cfg
    last = latest_checkpoint(run.path("checkpoints"))
    if last is not None:  # resume with the micro-batch the checkpoint was written with
        st = json.loads((last / "state.json").read_text())
        sizes = (st.get("batch_size", cfg.train.batch_size), st.get("grad_accum", cfg.train.grad_accum))
        if sizes != (cfg.train.batch_size, cfg.train.grad_accum):
            cfg = copy.deepcopy(cfg)
            cfg.train.batch_size, cfg.train.grad_accum = sizes
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    while True:
        try:
            return attempt(cfg), cfg
        except torch.OutOfMemoryError:
            t = cfg.train
            if world().distributed:
                raise
            if t.batch_size < 2:
                raise UserError(
                    "GPU out of memory in phase train even with one pair per micro-batch; use "
                    "model.quantization=4bit (or 8bit), a smaller model, or a GPU with more memory"
                ) from None
        # out of the except block: the failed attempt's frames (and their tensors) are released
        smaller = copy.deepcopy(cfg)
        smaller.train.batch_size, smaller.train.grad_accum = t.batch_size // 2, t.grad_accum * 2
        run.log(
            f"  GPU out of memory at train.batch_size={t.batch_size}; starting again with "
            f"train.batch_size={smaller.train.batch_size} train.grad_accum={smaller.train.grad_accum} "
            f"(the same {t.batch_size * t.grad_accum} pairs per step)"
        )
        cfg = smaller
        shutil.rmtree(run.path("checkpoints"), ignore_errors=True)  # positions counted in old micro-batches
        with torch.no_grad():
            for k, v in model.named_parameters():
                if k in initial:
                    v.copy_(initial[k])
        model.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _tuned_model(run: Run):
    if run._tuned is not None:
        return run._tuned
    from peft import PeftModel

    loaded = run.base()
    run._tuned = PeftModel.from_pretrained(loaded.model, str(run.path("adapter")))
    run._tuned.eval()
    return run._tuned


def phase_finetuned(run: Run, force: bool = False) -> None:
    if not run.done("train"):
        raise UserError(f"{run.root} has no adapter yet; run 'captune train {run.root}' first")
    evaluate(run, _tuned_model(run), run.base().processor, "finetuned")


def phase_compare(run: Run, force: bool = False) -> dict:
    from captune.evaluation.compare import compare, markdown_table

    for side in ("baseline", "finetuned"):
        if not run.done(side):
            raise UserError(f"{run.root} has no {side} metrics; run 'captune eval {run.root}' first")
    base = json.loads(run.path("baseline", "metrics.json").read_text())
    tuned = json.loads(run.path("finetuned", "metrics.json").read_text())
    comparison = compare(base, tuned, samples=run.cfg.eval.bootstrap, seed=run.cfg.eval.seed)
    if attributes.applies(run.cfg.data.source):
        comparison["attributes"] = attributes.compare_sides(run.path("baseline"), run.path("finetuned"))
    table = markdown_table(comparison) + attributes.markdown(comparison.get("attributes"))
    write_atomic(run.path("comparison.json"), json.dumps(comparison, indent=2))
    write_atomic(run.path("comparison.md"), table + "\n")
    run.log("\n" + table + "\n")
    return comparison


def phase_report(run: Run, force: bool = False) -> None:
    from captune.report import build_report

    if not run.done("compare"):
        phase_compare(run)
    images = {e.image_id: e.image for e in _eval_examples(run)}
    page, md = build_report(run.root, run.cfg, images)
    with staged_dir(run.path("report")) as tmp:
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "report.md").write_text(md, encoding="utf-8")
    run.log(f"  report: {run.path('report', 'index.html')}")


PHASE_FUNCS = {
    "data": phase_data,
    "baseline": phase_baseline,
    "train": phase_train,
    "finetuned": phase_finetuned,
    "compare": phase_compare,
    "report": phase_report,
}


def run_phases(run: Run, phases: tuple[str, ...] = PHASES, *, force: bool = False) -> None:
    run.overlap = "baseline" in phases and "train" in phases
    try:
        _run_phases(run, phases, force)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            run.join()
        raise
    run.join()


# Phases every process takes part in under a launcher; the main process alone does the others
# while the rest wait (if it fails, the launcher stops them).
SHARED_PHASES = ("baseline", "train", "finetuned")


def _run_phases(run: Run, phases: tuple[str, ...], force: bool) -> None:
    w = world()
    for phase in phases:
        if w.distributed:
            if phase in SHARED_PHASES and all_agree(not run.done(phase) or force):
                _run_phase(run, phase, force)
            elif w.is_main:
                _run_phase(run, phase, force)
            barrier()
            continue
        _run_phase(run, phase, force)


def _run_phase(run: Run, phase: str, force: bool) -> None:
    if phase in ("compare", "report"):
        run.join()
    if run.done(phase) and not force:
        run.log(f"[{phase}] complete, skipped (use --force to redo)")
        return
    run.log(f"[{phase}]")
    t0 = time.perf_counter()
    try:
        PHASE_FUNCS[phase](run, force=force)
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        t, e = run.cfg.train, run.cfg.eval
        raise UserError(
            f"GPU out of memory in phase {phase} (train.batch_size={t.batch_size}, "
            f"eval.batch_size={e.batch_size}); lower them, e.g. train.batch_size={max(1, t.batch_size // 2)} "
            f"train.grad_accum={t.grad_accum * 2} eval.batch_size={max(1, e.batch_size // 2)}"
        ) from None
    seconds = time.perf_counter() - t0
    run.record_time(phase, seconds)
    run.log(f"[{phase}] done in {seconds:.1f}s")

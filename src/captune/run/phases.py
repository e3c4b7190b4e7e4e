"""The phases of a run, in order: data, baseline, train, finetuned, scst, compare, report.

``scst`` (self-critical training, ``rl.*``) runs only when ``rl.enabled``: it starts from the
cross-entropy adapter (RUN/adapter), writes RUN/adapter-scst and scores it into
RUN/finetuned-scst; RUN/finetuned stays the cross-entropy adapter's."""

from __future__ import annotations

import contextlib
import json
import shutil
import time

from captune.atomic import staged_dir, write_atomic
from captune.data.prepare import load_split, prepare
from captune.demo import attributes
from captune.distributed import all_agree, barrier, world
from captune.errors import UserError, is_out_of_memory, out_of_memory
from captune.evaluation.evaluate import cider_scorer, eval_examples, evaluate
from captune.run.folder import PHASES, Run
from captune.training.memory import train_within_memory


def validation_examples(run: Run):
    """The validation split, or its seeded sample of ``train.val_images``."""
    from captune.data.cache import sample_examples

    cfg = run.cfg
    return sample_examples(load_split(run.path("data"), "validation"), cfg.train.val_images, cfg.data.seed)


def phase_data(run: Run, force: bool = False) -> None:
    from captune.demo.vocabulary import warn_unknown_words

    prepare(run.cfg.data, run.path("data"), force=force, log=run.log)
    warn_unknown_words(run.cfg, run.path("data"), run.log)  # the demo model on other captions


def phase_baseline(run: Run, force: bool = False) -> None:
    loaded = run.base()
    evaluate(run, loaded.model, loaded.processor, "baseline")


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
    val_ex = validation_examples(run)

    def attempt(cfg):
        return train(
            model,
            loaded.processor,
            train_ex,
            val_ex,
            cfg,
            log_path=run.path("logs", "train.jsonl"),
            log=run.log,
            score_fn=cider_scorer(),
            feature_fn=run.features,
            checkpoint_dir=run.path("checkpoints"),
        )

    result, used = train_within_memory(run.cfg, model, attempt, checkpoint_dir=run.path("checkpoints"), log=run.log)
    sharded = result.adapter_state is not None
    if sharded:  # the loaded language model is shards or partitions now: later phases load it again
        run.forget_models()
    else:
        run.keep_tuned(model)
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


def phase_finetuned(run: Run, force: bool = False) -> None:
    if not run.done("train"):
        raise UserError(f"{run.root} has no adapter yet; run 'captune train {run.root}' first")
    evaluate(run, run.tuned(), run.base().processor, "finetuned")


def phase_scst(run: Run, force: bool = False) -> None:
    """SCST from the cross-entropy adapter: RUN/adapter-scst, then its evaluation in RUN/finetuned-scst.

    The adapter is trained in place on the run's fine-tuned model; the cross-entropy weights are
    put back afterwards, so that whatever reads ``run.tuned()`` later gets the adapter of RUN/adapter."""
    from captune.model.lora import trainable_state

    if not run.done("train"):
        raise UserError(f"{run.root} has no adapter yet; run 'captune train {run.root}' first")
    if force:
        shutil.rmtree(run.path("checkpoints-scst"), ignore_errors=True)
        shutil.rmtree(run.path("adapter-scst"), ignore_errors=True)
    model, processor = run.tuned(), run.base().processor
    for name, p in model.named_parameters():  # a loaded adapter is frozen: SCST trains its LoRA weights
        p.requires_grad_("lora_" in name)
    start = trainable_state(model)
    try:
        if run.path("adapter-scst", "adapter_config.json").is_file():
            _load_adapter_weights(model, run.path("adapter-scst"))
            run.log("  SCST adapter complete, loaded from adapter-scst (use --force to redo)")
        else:
            _train_scst(run, model, processor)
        evaluate(run, model, processor, "finetuned-scst")
    finally:
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():
                params[name].copy_(value)
        model.eval()


def _load_adapter_weights(model, folder) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))


def _train_scst(run: Run, model, processor) -> None:
    from captune.training.scst import train_scst

    result = train_scst(
        model,
        processor,
        load_split(run.path("data"), "train"),
        validation_examples(run),
        run.cfg,
        log_path=run.path("logs", "scst.jsonl"),
        log=run.log,
        score_fn=cider_scorer(),
        feature_fn=run.features,
        checkpoint_dir=run.path("checkpoints-scst"),
    )
    if not world().is_main:
        return
    with staged_dir(run.path("adapter-scst")) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "captune_config.yaml").write_text(run.cfg.to_yaml())
        doc = {"steps": result.steps, "best_step": result.best_step, "best_validation": result.best,
               "images_per_s": result.images_per_s, "seconds": result.seconds}  # fmt: skip
        (tmp / "training.json").write_text(json.dumps(doc, indent=2))
    run.log(f"  SCST adapter written to {run.path('adapter-scst')}")


def phase_compare(run: Run, force: bool = False) -> dict:
    from captune.evaluation.compare import compare, markdown_table

    for side in ("baseline", "finetuned"):
        if not run.done(side):
            raise UserError(f"{run.root} has no {side} metrics; run 'captune eval {run.root}' first")
    base = json.loads(run.path("baseline", "metrics.json").read_text())
    tuned = json.loads(run.path("finetuned", "metrics.json").read_text())
    comparison = compare(base, tuned, samples=run.cfg.eval.bootstrap, seed=run.cfg.eval.seed)
    sides_have_captions = all(run.path(s, "predictions.jsonl").is_file() for s in ("baseline", "finetuned"))
    if attributes.applies(run.cfg.data.source) and sides_have_captions:
        comparison["attributes"] = attributes.compare_sides(run.path("baseline"), run.path("finetuned"))
    table = markdown_table(comparison) + attributes.markdown(comparison.get("attributes"))
    if run.cfg.rl.enabled and run.done("scst"):  # the cross-entropy adapter vs the SCST adapter
        scst = json.loads(run.path("finetuned-scst", "metrics.json").read_text())
        comparison["scst"] = compare(tuned, scst, samples=run.cfg.eval.bootstrap, seed=run.cfg.eval.seed)
        labels = ("cross-entropy", "SCST")
        table += "\n\nCross-entropy adapter vs SCST adapter:\n\n" + markdown_table(comparison["scst"], labels)
    write_atomic(run.path("comparison.json"), json.dumps(comparison, indent=2))
    write_atomic(run.path("comparison.md"), table + "\n")
    run.log("\n" + table + "\n")
    return comparison


def phase_report(run: Run, force: bool = False) -> None:
    from captune.report import build_report

    if not run.done("compare"):
        phase_compare(run)
    images = eval_examples(run).images_by_id()  # read on lookup: the report shows a few
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
    "scst": phase_scst,
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
SHARED_PHASES = ("baseline", "train", "finetuned", "scst")


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
    if phase == "scst" and not run.cfg.rl.enabled:
        run.log("[scst] off (rl.enabled is false), skipped")
        return
    if run.done(phase) and not force:
        run.log(f"[{phase}] complete, skipped (use --force to redo)")
        return
    run.log(f"[{phase}]")
    t0 = time.perf_counter()
    try:
        PHASE_FUNCS[phase](run, force=force)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        t = run.cfg.train
        raise UserError(
            out_of_memory(f"in phase {phase}", t.batch_size, t.grad_accum, run.cfg.eval.batch_size)
        ) from None
    seconds = time.perf_counter() - t0
    run.record_time(phase, seconds)
    run.log(f"[{phase}] done in {seconds:.1f}s")

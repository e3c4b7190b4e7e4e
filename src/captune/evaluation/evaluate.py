"""Caption a run's evaluation split and score it: predictions.jsonl and metrics.json."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from captune.atomic import staged_dir
from captune.data.cache import Example, as_images
from captune.data.prepare import load_split
from captune.demo import attributes
from captune.distributed import gather_strided_objects, world
from captune.errors import UserError
from captune.evaluation import background
from captune.run.folder import Run

# Images captioned per call; predictions are written after each. A split of up to this many is
# captioned in one call, exactly as before (the fast decoder sizes its batches by the call).
CAPTION_CHUNK = 8192


def eval_examples(run: Run) -> Sequence[Example]:
    """The evaluation split (its first ``eval.max_images``), read lazily: no image bytes held."""
    examples = load_split(run.path("data"), run.cfg.eval.split)
    if run.cfg.eval.max_images:
        examples = examples[: run.cfg.eval.max_images]
    if not examples:
        raise UserError(f"the {run.cfg.eval.split} split is empty; change data.ratios")
    return examples


def evaluate(run: Run, model, processor, out_name: str) -> None:
    """Caption the eval split with ``model``; write predictions.jsonl and metrics.json.

    Predictions go to a temporary file as they are made (``CAPTION_CHUNK`` images at a time);
    scoring reads that file. Scoring runs on the CPU (and in Java). When ``run.overlap`` is
    set, the baseline's scoring goes on in the background while the GPU trains (in the run's
    scoring process, ``evaluation.background``); ``run.join()`` waits for it before anything reads
    its metrics. With a scoring process, the other splits are scored there too (one METEOR JVM).
    """
    from captune.model.lora import adapter_touches_vision
    from captune.ops.features import image_features
    from captune.ops.generation import caption_features

    examples = eval_examples(run)
    t0 = time.perf_counter()
    if adapter_touches_vision(model):  # a trained Q-Former: the cached base features do not apply
        loaded = run.base()
        images = as_images(examples)
        feats = image_features(model, processor, images, batch_size=run.cfg.eval.batch_size, device=loaded.device)
    else:
        feats = run.features(as_images(examples))
    w = world()
    predictions = run.path(f".{out_name}-predictions.jsonl.partial")

    def caption(part) -> list[str]:
        return caption_features(model, processor.tokenizer, part, run.cfg.eval, run.cfg.model.prompt)

    if w.distributed:  # each process captions every size-th image; the main one gathers them once
        mine = list(range(w.rank, len(examples), w.size))
        captions = gather_strided_objects(caption(feats[mine]), len(examples))
        if not w.is_main:
            return
        _write_predictions(predictions, [(examples, captions)])
    else:
        chunks = range(0, len(examples), CAPTION_CHUNK)
        parts = ((examples[i : i + CAPTION_CHUNK], caption(feats[i : i + CAPTION_CHUNK])) for i in chunks)
        _write_predictions(predictions, parts)
    gen_s = time.perf_counter() - t0
    run.log(f"  {out_name}: {len(examples)} images captioned in {gen_s:.1f}s")
    job = (score_split, run.root, run.cfg, out_name, predictions, gen_s)
    if run.overlap and out_name == "baseline":
        run.in_background(f"{out_name} scoring (overlapped with training)", *job)
        run.log(f"  {out_name}: scoring in the background")
        return
    if background.separate():  # the run's scoring process (and its METEOR) scores this split too
        _, lines = background.submit(*job).result()
        for line in lines:
            run.log(line)
        return
    _score_and_write(run, examples, predictions, out_name, gen_s)


def score_split(root: Path, cfg, out_name: str, predictions: Path, gen_s: float) -> tuple[float, list[str]]:
    """``_score_and_write`` for the run folder ``root`` (what the scoring process is sent): the
    seconds it took and the lines it would have logged."""
    lines: list[str] = []
    run = Run(root, cfg, log=lines.append)
    return _score_and_write(run, eval_examples(run), predictions, out_name, gen_s), lines


def _write_predictions(path: Path, parts) -> None:
    """predictions.jsonl rows ({"image_id", "caption", "references"}), written part by part."""
    with path.open("w", encoding="utf-8") as f:
        for examples, captions in parts:
            for e, c in zip(examples, captions, strict=True):
                f.write(json.dumps({"image_id": e.image_id, "caption": c, "references": e.captions}) + "\n")


def _read_predictions(path: Path, fields: tuple[str, ...]):
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield tuple(row[k] for k in fields)


def _score_and_write(run: Run, examples, predictions: Path, out_name: str, gen_s: float) -> float:
    from captune.evaluation.clipscore import OFF, add_clip_scores
    from captune.evaluation.metrics import score_file
    from captune.evaluation.seed_metrics import seed_compatible

    t1 = time.perf_counter()
    scores = score_file(predictions, spice=True)
    if str(run.cfg.eval.clip_model).strip().lower() not in OFF:  # CLIP needs every caption and image
        rows = list(_read_predictions(predictions, ("caption", "references")))
        clip_note = add_clip_scores(
            scores, as_images(examples), [r[0] for r in rows], [r[1] for r in rows], run.cfg.eval.clip_model
        )
        if clip_note:
            run.log(f"  {out_name}: {clip_note}")
    first = {i: [refs[0]] for i, _, refs in _read_predictions(predictions, ("image_id", "caption", "references"))}
    seed = seed_compatible(dict(_read_predictions(predictions, ("image_id", "caption"))), first)
    del first
    score_s = time.perf_counter() - t1
    # The official metrics are top-level keys (the run-folder contract); the rest describes them.
    doc = {
        **scores.corpus,
        "split": run.cfg.eval.split,
        "images": len(examples),
        "references": sum(len(refs) for (refs,) in _read_predictions(predictions, ("references",))),
        "unavailable": scores.unavailable,
        "seed_compatible": seed,
        "seconds": {"generation": round(gen_s, 3), "scoring": round(score_s, 3)},
        "image_ids": scores.image_ids,
        "per_image": scores.per_image,
        "bleu_stats": scores.bleu_stats,
        "meteor_stats": scores.meteor_stats,
    }
    with staged_dir(run.path(out_name)) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=2))
        if attributes.applies(run.cfg.data.source):  # demo runs: attributes.json
            captions = [c for (c,) in _read_predictions(predictions, ("caption",))]
            attributes.write_side(tmp, run.cfg.data.source, examples, captions)
        os.replace(predictions, tmp / "predictions.jsonl")
    shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.corpus.items())
    run.log(f"  {out_name}: scored in {score_s:.1f}s: {shown}")
    return score_s


def cider_scorer():
    """Corpus CIDEr-D of captions against their references: ``(captions, refs) -> float``, a plain
    function, so that the scoring process can run it."""
    return cider_score


def cider_score(captions: list[str], refs: list[list[str]]) -> float:
    from captune.evaluation.metrics import score_captions

    ids = [str(i) for i in range(len(captions))]
    gts, res = dict(zip(ids, refs, strict=True)), dict(zip(ids, captions, strict=True))
    scores = score_captions(res, gts, metrics=("CIDEr",))
    return scores.corpus["CIDEr"]

"""Caption a run's evaluation split and score it: predictions.jsonl and metrics.json."""

from __future__ import annotations

import json
import time

from captune.atomic import staged_dir
from captune.data.prepare import load_split
from captune.demo import attributes
from captune.distributed import gather_strided_objects, world
from captune.errors import UserError
from captune.run.folder import Run


def eval_examples(run: Run):
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

    examples = eval_examples(run)
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
        run.in_background(f"{out_name} scoring (overlapped with training)", _score_and_write, run, examples,
                          captions, out_name, gen_s)  # fmt: skip
        run.log(f"  {out_name}: scoring in the background")
        return
    _score_and_write(run, examples, captions, out_name, gen_s)


def _score_and_write(run: Run, examples, captions: list[str], out_name: str, gen_s: float) -> float:
    from captune.evaluation.clipscore import add_clip_scores
    from captune.evaluation.metrics import score_captions
    from captune.evaluation.seed_metrics import seed_compatible

    t1 = time.perf_counter()
    preds = {e.image_id: c for e, c in zip(examples, captions, strict=True)}
    refs = {e.image_id: e.captions for e in examples}
    scores = score_captions(preds, refs, spice=True)
    clip_note = add_clip_scores(
        scores, [e.image for e in examples], captions, [refs[i] for i in preds], run.cfg.eval.clip_model
    )
    if clip_note:
        run.log(f"  {out_name}: {clip_note}")
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
        "meteor_stats": scores.meteor_stats,
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


def cider_scorer():
    from captune.evaluation.metrics import score_captions

    def score(captions: list[str], refs: list[list[str]]) -> float:
        ids = [str(i) for i in range(len(captions))]
        scores = score_captions(
            dict(zip(ids, captions, strict=True)), dict(zip(ids, refs, strict=True)), metrics=("CIDEr",)
        )
        return scores.corpus["CIDEr"]

    return score

"""Baseline vs fine-tuned: the seed-style table plus bootstrap intervals and paired tests.

Intervals resample images (with replacement) and recompute each metric on the resample
exactly as the number beside it is computed, so every interval is of that number:

* BLEU-n: corpus BLEU from the resample's summed n-gram statistics;
* METEOR: corpus METEOR 1.5 from the resample's summed alignment statistics, with the
  jar's own aggregation (``corpus_meteor_from_stats``; a test holds it against the jar);
* CIDEr-D, ROUGE-L, SPICE, CLIPScore, RefCLIPScore: their corpus score is the mean of
  per-image scores, so the resample's mean is its corpus score (CIDEr-D's IDF stays that of
  the full test set, as the point estimate's does).

Run folders scored before METEOR statistics were kept fall back to the per-image mean of
METEOR and say so (``interval_of``).
"""

from __future__ import annotations

import numpy as np

from captune.evaluation.metrics import OFFICIAL, corpus_bleu_from_stats, corpus_meteor_from_stats, meteor_summable
from captune.evaluation.seed_metrics import LABEL

EXTRA = ("SPICE", "CLIPScore", "RefCLIPScore")
# Below this many test images the intervals are too wide (and too unstable) to mean much.
SMALL_SPLIT = 100


def _resample_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """How often each image is drawn in each resample, shape (samples, n).

    Sums over a resample are then one matrix product (no samples x n x stats array).
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    flat = (np.arange(samples)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=samples * n).reshape(samples, n).astype(np.float64)


def _exact_corpus(counts: np.ndarray, base_bleu, tuned_bleu, base_meteor, tuned_meteor) -> dict:
    """metric -> (baseline per resample, fine-tuned per resample, baseline point, fine-tuned point)."""
    out: dict[str, tuple] = {}
    if base_bleu and tuned_bleu:
        sb, st = np.asarray(base_bleu, dtype=np.float64), np.asarray(tuned_bleu, dtype=np.float64)
        rb, rt = corpus_bleu_from_stats(counts @ sb), corpus_bleu_from_stats(counts @ st)
        fb, ft = corpus_bleu_from_stats(sb.sum(axis=0)), corpus_bleu_from_stats(st.sum(axis=0))
        for k in range(4):
            out[f"BLEU-{k + 1}"] = (rb[k], rt[k], float(fb[k]), float(ft[k]))
    if base_meteor and tuned_meteor:
        mb, mt = meteor_summable(base_meteor), meteor_summable(tuned_meteor)
        out["METEOR"] = (
            corpus_meteor_from_stats(counts @ mb),
            corpus_meteor_from_stats(counts @ mt),
            float(corpus_meteor_from_stats(mb.sum(axis=0))),
            float(corpus_meteor_from_stats(mt.sum(axis=0))),
        )
    return out


# Below this baseline a relative change says nothing (0.04 -> 4.0 reads +9900%): only the absolute one is shown.
MIN_BASELINE_FOR_PCT = 0.05


def change_pct(baseline: float, finetuned: float) -> float | None:
    """The change in percent of the baseline, or None when the baseline is too small for it to mean much."""
    if abs(baseline) < MIN_BASELINE_FOR_PCT:
        return None
    return (finetuned - baseline) / baseline * 100


def bootstrap(
    base: dict[str, list[float]],
    tuned: dict[str, list[float]],
    *,
    samples: int,
    seed: int,
    base_bleu: list | None = None,
    tuned_bleu: list | None = None,
    base_meteor: list | None = None,
    tuned_meteor: list | None = None,
) -> dict[str, dict]:
    """Percentile 95% intervals for each side and the change, and a paired p-value.

    With per-image BLEU and METEOR statistics those metrics are recomputed as corpus scores on
    each resample; the others are means of per-image scores, which is their corpus score.
    """
    out: dict[str, dict] = {}
    if samples <= 0 or not base:
        return out
    n = len(next(iter(base.values())))
    counts = _resample_counts(n, samples, seed)
    exact = _exact_corpus(counts, base_bleu, tuned_bleu, base_meteor, tuned_meteor)
    for metric in base:
        if metric not in tuned:
            continue
        if metric in exact:
            mb, mt, pb, pt = exact[metric]
            interval_of = "corpus score"
        else:
            b, t = np.asarray(base[metric], dtype=np.float64), np.asarray(tuned[metric], dtype=np.float64)
            mb, mt, pb, pt = counts @ b / n, counts @ t / n, float(b.mean()), float(t.mean())
            interval_of = "per-image mean" if metric == "METEOR" else "corpus score"
        d = mt - mb
        observed = pt - pb
        # Two-sided paired bootstrap p-value: how often the resampled change
        # falls on the other side of zero from the observed one.
        if observed == 0:
            p = 1.0
        else:
            p = max(float(min(1.0, 2 * np.mean(d <= 0 if observed > 0 else d >= 0))), 1.0 / samples)
        out[metric] = {
            "baseline_ci": [float(np.percentile(mb, 2.5)), float(np.percentile(mb, 97.5))],
            "finetuned_ci": [float(np.percentile(mt, 2.5)), float(np.percentile(mt, 97.5))],
            "change_ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "p_value": p,
            # At the floor no resample crossed zero: p is below 1/resamples, not equal to it.
            "p_at_floor": observed != 0 and p <= 1.0 / samples,
            "interval_of": interval_of,
        }
    return out


def format_p(row: dict) -> str:
    """The p-value as printed: ``< 0.001`` at the bootstrap floor (1,000 resamples), else 3 digits."""
    p = row.get("p_value")
    if p is None:
        return "n/a"
    if row.get("p_at_floor"):
        return f"< {p:.3g}"
    return f"{p:.3g}"


def format_pct(row: dict) -> str:
    """A row's change in percent as every output prints it (terminal, Markdown, HTML): ``+1.23%``,
    or ``n/a`` when the baseline is too small for a relative change to mean much."""
    return "n/a" if row.get("change_pct") is None else f"{row['change_pct']:+.2f}%"


def is_clear_change(row: dict) -> bool:
    """Whether the change's 95% interval excludes zero (only such changes are shown as gains or losses)."""
    ci = row.get("change_ci")
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


def small_split_warning(images: int) -> str | None:
    """A one-line warning when the test split is too small for the intervals to mean much."""
    if 0 < images < SMALL_SPLIT:
        return (
            f"warning: only {images} test images (under {SMALL_SPLIT}); the intervals and p-values are "
            "rough, score on a larger split before trusting a change"
        )
    return None


def compare(baseline: dict, finetuned: dict, *, samples: int = 1000, seed: int = 0) -> dict:
    """``baseline``/``finetuned`` are metrics.json documents (metric keys at the top, plus per_image)."""
    pb, pf = baseline.get("per_image", {}), finetuned.get("per_image", {})
    if baseline.get("image_ids") != finetuned.get("image_ids"):
        from captune.errors import UserError

        raise UserError("baseline and fine-tuned predictions cover different images; re-run eval")
    stats = (
        bootstrap(
            pb,
            pf,
            samples=samples,
            seed=seed,
            base_bleu=baseline.get("bleu_stats"),
            tuned_bleu=finetuned.get("bleu_stats"),
            base_meteor=baseline.get("meteor_stats"),
            tuned_meteor=finetuned.get("meteor_stats"),
        )
        if pb and pf
        else {}
    )
    rows = []
    for metric in OFFICIAL + EXTRA:
        if metric not in baseline or metric not in finetuned:
            continue
        b, f = baseline[metric], finetuned[metric]
        row = {
            "metric": metric,
            "baseline": b,
            "finetuned": f,
            "change": f - b,
            "change_pct": change_pct(b, f),
        }
        row.update(stats.get(metric, {}))
        rows.append(row)
    seed_rows = []
    sb, sf = baseline.get("seed_compatible", {}), finetuned.get("seed_compatible", {})
    for metric, b in sb.get("metrics", {}).items():
        f = sf.get("metrics", {}).get(metric)
        if f is not None:
            seed_rows.append(
                {
                    "metric": metric,
                    "baseline": b,
                    "finetuned": f,
                    "change": f - b,
                    "change_pct": change_pct(b, f),
                }
            )
    images = len(baseline.get("image_ids", []))
    warning = small_split_warning(images)
    return {
        "images": images,
        "warnings": [warning] if warning else [],
        "bootstrap_samples": samples,
        "rows": rows,
        "seed_compatible": {
            "protocol": sb.get("protocol"),
            "rows": seed_rows,
            "unavailable": sb.get("unavailable", {}),
        },
    }


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def interval_note(comparison: dict) -> str:
    """What the intervals are of, in one sentence (under every printed table)."""
    approx = [r["metric"] for r in comparison["rows"] if r.get("interval_of") == "per-image mean"]
    note = (
        f"{comparison.get('bootstrap_samples', 0)} paired bootstrap resamples of the test images, each metric "
        "recomputed on each resample exactly as its corpus score is"
    )
    if approx:
        note += f" (except {', '.join(approx)}: mean of per-image scores, scored before statistics were kept)"
    return note + "."


def markdown_table(comparison: dict, labels: tuple[str, str] = ("baseline", "fine-tuned")) -> str:
    """The comparison as Markdown; ``labels`` name its two sides (the columns baseline / finetuned)."""
    lines = [
        f"| metric | {labels[0]} | {labels[1]} | change | change % | 95% CI of change | p |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in comparison["rows"]:
        ci = r.get("change_ci")
        ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
        pct = format_pct(r)
        lines.append(
            f"| {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['finetuned'])} | "
            f"{r['change']:+.4f} | {pct} | {ci_s} | {format_p(r)} |"
        )
    lines += ["", f"95% CI: {interval_note(comparison)}"]
    for warning in comparison.get("warnings", []):
        lines += ["", f"**{warning}**"]
    seed = comparison.get("seed_compatible") or {}
    if seed.get("rows"):
        lines += [
            "",
            f"{LABEL}:",
            "",
            "| metric | baseline | fine-tuned | change % |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in seed["rows"]:
            pct = format_pct(r)
            lines.append(f"| {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['finetuned'])} | {pct} |")
        for metric, why in seed.get("unavailable", {}).items():
            lines.append(f"\n{metric} (single-reference): unavailable, {why}.")
    return "\n".join(lines)

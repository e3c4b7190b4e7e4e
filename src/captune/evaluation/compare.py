"""Baseline vs fine-tuned: the seed-style table plus bootstrap intervals and paired tests.

Intervals resample images (with replacement) and recompute each metric on the
resample. BLEU is recomputed exactly from per-image n-gram statistics; CIDEr-D and
ROUGE-L are means of per-image scores, so their intervals are exact too. METEOR 1.5
aggregates alignment statistics inside Java, so its interval describes the mean of
per-image METEOR and is labelled as such.
"""

from __future__ import annotations

import numpy as np

from captune.evaluation.metrics import OFFICIAL, corpus_bleu_from_stats
from captune.evaluation.seed_metrics import LABEL

EXACT_MEAN = ("CIDEr", "ROUGE-L")
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
) -> dict[str, dict]:
    """Percentile 95% intervals for each side and the change, and a paired p-value.

    With per-image BLEU statistics, BLEU is recomputed exactly on each resample.
    """
    out: dict[str, dict] = {}
    if samples <= 0:
        return out
    rng = np.random.default_rng(seed)
    n = len(next(iter(base.values())))
    idx = rng.integers(0, n, size=(samples, n))
    exact_bleu = {}
    if base_bleu and tuned_bleu:
        sb, st = np.asarray(base_bleu, dtype=np.float64), np.asarray(tuned_bleu, dtype=np.float64)
        rb, rt = corpus_bleu_from_stats(sb[idx].sum(axis=1)), corpus_bleu_from_stats(st[idx].sum(axis=1))
        fb, ft = corpus_bleu_from_stats(sb.sum(axis=0)), corpus_bleu_from_stats(st.sum(axis=0))
        for k in range(4):
            exact_bleu[f"BLEU-{k + 1}"] = (rb[k], rt[k], float(ft[k] - fb[k]))
    for metric in base:
        if metric not in tuned:
            continue
        b, t = np.asarray(base[metric]), np.asarray(tuned[metric])
        if metric in exact_bleu:
            mb, mt, observed = exact_bleu[metric]
        else:
            mb, mt = b[idx].mean(axis=1), t[idx].mean(axis=1)
            observed = float(t.mean() - b.mean())
        d = mt - mb
        # Two-sided paired bootstrap p-value: how often the resampled change
        # falls on the other side of zero from the observed one.
        if observed == 0:
            p = 1.0
        else:
            p = float(min(1.0, 2 * np.mean(d <= 0 if observed > 0 else d >= 0)))
        out[metric] = {
            "baseline_ci": [float(np.percentile(mb, 2.5)), float(np.percentile(mb, 97.5))],
            "finetuned_ci": [float(np.percentile(mt, 2.5)), float(np.percentile(mt, 97.5))],
            "change_ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "p_value": max(p, 1.0 / samples) if observed != 0 else 1.0,
            "interval_of": "corpus score" if metric in EXACT_MEAN or metric in exact_bleu else "per-image mean",
        }
    return out


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
        )
        if pb and pf
        else {}
    )
    rows = []
    for metric in OFFICIAL + ("SPICE",):
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
    return {
        "images": len(baseline.get("image_ids", [])),
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


def markdown_table(comparison: dict) -> str:
    lines = [
        "| metric | baseline | fine-tuned | change | change % | 95% CI of change | p |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in comparison["rows"]:
        ci = r.get("change_ci")
        ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
        pct = "n/a" if r["change_pct"] is None else f"{r['change_pct']:+.2f}%"
        p = r.get("p_value")
        lines.append(
            f"| {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['finetuned'])} | "
            f"{r['change']:+.4f} | {pct} | {ci_s} | {'n/a' if p is None else f'{p:.3g}'} |"
        )
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
            pct = "n/a" if r["change_pct"] is None else f"{r['change_pct']:+.2f}%"
            lines.append(f"| {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['finetuned'])} | {pct} |")
        for metric, why in seed.get("unavailable", {}).items():
            lines.append(f"\n{metric} (single-reference): unavailable, {why}.")
    return "\n".join(lines)

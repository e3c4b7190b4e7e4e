"""Bootstrap intervals and paired tests."""

import numpy as np
import pytest

from captune.evaluation.compare import bootstrap, compare, markdown_table


def _doc(values, stats=None):
    return {
        "CIDEr": float(np.mean(values)),
        "per_image": {"CIDEr": list(values)},
        "image_ids": [str(i) for i in range(len(values))],
        "bleu_stats": stats or [],
    }


def test_clear_improvement_is_significant():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, 300)
    comp = compare(_doc(base), _doc(base + 0.3), samples=500, seed=0)
    row = comp["rows"][0]
    assert row["change"] == pytest.approx(0.3)
    assert row["change_ci"][0] > 0.25 and row["change_ci"][1] < 0.35
    assert row["p_value"] <= 1 / 500 + 1e-12


def test_no_change_is_not_significant():
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.2, 300)
    noise = rng.normal(0, 0.2, 300)
    comp = compare(_doc(base), _doc(base + noise - noise.mean()), samples=500, seed=0)
    row = comp["rows"][0]
    assert row["change_ci"][0] < 0 < row["change_ci"][1]
    assert row["p_value"] > 0.5


def test_bootstrap_is_seeded():
    a = {"CIDEr": list(np.linspace(0, 1, 50))}
    b = {"CIDEr": list(np.linspace(0.1, 1.2, 50))}
    assert bootstrap(a, b, samples=200, seed=3) == bootstrap(a, b, samples=200, seed=3)


def test_exact_bleu_interval_contains_point_estimate():
    from captune.evaluation.metrics import corpus_bleu_from_stats

    rng = np.random.default_rng(2)
    stats_b = [[10, 11, 10, 9, 8, 7, int(rng.integers(4, 9)), 4, 2, 1] for _ in range(200)]
    stats_t = [[10, 10, 10, 9, 8, 7, int(rng.integers(6, 10)), 5, 3, 2] for _ in range(200)]
    per = {"BLEU-1": [0.0] * 200}
    out = bootstrap(per, per, samples=300, seed=0, base_bleu=stats_b, tuned_bleu=stats_t)
    point = float(
        corpus_bleu_from_stats(np.sum(stats_t, axis=0))[0] - corpus_bleu_from_stats(np.sum(stats_b, axis=0))[0]
    )
    lo, hi = out["BLEU-1"]["change_ci"]
    assert lo <= point <= hi and out["BLEU-1"]["interval_of"] == "corpus score"


def test_markdown_table_lists_metrics():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, 50)
    text = markdown_table(compare(_doc(base), _doc(base + 0.1), samples=100, seed=0))
    assert "| CIDEr |" in text and "%" in text


def test_change_in_percent_only_on_a_meaningful_baseline():
    def doc(cider, bleu):
        return {"image_ids": ["a"], "CIDEr": cider, "BLEU-4": bleu}

    result = compare(doc(0.04, 0.2), doc(4.0, 0.3), samples=0)
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["CIDEr"]["change_pct"] is None and rows["CIDEr"]["change"] == pytest.approx(3.96)
    assert rows["BLEU-4"]["change_pct"] == pytest.approx(50.0)
    table = markdown_table(result)
    assert "9900" not in table and "+50.00%" in table

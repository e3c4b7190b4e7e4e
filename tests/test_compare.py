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


def _scored_side(preds, refs):
    from captune.evaluation.metrics import score_captions

    s = score_captions(preds, refs)
    return {
        **s.corpus,
        "image_ids": s.image_ids,
        "per_image": s.per_image,
        "bleu_stats": s.bleu_stats,
        "meteor_stats": s.meteor_stats,
    }


@pytest.fixture(scope="module")
def scored_pair():
    import random

    words = "a an the dog cat man woman red blue small large sits on near table street park with two".split()
    rng = random.Random(11)

    def cap():
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 11)))

    refs = {f"i{n}": [cap() for _ in range(5)] for n in range(150)}
    base = {k: cap() for k in refs}
    # the fine-tuned side copies a reference for a third of the images: a real, uneven gain
    tuned = {k: (v[0] if n % 3 == 0 else cap()) for n, (k, v) in enumerate(refs.items())}
    return _scored_side(base, refs), _scored_side(tuned, refs)


def test_every_interval_contains_its_point_estimate(scored_pair):
    base, tuned = scored_pair
    comp = compare(base, tuned, samples=1000, seed=0)
    metrics = {r["metric"] for r in comp["rows"]}
    assert {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= metrics
    for r in comp["rows"]:
        assert r["interval_of"] == "corpus score", r["metric"]
        for point, ci in ((r["baseline"], r["baseline_ci"]), (r["finetuned"], r["finetuned_ci"])):
            assert ci[0] <= point <= ci[1], (r["metric"], point, ci)
        assert r["change_ci"][0] <= r["change"] <= r["change_ci"][1], r["metric"]


def test_meteor_interval_is_of_corpus_meteor_not_the_per_image_mean(scored_pair):
    """The per-image mean of METEOR is not corpus METEOR; the interval must follow the latter."""
    base, tuned = scored_pair
    comp = compare(base, tuned, samples=300, seed=0)
    row = next(r for r in comp["rows"] if r["metric"] == "METEOR")
    legacy = compare({**base, "meteor_stats": []}, {**tuned, "meteor_stats": []}, samples=300, seed=0)["rows"]
    old = next(r for r in legacy if r["metric"] == "METEOR")
    assert old["interval_of"] == "per-image mean"
    mean_t = float(np.mean(tuned["per_image"]["METEOR"]))
    assert abs(mean_t - tuned["METEOR"]) > 1e-3  # the two numbers differ on this set
    assert row["finetuned_ci"] != old["finetuned_ci"]


def test_p_at_the_floor_prints_as_below_it():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, 300)
    comp = compare(_doc(base), _doc(base + 0.3), samples=1000, seed=0)
    row = comp["rows"][0]
    assert row["p_at_floor"] and row["p_value"] == pytest.approx(0.001)
    text = markdown_table(comp)
    assert "| < 0.001 |" in text and "| 0.001 |" not in text


def test_small_split_warns():
    rng = np.random.default_rng(0)
    small = compare(_doc(rng.normal(0.5, 0.2, 40)), _doc(rng.normal(0.6, 0.2, 40)), samples=100, seed=0)
    assert small["warnings"] and "40 test images" in small["warnings"][0]
    assert "40 test images" in markdown_table(small)
    big = compare(_doc(rng.normal(0.5, 0.2, 150)), _doc(rng.normal(0.6, 0.2, 150)), samples=100, seed=0)
    assert big["warnings"] == []


def test_change_in_percent_only_on_a_meaningful_baseline():
    def doc(cider, bleu):
        return {"image_ids": ["a"], "CIDEr": cider, "BLEU-4": bleu}

    result = compare(doc(0.04, 0.2), doc(4.0, 0.3), samples=0)
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["CIDEr"]["change_pct"] is None and rows["CIDEr"]["change"] == pytest.approx(3.96)
    assert rows["BLEU-4"]["change_pct"] == pytest.approx(50.0)
    table = markdown_table(result)
    assert "9900" not in table and "+50.00%" in table

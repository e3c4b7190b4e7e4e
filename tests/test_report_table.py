"""The report's metric table: honest p-values, colour only for clear changes, small-split warning."""

import numpy as np

from captune.evaluation.compare import compare
from captune.report import metrics_table_html


def _doc(name, values):
    return {
        name: float(np.mean(values)),
        "per_image": {name: list(values)},
        "image_ids": list(map(str, range(len(values)))),
    }


def _merge(*docs):
    out = {"per_image": {}, "image_ids": docs[0]["image_ids"]}
    for d in docs:
        out.update({k: v for k, v in d.items() if k not in ("per_image", "image_ids")})
        out["per_image"].update(d["per_image"])
    return out


def test_only_changes_whose_interval_excludes_zero_are_coloured():
    rng = np.random.default_rng(0)
    base_c, base_r = rng.normal(0.5, 0.2, 60), rng.normal(0.5, 0.2, 60)
    noise = rng.normal(0, 0.2, 60)
    base = _merge(_doc("CIDEr", base_c), _doc("ROUGE-L", base_r))
    # CIDEr: a clear gain; ROUGE-L: a small positive change lost in the noise
    tuned = _merge(_doc("CIDEr", base_c + 0.4), _doc("ROUGE-L", base_r + noise - noise.mean() + 0.001))
    comp = compare(base, tuned, samples=1000, seed=0)
    rows = {r["metric"]: r for r in comp["rows"]}
    assert rows["ROUGE-L"]["change"] > 0 and rows["ROUGE-L"]["change_ci"][0] < 0
    page = metrics_table_html(comp)
    cider_row = next(x for x in page.split("<tr>") if x.startswith("<td>CIDEr"))
    rouge_row = next(x for x in page.split("<tr>") if x.startswith("<td>ROUGE-L"))
    assert "class='up'" in cider_row and "&lt; 0.001" in cider_row
    assert "class='up'" not in rouge_row and "class=''" in rouge_row
    assert "60 test images" in page and "class='warn'" in page


def test_web_page_lists_every_baseline_metric_before_fine_tuning(tmp_path):
    import json

    from captune.serve import metrics_markdown

    (tmp_path / "baseline").mkdir()
    doc = {"BLEU-1": 0.5, "BLEU-4": 0.1, "METEOR": 0.2, "ROUGE-L": 0.4, "CIDEr": 0.9, "CLIPScore": 0.7}
    (tmp_path / "baseline" / "metrics.json").write_text(json.dumps(doc))
    text = metrics_markdown(tmp_path)
    for key in doc:
        assert f"| {key} |" in text

"""Report charts and tables (issue 20): whole-number step ticks, the warm-up's first step on the
curves, the gallery's CIDEr-D label, the single-reference table, one rounding everywhere."""

import io
import re
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from captune.evaluation.compare import compare, markdown_table
from captune.report import gallery_cards, metrics_table_html, svg_line_plot
from captune.training.progress import TrainLog


def _x_ticks(svg: str) -> list[str]:
    return re.findall(r'text-anchor="middle">([^<]+)</text>', svg)[:3]


def test_step_axis_has_whole_number_ticks():
    svg = svg_line_plot({"loss": [(s, 1.0 / s) for s in range(1, 531)]}, title="Loss", x_label="optimizer step")
    ticks = _x_ticks(svg)
    assert ticks == ["1", "266", "530"], ticks
    # a real-valued axis keeps its fractional ticks
    assert _x_ticks(svg_line_plot({"y": [(0.0, 1.0), (0.5, 2.0)]}, title="t", x_label="x"))[1] == "0.25"


def _train_log(log_every: int, total: int) -> TrainLog:
    cfg = SimpleNamespace(trackers=[], progress="off", log_every=log_every)
    return TrainLog(path=None, history=[], train_cfg=cfg, config={}, total_steps=total,
                    position=SimpleNamespace(step=0, seen=0), say=lambda m: None, main=True)  # fmt: skip


def test_first_step_is_logged_so_the_warm_up_shows():
    log = _train_log(log_every=10, total=25)
    for step in range(1, 26):
        log.micro_batch(torch.tensor(float(step)))
        log.optimizer_step(SimpleNamespace(step=step, seen=step * 4), 1, 1e-4 * step, torch.device("cpu"))
    rows = [r for r in log.history if r["type"] == "train"]
    assert [r["step"] for r in rows] == [1, 10, 20, 25]
    assert rows[0]["loss"] == 1.0 and rows[1]["loss"] == np.mean(range(2, 11))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_gallery_label_reads_cider_d_not_uppercased():
    preds = {"a": {"caption": "a red square", "references": ["a red box"]}}
    (card,) = gallery_cards([("a", "largest gain")], preds, preds, {"a": 0.1}, {"a": 0.9}, {"a": _png()})
    assert "<span class='metric'>CIDEr-D</span> 0.10 → 0.90" in card
    from captune.report import CSS

    assert ".card .tag .metric{text-transform:none}" in CSS  # the tag's uppercase would print CIDER-D


def _doc(values, seed_values):
    return {
        "CIDEr": float(np.mean(values)),
        "per_image": {"CIDEr": list(values)},
        "image_ids": [str(i) for i in range(len(values))],
        "seed_compatible": {"protocol": "p", "metrics": seed_values, "unavailable": {"METEOR": "no Java"}},
    }


def test_html_has_the_single_reference_table_with_the_terminal_rounding():
    from captune.report import single_reference_table_html

    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.6, 50)
    comp = compare(_doc(base, {"BLEU-4": 0.2, "CIDEr": 0.5}), _doc(base * 1.123456, {"BLEU-4": 0.2123456,
                   "CIDEr": 0.61}), samples=50, seed=0)  # fmt: skip
    page = single_reference_table_html(comp)
    assert "Single-reference scores" in page and "blip2-lora-coco5k" in page
    assert "<td>BLEU-4</td><td>0.2000</td><td>0.2123</td><td>+6.17%</td>" in page
    assert "METEOR (single-reference): unavailable, no Java." in page
    md = markdown_table(comp)
    assert "| BLEU-4 | 0.2000 | 0.2123 | +6.17% |" in md
    main_pct = f"{comp['rows'][0]['change_pct']:+.2f}%"
    assert main_pct in md and main_pct in metrics_table_html(comp)
    assert single_reference_table_html({"rows": []}) == ""

"""A self-contained HTML report (and a Markdown twin) of one run folder.

Everything the page shows is inside the file: images as data URIs, plots as
inline SVG drawn here (a few lines of SVG beat shipping a plotting stack and keep
the page valid offline), styles inline, no scripts.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path

from captune import summary
from captune.data.images import load_rgb
from captune.demo import attributes
from captune.evaluation.compare import format_p, format_pct, interval_note, is_clear_change, markdown_table
from captune.evaluation.seed_metrics import LABEL

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d232b;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#5b6573;margin-top:0}
table{border-collapse:collapse;margin:1rem 0} th,td{padding:.35rem .7rem;border-bottom:1px solid #dde2e8;
text-align:right} th:first-child,td:first-child{text-align:left}
.up{color:#17803d;font-weight:600} .down{color:#b42318;font-weight:600}
.warn{color:#b54708;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1.5rem} figure{margin:0} figcaption{color:#5b6573;font-size:.9rem}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:1rem}
.card{border:1px solid #dde2e8;border-radius:8px;padding:.7rem;background:#fafbfc}
.card img{width:100%;image-rendering:pixelated;border-radius:4px}
.card .tag{font-size:.75rem;text-transform:uppercase;color:#5b6573} .card .tag .metric{text-transform:none}
.card .base{color:#5b6573} .card .tuned{font-weight:600} .card ul{padding-left:1.1rem;margin:.3rem 0;
font-size:.85rem;color:#3a4350}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem} dt{color:#5b6573}
"""


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file ([] when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def svg_line_plot(
    series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, width: int = 480, height: int = 260
) -> str:
    """A small line plot as inline SVG; each series is a list of (x, y) points."""
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    # Steps are whole numbers: their axis gets whole-number ticks (no "step 265.5").
    whole_x = all(float(p[0]).is_integer() for p in points)
    colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    # Legend lines sit at the top right, above the plotting area, so they never cover a curve.
    pad_l, pad_r, pad_t, pad_b = 56, 12, 30 + 14 * max(0, len(series) - 1), 36
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return pad_t + (1 - (y - y0) / (y1 - y0)) * h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{pad_l}" y="18" font-size="13" font-weight="600">{html.escape(title)}</text>',
        f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#9aa4b2"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#9aa4b2"/>',
    ]
    for frac in (0, 0.5, 1):
        yv = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{pad_l - 6}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end">{yv:.3g}</text>')
        xv = x0 + frac * (x1 - x0)
        xv = round(xv) if whole_x else xv
        parts.append(f'<text x="{sx(xv):.1f}" y="{pad_t + h + 14}" font-size="10" text-anchor="middle">{xv:.4g}</text>')
    parts.append(
        f'<text x="{pad_l + w / 2}" y="{height - 4}" font-size="11" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    for k, (name, pts) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in pts if len(pts) < 30 else []:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        parts.append(
            f'<text x="{pad_l + w - 4}" y="{18 + 14 * k}" font-size="11" '
            f'text-anchor="end" fill="{colour}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def pick_examples(
    ids: list[str], base_cider: list[float], tuned_cider: list[float], k: int, seed: int
) -> list[tuple[str, str]]:
    """(image_id, why) for the largest gains, largest losses and a seeded sample."""
    if k <= 0 or not ids:
        return []
    delta = {i: t - b for i, b, t in zip(ids, base_cider, tuned_cider, strict=False)}
    order = sorted(ids, key=lambda i: delta[i])
    n_each = max(1, k // 3)
    chosen: list[tuple[str, str]] = []
    for i in reversed(order[-n_each:]):
        if delta[i] > 0:
            chosen.append((i, "largest gain"))
    for i in order[:n_each]:
        if delta[i] < 0 and i not in {c for c, _ in chosen}:
            chosen.append((i, "largest loss"))
    rest = [i for i in ids if i not in {c for c, _ in chosen}]
    rng = random.Random(seed)
    for i in rng.sample(rest, min(len(rest), k - len(chosen))):
        chosen.append((i, "random sample"))
    return chosen


def thumbnail_uri(data: bytes, size: int = 256) -> str:
    img = load_rgb(data)
    scale = max(1, size // max(img.size))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale))
    elif max(img.size) > size:
        img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if max(img.size) > 128 else "PNG", quality=85)
    mime = "jpeg" if max(img.size) > 128 else "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def metrics_table_html(comparison: dict) -> str:
    """The before/after table: a change is coloured as a gain or loss only when its 95% interval excludes 0."""
    esc = html.escape
    rows = []
    for r in comparison["rows"]:
        cls = ("up" if r["change"] > 0 else "down") if is_clear_change(r) else ""
        ci = r.get("change_ci")
        pct = format_pct(r)
        rows.append(
            f"<tr><td>{esc(r['metric'])}</td><td>{r['baseline']:.4f}</td><td>{r['finetuned']:.4f}</td>"
            f"<td class='{cls}'>{r['change']:+.4f}</td><td class='{cls}'>{pct}</td>"
            f"<td>{'n/a' if not ci else f'[{ci[0]:+.4f}, {ci[1]:+.4f}]'}</td>"
            f"<td>{esc(format_p(r))}</td></tr>"
        )
    warnings = "".join(f"<p class='warn'>{esc(w)}</p>" for w in comparison.get("warnings", []))
    return (
        '<table id="metrics"><thead><tr><th>metric</th><th>baseline</th><th>fine-tuned</th><th>change</th>'
        f"<th>change %</th><th>95% CI of change</th><th>p</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<p class='sub'>95% CI: {esc(interval_note(comparison))} A change is coloured only when its "
        f"interval excludes 0.</p>{warnings}"
    )


def single_reference_table_html(comparison: dict) -> str:
    """The single-reference scores (first reference per image, computed like the seed notebook's
    table), as the terminal, Markdown report and model card show them; empty when the run has none."""
    esc = html.escape
    seed = comparison.get("seed_compatible") or {}
    if not seed.get("rows") and not seed.get("unavailable"):
        return ""
    rows = "".join(
        f"<tr><td>{esc(r['metric'])}</td><td>{r['baseline']:.4f}</td><td>{r['finetuned']:.4f}</td>"
        f"<td>{format_pct(r)}</td></tr>"
        for r in seed.get("rows", [])
    )
    missing = "".join(
        f"<p class='sub'>{esc(metric)} (single-reference): unavailable, {esc(why)}.</p>"
        for metric, why in seed.get("unavailable", {}).items()
    )
    return (
        f"<h3>{esc(LABEL)}</h3><table id='single-reference'><thead><tr><th>metric</th><th>baseline</th>"
        f"<th>fine-tuned</th><th>change %</th></tr></thead><tbody>{rows}</tbody></table>{missing}"
    )


def metrics_table_pair_html(comparison: dict, labels: tuple[str, str], table_id: str) -> str:
    """``metrics_table_html`` with its two sides named ``labels`` (e.g. cross-entropy vs SCST)."""
    page = metrics_table_html(comparison).replace('<table id="metrics">', f'<table id="{table_id}">', 1)
    return page.replace("<th>baseline</th><th>fine-tuned</th>", f"<th>{labels[0]}</th><th>{labels[1]}</th>", 1)


def scst_section(run: Path, comparison: dict) -> tuple[str, list[str]]:
    """The SCST part of the report (html, markdown lines): the cross-entropy adapter vs the SCST
    adapter with paired intervals, and the curves of reward and validation CIDEr over SCST steps.
    Empty when the run has no SCST comparison."""
    pair = comparison.get("scst")
    if not pair:
        return "", []
    labels = ("cross-entropy", "SCST")
    log = read_jsonl(run / "logs" / "scst.jsonl")
    steps = [r for r in log if r.get("type") == "scst"]
    val = [r for r in log if r.get("type") == "validation" and "CIDEr" in r]
    plots = [
        svg_line_plot(
            {
                "reward (CIDEr-D)": [(r["step"], r["reward"]) for r in steps],
                "baseline": [(r["step"], r["baseline"]) for r in steps],
            },
            title="SCST reward",
            x_label="SCST step",
        ),  # fmt: skip
        svg_line_plot(
            {"advantage std": [(r["step"], r["advantage_std"]) for r in steps]},
            title="SCST advantage spread",
            x_label="SCST step",
        ),  # fmt: skip
        svg_line_plot(
            {"caption length": [(r["step"], r["caption_length"]) for r in steps]},
            title="Sampled caption length (tokens)",
            x_label="SCST step",
        ),  # fmt: skip
        svg_line_plot(
            {"validation CIDEr": [(r["step"], r["CIDEr"]) for r in val]},
            title="SCST validation CIDEr-D",
            x_label="SCST step",
        ),  # fmt: skip
    ]
    figures = "".join(f"<figure>{p}</figure>" for p in plots if p)
    page = (
        "<h2>Cross-entropy adapter vs SCST adapter</h2>"
        + metrics_table_pair_html(pair, labels, "metrics-scst")
        + f"<h2>Self-critical training</h2><div class='plots'>{figures}</div>"
    )
    return page, ["## Cross-entropy adapter vs SCST adapter", "", markdown_table(pair, labels), ""]


def training_plots(log: list[dict]) -> list[str]:
    """Loss (train and validation), learning rate and validation CIDEr-D over optimizer steps, as SVG."""
    train_rows = [r for r in log if r.get("type") == "train"]
    val_rows = [r for r in log if r.get("type") == "validation"]
    return [
        svg_line_plot(
            {
                "train loss": [(r["step"], r["loss"]) for r in train_rows],
                "validation loss": [(r["step"], r["loss"]) for r in val_rows],
            },
            title="Loss",
            x_label="optimizer step",
        ),
        svg_line_plot(
            {"learning rate": [(r["step"], r["lr"]) for r in train_rows]},
            title="Learning rate",
            x_label="optimizer step",
        ),
        svg_line_plot(
            {"validation CIDEr": [(r["step"], r["CIDEr"]) for r in val_rows if "CIDEr" in r]},
            title="Validation CIDEr-D",
            x_label="optimizer step",
        ),
    ]


def gallery_cards(picks, base_p: dict, tuned_p: dict, cider_b: dict, cider_t: dict, images: dict) -> list[str]:
    """One card per picked test image: both captions, their CIDEr-D, the references."""
    esc = html.escape
    cards = []
    for image_id, why in picks:
        refs = "".join(f"<li>{esc(c)}</li>" for c in base_p[image_id]["references"])
        cards.append(
            f"<div class='card'><div class='tag'>{esc(why)} · <span class='metric'>CIDEr-D</span> "
            f"{cider_b[image_id]:.2f} → "
            f"{cider_t[image_id]:.2f}</div><img alt='test image {esc(image_id)}' "
            f"src='{thumbnail_uri(images[image_id])}'><div class='base'>before: {esc(base_p[image_id]['caption'])}"
            f"</div><div class='tuned'>after: {esc(tuned_p[image_id]['caption'])}</div>"
            f"<div class='tag'>references</div><ul>{refs}</ul></div>"
        )
    return cards


def build_report(run: Path, cfg, images: dict[str, bytes]) -> tuple[str, str]:
    """(html, markdown) for the run folder ``run``."""
    comparison = json.loads((run / "comparison.json").read_text())
    base_m = json.loads((run / "baseline" / "metrics.json").read_text())
    tuned_m = json.loads((run / "finetuned" / "metrics.json").read_text())
    base_p = {r["image_id"]: r for r in read_jsonl(run / "baseline" / "predictions.jsonl")}
    tuned_p = {r["image_id"]: r for r in read_jsonl(run / "finetuned" / "predictions.jsonl")}
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    log = read_jsonl(run / "logs" / "train.jsonl")

    plots = training_plots(log)
    ids = base_m["image_ids"]
    picks = pick_examples(
        ids, base_m["per_image"]["CIDEr"], tuned_m["per_image"]["CIDEr"], cfg.report.examples, cfg.report.seed
    )
    tuned_attrs = run / "finetuned" / "attributes.json"
    if tuned_attrs.is_file():  # a demo run: a spread of right and wrong captions by the world's truth
        picks = attributes.pick_spread(
            json.loads(tuned_attrs.read_text())["per_image"], cfg.report.examples, cfg.report.seed
        )
    cider_b = dict(zip(ids, base_m["per_image"]["CIDEr"], strict=False))
    cider_t = dict(zip(ids, tuned_m["per_image"]["CIDEr"], strict=False))

    esc = html.escape
    cards = gallery_cards(picks, base_p, tuned_p, cider_b, cider_t, images)
    counts = manifest["counts"]
    timing_rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.get("phases", {}).items())
    skipped = manifest.get("skipped", [])
    scst_html, scst_md = scst_section(run, comparison)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>captune report: {esc(summary.title(cfg))}</title><style>{CSS}</style></head><body>
<h1>captune report: {esc(summary.title(cfg))}</h1>
<p class="sub">{esc(summary.description(cfg))}</p>
<h2>Recipe and data</h2>
<dl><dt>base model</dt><dd>{esc(cfg.model.name_or_path)}</dd>
<dt>LoRA</dt><dd>r {cfg.lora.r}, alpha {cfg.lora.alpha}, dropout {cfg.lora.dropout},
targets {esc(str(cfg.lora.target_modules))}</dd>
<dt>training</dt><dd>{cfg.train.epochs} epochs, batch {cfg.train.batch_size} × {cfg.train.grad_accum},
lr {cfg.train.lr:g} ({esc(cfg.train.schedule)}), keep best by {esc(cfg.train.select)}</dd>
<dt>data source</dt><dd>{esc(manifest["source"])}</dd>
<dt>images</dt><dd>{manifest["images"]} ({manifest["references"]} references);
train {counts["train"]} / validation {counts["validation"]} / test {counts["test"]}</dd>
<dt>skipped</dt><dd>{len(skipped)}{": " + esc("; ".join(s["reason"] for s in skipped[:5])) if skipped else ""}</dd>
<dt>scored on</dt><dd>{comparison["images"]} {esc(cfg.eval.split)} images, all references,
official COCO scorer (PTB tokenization, CIDEr-D)</dd></dl>
<h2>Before and after</h2>
{metrics_table_html(comparison)}
{single_reference_table_html(comparison)}
{scst_html}
{attributes.html_table(comparison.get("attributes"))}
<h2>Training</h2><div class="plots">{"".join(f"<figure>{p}</figure>" for p in plots if p)}</div>
<h2>Examples</h2><div class="gallery" id="gallery">{"".join(cards)}</div>
<h2>Timings</h2><table id="timings"><tbody>{timing_rows}</tbody></table>
<p class="sub">Hardware: {esc(timings.get("device", "unknown"))}</p>
</body></html>
"""
    md = [
        f"# captune report: {summary.title(cfg)}",
        "",
        summary.description(cfg),
        "",
        f"Base model `{cfg.model.name_or_path}`, data `{manifest['source']}`: "
        f"{manifest['images']} images, {manifest['references']} references "
        f"(train {counts['train']} / validation {counts['validation']} / test {counts['test']}), "
        f"{len(skipped)} skipped.",
        "",
        "## Before and after",
        "",
        markdown_table(comparison) + attributes.markdown(comparison.get("attributes")),
        "",
        *scst_md,
        "## Examples",
        "",
    ]
    for image_id, why in picks:
        md.append(
            f"- **{image_id}** ({why}): before “{base_p[image_id]['caption']}”, "
            f"after “{tuned_p[image_id]['caption']}”; reference “{base_p[image_id]['references'][0]}”"
        )
    md += ["", "## Timings", ""]
    md += [f"- {k}: {v:.1f} s" for k, v in timings.get("phases", {}).items()]
    return page, "\n".join(md) + "\n"

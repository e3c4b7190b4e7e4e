"""Attribute accuracy of demo captions: does a caption name what its image shows?

The demo world knows five attributes of every scene (count, size, colour, shape,
position). A caption in either style (plain or catalog) names them with a fixed
vocabulary, so both the truth (from the references, which the world wrote) and a
model's claim (from its caption) can be read back by word lookup. A caption is right
on an attribute when the values it names for it are exactly the true one: naming
none, or naming a wrong one beside the right one, counts as wrong.

CIDEr-D rewards matching words; this measure is the demo's ground truth, the way a
user would check a captioner by eye.
"""

from __future__ import annotations

import html
import json
import random
import re
from collections import Counter
from pathlib import Path

ATTRIBUTES = ("count", "size", "colour", "shape", "position")

# Word (or word pair) -> (attribute, canonical value), for both caption styles.
_WORDS: dict[str, tuple[str, str]] = {}
for _attr, _table in {
    "count": {"a": "1", "one": "1", "single": "1", "two": "2", "pair": "2", "three": "3", "trio": "3"},
    "size": {"small": "small", "tiny": "small", "large": "large", "big": "large"},
    "colour": {
        "red": "red",
        "crimson": "red",
        "green": "green",
        "emerald": "green",
        "blue": "blue",
        "navy": "blue",
        "yellow": "yellow",
        "golden": "yellow",
    },
    "shape": {
        **{w: "circle" for w in ("circle", "circles", "disc", "discs")},
        **{w: "square" for w in ("square", "squares", "tile", "tiles")},
        **{w: "triangle" for w in ("triangle", "triangles", "wedge", "wedges")},
    },
}.items():
    for _w, _v in _table.items():
        _WORDS[_w] = (_attr, _v)

# Positions are phrases: "on the left" (plain), "near the left edge" (catalog).
_POSITION = re.compile(r"\b(?:on the (left|right|top|bottom)|(left|right|upper|lower) edge)\b")
_EDGE = {"left": "left", "right": "right", "upper": "top", "lower": "bottom"}


def parse(caption: str) -> dict[str, set[str]]:
    """The values ``caption`` names for each attribute (an empty set: not named)."""
    found: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    text = caption.lower()
    for word in re.findall(r"[a-z]+", text):
        if word in _WORDS:
            attr, value = _WORDS[word]
            found[attr].add(value)
    for plain, edge in _POSITION.findall(text):
        found["position"].add(plain or _EDGE[edge])
    return found


def truth(references: list[str]) -> dict[str, str | None]:
    """Each attribute's value by majority over the references that name it (None: none do)."""
    votes: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    for ref in references:
        for attr, values in parse(ref).items():
            if len(values) == 1:
                votes[attr][next(iter(values))] += 1
    return {a: (votes[a].most_common(1)[0][0] if votes[a] else None) for a in ATTRIBUTES}


def judge(caption: str, references: list[str]) -> dict[str, bool]:
    """Per attribute whose truth is known: is ``caption`` right on it?"""
    said = parse(caption)
    return {a: said[a] == {v} for a, v in truth(references).items() if v is not None}


def attribute_accuracy(rows: list[dict]) -> dict:
    """Share of captions right on each attribute, over prediction rows
    (``{"image_id", "caption", "references"}``); also which images are right on all."""
    right: Counter = Counter()
    known: Counter = Counter()
    per_image: dict[str, dict[str, bool]] = {}
    for row in rows:
        verdict = judge(row["caption"], row["references"])
        per_image[row["image_id"]] = verdict
        for attr, ok in verdict.items():
            known[attr] += 1
            right[attr] += ok
    shares = {a: round(right[a] / known[a], 4) for a in ATTRIBUTES if known[a]}
    all_right = sum(1 for v in per_image.values() if v and all(v.values()))
    return {
        "images": len(rows),
        "share": shares,
        "all_right": round(all_right / len(rows), 4) if rows else 0.0,
        "per_image": per_image,
    }


def applies(source: str) -> bool:
    """Attribute accuracy is defined for the demo world's data sources only."""
    return source.startswith("demo:")


def write_side(folder: Path, source: str, examples, captions: list[str]) -> None:
    """Write ``folder/attributes.json`` for one side's captions when ``source`` is a demo world."""
    if not applies(source):
        return
    rows = [
        {"image_id": e.image_id, "caption": c, "references": e.captions}
        for e, c in zip(examples, captions, strict=True)
    ]
    (Path(folder) / "attributes.json").write_text(json.dumps(attribute_accuracy(rows), indent=2))


def _read_rows(side_dir: Path) -> list[dict]:
    path = side_dir / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_sides(baseline_dir: Path, finetuned_dir: Path) -> dict:
    """Baseline and fine-tuned shares per attribute and their change, from each side's predictions."""
    base = attribute_accuracy(_read_rows(Path(baseline_dir)))
    tuned = attribute_accuracy(_read_rows(Path(finetuned_dir)))
    rows = [
        {"attribute": a, "baseline": base["share"][a], "finetuned": tuned["share"][a]}
        for a in ATTRIBUTES
        if a in base["share"] and a in tuned["share"]
    ]
    rows.append({"attribute": "all five", "baseline": base["all_right"], "finetuned": tuned["all_right"]})
    for r in rows:
        r["change"] = round(r["finetuned"] - r["baseline"], 4)
    return {"images": tuned["images"], "rows": rows}


def html_table(section: dict | None) -> str:
    """The attribute table as an HTML section for the report (empty when the run has none)."""
    if not section:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(r['attribute'])}</td><td>{r['baseline']:.2f}</td><td>{r['finetuned']:.2f}</td>"
        f"<td class='{'up' if r['change'] > 0 else 'down' if r['change'] < 0 else ''}'>{r['change']:+.2f}</td></tr>"
        for r in section["rows"]
    )
    return (
        "<h2>What the captions say</h2><p class='sub'>Share of the "
        f"{section['images']} test captions that name the image's count, size, colour, shape and position "
        "(the demo world knows them; a caption naming none or a wrong one is wrong).</p>"
        "<table id='attributes'><thead><tr><th>attribute</th><th>baseline</th><th>fine-tuned</th>"
        f"<th>change</th></tr></thead><tbody>{body}</tbody></table>"
    )


def markdown(section: dict | None) -> str:
    """The attribute table as Markdown (empty when the run has none)."""
    if not section:
        return ""
    lines = [
        "",
        "",
        f"Attribute accuracy (share of {section['images']} test captions naming what the image shows):",
        "",
        "| attribute | baseline | fine-tuned | change |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in section["rows"]:
        lines.append(f"| {r['attribute']} | {r['baseline']:.2f} | {r['finetuned']:.2f} | {r['change']:+.2f} |")
    return "\n".join(lines)


def pick_spread(per_image: dict[str, dict[str, bool]], k: int, seed: int) -> list[tuple[str, str]]:
    """(image_id, why) for ``k`` gallery images, half right on every attribute and half wrong on
    some (seeded samples; one side short of images leaves more to the other), in id order within
    each half, so a reader sees how often and how the captions go wrong, not only the best cases."""
    right = sorted(i for i, v in per_image.items() if v and all(v.values()))
    wrong = sorted(i for i, v in per_image.items() if i not in set(right))
    n_wrong = min(len(wrong), max(k - len(right), k // 2))
    rng = random.Random(seed)
    chosen_wrong = sorted(rng.sample(wrong, n_wrong))
    chosen_right = sorted(rng.sample(right, min(len(right), k - n_wrong)))
    picks = [(i, "right on all five attributes") for i in chosen_right]
    for i in chosen_wrong:
        missed = [a for a, ok in per_image[i].items() if not ok]
        picks.append((i, "wrong " + ", ".join(missed) if missed else "attributes unknown"))
    return picks

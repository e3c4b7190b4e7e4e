"""Seed-comparable metrics: the seed notebook's protocol, offline.

The seed scored each caption against one reference (the image's first caption)
with Hugging Face ``evaluate``: ``bleu`` (13a tokenization, the NMT ``compute_bleu``
formula, no smoothing), ``rouge`` (``rouge_score``'s F-measure) and pycocoevalcap's
CIDEr on untokenized text. ``evaluate.load`` fetches its scripts from the Hub at run
time, so the formulas are re-implemented here (BLEU, 13a) or called from the same
library (rouge_score, pycocoevalcap). Its METEOR is NLTK's, which needs the WordNet
corpus, a download that is not on PyPI: it is reported as unavailable, never guessed.

These numbers exist only to hold a run against the seed's published table; the
official, multi-reference numbers are in ``metrics.py``.

Users see them as "single-reference scores" (``LABEL``): "seed-comparable" means nothing
to someone who has not read the notebook.
"""

from __future__ import annotations

import math
import re
from collections import Counter

UNAVAILABLE = {
    "METEOR": "the notebook's METEOR is NLTK's and needs the WordNet corpus, which is not installed "
    "(not on PyPI); use the official METEOR 1.5"
}

_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> list[str]:
    """sacrebleu's 13a tokenizer, as used by HF evaluate's ``bleu``."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    counts: Counter = Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i : i + order])] += 1
    return counts


def hf_bleu(predictions: list[str], references: list[list[str]], max_order: int = 4) -> float:
    """BLEU exactly as HF evaluate's ``bleu`` metric computes it (smooth=False)."""
    matches = [0] * max_order
    possible = [0] * max_order
    ref_len = trans_len = 0
    for pred, refs in zip(predictions, references, strict=True):
        ref_toks = [tokenize_13a(r) for r in refs]
        trans = tokenize_13a(pred)
        ref_len += min(len(r) for r in ref_toks)
        trans_len += len(trans)
        merged: Counter = Counter()
        for r in ref_toks:
            merged |= _ngrams(r, max_order)
        overlap = _ngrams(trans, max_order) & merged
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for order in range(1, max_order + 1):
            if len(trans) - order + 1 > 0:
                possible[order - 1] += len(trans) - order + 1
    precisions = [matches[i] / possible[i] if possible[i] > 0 else 0.0 for i in range(max_order)]
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    if trans_len == 0 or ref_len == 0:
        return 0.0
    ratio = trans_len / ref_len
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * bp


def rouge_f(predictions: list[str], references: list[str], kind: str) -> float:
    """Mean ``rouge_score`` F-measure (evaluate's ``rouge`` aggregates the same per-pair scores)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=False)
    scores = [scorer.score(ref, pred)[kind].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


NOTEBOOK = "the blip2-lora-coco5k notebook"
LABEL = f"Single-reference scores (first reference per image), computed like {NOTEBOOK}'s table"


def seed_compatible(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """The seed's table: first reference only, its libraries' formulas."""
    from pycocoevalcap.cider.cider import Cider

    ids = list(predictions)
    preds = [predictions[i] for i in ids]
    first = [references[i][0] for i in ids]
    out: dict = {"protocol": f"one reference per image (the first), as {NOTEBOOK} scored"}
    metrics: dict[str, float] = {}
    for n in range(1, 5):
        metrics[f"BLEU-{n}"] = hf_bleu(preds, [[r] for r in first], max_order=n)
    metrics["ROUGE-1"] = rouge_f(preds, first, "rouge1")
    metrics["ROUGE-2"] = rouge_f(preds, first, "rouge2")
    cider, _ = Cider().compute_score(
        {i: [r] for i, r in zip(ids, first, strict=True)}, {i: [p] for i, p in zip(ids, preds, strict=True)}
    )
    metrics["CIDEr"] = float(cider)
    out["metrics"] = metrics
    out["unavailable"] = dict(UNAVAILABLE)
    return out

"""Benchmark: the reward CIDEr-D (captune.evaluation.cider) in captions scored per second (CPU).

A COCO-like corpus (``--images`` images x 5 references, 7-13 words from a 40-word
vocabulary plus rarer words) is indexed once; then batches of ``--batch`` images x
``--k`` samples are scored, as one SCST step would, with the regex tokenizer included.
pycocoevalcap's ``Cider`` on one batch is timed for comparison (it recomputes the
reference vectors and document frequencies each call).

Usage: python bench/cider_reward.py --out bench/results/DATE-cpu-cider-reward.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

WORDS = (
    "a an the man woman dog cat bus train person people table street car sitting standing on in near with "
    "red blue white black green large small two three of to and is are riding holding plate pizza field"
).split()
RARE = [f"w{i}" for i in range(3000)]  # a long tail, as in COCO's ~10k-word reference vocabulary


def caption(rng: random.Random) -> str:
    words = [rng.choice(RARE) if rng.random() < 0.1 else rng.choice(WORDS) for _ in range(rng.randint(7, 13))]
    return " ".join(words).capitalize() + rng.choice([".", "", " ."])


def main() -> None:
    import numpy as np

    from captune.evaluation.cider import CiderD, fast_tokenize

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=256, help="images per step")
    ap.add_argument("--k", type=int, default=5, help="samples per image")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = random.Random(0)
    refs = [[caption(rng) for _ in range(5)] for _ in range(args.images)]
    t0 = time.perf_counter()
    scorer = CiderD(refs)
    build_s = time.perf_counter() - t0
    per_step = args.batch * args.k
    rates, rates_pretok = [], []
    for _ in range(args.steps):
        images = np.repeat(np.array(rng.sample(range(args.images), args.batch)), args.k)
        cands = [caption(rng) for _ in range(per_step)]
        t0 = time.perf_counter()
        scorer.score(cands, images)
        rates.append(per_step / (time.perf_counter() - t0))
        tokenized = [fast_tokenize(c) for c in cands]
        scorer.tokenize = None  # the same index, scoring already-tokenized text
        t0 = time.perf_counter()
        scorer.score(tokenized, images)
        rates_pretok.append(per_step / (time.perf_counter() - t0))
        scorer.tokenize = fast_tokenize
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [fast_tokenize(r) for r in refs[int(images[i])]] for i in range(per_step)}
    res = {i: [tokenized[i]] for i in range(per_step)}
    t0 = time.perf_counter()
    Cider().compute_score(gts, res)
    official = per_step / (time.perf_counter() - t0)
    result = {
        "what": "reward CIDEr-D captions scored per second (one SCST step's batch, tokenization included)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": "python " + " ".join(sys.argv),
        "corpus_images": args.images,
        "references_per_image": 5,
        "index_build_s": round(build_s, 2),
        "captions_per_step": per_step,
        "captions_per_s_median": round(statistics.median(rates)),
        "captions_per_s_min": round(min(rates)),
        "captions_per_s_pretokenized_median": round(statistics.median(rates_pretok)),
        "pycocoevalcap_captions_per_s": round(official),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

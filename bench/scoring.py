"""Benchmark: official COCO metrics for N images x 5 references, plus bootstrap (CPU).

Usage: python bench/scoring.py --images 500 5000 --out bench/results/scoring-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

WORDS = (
    "a an the man woman dog cat bus train person people table street car sitting standing on in near with "
    "red blue white black green large small two three of to and is are riding holding plate pizza field"
).split()


def caption(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(7, 13)))
    return text.capitalize() + rng.choice([".", "", " ."])


def measure(images: int, resamples: int) -> dict:
    """Score two caption sets of ``images`` x 5 references and compare them with ``resamples`` resamples."""
    from captune.evaluation.compare import compare
    from captune.evaluation.metrics import score_captions
    from captune.evaluation.seed_metrics import seed_compatible

    rng = random.Random(0)
    refs = {str(i): [caption(rng) for _ in range(5)] for i in range(images)}
    sides = {}
    timings: dict = {"images": images, "references_per_image": 5, "resamples": resamples}
    for name in ("baseline", "finetuned"):
        preds = {i: caption(rng) for i in refs}
        t0 = time.perf_counter()
        s = score_captions(preds, refs)
        timings[f"official_{name}_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        seed = seed_compatible(preds, refs)
        timings[f"seed_compatible_{name}_s"] = round(time.perf_counter() - t0, 2)
        sides[name] = {
            **s.corpus,
            "per_image": s.per_image,
            "image_ids": s.image_ids,
            "bleu_stats": s.bleu_stats,
            "meteor_stats": s.meteor_stats,
            "seed_compatible": seed,
        }
    t0 = time.perf_counter()
    comp = compare(sides["baseline"], sides["finetuned"], samples=resamples, seed=0)
    timings["bootstrap_compare_s"] = round(time.perf_counter() - t0, 2)
    timings["one_side_official_plus_bootstrap_s"] = round(
        timings["official_baseline_s"] + timings["bootstrap_compare_s"], 2
    )
    timings["both_sides_official_plus_bootstrap_s"] = round(
        timings["official_baseline_s"] + timings["official_finetuned_s"] + timings["bootstrap_compare_s"], 2
    )
    timings["intervals_of"] = {r["metric"]: r["interval_of"] for r in comp["rows"]}
    timings["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[500, 5000])
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    load_before = round(os.getloadavg()[0], 2)
    runs = [measure(n, args.bootstrap) for n in args.images]
    result = {
        "what": "official COCO metrics (PTB, BLEU, METEOR 1.5, ROUGE-L, CIDEr-D) on N images x 5 refs for two "
        f"caption sets, seed-comparable metrics, and a {args.bootstrap}-resample paired bootstrap of all "
        "metrics (BLEU and METEOR recomputed as corpus scores on every resample); the first scoring "
        "includes starting Java's METEOR",
        "runs": runs,
        "cpu": f"{platform.machine()} x{os.cpu_count()} ({platform.processor() or 'unknown'})",
        "load_average_1min_before": load_before,
        "note": "shared machine: other engineers' jobs ran on the same 2 cores (see the load averages)",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/scoring.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: N synthetic COCO-like images through a whole run, peak RSS of each phase (CPU).

A local folder source (``imagefolder:``, metadata.jsonl) of N JPEGs of ~15 KB (the demo world's
scenes, upscaled to 192 px with noise, each image's bytes unique) with 5 captions each (the
scene's 3 catalog and 2 plain captions) goes through ``captune data``, ``eval`` (baseline),
``train`` (a fixed number of steps), ``eval`` (fine-tuned), ``compare`` and ``report`` on the
built-in demo model, each phase in its own process. Peak RSS is each phase process's own
(``VmHWM``, see PHASE) and, separately, the largest of its children's (Java's METEOR and PTB tokenizer;
a forked child counts the parent's pages at the fork, so this is at least the parent's RSS then).

The evaluation split is capped at ``--eval-images`` (eval.max_images) so every N scores the
same number of images; data.ratios stay 0.9/0.05/0.05.

Usage: python bench/scale.py --images 10000 --out bench/results/scale-cpu-10k.json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENES = 1000  # distinct scenes; images differ by their noise
SIDE = 192

# A child runs one phase and writes its peak RSS (and its children's) when it exits. Its own peak is
# VmHWM, the high-water mark of the memory its program has mapped since exec: ru_maxrss keeps the
# larger of that and the forking process's RSS at the fork (this script's, hundreds of MB after it
# made or checked a million-image source), so a small phase would read as the bench's size.
PHASE = """
import atexit, json, resource, sys
out = sys.argv[1]
def hwm_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def peak():
    with open(out, "w") as f:
        json.dump({"self_kb": hwm_kb(), "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
atexit.register(peak)  # registered first: runs last, after METEOR's Java is stopped and waited for
from captune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _scenes(seed: int) -> list:
    import numpy as np
    from PIL import Image

    from captune.demo import world

    catalog = world.make_items("catalog", SCENES, seed=seed)
    plain = world.make_items("plain", SCENES, seed=seed)
    return [
        (np.asarray(Image.open(io.BytesIO(c["image"])).convert("RGB").resize((SIDE, SIDE), Image.NEAREST)), c, p)
        for c, p in zip(catalog, plain, strict=True)
    ]


def _write_images(folder: Path, scenes: list, indices: range, rng) -> tuple[list[str], int]:
    """Images ``indices`` (scene i % SCENES plus noise from ``rng``): their metadata lines, their bytes."""
    import numpy as np
    from PIL import Image

    lines, total = [], 0
    for i in indices:
        pixels, c, p = scenes[i % SCENES]
        img = Image.fromarray(np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        name = f"images/{i // 1000:04d}/{i:07d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(buf.getvalue())
        total += buf.tell()
        lines.append(json.dumps({"file_name": name, "caption": c["captions"][:3] + p["captions"][:2]}) + "\n")
    return lines, total


def _block(args: tuple) -> tuple[list[str], int]:
    import numpy as np

    folder, n, seed, block = args
    rng = np.random.default_rng([seed, block])  # a block's noise, whichever process makes it
    return _write_images(folder, _scenes(seed), range(block * 1000, min(n, (block + 1) * 1000)), rng)


def make_source(folder: Path, n: int, seed: int = 0, jobs: int = 1) -> dict:
    """``n`` JPEGs in ``folder/images/NNNN/`` and ``folder/metadata.jsonl``; returns sizes and time.

    One process draws every image's noise from one stream (the committed 10k and 100k results);
    ``jobs`` > 1 makes blocks of 1,000 images in parallel, each block's noise its own stream."""
    import numpy as np

    t0 = time.perf_counter()
    if jobs <= 1:
        parts = [_write_images(folder, _scenes(seed), range(n), np.random.default_rng(seed))]
    else:
        from multiprocessing import Pool

        with Pool(jobs) as pool:
            parts = pool.map(_block, [(folder, n, seed, b) for b in range((n + 999) // 1000)])
    tmp = folder / "metadata.jsonl.tmp"
    with tmp.open("w") as meta:
        for lines, _ in parts:
            meta.writelines(lines)
    tmp.rename(folder / "metadata.jsonl")
    total = sum(t for _, t in parts)
    return {
        "images": n,
        "mean_jpeg_bytes": round(total / n),
        "seconds": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }


def write_recipe(path: Path, source: Path, steps: int, eval_images: int) -> None:
    path.write_text(
        f"""name: scale
description: bench/scale.py - N synthetic images through every phase
data:
  source: imagefolder:{source}
  num_images: 0
  ratios: [0.9, 0.05, 0.05]
  train_captions: all
model:
  name_or_path: builtin:demo
  device: cpu
lora:
  r: 16
  alpha: 32
  target_modules: all-linear
train:
  epochs: 1
  max_steps: {steps}
  batch_size: 32
  lr: 0.003
  validate_every: 0
  log_every: 10
eval:
  batch_size: 80
  max_new_tokens: 20
  max_images: {eval_images}
  bootstrap: 1000
report:
  examples: 12
"""
    )


def public(text: str, folders: dict[str, Path | None]) -> str:
    """``text`` with this machine's folders named by their role (``$WORK``, ``$SOURCE``): a committed
    result holds no local path."""
    for name, folder in folders.items():
        if folder is not None:
            text = text.replace(str(folder), f"${name}")
    return text


def run_phase(run: Path, argv: list[str], work: Path) -> dict:
    """One ``captune`` command in its own process: wall seconds and peak RSS."""
    out = work / "peak.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PHASE, str(out), *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"captune {' '.join(argv)} failed with exit {done.returncode}")
    peak = json.loads(out.read_text())
    return {
        "command": public("captune " + " ".join(argv), {"WORK": work}),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak["self_kb"] / 1024, 1),
        "children_peak_rss_mb": round(peak["children_kb"] / 1024, 1),
        "log_tail": [public(line, {"WORK": work}) for line in done.stdout.strip().splitlines()[-3:]],
    }


def reuse_source(folder: Path, n: int) -> dict:
    """A source folder an earlier run made and kept (``--keep``): checked to hold ``n`` images."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise SystemExit(f"--source {folder}: no metadata.jsonl (make one with --keep)")
    with meta.open() as f:
        lines = sum(1 for _ in f)
    if lines != n:
        raise SystemExit(f"--source {folder} holds {lines} images, not --images {n}")
    total = sum(p.stat().st_size for p in (folder / "images").rglob("*.jpg"))
    return {"images": n, "mean_jpeg_bytes": round(total / n), "reused": True}


def measure(n: int, work: Path, steps: int, eval_images: int, jobs: int = 1, source: Path | None = None) -> dict:
    run = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if source is None:
        source = work / "source"
        source.mkdir()
        made = make_source(source, n, jobs=jobs)
    else:
        made = reuse_source(source, n)
    recipe = work / "scale.yaml"
    write_recipe(recipe, source, steps, eval_images)
    phases = {
        "data": ["data", str(run), "--recipe", str(recipe)],
        "baseline": ["eval", str(run)],
        "train": ["train", str(run)],
        "finetuned": ["eval", str(run)],
        "compare": ["compare", str(run)],
        "report": ["report", str(run)],
    }
    results = {name: run_phase(run, argv, work) for name, argv in phases.items()}
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    total = sum(r["seconds"] for r in results.values())
    return {
        "images": n,
        "source": made,
        "counts": manifest["counts"],
        "references": manifest["references"],
        "phases": results,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
        "seconds": round(total, 1),
        "seconds_per_image": total / n,
        "disk_mb": {
            "source": round(_size(source) / 2**20),
            "data_cache": round(_size(run / "data") / 2**20),
            "run_folder": round(_size(run) / 2**20),
        },
    }


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "pyarrow", "pycocoevalcap"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor()} x {os.cpu_count()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, required=True)
    ap.add_argument("--steps", type=int, default=20, help="training steps (train.max_steps)")
    ap.add_argument("--eval-images", type=int, default=500, help="eval.max_images: images scored per side")
    ap.add_argument("--jobs", type=int, default=1, help="processes making the source images (not timed)")
    ap.add_argument("--work", default=None, help="scratch folder (default $TMPDIR/captune-scale-N)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--source", default=None, help="an image folder kept from an earlier run (not timed either way)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import tempfile

    work = Path(args.work or Path(tempfile.gettempdir()) / f"captune-scale-{args.images}")
    started = datetime.datetime.now(datetime.timezone.utc)
    source = Path(args.source).resolve() if args.source else None
    if source is not None and work.resolve() in source.parents:
        raise SystemExit(f"--source {source} is inside --work {work}, which is cleared first")
    result = measure(args.images, work, args.steps, args.eval_images, args.jobs, source)
    doc = {
        "what": "N synthetic ~15 KB JPEGs x 5 captions through data, baseline eval, train (fixed steps), "
        "fine-tuned eval, compare, report; each phase in its own process, its peak RSS (VmHWM) "
        "and its children's (Java) apart",
        "date": started.isoformat(timespec="seconds"),
        "cpu": _cpu(),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "versions": _versions(),
        "command": public(
            "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
            {"WORK": work, "SOURCE": source, "OUT": Path(args.out).resolve().parent},
        ),
        "settings": {"steps": args.steps, "eval_images": args.eval_images, "ratios": [0.9, 0.05, 0.05]},
        "peak_measure": "VmHWM of each phase's process (its own, from exec)",
        **result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("images", "peak_rss_mb", "seconds", "seconds_per_image")}))
    for name, r in doc["phases"].items():
        rss, kids = r["peak_rss_mb"], r["children_peak_rss_mb"]
        print(f"  {name:10s} {r['seconds']:8.1f}s  peak RSS {rss:7.1f} MB  (children {kids} MB)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: prepare N COCO-size JPEGs from a local COCO-format folder (CPU).

Writes synthetic 640x480 JPEGs (quality 90, about COCO's size and entropy) with
five captions each, then times ``captune data prepare`` on them (the reading,
hashing, full decode check, grouping, splitting and parquet writing).

Usage: python bench/data_prepare.py --images 5000 --out bench/results/data-prepare.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_folder(root: Path, n: int) -> Path:
    rng = random.Random(0)
    images, anns = [], []
    for i in range(n):
        img = Image.effect_noise((640, 480), 60).convert("RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.ellipse(
                (x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                fill=tuple(rng.randrange(256) for _ in range(3)),
            )
        img = img.filter(ImageFilter.GaussianBlur(1))
        name = f"{i:012d}.jpg"
        img.save(root / name, quality=90)
        images.append({"id": i, "file_name": name})
        anns += [{"image_id": i, "caption": f"a picture number {i} with shapes, caption {j}."} for j in range(5)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "captions.json"


def main() -> None:
    from captune.config import DataConfig
    from captune.data.prepare import prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "imgs").mkdir()
        ann = make_folder(tmp / "imgs", args.images)
        size_mb = sum(p.stat().st_size for p in (tmp / "imgs").glob("*.jpg")) / 1e6
        cfg = DataConfig(source=f"coco:{ann}", num_images=args.images)
        t0 = time.perf_counter()
        manifest = prepare(cfg, tmp / "cache", progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t0
    result = {
        "what": "captune data prepare, local COCO-format folder of 640x480 JPEGs",
        "images": manifest["images"],
        "references": manifest["references"],
        "jpeg_mb": round(size_mb, 1),
        "seconds": round(seconds, 2),
        "images_per_s": round(manifest["images"] / seconds, 1),
        "cpu": f"{platform.machine()} x{os.cpu_count()}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/data_prepare.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

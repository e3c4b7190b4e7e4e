"""Benchmark (GPU): training streamed from the sharded feature cache at 100,000 images vs the 5k job.

blip2-opt-2.7b with random weights (built from config, as ``captune bench``), bf16, the coco5k
recipe's training settings (LoRA r 8 q/k, 256 pairs per micro-batch, packed). Then:

1. ``--images`` synthetic 640x480 JPEGs x ``--captions`` captions each. The JPEGs are made on
   demand, never held together: ``--pictures`` distinct pictures are encoded once, and image i is
   picture i mod P with a JPEG comment segment carrying i, so every image's bytes (and SHA-256) are
   its own and the features phase decodes real JPEGs (on the GPU, nvJPEG, as a run does).
2. Their features computed once into the sharded on-disk cache (``run.feature_cache``, as
   ``captune run`` does): images/s and peak GPU memory.
3. The 5k job's training split (the first 4,000 images) resident on the GPU
   (``train.feature_residence=gpu``) for ``--compare-steps`` optimizer steps: the in-memory path's
   samples/s and peak GPU memory.
4. One epoch over all images' pairs streamed from the memory map (``train.feature_residence=stream``):
   samples/s and peak GPU memory, held against 3 (bars: peak within 10%, samples/s within 10%).
   ``--resident-full`` also trains ``--compare-steps`` steps with the whole 100,000 on the GPU.

samples/s is the steady pace between the train log rows at step 20 and the last (the first
steps warm up the kernels). ``--tiny`` runs the same on the CPU with the demo model.

Usage (one H200, under 9 minutes): python bench/scale_gpu.py --out /root/out/scale-gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class SyntheticExample:
    """A training example whose JPEG is made when read (as a streamed split reads it from its shard)."""

    __slots__ = ("i", "pictures", "captions")

    def __init__(self, i: int, pictures: list[bytes], captions: list[str]):
        self.i, self.pictures, self.captions = i, pictures, captions

    @property
    def image_id(self) -> str:
        return f"{self.i:09d}"

    @property
    def image(self) -> bytes:
        jpg = self.pictures[self.i % len(self.pictures)]
        payload = f"captune synthetic image {self.i}".encode()
        at = 2  # after SOI, and after the JFIF APP0 segment where there is one (it must come first)
        if jpg[2:4] == b"\xff\xe0":
            at = 4 + struct.unpack(">H", jpg[4:6])[0]
        return jpg[:at] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpg[at:]  # COM segment


def _environment(args, device: str) -> dict:
    import peft
    import torch
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architecture": "builtin:demo" if args.tiny else "blip2-opt-2.7b (random weights, built from config)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "command": "python bench/scale_gpu.py " + " ".join(sys.argv[1:]),
    }


def _model(args):
    """(PEFT model with the seed's LoRA, processor, the run config, device)."""
    import torch

    from captune.config import load_config
    from captune.model.lora import attach_lora

    device = "cpu" if args.tiny else "cuda"
    overrides = ["train.epochs=1", "train.validate_every=0", "train.select=last", "train.log_every=10",
                 f"train.batch_size={args.batch_size}", f"eval.batch_size={args.feature_batch}",
                 f"model.device={device}"]  # fmt: skip
    if args.tiny:
        from captune.model.load import load_model

        cfg = load_config("coco5k", [*overrides, "model.name_or_path=builtin:demo", "model.dtype=fp32"])
        loaded = load_model(cfg.model)
        model, processor = loaded.model, loaded.processor
    else:
        from captune.bench import build_model, build_processor

        cfg = load_config("coco5k", overrides)
        model, arch_cfg = build_model("blip2-opt-2.7b", torch.bfloat16)
        processor = build_processor(arch_cfg)
    torch.manual_seed(cfg.train.seed)
    return attach_lora(model, cfg.lora), processor, cfg, torch.device(device)


def _peak_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 3) if device.type == "cuda" else None


def _reset(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _steady(history: list[dict], skip: int = 20) -> float:
    """Pairs per second between the first train row at step >= ``skip`` (else the first) and the last."""
    rows = [h for h in history if h["type"] == "train"]
    start = next((r for r in rows if r["step"] >= skip and r is not rows[-1]), rows[0])
    end = rows[-1]
    pairs = end["samples_per_s"] * end["elapsed_s"] - start["samples_per_s"] * start["elapsed_s"]
    return pairs / max(end["elapsed_s"] - start["elapsed_s"], 1e-9)


def _train(model, processor, cfg, examples, residence: str, feature_fn, device, max_steps: int = 0) -> dict:
    """One training run from the given start weights; its pace and peak memory."""
    from captune.training import train

    cfg.train.feature_residence, cfg.train.max_steps = residence, max_steps
    _reset(device)
    t0 = time.perf_counter()
    result = train(model, processor, examples, [], cfg, log=lambda m: print(m, flush=True), feature_fn=feature_fn)
    return {
        "residence": residence,
        "images": len(examples),
        "pairs": sum(len(e.captions) for e in examples) if not max_steps else None,
        "steps": result.steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "samples_per_s_steady": round(_steady(result.history), 1),
        "samples_per_s_overall": round(result.samples_per_s, 1),
        "peak_gpu_gb": _peak_gb(device),
    }


def run(args) -> dict:
    import torch

    from captune.bench import synthetic_captions, synthetic_jpegs
    from captune.data.cache import ImageColumn
    from captune.model.lora import trainable_state
    from captune.run.feature_cache import FeatureStore

    model, processor, cfg, device = _model(args)
    result = _environment(args, device.type)
    names = ("images", "captions", "pictures", "compare_steps", "batch_size", "feature_batch", "shard_rows")
    result["settings"] = {k: getattr(args, k) for k in (*names, "resident_full")}
    t0 = time.perf_counter()
    pictures = synthetic_jpegs(args.pictures)
    caps = synthetic_captions(args.images, per_image=args.captions)
    examples = [SyntheticExample(i, pictures, caps[i]) for i in range(args.images)]
    print(f"  {args.images} images ({args.pictures} pictures) in {time.perf_counter() - t0:.1f}s", flush=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)  # features computed once, here
    store = FeatureStore(work, "scale-gpu", rows_per_shard=args.shard_rows)

    _reset(device)
    t0 = time.perf_counter()
    fmap = store.get(model, processor, ImageColumn(examples), batch_size=args.feature_batch, stream=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result["features"] = {"images": len(fmap), "seconds": round(seconds, 1),
                          "images_per_s": round(len(fmap) / seconds, 1), "cache_gb": round(fmap.nbytes / 1e9, 2),
                          "shards": len(list(store.path_for(ImageColumn(examples)).glob("shard-*.bin"))),
                          "peak_gpu_gb": _peak_gb(device)}  # fmt: skip
    print(f"  features: {json.dumps(result['features'])}", flush=True)
    start = trainable_state(model)

    def restart():
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])

    five_k = min(4000, args.images)  # the coco5k job's training split
    held = {"feats": fmap.rows(range(five_k)).to(device)}  # its features, whole on the GPU as the job has them
    result["resident_5k"] = _train(model, processor, cfg, examples[:five_k], "gpu",
                                   lambda images, stream=False: held["feats"], device, args.compare_steps)  # fmt: skip
    print(f"  resident 5k: {json.dumps(result['resident_5k'])}", flush=True)
    held.clear()
    restart()

    def from_store(images, stream=False):
        return store.get(model, processor, images, batch_size=args.feature_batch, stream=stream)

    result["streamed"] = _train(model, processor, cfg, examples, "stream", from_store, device)
    print(f"  streamed: {json.dumps(result['streamed'])}", flush=True)
    if args.resident_full:
        restart()
        result["resident_full"] = _train(model, processor, cfg, examples, "gpu", from_store, device,
                                         args.compare_steps)  # fmt: skip
        print(f"  resident full: {json.dumps(result['resident_full'])}", flush=True)
    result["acceptance"] = _acceptance(result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _acceptance(result: dict) -> dict:
    base, streamed = result["resident_5k"], result["streamed"]
    out = {"samples_per_s_ratio": round(streamed["samples_per_s_steady"] / base["samples_per_s_steady"], 3)}
    out["samples_per_s_within_10pct"] = out["samples_per_s_ratio"] >= 0.9
    if base["peak_gpu_gb"] is not None:
        out["peak_gpu_ratio"] = round(streamed["peak_gpu_gb"] / base["peak_gpu_gb"], 3)
        out["peak_gpu_within_10pct"] = out["peak_gpu_ratio"] <= 1.1
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--pictures", type=int, default=4096, help="distinct pictures the images are made of")
    parser.add_argument("--compare-steps", type=int, default=300, help="steps of the resident runs")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per micro-batch (coco5k: 256)")
    parser.add_argument("--feature-batch", type=int, default=128, help="images per feature batch")
    parser.add_argument("--shard-rows", type=int, default=1024, help="feature rows per cache shard")
    parser.add_argument("--resident-full", action="store_true", help="also the whole set resident on the GPU")
    parser.add_argument("--work", default="/tmp/captune-scale-gpu", help="feature cache folder (emptied first)")
    parser.add_argument("--keep", action="store_true", help="keep the feature cache afterwards")
    parser.add_argument("--tiny", action="store_true", help="CPU, demo model, a few hundred images")
    args = parser.parse_args(argv)
    if args.tiny:
        defaults = {"images": 100_000, "pictures": 4096, "compare_steps": 300, "batch_size": 256, "feature_batch": 128,
                    "shard_rows": 1024}  # fmt: skip
        tiny = {"images": 120, "pictures": 8, "compare_steps": 25, "batch_size": 16, "feature_batch": 16,
                "shard_rows": 32}  # fmt: skip
        for k, v in tiny.items():  # shrink what was not set by hand
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["acceptance"]), flush=True)


if __name__ == "__main__":
    main()

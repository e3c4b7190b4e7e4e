"""Probe: what a fresh process's first images cost on one GPU, use by use (the coco5k job's baseline
captions its 500 test images in 3.8 s, the fine-tuned phase the same images in 0.5 s).

One fresh process: blip2-opt-2.7b with random weights built from config and moved to the GPU, then,
each timed to a synchronised GPU: features of three batches of 128 JPEGs (the first is every first use
of the vision path), a batch of another size, the steady pace over 1,024; greedy captions of 1,024
images at batch 1,024, three times (the first builds the decoder and captures its CUDA graph); the
features of 1,024 JPEGs on a side stream while 1,024 images are captioned, against each alone; and
``captune caption``'s flow over 5,000 JPEG files, warm. ``--vit-attention flash`` (or cudnn) restricts
the vision tower's SDPA to that backend, from the first call.

    python bench/first_use.py --out results/DATE-h200-first-use.json [--vit-attention flash]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from captune import bench
from captune.config import EvalConfig
from captune.ops.features import image_features
from captune.ops.generation import caption_features


def _timed_once(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 4), out


def _vit_attention(model, backends: str) -> None:
    """The vision tower's attention restricted to ``backends`` (the Q-Former's fp32 attention keeps its own)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION]}[backends]
    vm = model.vision_model
    own = type(vm).forward

    def forward(*args, **kwargs):
        with sdpa_kernel(chosen):
            return own(vm, *args, **kwargs)

    vm.forward = forward


def _steady_features(model, processor, jpegs) -> float:
    image_features(model, processor, jpegs[:256], batch_size=128)
    t, _ = _timed_once(lambda: image_features(model, processor, jpegs[:1024], batch_size=128))
    return round(1024 / t, 1)


def _side_by_side(model, processor, jpegs, feats, cfg, decoders) -> dict:
    """Features of 1,024 JPEGs on a side stream in a thread while 1,024 images are captioned on this one."""
    from concurrent.futures import ThreadPoolExecutor

    tok = processor.tokenizer
    side = torch.cuda.Stream()

    def features_on_side():
        with torch.cuda.stream(side):
            out = image_features(model, processor, jpegs[:1024], batch_size=128)
        side.synchronize()
        return out

    alone_f, _ = _timed_once(features_on_side)
    alone_c, _ = _timed_once(lambda: caption_features(model, tok, feats, cfg, "", decoders))
    with ThreadPoolExecutor(1) as pool:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fut = pool.submit(features_on_side)
        caption_features(model, tok, feats, cfg, "", decoders)
        fut.result()
        torch.cuda.synchronize()
        both = time.perf_counter() - t0
    return {"features_alone_s": alone_f, "captions_alone_s": alone_c, "together_s": round(both, 4)}


def _cli_flow(model, processor, n: int, batch: int) -> dict:
    """``captune caption``'s flow (files read in chunks ahead, features, then captions) over ``n`` JPEG
    files in a warm process, each features and captions call timed to a synchronised GPU."""
    import tempfile
    from pathlib import Path

    import captune.ops.generation as generation
    from captune.run.caption import CaptionStats, ChunkReader, caption_chunks

    parts: dict[str, float] = {"features_s": 0.0, "captions_s": 0.0}

    def timing(name, fn):
        def wrapped(*args, **kwargs):
            t, out = _timed_once(lambda: fn(*args, **kwargs))
            parts[name] += t
            return out

        return wrapped

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, data in enumerate(bench.synthetic_jpegs(n, seed=3)):
            paths.append(Path(tmp) / f"{i:06d}.jpg")
            paths[-1].write_bytes(data)
        real = generation.image_features, generation.caption_features
        generation.image_features = timing("features_s", real[0])
        generation.caption_features = timing("captions_s", real[1])
        try:
            cfg = EvalConfig(batch_size=batch, max_new_tokens=20, min_new_tokens=20)
            t0 = time.perf_counter()
            reader = ChunkReader(paths, chunk=4 * batch, first=batch)
            head = reader.head()
            parts["first_chunk_read_s"] = round(time.perf_counter() - t0, 4)
            caption_chunks(
                model, processor, itertools.chain(head, reader.start()), cfg, "", lambda rows: None, CaptionStats()
            )
            parts["whole_s"] = round(time.perf_counter() - t0, 4)
        finally:
            generation.image_features, generation.caption_features = real
    parts["images"], parts["batch"] = n, batch
    parts["images_per_s"] = round(n / parts["whole_s"], 1)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vit-attention", choices=["default", "flash", "cudnn"], default="default")
    ap.add_argument("--no-cli-flow", action="store_true")
    args = ap.parse_args()
    import sys

    import transformers

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}  # fmt: skip
    jpegs = bench.synthetic_jpegs(1024)
    t, (model, cfg) = _timed_once(lambda: bench.build_model("blip2-opt-2.7b", torch.bfloat16))
    result["build_and_move_s"] = t
    processor = bench.build_processor(cfg)
    model.eval()
    result["vit_attention"] = args.vit_attention
    if args.vit_attention != "default":
        _vit_attention(model, args.vit_attention)
    for i in range(3):
        result[f"features_128_call{i + 1}_s"], feats = _timed_once(
            lambda i=i: image_features(model, processor, jpegs[128 * i : 128 * (i + 1)], batch_size=128)
        )
    result["features_64_first_s"], _ = _timed_once(lambda: image_features(model, processor, jpegs[:64], batch_size=64))
    result["features_64_again_s"], _ = _timed_once(lambda: image_features(model, processor, jpegs[:64], batch_size=64))
    result["features_steady_images_per_s"] = _steady_features(model, processor, jpegs)
    feats = feats.repeat(8, 1, 1)
    cfg20 = EvalConfig(batch_size=1024, max_new_tokens=20, min_new_tokens=20)
    decoders: dict = {}
    tok = processor.tokenizer
    for i in range(3):
        result[f"captions_1024_call{i + 1}_s"], _ = _timed_once(
            lambda: caption_features(model, tok, feats, cfg20, "", decoders)
        )
    result["side_by_side"] = _side_by_side(model, processor, jpegs, feats, cfg20, decoders)
    if not args.no_cli_flow:
        result["cli_flow_warm"] = _cli_flow(model, processor, 5000, 1024)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

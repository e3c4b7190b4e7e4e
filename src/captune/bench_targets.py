"""Issue 24's speed targets, checked in one ``captune bench`` run, each with what bounds it.

``kernel_profile`` sorts a call's GPU kernels into classes (matrix products, attention,
layer norms, the rest); ``caption_parts`` times the greedy decoder's prefill and one decode
step; ``targets`` turns a run's figures into a row per target: measured, goal, share, met,
and a sentence computed from the same run saying what its time is made of.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

CLASSES = (  # the first class whose words a kernel's name holds (lower case)
    ("attention", ("fmha", "flash", "attention", "_decode_kernel", "_prompt_kernel", "sdpa")),
    ("matrix products", ("nvjet", "gemm", "xmma", "splitkreduce", "cublas", "cutlass")),
    ("layer norms", ("layer_norm", "layernorm")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, words in CLASSES if any(w in low for w in words)), "other")


def kernel_profile(fn, calls: int = 3, top: int = 8) -> dict:
    """The GPU kernels of ``calls`` calls of ``fn`` (after one unprofiled), per call: their time by class,
    in all, their number, the wall time under the profiler, and the ``top`` costliest."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    by = defaultdict(float)
    for e in kernels:
        by[kernel_class(e.key)] += e.self_device_time_total / calls / 1e3
    costliest = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {
        "wall_ms_profiled": round(wall * 1e3, 2),
        "kernel_ms": round(sum(by.values()), 2),
        "by_class_ms": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
        "kernels": sum(e.count for e in kernels) // calls,
        "top": [(e.key[:80], round(e.self_device_time_total / calls / 1e3, 2), e.count // calls) for e in costliest],
    }


def gpu_timed(fn, repeats: int, *, warmup: bool = True) -> float:
    """Seconds per call of ``fn`` on the GPU, after one untimed call (``warmup``)."""
    if warmup:
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def caption_prompt(model, feats: torch.Tensor, batch: int) -> torch.Tensor:
    """The greedy decoder's prompt embeddings for ``batch`` images (``feats`` cycled): image tokens, BOS."""
    from captune.ops.lm import embed_with_features

    f = feats[torch.arange(batch, device=feats.device) % feats.size(0)]
    ids = torch.full((batch, f.size(1) + 1), model.config.image_token_index, device=feats.device)
    ids[:, -1] = model.config.text_config.bos_token_id
    return embed_with_features(model, ids, f)


@torch.no_grad()
def caption_parts(model, feats: torch.Tensor, batch: int, new_tokens: int) -> dict:
    """The fast greedy decoder at ``batch`` rows: the prefill of the prompt rows alone, one decode step
    (a CUDA graph replay), and the whole generation, in seconds."""
    from captune.ops.fast_decode import GreedyOPT

    embeds = caption_prompt(model, feats, batch)
    dec = GreedyOPT(model.language_model, batch, embeds.size(1), new_tokens)

    def prefill():
        return dec._forward(dec._embed(embeds, torch.arange(embeds.size(1), device=embeds.device)), None)

    whole = gpu_timed(lambda: dec.generate(embeds, eos_token_id=-5, pad_token_id=1), 3)
    step = gpu_timed(lambda: dec._replay(clone=False), 10)  # as ``generate`` replays it
    out = {"prefill_s": round(gpu_timed(prefill, 3), 4), "decode_step_s": round(step, 5)}
    out |= {"whole_s": round(whole, 4), "prompt_len": embeds.size(1), "batch": batch}
    dec = None  # the static cache's memory back before the next measurement
    torch.cuda.empty_cache()
    return out


@dataclass(frozen=True)
class Target:
    name: str
    key: str  # the run's figure
    goal: float
    unit: str
    lower: bool = False  # a time: at most the goal


TARGETS = (
    Target("packed training", "train_packed_samples_per_s", 3000, "samples/s"),
    Target("captioning from cached features", "caption_images_per_s", 2000, "images/s"),
    Target("image features from JPEG bytes", "features_from_jpeg_images_per_s", 880, "images/s"),
    Target("`captune caption` from JPEG files, after the model load", "caption_cli_images_per_s", 600, "images/s"),
    Target("whole coco5k job, fresh process", "e2e_job_s", 30, "s", lower=True),
    Target("4-bit NF4 packed training, share of bf16's at the same micro-batch", "train_4bit_share_of_bf16", 0.5, "x"),
)


def targets(result: dict) -> list[dict]:
    """A row per target the run measured: figure, goal, share of the goal, met, and why."""
    rows = []
    for t in TARGETS:
        got = result.get(t.key)
        if got is None:
            continue
        share = t.goal / got if t.lower else got / t.goal
        why = WHY[t.key](result, t)
        rows.append({"target": t.name, "measured": got, "goal": t.goal, "unit": t.unit,
                     "share_of_goal": round(share, 3), "met": share >= 1.0, "why": why})  # fmt: skip
    return rows


def _classes(profile: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in profile["by_class_ms"].items())


def _why_training(result: dict, t: Target) -> str:
    prof = result.get("train_packed_profile")
    pairs = result["train_batch_pairs"]
    step_ms = 1e3 * pairs / result[t.key]
    why = f"a step of {pairs} pairs takes {step_ms:.1f} ms"
    mm = (prof or {}).get("by_class_ms", {}).get("matrix products", 0.0)
    if not mm:
        return why + " (no profile of its kernels)"
    need = 1e3 * pairs / t.goal
    return (
        f"{why}; its kernels {prof['kernel_ms']:.1f} ms ({_classes(prof)}). With only its matrix products it "
        f"would give {1e3 * pairs / mm:.0f} {t.unit}; {t.goal:.0f} needs a {need:.1f} ms step, so at most "
        f"{max(need - mm, 0):.1f} ms beside them (now {step_ms - mm:.1f}, {prof['kernel_ms'] - mm:.1f} of it kernels)"
    )


def _why_captioning(result: dict, t: Target) -> str:
    parts = result.get("caption_parts")
    if not parts:
        return "not broken down"
    b, pre, step, rows = parts["batch"], parts["prefill_s"], parts["decode_step_s"], parts["prompt_len"]
    params = result.get("lm_parameters")
    rate = f" (~{2 * params * b * rows / pre / 1e12:.0f} TFLOP/s at 2 FLOPs per parameter and row)" if params else ""
    return (
        f"at batch {b}: the prefill of {rows} prompt rows takes {pre:.3f} s{rate} and a decode step "
        f"{step * 1e3:.1f} ms; the prefill alone caps the rate at {b / pre:.0f} {t.unit}, and {t.goal:.0f} "
        f"needs the whole batch in {b / t.goal:.3f} s (now {parts['whole_s']:.3f})"
    )


def _why_features(result: dict, t: Target) -> str:
    prof = result.get("features_profile")
    rate = result[t.key]
    vit = f"{rate * VIT_GFLOP_PER_IMAGE / 1e3:.0f} TFLOP/s of the ViT's ~{VIT_GFLOP_PER_IMAGE} GFLOP an image"
    plain = result.get("features_from_jpeg_plain_vision_images_per_s")
    if plain:
        vit += f" (fused vision kernels; {plain:.1f} {t.unit} with the checkpoint's own modules)"
    if not prof:
        return vit
    n = result.get("features_profile_images", 0)
    return (
        f"{vit}; {n} images from JPEG: kernels {prof['kernel_ms']:.1f} ms of {prof['wall_ms_profiled']:.1f} ms "
        f"under the profiler ({_classes(prof)})"
    )


def _why_caption_cli(result: dict, t: Target) -> str:
    batch = result.get("caption_cli_batch")
    by_batch = result.get("caption_images_per_s_by_batch", {})
    f = result.get("features_from_jpeg_images_per_s")
    c = by_batch.get(batch, by_batch.get(str(batch))) or result.get("caption_images_per_s")
    if not (f and c):
        return ""
    at = batch if by_batch.get(batch, by_batch.get(str(batch))) else result.get("caption_batch")
    serial = 1 / (1 / f + 1 / c)
    return (
        f"its images go through the features ({f:.0f} images/s in this run) and then the decoder ({c:.0f} at "
        f"batch {at}{f'; the command ran batch {batch}' if batch else ''}), one after the other on the GPU: "
        f"at most {serial:.0f} {t.unit} at those rates, before reading and writing files"
    )


def _why_job(result: dict, t: Target) -> str:
    phases = result.get("e2e_phases_s", {})
    shown = ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if "overlapped" not in k)
    f, train = result.get("features_from_jpeg_images_per_s"), result.get("e2e_train_samples_per_s")
    steps, n = result.get("e2e_train_steps", 0), result.get("e2e_images", 0)
    batch = result.get("e2e_train_batch_pairs", 0)
    why = f"phases, s: {shown}"
    if f and n:
        why += f"; features of its {n} images at this run's {f:.0f} images/s alone take {n / f:.1f} s"
    if train and steps and batch:
        why += f"; {steps} training steps of up to {batch} pairs at the job's {train:.0f} samples/s about "
        why += f"{steps * batch / train:.1f} s"
    return why


VIT_GFLOP_PER_IMAGE = 521  # ViT-g/14 at 224 px, 257 tokens: ~986M parameters (issue 24's figure)

WHY = {
    "train_packed_samples_per_s": _why_training,
    "caption_images_per_s": _why_captioning,
    "features_from_jpeg_images_per_s": _why_features,
    "caption_cli_images_per_s": _why_caption_cli,
    "e2e_job_s": _why_job,
    "train_4bit_share_of_bf16": lambda r, t: (
        f"{r['train_4bit_packed_samples_per_s']} against {r['train_packed_samples_per_s']} samples/s at "
        f"{r['train_batch_pairs']} pairs; LoRA products: 4-bit {r['train_4bit_lora_compute']}, "
        f"bf16 {r['train_lora_compute']}"
    ),
}


def targets_table(rows: list[dict]) -> str:
    lines = ["| target | measured | goal | share | met |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [
        f"| {r['target']} | {r['measured']} {r['unit']} | {r['goal']:g} | {r['share_of_goal']:.0%} | "
        f"{'yes' if r['met'] else 'no'} |"
        for r in rows
    ]
    return "\n".join(lines + [""] + [f"- {r['target']}: {r['why']}" for r in rows])

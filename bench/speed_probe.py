"""Probe: where the time of features, captioning and the packed training step goes (one GPU).

blip2-opt-2.7b with random weights, as ``captune bench`` builds it. Measures
- image features: ViT alone, Q-Former + projection alone, whole ``get_image_features``,
  at several batches, with the Q-Former in fp32 (as transformers keeps it) and in bf16,
  and with TF32 matmuls allowed;
- greedy captioning: the prefill alone and the whole decode at batch 1024/2048/4096 (and 2048 with the
  decoder's residual sums and norms unfused), the kernels of a decode step and of the prefill;
- the packed LoRA step: eager, and ``torch.compile`` (default and ``reduce-overhead``,
  i.e. CUDA graphs), with a torch.profiler summary of the eager step's CPU vs GPU time;
- ``jpeg``: features from JPEG bytes, captune's ``image_features`` (nvJPEG on the GPU, and the
  CPU thread pool), against its parts: one batch's decode + preprocessing alone, the model alone;
- ``vision``: features from JPEG bytes with the vision tower's modules as the checkpoint has them, with
  GELU's tanh form in fc1's product only, and fully fused (also the residual sums with their norms) at
  several warp counts of the sum-and-norm kernel; that kernel alone against torch's add and norm;
- ``sampling``: SCST's sampler (LoRA attached, K samples per image), its prefill, one graph
  step, one token choice and the text decode apart, and the eager step's kernels.

Usage: python bench/speed_probe.py --out probe.json [--skip-compile]

Its profiles slow the process's later kernel launches (pytorch/pytorch#144455): figures measured after
one (the probes after ``captioning`` in one process) are only comparable with each other; run ``--only``
one probe per process for figures to quote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from captune import bench  # noqa: E402
from captune.bench_targets import gpu_timed as timed  # noqa: E402


@torch.no_grad()
def probe_features(model, processor, jpegs) -> dict:
    from captune.ops.features import pixel_values

    out = {
        "vision_attn": getattr(model.vision_model.config, "_attn_implementation", None),
        "qformer_attn": getattr(model.qformer.config, "_attn_implementation", None),
    }
    pv_all = pixel_values(processor, jpegs[:256]).to("cuda", torch.bfloat16)
    for batch in (64, 128, 256):
        pv = pv_all[:batch]
        emb = model.vision_model(pixel_values=pv).last_hidden_state
        out[f"vit_only_b{batch}"] = round(batch / timed(lambda pv=pv: model.vision_model(pixel_values=pv), 3), 1)
        out[f"whole_fp32_qformer_b{batch}"] = round(
            batch / timed(lambda pv=pv: model.get_image_features(pixel_values=pv, return_dict=True), 3), 1
        )
        out[f"qformer_fp32_only_b{batch}"] = round(batch / timed(lambda e=emb: _qformer(model, e), 3), 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    out["whole_tf32_qformer_b128"] = round(
        128 / timed(lambda: model.get_image_features(pixel_values=pv_all[:128], return_dict=True), 3), 1
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = model.get_image_features(pixel_values=pv_all[:128], return_dict=True).pooler_output
    model.qformer.to(torch.bfloat16)
    model.query_tokens.data = model.query_tokens.data.to(torch.bfloat16)
    try:
        out["whole_bf16_qformer_b128"] = round(
            128 / timed(lambda: model.get_image_features(pixel_values=pv_all[:128], return_dict=True), 3), 1
        )
        got = model.get_image_features(pixel_values=pv_all[:128], return_dict=True).pooler_output
        out["bf16_qformer_max_abs_diff"] = float((got.float() - ref.float()).abs().max())
        out["bf16_qformer_ref_abs_mean"] = float(ref.float().abs().mean())
    except Exception as exc:
        out["bf16_qformer_error"] = repr(exc)[:300]
    model.qformer.float()
    model.query_tokens.data = model.query_tokens.data.float()
    return out


def _qformer(model, emb):
    from captune.ops.features import project_queries

    return project_queries(model, emb)


@torch.no_grad()
def probe_captioning(model, feats) -> dict:
    from captune.bench_targets import caption_parts, caption_prompt
    from captune.ops import fast_decode

    out = {}
    lm = model.language_model
    for batch in (1024, 2048, 4096):
        parts = caption_parts(model, feats, batch, 20)
        out[f"b{batch}"] = {"images_per_s_decoder_only": round(batch / parts["whole_s"], 1)} | {
            k: parts[k] for k in ("prefill_s", "decode_step_s", "whole_s")
        }
        if batch == 2048:  # the residual sums and their norms as torch's two ops each
            fast_decode.FUSED_NORMS = False
            try:
                parts = caption_parts(model, feats, batch, 20)
            finally:
                fast_decode.FUSED_NORMS = True
            out["b2048_unfused_norms"] = {"images_per_s_decoder_only": round(batch / parts["whole_s"], 1)} | {
                k: parts[k] for k in ("prefill_s", "decode_step_s", "whole_s")
            }
            embeds = caption_prompt(model, feats, batch)
            # the sweep's timings before the profile: after a profile the process's launches are slower
            out["decode_attention_sweep_b2048"] = _sweep_decode_attention(batch, lm.config)
            out["decode_step_profile_b2048"], out["prefill_profile_b2048"] = _profile_decode_step(lm, embeds)
        torch.cuda.empty_cache()
    return out


def _sweep_decode_attention(batch: int, cfg, prompt: int = 33, new: int = 20) -> dict:
    """One layer's decode attention at ``batch``, each (split, chunk, warps), early and late in the
    caption, with the prompt part per sequence (greedy) and shared by 5 (SCST's K); ``best``: the
    fastest for greedy captioning (early + late)."""
    from captune.ops import decode_attention as da

    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    out, chosen = {}, (da.CHUNK, da.NUM_WARPS, da.SPLIT_D)
    configs = [(sp, c, w) for sp in (True, False) for c in (8, 16, 32) for w in (1, 2)]
    for rep in (1, 5):
        q = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.bfloat16)
        kp = torch.randn(batch // rep, heads, prompt, d, device="cuda", dtype=torch.bfloat16)
        kn = torch.randn(batch, heads, new, d, device="cuda", dtype=torch.bfloat16)
        for split, chunk, warps in configs:
            da.SPLIT_D, da.CHUNK, da.NUM_WARPS = split, chunk, warps
            for slot in (3, 19):
                pos = torch.tensor(prompt + slot, device="cuda")
                ms = 1e3 * timed(lambda p=pos, q=q, kp=kp, kn=kn: da.decode_attention(q, q, q, kp, kp, kn, kn, p), 20)
                out[f"rep{rep}_split{int(split)}_chunk{chunk}_warps{warps}_slot{slot}_ms"] = round(ms, 4)
    da.CHUNK, da.NUM_WARPS, da.SPLIT_D = chosen

    def greedy_ms(c):
        return sum(out[f"rep1_split{int(c[0])}_chunk{c[1]}_warps{c[2]}_slot{s}_ms"] for s in (3, 19))

    split, chunk, warps = min(configs, key=greedy_ms)
    out["best"] = {
        "split": split,
        "chunk": chunk,
        "warps": warps,
        "early_plus_late_ms": round(greedy_ms((split, chunk, warps)), 4),
    }
    return out


def sweep_decode_heads(batch: int = 2048, heads: int = 32, d: int = 80, prompt: int = 33, new: int = 20) -> dict:
    """One layer's greedy decode attention (no shared prompt) at ``batch``, early and late in a caption, with
    one (sequence, head) a program (``HEADS`` 1, the kernel before) and with 2, 4 or 8 heads a program at 1,
    2 or 4 warps and 4, 8 or 16 keys a chunk; ``best``: the fastest early + late. Each setting's output is
    checked against the one-head kernel's."""
    from captune.ops import decode_attention as da

    chosen = (da.HEADS, da.HEADS_WARPS, da.CHUNK)  # (CHUNK is the one-head kernel's too)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.bfloat16, generator=g) * d**-0.5
    kp = torch.randn(batch, heads, prompt, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kn = torch.randn(batch, heads, new, d, device="cuda", dtype=torch.bfloat16, generator=g)
    configs = [(1, 1, 8)] + [(hp, w, c) for hp in (2, 4, 8) for w in (1, 2, 4) for c in (4, 8, 16)]
    out, ref, bad = {}, {}, set()
    try:
        for hp, warps, chunk in configs:
            da.HEADS, da.HEADS_WARPS, da.CHUNK = hp, warps, chunk
            for slot in (3, 19):
                pos = torch.tensor(prompt + slot, device="cuda")
                got = da.decode_attention(q, q, q, kp, kp, kn.clone(), kn.clone(), pos)
                ref.setdefault(slot, got)
                if (got.float() - ref[slot].float()).abs().max().item() > 2e-2:
                    out[f"heads{hp}_warps{warps}_chunk{chunk}_slot{slot}_error"] = "differs from the one-head kernel"
                    bad.add((hp, warps, chunk))
                ms = 1e3 * timed(lambda p=pos: da.decode_attention(q, q, q, kp, kp, kn, kn, p), 20)
                out[f"heads{hp}_warps{warps}_chunk{chunk}_slot{slot}_ms"] = round(ms, 4)
    finally:
        da.HEADS, da.HEADS_WARPS, da.CHUNK = chosen

    def both(c):
        return sum(out[f"heads{c[0]}_warps{c[1]}_chunk{c[2]}_slot{s}_ms"] for s in (3, 19))

    best = min((c for c in configs if c not in bad), key=both)
    out["best"] = {"heads": best[0], "warps": best[1], "chunk": best[2], "early_plus_late_ms": round(both(best), 4),
                   "one_head_early_plus_late_ms": round(both(configs[0]), 4)}  # fmt: skip
    return out


def _sweep_shared_attention(rows: int, cfg, k: int = 5, prompt: int = 33, new: int = 20) -> dict:
    """One layer's decode attention for ``rows`` sequences, K sharing each prompt row (SCST's sampler):
    one program per sequence for all of it, against the prompt part by ``_prompt_kernel`` at each (keys
    per chunk, warps), early and late in the caption; ``best``: the fastest (early + late)."""
    from captune.ops import decode_attention as da

    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(rows, heads, 1, d, device="cuda", dtype=torch.bfloat16)
    kp = torch.randn(rows // k, heads, prompt, d, device="cuda", dtype=torch.bfloat16)
    kn = torch.randn(rows, heads, new, d, device="cuda", dtype=torch.bfloat16)
    chosen = (da.SHARED, da.SHARED_CHUNK, da.SHARED_WARPS)
    configs = [(c, w) for c in (16, 32, 64) for w in (1, 2, 4, 8)]
    out: dict = {"rows": rows, "k": k}

    def ms(slot: int) -> float:
        pos = torch.tensor(prompt + slot, device="cuda")
        return round(1e3 * timed(lambda: da.decode_attention(q, q, q, kp, kp, kn, kn, pos), 20), 4)

    da.SHARED = False
    out["per_sequence_ms"] = {f"slot{s}": ms(s) for s in (3, 19)}
    da.SHARED = True
    for c, w in configs:
        da.SHARED_CHUNK, da.SHARED_WARPS = c, w
        out[f"prompt_kernel_chunk{c}_warps{w}_ms"] = {f"slot{s}": ms(s) for s in (3, 19)}
    da.SHARED, da.SHARED_CHUNK, da.SHARED_WARPS = chosen
    best = min(configs, key=lambda c: sum(out[f"prompt_kernel_chunk{c[0]}_warps{c[1]}_ms"].values()))
    out["best"] = {"chunk": best[0], "warps": best[1],
                   "early_plus_late_ms": round(sum(out[f"prompt_kernel_chunk{best[0]}_warps{best[1]}_ms"].values()), 4),
                   "per_sequence_early_plus_late_ms": round(sum(out["per_sequence_ms"].values()), 4)}  # fmt: skip
    return out


def _profile_decode_step(lm, embeds) -> tuple[dict, dict]:
    """GPU time per kernel of one eager decode step (no graph, so the kernels are visible), and of the
    prefill."""
    from captune.ops.fast_decode import GreedyOPT

    dec = GreedyOPT(lm, embeds.size(0), embeds.size(1), 20, use_graph=False)
    dec.generate(embeds, eos_token_id=-5, pad_token_id=1)
    dec.static_pos.fill_(embeds.size(1) + 3)
    hidden = dec._embed(embeds, torch.arange(embeds.size(1), device=embeds.device))
    step = _kernel_profile(dec._step, 5)
    return step, _kernel_profile(lambda: dec._forward(hidden, None), 2)


def _kernel_profile(fn, reps: int) -> dict:
    """GPU time per kernel of ``fn`` (two warm-up calls, then ``reps`` profiled), per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / reps / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:16]
    return {
        "kernel_ms_per_call": round(total, 3),
        "top": [(e.key[:140], round(e.self_device_time_total / reps / 1e3, 3), e.count // reps) for e in top],
    }


@torch.no_grad()
def probe_jpeg(model, processor, n: int = 2048, batch: int = 128) -> dict:
    """Features from JPEG bytes: the whole path and its parts, GPU and CPU decoding."""
    from captune.ops import features as F
    from captune.ops.features import gpu_pixel_values, image_features, pixel_values, qformer_precision

    jpegs = bench.synthetic_jpegs(n)
    out = {"images": n, "batch": batch, "mean_jpeg_bytes": round(sum(map(len, jpegs)) / n)}
    out["gpu_decode_preprocess_s_per_batch"] = round(
        timed(lambda: gpu_pixel_values(processor, jpegs[:batch], torch.device("cuda")), 3), 4
    )
    out["cpu_preprocess_one_thread_s_per_batch"] = round(timed(lambda: pixel_values(processor, jpegs[:batch]), 1), 4)
    pv = pixel_values(processor, jpegs[:batch]).to("cuda", torch.bfloat16)
    with qformer_precision(model):
        out["model_only_s_per_batch"] = round(
            timed(lambda: model.get_image_features(pixel_values=pv, return_dict=True), 3), 4
        )
    for name, gpu in (("gpu_decode", True), ("cpu_threads", False)):
        F._GPU_DECODE_FAILED = not gpu
        image_features(model, processor, jpegs[: 2 * batch], batch_size=batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        image_features(model, processor, jpegs, batch_size=batch)
        torch.cuda.synchronize()
        out[f"whole_{name}_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    F._GPU_DECODE_FAILED = False
    out["model_only_images_per_s"] = round(batch / out["model_only_s_per_batch"], 1)
    return out


@torch.no_grad()
def probe_vision(model, processor, n: int = 2048, batch: int = 128) -> dict:
    """``model.vision_kernels`` plain, GELU only, and fused at 2, 4 and 8 warps: features from JPEG, steady."""
    from captune.ops import vision
    from captune.ops.features import image_features

    jpegs = bench.synthetic_jpegs(n)

    def rate() -> float:
        image_features(model, processor, jpegs[: 2 * batch], batch_size=batch)
        return round(n / timed(lambda: image_features(model, processor, jpegs, batch_size=batch), 2), 1)

    out = {"images": n, "batch": batch}
    vision.set_vision_kernels(model, "plain")
    out["plain_images_per_s"] = rate()
    vision.set_vision_kernels(model, "fused")
    vision.ADD_NORM = False
    out["gelu_only_images_per_s"] = rate()
    vision.ADD_NORM = True
    for warps in (2, 4, 8):
        vision.NUM_WARPS = warps
        out[f"fused_{warps}_warps_images_per_s"] = rate()
    vision.NUM_WARPS = 4
    out["plain_again_images_per_s"] = (vision.set_vision_kernels(model, "plain"), rate())[1]
    vision.set_vision_kernels(model, "auto")
    norm = model.vision_model.encoder.layers[1].layer_norm1
    a, h = (torch.randn(batch, 257, norm.weight.numel(), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out["add_norm_ms"] = round(1e3 * timed(lambda: vision.add_norm(a, h, norm), 50), 4)
    out["torch_add_then_norm_ms"] = round(1e3 * timed(lambda: norm(a + h), 50), 4)
    return out


@torch.no_grad()
def probe_sampling(model, processor, feats, images: int = 256, k: int = 5, tokens: int = 20) -> dict:
    """SCST's sampler as training/scst.py runs it (LoRA attached, eval mode), in parts."""
    from captune.config import LoraConfig
    from captune.model.lora import attach_lora
    from captune.ops.batching import generation_prompt
    from captune.ops.fast_decode import SamplingOPT
    from captune.ops.lm import embed_with_features, unwrap
    from captune.ops.sampling import SamplingSpec, choose, sample_captions

    tok = processor.tokenizer
    from captune.model.lora_compute import use_16bit_compute

    peft_model = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="seed"))
    use_16bit_compute(peft_model)  # as the SCST trainer does (lora.compute=auto)
    peft_model.eval()
    f = feats[torch.arange(images, device="cuda") % feats.size(0)]
    spec = SamplingSpec(k=k, max_new_tokens=tokens, min_new_tokens=tokens)
    gen = torch.Generator(device="cuda").manual_seed(1)
    decoders: dict = {}
    run = lambda: sample_captions(peft_model, tok, f, spec, generator=gen, decoders=decoders)  # noqa: E731
    out = {"images": images, "k": k, "tokens": tokens, "whole_s": round(timed(run, 3), 4)}
    dec = next(iter(decoders.values()))
    ids = generation_prompt(tok, images, num_query_tokens=model.config.num_query_tokens,
                            image_token_id=model.config.image_token_index).input_ids.to("cuda")  # fmt: skip
    embeds = embed_with_features(model, ids, f)

    def prefill():
        hidden = dec._embed(embeds, torch.arange(embeds.size(1), device="cuda"))
        return dec._forward(hidden, None).repeat_interleave(k, 0)

    logits = prefill()
    out["prefill_s"] = round(timed(prefill, 3), 4)
    dec.static_pos.fill_(embeds.size(1) + 3)
    out["graph_step_s"] = round(timed(dec._replay, 10), 5)
    out["choose_s"] = round(timed(lambda: choose(logits, 3, spec, tok.eos_token_id, gen), 10), 5)
    samples = run()
    t0 = time.perf_counter()
    tok.batch_decode(samples.tokens.tolist(), skip_special_tokens=True)
    out["text_decode_s"] = round(time.perf_counter() - t0, 4)
    eager = SamplingOPT(unwrap(peft_model).language_model, images, k, embeds.size(1), tokens, use_graph=False)
    eager.sample(embeds, lambda lg, n: choose(lg, n, spec, tok.eos_token_id, gen), eos_token_id=-5, pad_token_id=1)
    out["eager_step_profile"] = _profile_steps(eager._step)
    del eager
    cfg = unwrap(peft_model).language_model.config
    out["shared_attention_sweep"] = [_sweep_shared_attention(rows, cfg, k) for rows in (images * k, 384 * k)]
    decoders.clear()
    peft_model.unload()
    torch.cuda.empty_cache()
    return out


def _profile_steps(step) -> dict:
    from captune.bench_targets import kernel_profile

    step()
    return kernel_profile(step, calls=5, top=14)


def probe_training(model, processor, feats, compile_modes) -> dict:
    from captune.config import LoraConfig
    from captune.model.lora import attach_lora
    from captune.ops.packing import packed_loss

    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="seed"))
    from captune.model.lora_compute import use_16bit_compute

    sixteen = use_16bit_compute(peft_model)  # captune's default (lora.compute=auto)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g, k = 52, 5
    packed, f = bench.synthetic_packed_batch(feats, g, k, 12)
    peft_model.train()

    def make_step(loss_fn):
        def step():
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    eager = make_step(lambda: packed_loss(peft_model, f, packed))
    out = {"eager_samples_per_s": round(g * k / timed(eager, 10), 1), "lora_16bit_layers": sixteen}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eager()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / 3 / 1e3
    out["eager_profile_gpu_ms_per_step"] = round(cuda_total, 2)
    out["eager_profile_top_gpu"] = [
        (e.key[:60], round(e.self_device_time_total / 3 / 1e3, 2), e.count // 3)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]
    ]
    out["eager_kernel_launches_per_step"] = (
        sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) // 3
    )
    for mode in compile_modes:
        try:
            t0 = time.perf_counter()
            fn = torch.compile(lambda: packed_loss(peft_model, f, packed), mode=mode)
            step = make_step(fn)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            out[f"compile_{mode}_compile_s"] = round(time.perf_counter() - t0, 1)
            out[f"compile_{mode}_samples_per_s"] = round(g * k / timed(step, 10), 1)
        except Exception as exc:
            out[f"compile_{mode}_error"] = repr(exc)[:500]
        torch._dynamo.reset()
    peft_model.unload()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile", default="default,reduce-overhead")
    ap.add_argument(
        "--only",
        default="features,captioning,training",
        help="of features,jpeg,vision,captioning,sampling,training; or decode_heads (alone)",
    )
    args = ap.parse_args()
    if "decode_heads" in args.only.split(","):  # the kernel alone, no model: nothing else runs
        if args.only != "decode_heads":
            raise SystemExit("--only decode_heads runs alone")
        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
                  "decode_heads_sweep_b2048": sweep_decode_heads()}  # fmt: skip
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["decode_heads_sweep_b2048"]["best"]), flush=True)
        return
    jpegs = bench.synthetic_jpegs(256)
    model, cfg = bench.build_model("blip2-opt-2.7b", torch.bfloat16)
    processor = bench.build_processor(cfg)
    import datetime

    import transformers

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv)}  # fmt: skip
    only = args.only.split(",")
    if "features" in only:
        result["features"] = probe_features(model, processor, jpegs)
    print(json.dumps(result), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    from captune.ops.features import image_features

    feats = image_features(model, processor, jpegs, batch_size=128)
    if "captioning" in only:
        result["captioning"] = probe_captioning(model, feats)
    print(json.dumps(result.get("captioning")), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, probe in (
        ("jpeg", lambda: probe_jpeg(model, processor)),
        ("vision", lambda: probe_vision(model, processor)),
        ("sampling", lambda: probe_sampling(model, processor, feats)),
    ):
        if name in only:
            result[name] = probe()
            print(json.dumps(result[name]), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    modes = [m for m in args.compile.split(",") if m]
    if "training" in only:
        result["training"] = probe_training(model, processor, feats, modes)
    print(json.dumps(result.get("training")), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

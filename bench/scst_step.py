"""Benchmark (GPU): one SCST step from cached features, in images/s, with its parts timed.

blip2-opt-2.7b with random weights (built from config), LoRA r 8 on q/k as the seed
recipe, bf16. A step: sample K captions of exactly ``--tokens`` tokens per image
(``ops.sampling``, static cache + CUDA graph), decode and score them with the reward
CIDEr-D (``evaluation.cider``, corpus of ``--corpus`` synthetic images x 5 references),
mean-of-others baseline, teacher-forced log-probs with gradient (``ops.scst``), backward
and a fused AdamW step. The library's parts only: the training loop that will run them
is not written yet. The cross-entropy training rate of ``captune bench`` (same process,
same model) is measured first for comparison.

Usage: python bench/scst_step.py --out /root/out/scst-step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    import numpy as np
    import torch
    import transformers

    from captune.bench import build_model, build_processor, measure_captune_training, synthetic_captions
    from captune.config import LoraConfig
    from captune.evaluation.cider import CiderD
    from captune.model.lora import attach_lora
    from captune.ops.batching import generation_prompt
    from captune.ops.sampling import SamplingSpec, sample_captions
    from captune.ops.scst import advantages, baseline, policy_loss, sequence_logprobs
    from captune.ops.scst import statistics as step_statistics

    ap = argparse.ArgumentParser()
    ap.add_argument("--images-per-step", type=int, default=256)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--corpus", type=int, default=10000)
    ap.add_argument("--skip-ce", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    b, k = args.images_per_step, args.k
    model, cfg = build_model("blip2-opt-2.7b", torch.bfloat16)
    processor = build_processor(cfg)
    tok = processor.tokenizer
    hidden = cfg.text_config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(1024, cfg.num_query_tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    result: dict = {}
    if not args.skip_ce:
        result.update(measure_captune_training(model, processor, pool[:256], images_per_step=52, text_tokens=12))
    t0 = time.perf_counter()
    scorer = CiderD(synthetic_captions(args.corpus))
    index_s = time.perf_counter() - t0
    torch.manual_seed(0)
    peft = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="seed"))
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    prompt = generation_prompt(tok, b, num_query_tokens=cfg.num_query_tokens, image_token_id=cfg.image_token_index)
    ids, attn = prompt.input_ids.cuda(), prompt.attention_mask.cuda()
    spec = SamplingSpec(k=k, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    decoders: dict = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    times: dict[str, list[float]] = {"sample": [], "reward": [], "backward": [], "step": []}
    stats_log = []

    def step(i: int) -> None:
        images = (torch.arange(b) + i * b) % args.corpus
        feats = pool[images % pool.size(0)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        peft.eval()
        samples = sample_captions(peft, tok, feats, spec, generator=gen, decoders=decoders)  # syncs (decode)
        t1 = time.perf_counter()
        r = scorer.score(samples.captions, np.repeat(images.numpy(), k))
        rewards = torch.tensor(r, dtype=torch.float32).view(b, k).cuda()
        t2 = time.perf_counter()
        peft.train()
        base = baseline(rewards)
        lp = sequence_logprobs(peft, feats, ids, attn, samples.tokens, samples.mask)
        policy_loss(lp, samples.mask, advantages(rewards, base)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats_log.append({n: round(float(v), 4) for n, v in step_statistics(rewards, base, samples.mask).items()})
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        for name, d in (("sample", t1 - t0), ("reward", t2 - t1), ("backward", t3 - t2), ("step", t3 - t0)):
            times[name].append(d)

    for i in range(2):  # graph capture, allocator warm-up
        step(i)
    for name in times:
        times[name].clear()
    torch.cuda.reset_peak_memory_stats()
    for i in range(2, 2 + args.steps):
        step(i)
    med = {n: statistics.median(v) for n, v in times.items()}
    result.update(
        {
            "what": "SCST step from cached features (sample K + CIDEr-D reward + teacher-forced backward + AdamW)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(),
            "cpu": f"{platform.processor() or platform.machine()}",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "architecture": "blip2-opt-2.7b (random weights, built from config), bf16, LoRA r 8 q/k",
            "command": "python " + " ".join(sys.argv),
            "images_per_step": b,
            "k": k,
            "tokens_per_caption": args.tokens,
            "reward_corpus_images": args.corpus,
            "reward_index_build_s": round(index_s, 2),
            "scst_images_per_s": round(b / med["step"], 1),
            "scst_captions_per_s": round(b * k / med["step"], 1),
            "median_s": {n: round(v, 4) for n, v in med.items()},
            "reward_captions_per_s": round(b * k / med["reward"]),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "stats_last_step": stats_log[-1],
        }
    )
    if "train_flat_samples_per_s" in result:
        result["ce_images_per_s_flat"] = round(result["train_flat_samples_per_s"] / 5, 1)
        result["ce_images_per_s_packed"] = round(result["train_packed_samples_per_s"] / 5, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

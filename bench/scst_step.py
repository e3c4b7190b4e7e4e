"""Benchmark (GPU): one SCST step from cached features, in images/s, with its parts timed.

blip2-opt-2.7b with random weights (built from config), LoRA r 8 on q/k as the seed
recipe, bf16. A step is what ``training/scst.py`` does: sample K captions of exactly
``--tokens`` tokens per image (``ops.sampling``, static cache + CUDA graph), decode and score
them with the reward CIDEr-D (``evaluation.cider``, corpus of ``--corpus`` synthetic images x 5
references), mean-of-others baseline, teacher-forced log-probs with gradient (``ops.scst``;
packed, each image's prefix once with its K samples, unless ``--no-pack``), backward and a
fused AdamW step, all in eval mode (no LoRA dropout) as the trainer runs it. Each
``--images-per-step`` size is measured in turn; one that runs out of memory is recorded as
such and the rest still run. The cross-entropy training rate of ``captune bench`` (same
process, same model) is measured first for comparison.

Usage: python bench/scst_step.py --images-per-step 64 128 256 --out /root/out/scst-step.json
       python bench/scst_step.py --tiny --out /tmp/scst-step-tiny.json   (CPU, the demo model)
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

import torch  # noqa: E402


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images-per-step", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--corpus", type=int, default=10000)
    ap.add_argument("--skip-ce", action="store_true")
    ap.add_argument("--no-pack", action="store_true", help="the unpacked log-prob forward (K copies of the prefix)")
    ap.add_argument(
        "--reward-inline",
        action="store_true",
        help="reward before the policy forward is queued (the order before)",
    )
    ap.add_argument(
        "--per-row-attention",
        action="store_true",
        help="the sampler's decode attention one program per sequence (the kernel before the shared one)",
    )
    ap.add_argument(
        "--unfused-mlp",
        action="store_true",
        help="fc1 and its ReLU as two calls (the path before ops.mlp's fused product)",
    )
    ap.add_argument("--profile", action="store_true", help="the GPU kernels of two more steps of the last size")
    ap.add_argument("--tiny", action="store_true", help="CPU, the built-in demo model, small sizes: a smoke test")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.tiny:
        args.images_per_step = sorted({min(b, 4) for b in args.images_per_step} | {2})[:2]
        args.steps, args.corpus, args.tokens, args.skip_ce = min(args.steps, 2), min(args.corpus, 200), 8, True
    return args


def _model(args):
    """(model, processor, cfg, device): the random-weight blip2-opt-2.7b on the GPU, or the demo model."""
    if args.tiny:
        from captune.config import ModelConfig
        from captune.model.load import load_model

        loaded = load_model(ModelConfig(device="cpu", dtype="fp32"))
        return loaded.model, loaded.processor, loaded.model.config, torch.device("cpu")
    from captune.bench import build_model, build_processor

    model, cfg = build_model("blip2-opt-2.7b", torch.bfloat16)
    return model, build_processor(cfg), cfg, torch.device("cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stepper:
    """One SCST step's parts on ``images`` images, as training/scst.py runs them, timed."""

    def __init__(self, peft, tok, cfg, pool, scorer, args, images: int, device: torch.device):
        from captune.ops.batching import generation_prompt
        from captune.ops.sampling import SamplingSpec

        self.peft, self.tok, self.pool, self.scorer, self.args = peft, tok, pool, scorer, args
        self.b, self.device = images, device
        prompt = generation_prompt(tok, images, num_query_tokens=cfg.num_query_tokens,
                                   image_token_id=cfg.image_token_index)  # fmt: skip
        self.ids, self.attn = prompt.input_ids, prompt.attention_mask  # on the CPU, as the trainer
        self.spec = SamplingSpec(k=args.k, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        self.decoders: dict = {}
        self.gen = torch.Generator(device=device).manual_seed(1)
        params = [p for p in peft.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        self.times: dict[str, list[float]] = {
            "sample": [],
            "reward": [],
            "after_sampling": [],
            "step": [],
        }
        self.stats: dict = {}
        from captune.training.rewards import Rewards

        self.rewards = Rewards(scorer, tok, peft, "")

    def step(self, i: int) -> None:
        import numpy as np

        from captune.ops.sampling import sample_tokens
        from captune.ops.scst import policy_loss, sequence_logprobs, statistics
        from captune.training.rewards import Advantages, Drawn

        b, k, dev = self.b, self.args.k, self.device
        images = (torch.arange(b) + i * b) % self.args.corpus
        feats = self.pool[(images % self.pool.size(0)).to(dev)]
        _sync(dev)
        t0 = time.perf_counter()
        self.peft.eval()  # sampling and the gradient forward both in eval mode, as the trainer
        tokens, mask = sample_tokens(self.peft, self.tok, feats, self.spec, generator=self.gen, decoders=self.decoders)
        drawn = Drawn(tokens, mask)  # the samples on the CPU: the step's one wait
        t1 = time.perf_counter()
        pending = self.rewards.later(drawn.tokens, np.repeat(images.numpy(), k))
        if self.args.reward_inline:  # the order before: the rewards, then the policy forward queued
            pending.result()
        adv = Advantages(pending, None, (b, k), "mean_others", dev)
        lp = sequence_logprobs(self.peft, feats, self.ids, self.attn, tokens, mask, pack=not self.args.no_pack,
                               positions=drawn.positions)  # fmt: skip
        loss = policy_loss(lp, mask, adv())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.stats = {n: round(float(v), 4) for n, v in statistics(adv.rewards, adv.base, mask).items()}
        _sync(dev)
        t2 = time.perf_counter()
        parts = {"sample": t1 - t0, "reward": self.rewards.last_score_s, "after_sampling": t2 - t1, "step": t2 - t0}
        for name, d in parts.items():
            self.times[name].append(d)

    def measure(self, profile: bool = False) -> dict:
        from captune.ops.scst import packs_samples

        for i in range(2):  # graph capture, allocator warm-up
            self.step(i)
        for v in self.times.values():
            v.clear()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(2, 2 + self.args.steps):
            self.step(i)
        med = {n: statistics.median(v) for n, v in self.times.items()}
        b, k = self.b, self.args.k
        profile = self._profile() if profile and self.device.type == "cuda" else None
        return {
            "kernel_profile": profile,
            "images_per_step": b,
            "reward": "before the policy forward" if self.args.reward_inline else "while the policy forward runs",
            "logprob_path": "packed" if not self.args.no_pack and packs_samples(self.peft, self.attn) else "unpacked",
            "scst_images_per_s": round(b / med["step"], 1),
            "scst_captions_per_s": round(b * k / med["step"], 1),
            "median_s": {n: round(v, 4) for n, v in med.items()},
            "reward_captions_per_s": round(b * k / max(med["reward"], 1e-9)),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if self.device.type == "cuda" else None,
            "stats_last_step": self.stats,
        }

    def _profile(self) -> dict:
        """The GPU kernels of two more steps (``bench_targets.kernel_profile``: by class, the costliest 25)."""
        from captune.bench_targets import kernel_profile

        index = iter(range(100, 200))
        return kernel_profile(lambda: self.step(next(index)), calls=2, top=25)


def _measure_size(peft, tok, cfg, pool, scorer, args, images: int, device, profile: bool) -> dict:
    """One size's figures, or a record that it ran out of memory (the next size still runs)."""
    from captune.errors import is_out_of_memory

    stepper = Stepper(peft, tok, cfg, pool, scorer, args, images, device)
    try:
        return stepper.measure(profile)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        return {"images_per_step": images, "out_of_memory": True}
    finally:
        stepper.peft.zero_grad(set_to_none=True)
        del stepper
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    import transformers

    from captune.atomic import write_atomic
    from captune.bench import measure_captune_training, synthetic_captions
    from captune.config import LoraConfig
    from captune.evaluation.cider import CiderD
    from captune.model.lora import attach_lora

    args = _args()
    from captune.ops import decode_attention

    decode_attention.SHARED = not args.per_row_attention
    from captune.ops import mlp

    mlp.FUSED = not args.unfused_mlp
    model, processor, cfg, device = _model(args)
    tok = processor.tokenizer
    hidden = cfg.text_config.hidden_size
    g = torch.Generator(device=device).manual_seed(0)
    pool = torch.randn(1024, cfg.num_query_tokens, hidden, device=device, generator=g).to(model.dtype)
    result: dict = {}
    if not args.skip_ce:
        result.update(measure_captune_training(model, processor, pool[:256], images_per_step=52, text_tokens=12))
    t0 = time.perf_counter()
    scorer = CiderD(synthetic_captions(args.corpus))
    index_s = time.perf_counter() - t0
    torch.manual_seed(0)
    peft = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="seed"))
    from captune.model.lora_compute import use_16bit_compute

    result["lora_16bit_layers"] = use_16bit_compute(peft)  # as the trainers do (lora.compute=auto)
    # profiled: the last size only, since once the profiler has run CUPTI slows the process's later kernel
    # launches (pytorch/pytorch#144455) and a size timed after a profile would be timed slow
    sizes = args.images_per_step
    runs = [_measure_size(peft, tok, cfg, pool, scorer, args, b, device, args.profile and i == len(sizes) - 1)
            for i, b in enumerate(sizes)]  # fmt: skip
    done = [r for r in runs if not r.get("out_of_memory")]
    best = max(done, key=lambda r: r["scst_images_per_s"]) if done else {}
    result.update(
        {
            "what": "SCST step from cached features (sample K + CIDEr-D reward + teacher-forced backward + AdamW)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "cpu": f"{platform.processor() or platform.machine()}",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "architecture": ("builtin:demo (CPU smoke test, fp32)" if args.tiny else
                             "blip2-opt-2.7b (random weights, built from config), bf16") + ", LoRA r 8 q/k",
            "command": "python " + " ".join(sys.argv),
            "decode_attention": "one program per sequence" if args.per_row_attention else "shared prompt rows",
            "feed_forward": mlp.feed_forward_path(peft, pool[:1]),
            "k": args.k,
            "tokens_per_caption": args.tokens,
            "reward_corpus_images": args.corpus,
            "reward_index_build_s": round(index_s, 2),
            "runs": runs,
            "best_images_per_step": best.get("images_per_step"),
            "scst_images_per_s": best.get("scst_images_per_s"),
        }
    )  # fmt: skip
    if "train_flat_samples_per_s" in result:
        result["ce_images_per_s_flat"] = round(result["train_flat_samples_per_s"] / 5, 1)
        result["ce_images_per_s_packed"] = round(result["train_packed_samples_per_s"] / 5, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

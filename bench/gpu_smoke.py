"""GPU smoke benchmark of captune's training and captioning paths on the real
blip2-opt-2.7b architecture with random weights (nothing is downloaded).

It measures, on whatever CUDA GPU it runs on:
  * frozen image-feature extraction (ViT-g + Q-Former + projection), images/s;
  * captune's LoRA train step on cached features (seed LoRA: q/k, r 8), samples/s,
    with 32 query + 12 text tokens, and peak memory;
  * captune's batched greedy captioning from cached features, 20 new tokens pinned.

Usage: python bench/gpu_smoke.py --out results.json [--train-batch 64] [--gen-batch 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def blip2_opt_2_7b_config():
    """The published blip2-opt-2.7b configuration, written out (no Hub access)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        encoder_hidden_size=1408,
        cross_attention_frequency=2,
    )
    text = OPTConfig(
        vocab_size=50272,
        hidden_size=2560,
        num_hidden_layers=32,
        ffn_dim=10240,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=2560,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=50118,
        torch_dtype="float16",
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=50265,
    )


class _OptIds:
    """Just enough of OPT's tokenizer for a generation prompt: BOS (id 2) and no text."""

    padding_side = "left"

    def __call__(self, texts, **kw):
        if isinstance(texts, str):
            return {"input_ids": [2] if kw.get("add_special_tokens", True) else []}
        ids = torch.full((len(texts), 1), 2)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed(fn, repeats: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    from transformers import Blip2ForConditionalGeneration

    from captune.batching import IGNORE
    from captune.config import LoraConfig
    from captune.features import lm_loss
    from captune.modeling import attach_lora, count_parameters

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=256)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = blip2_opt_2_7b_config()
    with torch.device(dev):
        model = Blip2ForConditionalGeneration(cfg)
    model = model.to(torch.bfloat16)
    model.qformer.float()  # transformers keeps the Q-Former in fp32
    model.eval()
    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "architecture": "blip2-opt-2.7b (random weights, built from config)",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    import peft
    import transformers

    result["transformers"], result["peft"] = transformers.__version__, peft.__version__

    # 1. frozen features
    pix = torch.randn(64, 3, 224, 224, device=dev, dtype=torch.bfloat16)

    @torch.no_grad()
    def feats():
        return model.get_image_features(pixel_values=pix, return_dict=True).pooler_output

    feats()
    t = timed(feats, 5)
    result["features_images_per_s"] = round(64 / t, 1)
    f = feats()

    # 2. LoRA train step on cached features (captune's lm_loss)
    model = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="seed"))
    trainable, total = count_parameters(model)
    result["lora_trainable"] = trainable
    b = args.train_batch
    feats_b = f[:1].expand(b, -1, -1).contiguous()
    ids = torch.randint(3, 50000, (b, 32 + 12), device=dev)
    ids[:, :32] = 50265
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :33] = IGNORE
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    losses = []

    def step():
        model.train()
        loss = lm_loss(model, feats_b, ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    t = timed(step, 20)
    result["train_batch"] = b
    result["train_samples_per_s"] = round(b / t, 1)
    result["train_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    result["train_loss_first_last"] = [float(losses[0]), float(losses[-1])]
    # MFU: 6 * trainable-path FLOPs ~ 2 * fwd (frozen weights still need input grads) + fwd
    lm_params = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n)
    flops = 3 * 2 * lm_params * b * ids.size(1)
    result["train_tflops"] = round(flops / t / 1e12, 1)

    # 3. captioning from cached features, 20 new tokens pinned (captune's generate path)
    from captune.batching import generation_prompt
    from captune.features import generate_from_features

    g = args.gen_batch
    feats_g = f[:1].expand(g, -1, -1).contiguous()
    prompt = generation_prompt(_OptIds(), g, num_query_tokens=32, image_token_id=50265)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=1, eos_token_id=50118, pad_token_id=1)
    model.eval()
    pids, pmask = prompt.input_ids.to(dev), prompt.attention_mask.to(dev)
    generate_from_features(model, feats_g, pids, pmask, **kw)
    torch.cuda.reset_peak_memory_stats()
    t = timed(lambda: generate_from_features(model, feats_g, pids, pmask, **kw), 3)
    result["gen_batch"] = g
    result["gen_images_per_s"] = round(g / t, 1)
    result["gen_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

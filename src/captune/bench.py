"""``captune bench``: the seed's recipe against captune's paths, same GPU, same run.

Everything is built locally: the named architecture with random weights (speed
does not depend on weight values once output length is pinned), synthetic JPEGs of
COCO size, a tokenizer covering the model's vocabulary. Nothing is downloaded.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from captune.bench_targets import caption_parts, gpu_timed, kernel_profile, targets, targets_table

# bf16 dense peak by GPU name (vendor datasheets), for the MFU estimate.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
WORDS = (
    "a an the man woman dog cat bus train person people table street car sitting standing on in near with "
    "red blue white black green large small two three of to and is are riding holding plate pizza field "
    "grass water sky building window road sign tree boat horse bird kitchen room bed"
).split()


def _sync() -> None:
    torch.cuda.synchronize()


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, the caller having warmed ``fn`` up."""
    return gpu_timed(fn, repeats, warmup=False)


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def synthetic_jpegs(n: int, seed: int = 0, size=(640, 480)) -> list[bytes]:
    """COCO-sized JPEGs: smooth random colour fields (about 30-60 KB each), made in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one(i: int) -> bytes:
        rng = np.random.default_rng(seed * 1_000_003 + i)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        noise = rng.integers(0, 24, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(np.asarray(img, dtype=np.uint8) // 2 + noise + 40)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    with ThreadPoolExecutor(min(16, os.cpu_count() or 2)) as pool:
        return list(pool.map(one, range(n)))


def synthetic_captions(n: int, seed: int = 0, per_image: int = 5) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[" ".join(rng.choice(WORDS, size=int(rng.integers(8, 12)))) for _ in range(per_image)] for _ in range(n)]


# Words the InstructBLIP benchmark's instruction and planted captions use, beside ``WORDS``.
INSTRUCT_WORDS = ["short", "image", "caption", ":", "yellow", "brown", "grey", "number", "photo"]


def build_tokenizer(vocab_size: int, image_token_index: int, seq2seq: bool = False, llama: bool = False):
    """A word-level tokenizer whose ids cover the model's whole vocabulary, with OPT's specials in
    place (BOS = EOS = </s> before the text), T5's (pad 0, </s> 1 after the text, no BOS) or
    LLaMA's (<unk> 0, <s> 1 before the text, </s> 2 not appended, [PAD] after the 32,000 ids)."""
    from captune.demo.tokenizer import LLAMA_SPECIALS, OPT_SPECIALS, word_tokenizer

    words = WORDS + INSTRUCT_WORDS  # appended: the ids of WORDS stay those of earlier benchmarks
    if llama:  # [PAD] takes the id before <image>, as in Vicuna's InstructBLIP vocabulary
        tok = word_tokenizer(words, specials=LLAMA_SPECIALS, size=image_token_index - 1, max_length=512, llama=True)
        return tok, vocab_size
    specials = ("<pad>", "</s>", "<unk>") if seq2seq else OPT_SPECIALS
    tok = word_tokenizer(words, seq2seq=seq2seq, specials=specials, size=image_token_index, max_length=512)
    return tok, vocab_size


def qformer_tokenizer(vocab_size: int, words: tuple[str, ...] = tuple(WORDS + INSTRUCT_WORDS)):
    """BERT-style, as InstructBLIP's Q-Former tokenizer (``bert-base-uncased`` ids: [PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103), word-level over ``words``, ``vocab_size`` ids in all."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, **{f"[unused{i}]": i for i in range(1, 100)}}
    vocab.update({"[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    for w in words:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"[unused{len(vocab)}]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def build_processor(cfg):
    """A processor for ``cfg`` built locally: ``Blip2Processor``, or for InstructBLIP an
    ``InstructBlipProcessor`` with its BERT-style Q-Former tokenizer (LLaMA's conventions for Vicuna)."""
    from transformers import Blip2Processor, BlipImageProcessor, InstructBlipProcessor

    seq2seq = not cfg.use_decoder_only_language_model
    instruct = cfg.model_type == "instructblip"
    llama = instruct and cfg.text_config.model_type == "llama"
    tokenizer, vocab_size = build_tokenizer(cfg.text_config.vocab_size, cfg.image_token_index, seq2seq, llama)
    image_processor = BlipImageProcessor(
        size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    if instruct:
        qformer = qformer_tokenizer(cfg.qformer_config.vocab_size)
        processor = InstructBlipProcessor(image_processor, tokenizer, qformer, num_query_tokens=cfg.num_query_tokens)
    else:
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=cfg.num_query_tokens)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_index
    extra = vocab_size - len(processor.tokenizer)
    if extra > 0:  # ids past <image> exist in the model; give them names so any id decodes
        processor.tokenizer.add_tokens([f"<extra{i}>" for i in range(extra)])
    return processor


def build_model(arch: str, dtype: torch.dtype):
    from captune.model.architectures import blip2_config, model_class

    cfg = blip2_config(arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_class(cfg)(cfg)
    model = model.to(dtype)
    model.qformer.float()  # transformers keeps the Q-Former in fp32
    return model.eval(), cfg


def lm_params(model) -> int:
    lm = model.language_model
    emb = lm.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in lm.parameters()) - emb


# ------------------------------------------------------------------ measurements


def measure_features(model, processor, jpegs: list[bytes], batch: int) -> dict:
    """Image features: plain HF on decoded tensors and captune's path from JPEG bytes, in images/s; the
    latter also with the checkpoint's own vision modules (``model.vision_kernels=plain``) when auto fuses."""
    from captune.ops.features import image_features, pixel_values, qformer_matmul
    from captune.ops.lm import unwrap
    from captune.ops.vision import VISION_KERNELS, set_vision_kernels, vision_kernels, vision_path

    pv = pixel_values(processor, jpegs[:batch]).to("cuda", torch.bfloat16)
    with torch.no_grad():
        model.get_image_features(pixel_values=pv, return_dict=True)
        gpu = _timed(lambda: model.get_image_features(pixel_values=pv, return_dict=True), 5)

    def from_jpeg() -> float:
        image_features(model, processor, jpegs[:batch], batch_size=batch)
        _sync()
        t0 = time.perf_counter()
        image_features(model, processor, jpegs, batch_size=batch)
        _sync()
        return round(len(jpegs) / (time.perf_counter() - t0), 1)

    out = {
        "features_gpu_images_per_s": round(batch / gpu, 1),
        "features_from_jpeg_images_per_s": from_jpeg(),
        # the GPU-only line is plain HF (fp32 Q-Former, the checkpoint's modules); captune's path uses these
        "features_qformer_matmul": qformer_matmul(model),
        "features_vision_kernels": vision_path(model),
    }
    if vision_kernels(model) == "fused":
        before = getattr(unwrap(model), VISION_KERNELS, "auto")
        set_vision_kernels(model, "plain")
        try:
            out["features_from_jpeg_plain_vision_images_per_s"] = from_jpeg()
        finally:
            set_vision_kernels(model, before)
    return out


def synthetic_packed_batch(feats: torch.Tensor, images: int, k: int, text_tokens: int):
    """A packed batch of ``images`` x ``k`` random captions (BOS first, the rest labelled; ids from
    a seeded generator) and the images' features, cycled from ``feats``."""
    from captune.ops.batching import IGNORE
    from captune.ops.packing import PackedBatch

    dev = feats.device
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(4, 50000, (images, k, text_tokens), device=dev, generator=gen)
    ids[:, :, 0] = 2
    labels = ids.clone()
    labels[:, :, 0] = IGNORE
    packed = PackedBatch(ids, torch.ones_like(ids), labels, images * k)
    return packed, feats[torch.arange(images, device=dev) % feats.size(0)]


def measure_captune_training(  # noqa: PLR0913
    model, processor, feats, *, images_per_step: int, text_tokens: int, profile: bool = False, packed_only=False
) -> dict:
    """captune's training step, packed and unpacked, and packed with peft's fp32 adapter products; with
    ``profile``, only the packed step's kernels (``bench_targets.kernel_profile``); with ``packed_only``,
    only the packed step's rate and peak."""
    from captune.config import LoraConfig
    from captune.model.lora import attach_lora
    from captune.model.lora_compute import applies, use_16bit_compute
    from captune.ops.batching import IGNORE
    from captune.ops.lm import lm_loss
    from captune.ops.mlp import feed_forward_path
    from captune.ops.packing import packed_loss

    torch.manual_seed(0)
    peft_model = attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="seed"))
    peft_layers = {m: vars(m).get("forward") for m in peft_model.modules() if applies(m)}
    sixteen = use_16bit_compute(peft_model)  # as the trainer does (lora.compute=auto)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    k, q = 5, feats.size(1)
    g = images_per_step
    packed, f = synthetic_packed_batch(feats, g, k, text_tokens)
    ids, labels = packed.ids, packed.labels
    flat_ids = torch.cat(
        [torch.full((g * k, q), model.config.image_token_index, device="cuda"), ids.view(g * k, text_tokens)], dim=1
    )
    flat_labels = torch.cat([torch.full((g * k, q), IGNORE, device="cuda"), labels.view(g * k, text_tokens)], dim=1)
    flat_f = f.repeat_interleave(k, dim=0)
    mask = torch.ones_like(flat_ids)
    n_params = lm_params(model)

    def step(packed_mode: bool):
        peft_model.train()
        loss = (
            packed_loss(peft_model, f, packed)
            if packed_mode
            else lm_loss(peft_model, flat_f, flat_ids, mask, flat_labels)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if profile:
        out = {"train_packed_profile": kernel_profile(lambda: step(True))}
        peft_model.unload().eval()
        return out
    out = {}
    losses = []
    for name, mode in (("packed", True), ("flat", False))[: 1 if packed_only else 2]:
        for _ in range(3):
            step(mode)
        torch.cuda.reset_peak_memory_stats()
        t = _timed(lambda m=mode: losses.append(step(m).detach()), 10)
        tokens = g * (q + k * text_tokens) if mode else g * k * (q + text_tokens)
        out[f"train_{name}_samples_per_s"] = round(g * k / t, 1)
        out[f"train_{name}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        # forward 2 FLOPs per parameter per token, backward to the inputs the same again
        out[f"train_{name}_tflops"] = round(4 * n_params * tokens / t / 1e12, 1)
    out["train_lora_compute"] = (
        f"{sixteen} LoRA layers as one function each (LoraLinear), 16-bit products" if sixteen else "fp32 (peft)"
    )
    if packed_only:
        peft_model.unload().eval()
        return out
    out["train_packed_peft_fp32_lora_samples_per_s"] = _peft_fp32_rate(peft_layers, step, g * k)
    out["train_feed_forward"] = feed_forward_path(peft_model, f)
    out["train_batch_pairs"] = g * k
    out["train_text_tokens"] = text_tokens
    out["lm_parameters"] = n_params
    # the plain model back for the next measurements, in eval mode: step() set train mode, and HF generate
    # (and the features) would otherwise run with dropout on
    peft_model.unload().eval()
    return out


def profile_features(model, processor, jpegs: list[bytes], batch: int) -> dict:
    """The kernels of captune's feature path from JPEG bytes over four batches (``bench_targets.kernel_profile``)."""
    from captune.ops.features import image_features

    few = jpegs[: 4 * batch]
    return {
        "features_profile": kernel_profile(lambda: image_features(model, processor, few, batch_size=batch), 2),
        "features_profile_images": len(few),
    }


def _peft_fp32_rate(peft_layers: dict, step, pairs: int) -> float:
    """The same packed step with peft's fp32 adapter products (its layers' own forwards put back: the class's,
    with no bound method stored on the layer, which would be a reference cycle)."""
    for m, forward in peft_layers.items():
        if forward is None:
            vars(m).pop("forward", None)
        else:
            m.forward = forward
    for _ in range(3):
        step(True)
    return round(pairs / _timed(lambda: step(True), 10), 1)


def measure_captune_captioning(model, processor, feats, batches: tuple[int, ...], new_tokens: int) -> dict:
    """Greedy captioning of 4 batches per call (one decoder and CUDA graph per call, as in an
    eval) at each batch size, against HF ``generate`` from the same features at the first
    batch size; also how often the two give the same caption."""
    from captune.config import EvalConfig
    from captune.ops.generation import caption_features

    tok = processor.tokenizer
    by_batch = {}
    for batch in batches:
        n = 4 * batch
        f = feats[torch.arange(n, device="cuda") % feats.size(0)]
        cfg = EvalConfig(batch_size=batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        caption_features(model, tok, f[:batch], cfg)  # warm-up
        by_batch[batch] = round(n / _timed(lambda f=f, cfg=cfg: caption_features(model, tok, f, cfg), 2), 1)
        torch.cuda.empty_cache()
    batch = batches[0]
    n = 4 * batch
    f = feats[torch.arange(n, device="cuda") % feats.size(0)]
    cfg = EvalConfig(batch_size=batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    hf = EvalConfig(batch_size=batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, fast=False)
    fast, slow = caption_features(model, tok, f[:batch], cfg), caption_features(model, tok, f[:batch], hf)
    t_hf = _timed(lambda: caption_features(model, tok, f, hf), 1)
    best = max(by_batch, key=by_batch.get)
    parts = caption_parts(model, feats, best, new_tokens)
    from captune.ops import decode_attention as da

    return {
        "caption_decode_attention": (
            f"triton, {da.CHUNK} keys a chunk, {da.NUM_WARPS} warp(s), head dims {'split' if da.SPLIT_D else 'padded'}"
            + (f", {da.HEADS} heads a program ({da.HEADS_WARPS} warps)" if da.HEADS > 1 else "")
            if da.available(feats.device)
            else "sdpa"
        ),
        "caption_prefill": _prefill_path(model, feats, feats.size(1) + 1),  # image tokens + BOS
        "caption_images_per_s": by_batch[best],
        "caption_batch": best,
        "caption_parts": parts,
        "caption_feed_forward": _decoding_path(model, feats),
        "caption_images_per_s_by_batch": by_batch,
        "caption_hf_generate_images_per_s": round(n / t_hf, 1),
        "caption_hf_generate_batch": batch,
        # exact equality of whole captions; on random weights the next-token logits are
        # nearly flat, so bf16 rounding flips ties (the GPU test checks a trained model)
        "caption_fast_equals_generate_random_weights": round(
            sum(a == b for a, b in zip(fast, slow, strict=True)) / batch, 4
        ),
    }


@torch.no_grad()
def _prefill_path(model, feats, prompt_rows: int) -> str:
    """How the static-cache decoder's prefill and residual sums run for ``model`` on ``feats``' device, for
    ``prompt_rows`` rows (``captune bench`` records it)."""
    from captune.ops import decode_attention as da
    from captune.ops import fast_decode, vision
    from captune.ops.lm import unwrap

    lm = unwrap(model).language_model
    cfg, layer = lm.config, lm.model.decoder.layers[0]
    heads, dtype = cfg.num_attention_heads, layer.self_attn.v_proj.weight.dtype
    rows = torch.empty(1, heads, prompt_rows, cfg.hidden_size // heads, device=feats.device, dtype=dtype)
    kernel = da.prefills(rows, rows, rows, rows, rows)
    attention = "one Triton kernel with the cache fill" if kernel else "SDPA, then the cache copied"
    parts = [f"prefill attention: {attention}", "the last layer for the last row only (SDPA)"]
    fused = fast_decode.FUSED_NORMS and vision.ADD_NORM and da.available(feats.device)
    if cfg.do_layer_norm_before and fused:
        plain = vision._plain_norm(layer.self_attn_layer_norm, rows.view(-1, cfg.hidden_size))
        parts.append("residual sums + layer norms " + ("in one pass" if plain else "as torch ops"))
    return ", ".join(parts)


@torch.no_grad()
def _decoding_path(model, feats) -> str:
    """The decoder's feed-forward as decoding runs it (without autograd: ``ops.mlp.fuses``)."""
    from captune.ops.mlp import feed_forward_path

    return feed_forward_path(model, feats)


def measure_seed(arch: str, processor, jpegs: list[bytes], steps: int, captions: int) -> dict:
    """The seed notebook's recipe: HF Trainer, batch 1 x 2 accumulation, fp16 weights, LoRA q/k r 8,
    labels = input_ids padded to 42 text tokens; captions one image at a time with ``generate``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model, cfg = build_model(arch, torch.float16)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules=["q_proj", "k_proj"])
    )
    from PIL import Image

    pv = processor.image_processor([Image.open(io.BytesIO(b)) for b in jpegs[:32]], return_tensors="pt")[
        "pixel_values"
    ].half()
    text = processor.tokenizer(
        ["a man riding a horse on a field"] * 32, padding="max_length", max_length=42, return_tensors="pt"
    )
    q = cfg.num_query_tokens
    ids = torch.cat([torch.full((32, q), cfg.image_token_index), text["input_ids"]], dim=1)
    mask = torch.cat([torch.ones(32, q, dtype=torch.long), text["attention_mask"]], dim=1)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"pixel_values": pv[i], "input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i]}

    args = TrainingArguments(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "captune-seed-bench"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        learning_rate=1e-5,
        warmup_steps=20,
        max_steps=steps,
        fp16=True,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    torch.cuda.reset_peak_memory_stats()
    metrics = trainer.train().metrics
    out = {
        "seed_train_samples_per_s": round(metrics["train_samples_per_second"], 2),
        "seed_train_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }
    model.eval()
    out["seed_caption_images_per_s"] = _seed_captioning(model.get_base_model(), pv.to("cuda"), captions)
    del trainer, model
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def _seed_captioning(model, pixels: torch.Tensor, n: int) -> float:
    """The seed's evaluation loop: ``generate`` on one image at a time (20 new tokens pinned)."""

    def caption_all():
        for i in range(n):
            model.generate(pixel_values=pixels[i : i + 1], max_new_tokens=20, min_new_tokens=20)

    model.generate(pixel_values=pixels[:1], max_new_tokens=20, min_new_tokens=20)
    return round(n / _timed(caption_all, 1), 2)


# What the job imports, so that importing it once writes their compiled modules.
_JOB_IMPORTS = (
    "import importlib, pkgutil, captune\n"
    "for m in pkgutil.walk_packages(captune.__path__, 'captune.'):\n"
    "    if not m.name.startswith(('captune.serve', 'captune.bench', 'captune.__main__')):\n"
    "        importlib.import_module(m.name)\n"
    "import peft, accelerate, safetensors.torch\n"
    "from transformers import Blip2ForConditionalGeneration, Blip2Processor, AutoTokenizer, BlipImageProcessor\n"
    "from transformers.models.blip_2 import modeling_blip_2, processing_blip_2\n"
)


def warm_bytecode(env: dict, prefix: Path) -> str:
    """Give the job compiled modules, as a normal install has (pip writes .pyc files).

    Where writing them is switched off (PYTHONDONTWRITEBYTECODE, as on the machines these
    benchmarks ran on), every fresh process compiles the source of torch and transformers
    again: about 9 s of the job, measured with py-spy. One process that imports what the job
    imports writes them to a cache folder (PYTHONPYCACHEPREFIX), and the job reads them from
    there; the untimed ``captune data`` run adds what it imports. Changes ``env`` in place;
    says what it did."""
    if not sys.dont_write_bytecode and not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return "the environment's own .pyc files"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    done = subprocess.run([sys.executable, "-c", _JOB_IMPORTS], env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the job still runs; the figure then includes compiling
        return f"not written: importing the job's modules failed ({(done.stderr or '').strip()[-300:]})"
    return f"written to {prefix} by one process importing the job's modules (PYTHONDONTWRITEBYTECODE was set)"


def run_e2e(model, cfg, processor, jpegs: list[bytes], captions: list[list[str]], work: Path, log) -> dict:
    """The coco5k job from local files: write the model and a COCO folder, prepare, then time ``captune run``."""
    from captune.config import load_config

    model_dir, data_dir, run_dir = work / "model", work / "coco", work / "run"
    if not (model_dir / "config.json").is_file():
        log("  e2e: saving the model in checkpoint format")
        model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="5GB")
        processor.save_pretrained(model_dir)
    model.to("cpu")  # free this process's GPU memory for the job
    torch.cuda.empty_cache()
    if not (data_dir / "captions.json").is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i, (jpg, caps) in enumerate(zip(jpegs, captions, strict=True)):
            name = f"{i:012d}.jpg"
            (data_dir / name).write_bytes(jpg)
            images.append({"id": i, "file_name": name})
            anns += [{"image_id": i, "caption": c} for c in caps]
        (data_dir / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.source=coco:{data_dir / 'captions.json'}",
        "eval.min_new_tokens=20",
        "eval.max_new_tokens=20",
    ]
    job = load_config("coco5k", overrides)  # fail here, not in the subprocess
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), HF_HUB_OFFLINE="1")
    bytecode = warm_bytecode(env, work / "pycache")
    cmd = [sys.executable, "-m", "captune.cli"]
    subprocess.run(
        cmd + ["data", str(run_dir), "--recipe", "coco5k", *overrides], check=True, env=env, capture_output=True
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd + ["run", "coco5k", "--out", str(run_dir), *overrides], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError("e2e run failed: " + (done.stderr or done.stdout)[-2000:])
    (work / "e2e.log").write_text(done.stdout + "\n" + done.stderr)
    phases = json.loads((run_dir / "timings.json").read_text())["phases"]
    phases.pop("data", None)  # prepared beforehand by an untimed ``captune data``
    train = json.loads((run_dir / "adapter" / "training.json").read_text())
    in_line = sum(v for k, v in phases.items() if "overlapped" not in k)
    return {
        **run_caption_cli(cmd, env, model_dir, run_dir, data_dir, len(jpegs)),
        "e2e_images": len(jpegs),
        "e2e_train_steps": train["steps"],
        "e2e_train_batch_pairs": job.train.batch_size * job.train.grad_accum,
        "e2e_bytecode": bytecode,
        "e2e_job_s": round(wall, 1),
        "e2e_phases_s": phases,
        # the job's time outside start-up and its phases: between phases, and the process's exit
        "e2e_outside_phases_s": round(wall - in_line, 1),
        "e2e_train_samples_per_s": round(train["samples_per_s"], 1),
        "e2e_log_head": done.stdout[:3000],
        "e2e_log_tail": done.stdout[-1500:],
    }


CAPTION_CLI_BATCH = 1024  # the decoder's pace at 1024 is within 5% of 2048's; 4 batches a chunk of files


def run_caption_cli(cmd: list[str], env: dict, model_dir: Path, run_dir: Path, data_dir: Path, n: int) -> dict:
    """``captune caption`` over the job's JPEG files with its adapter, in a fresh process, as a user runs it
    (``--batch-size 1024``, 20 new tokens): images/s from the first file read to the last row written, less
    the model load, as the command reports it, and the command's whole time."""
    out = run_dir / "caption-cli.jsonl"
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd + ["caption", str(data_dir), "--model", str(model_dir), "--adapter", str(run_dir / "adapter"),
               "--batch-size", str(CAPTION_CLI_BATCH), "--max-new-tokens", "20", "--format", "jsonl",
               "--output", str(out)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    found = parse_caption_report(done.stderr)
    if done.returncode != 0 or not found or found["images"] != n:
        return {"caption_cli_error": (done.stderr or done.stdout)[-1500:]}
    return {
        "caption_cli_images_per_s": found["images_per_s"],
        "caption_cli_captioning_s": found["seconds"],
        "caption_cli_model_load_s": found["model_load_s"],
        "caption_cli_command_s": round(wall, 1),
        "caption_cli_images": n,
        "caption_cli_batch": CAPTION_CLI_BATCH,
    }


def parse_caption_report(stderr: str) -> dict | None:
    """The figures of ``captune caption``'s closing line on stderr, or None."""
    found = re.search(r"captioned (\d+) image\(s\) in ([\d.]+)s \(([\d.]+) images/s; model load ([\d.]+)s", stderr)
    if not found:
        return None
    n, seconds, rate, load = found.groups()
    return {"images": int(n), "seconds": float(seconds), "images_per_s": float(rate), "model_load_s": float(load)}


def run_bench(
    arch: str = "blip2-opt-2.7b",
    *,
    images: int = 5000,
    e2e: bool = True,
    seed_steps: int = 40,
    work: Path | None = None,
    log=print,
    e2e_only: bool = False,
    captioning_only: bool = False,
) -> dict:
    if not torch.cuda.is_available():
        from captune.errors import UserError

        raise UserError("captune bench needs a CUDA GPU; run it on a GPU machine")
    result = _environment(arch)
    t0 = time.perf_counter()
    jpegs = synthetic_jpegs(images)
    caps = synthetic_captions(images)
    log(f"  {images} synthetic 640x480 JPEGs in {time.perf_counter() - t0:.1f}s")
    model, cfg = build_model(arch, torch.bfloat16)
    processor = build_processor(cfg)
    result["parameters"] = sum(p.numel() for p in model.parameters())

    if e2e_only:
        result.update(run_e2e(model, cfg, processor, jpegs, caps, Path(work or "/tmp/captune-bench"), log))
        result["targets"] = targets(result)
        return result
    log("  features ...")
    result.update(measure_features(model, processor, jpegs[:2048], batch=128))
    from captune.ops.features import image_features

    feats = image_features(model, processor, jpegs[:256], batch_size=128)
    result["features_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    if captioning_only:
        result.update(measure_captune_captioning(model, processor, feats, batches=(1024, 2048), new_tokens=20))
        result["targets"] = targets(result)
        return result
    log("  captune training ...")
    result.update(measure_captune_training(model, processor, feats, images_per_step=52, text_tokens=12))
    log(f"  {json.dumps({k: v for k, v in result.items() if k.startswith(('train', 'features'))})}")
    log("  captune captioning ...")
    result.update(measure_captune_captioning(model, processor, feats, batches=(1024, 2048), new_tokens=20))
    log(f"  {json.dumps({k: v for k, v in result.items() if k.startswith('caption')})}")
    result["caption_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    del feats
    torch.cuda.empty_cache()  # the job below runs in its own process and needs the memory
    if e2e:
        log("  end-to-end coco5k job ...")
        work = Path(work or Path(os.environ.get("TMPDIR", "/tmp")) / "captune-bench")
        _guarded(result, "e2e", log, lambda: run_e2e(model, cfg, processor, jpegs, caps, work, log))
    model.to("cpu")  # the seed recipe builds its own model; this one comes back for the profiles
    torch.cuda.empty_cache()
    log("  seed recipe ...")
    _guarded(result, "seed", log, lambda: measure_seed(arch, processor, jpegs, seed_steps, captions=16))
    if "seed_error" not in result:
        _guarded(result, "ratios", log, lambda: _ratios(result, peak_tflops(result["gpu"])))
    if e2e and "e2e_error" not in result:
        log("  4-bit training ...")
        bf16 = result.get("train_packed_samples_per_s")
        _guarded(result, "train_4bit", log, lambda: measure_4bit(work / "model", jpegs, bf16))
    log("  kernel profiles ...")
    _guarded(result, "profile", log, lambda: _profiles(model.to("cuda"), processor, jpegs))
    _guarded(result, "targets", log, lambda: {"targets": targets(result)})
    return result


def _guarded(result: dict, what: str, log, fn) -> None:
    """``result.update(fn())``; a failure is recorded as ``WHAT_error`` and logged, and the run goes on."""
    try:
        result.update(fn())
    except Exception as exc:  # keep the other measurements; say what failed
        result[f"{what}_error"] = f"{type(exc).__name__}: {exc}"[-3000:]
        log(f"  {what} failed: {result[f'{what}_error'][-500:]}")


def measure_4bit(model_dir: Path, jpegs: list[bytes], bf16_rate: float | None) -> dict:
    """Issue 24's 4-bit bar: the packed step at the bf16 one's micro-batch on the checkpoint the job loaded,
    its language model in NF4 (``model.quantization=4bit``, bitsandbytes), as a share of bf16's rate."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"train_4bit_error": "bitsandbytes is not installed (pip install 'captune[quant]')"}
    from captune.config import ModelConfig
    from captune.model.load import load_model
    from captune.ops.features import image_features

    loaded = load_model(ModelConfig(name_or_path=str(model_dir), device="cuda", quantization="4bit"))
    feats = image_features(loaded.model, loaded.processor, jpegs[:256], batch_size=128)
    got = measure_captune_training(
        loaded.model, loaded.processor, feats, images_per_step=52, text_tokens=12, packed_only=True
    )
    out = {
        "train_4bit_bitsandbytes": importlib.metadata.version("bitsandbytes"),
        "train_4bit_packed_samples_per_s": got["train_packed_samples_per_s"],
        "train_4bit_peak_gb": got["train_packed_peak_gb"],
        "train_4bit_lora_compute": got["train_lora_compute"],
    }
    if bf16_rate:
        out["train_4bit_share_of_bf16"] = round(got["train_packed_samples_per_s"] / bf16_rate, 3)
    del loaded, feats
    torch.cuda.empty_cache()
    return out


def _profiles(model, processor, jpegs: list[bytes]) -> dict:
    """The kernels of the packed training step and of captune's features, measured after everything else:
    once the profiler has run, CUPTI stays loaded and slows every later kernel launch of the process
    (pytorch/pytorch#144455; a packed step timed after one profile ran at 1653 samples/s instead of ~2300)."""
    from captune.ops.features import image_features

    model.eval()
    out = profile_features(model, processor, jpegs, batch=128)
    feats = image_features(model, processor, jpegs[:256], batch_size=128)
    out |= measure_captune_training(model, processor, feats, images_per_step=52, text_tokens=12, profile=True)
    return out


def _environment(arch: str) -> dict:
    """GPU, date, library versions and the command: what every committed result names."""
    import peft
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(0),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architecture": f"{arch} (random weights, built from config)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "command": "captune bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "run_bench()",
    }


def _ratios(result: dict, peak: float | None) -> dict:
    """MFU estimates against the GPU's bf16 peak, and captune's speed-ups over the seed recipe."""
    out = {}
    if peak:
        out["peak_bf16_tflops"] = peak
        out["train_packed_mfu"] = round(result["train_packed_tflops"] / peak, 3)
        out["train_flat_mfu"] = round(result["train_flat_tflops"] / peak, 3)
    out["speedup_train_vs_seed"] = round(result["train_packed_samples_per_s"] / result["seed_train_samples_per_s"], 1)
    out["speedup_caption_vs_seed"] = round(result["caption_images_per_s"] / result["seed_caption_images_per_s"], 1)
    return out


def table(result: dict) -> str:
    rows = [
        ("seed recipe training (HF Trainer, batch 1x2, fp16)", result.get("seed_train_samples_per_s"), "samples/s"),
        ("captune training, packed (bf16, cached features)", result.get("train_packed_samples_per_s"), "samples/s"),
        ("captune training, unpacked", result.get("train_flat_samples_per_s"), "samples/s"),
        ("seed-style captioning (one image at a time)", result.get("seed_caption_images_per_s"), "images/s"),
        ("captune captioning (static cache, CUDA graphs)", result.get("caption_images_per_s"), "images/s"),
        ("HF generate from cached features, same batch", result.get("caption_hf_generate_images_per_s"), "images/s"),
        ("feature extraction, GPU only", result.get("features_gpu_images_per_s"), "images/s"),
        ("feature extraction from JPEG bytes", result.get("features_from_jpeg_images_per_s"), "images/s"),
        ("training peak memory, packed", result.get("train_packed_peak_gb"), "GB"),
        ("seed training peak memory", result.get("seed_train_peak_gb"), "GB"),
        ("training MFU estimate, packed", result.get("train_packed_mfu"), "of bf16 peak"),
        ("end-to-end coco5k job (load to report, prepared data)", result.get("e2e_job_s"), "s"),
        ("training speed-up over the seed", result.get("speedup_train_vs_seed"), "x"),
        ("captioning speed-up over the seed", result.get("speedup_caption_vs_seed"), "x"),
    ]
    lines = [
        f"captune bench on {result['gpu']} ({result['architecture']})",
        "",
        "| measurement | value | unit |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {a} | {b if b is not None else 'n/a'} | {c} |" for a, b, c in rows]
    if result.get("targets"):
        lines += ["", "Issue 24's targets:", "", targets_table(result["targets"])]
    return "\n".join(lines)

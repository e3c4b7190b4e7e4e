"""Build the demo's tiny BLIP-2 base model, deterministically, on the CPU.

The model uses the real classes (``Blip2ForConditionalGeneration`` with an OPT
language model, ``Blip2Processor``, a fast tokenizer) at a small size, is
pre-trained on the ``plain`` caption style of the synthetic world, and is saved in
Hugging Face format. Everything downstream loads it with ``from_pretrained`` from
that folder, exactly as it would load ``Salesforce/blip2-opt-2.7b``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from captune.atomic import staged_dir
from captune.demo import world
from captune.ops.batching import encode_texts, training_text

DEMO_VERSION = "v1"
IMAGE_SIZE = 64


@dataclass(frozen=True)
class DemoBuildSpec:
    """How the demo base model is built. Changing any field changes the cache key."""

    images: int = 4000
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1234
    vision_hidden: int = 96
    qformer_hidden: int = 96
    text_hidden: int = 128
    layers: int = 2
    query_tokens: int = 8
    patch_size: int = 8
    vision_layers: int = 2

    def key(self) -> str:
        return f"demo-{DEMO_VERSION}-" + "-".join(str(v) for v in asdict(self).values())


def build_tokenizer(seq2seq: bool = False):
    """A word-level fast tokenizer over the demo vocabulary, OPT-style (BOS = EOS = </s> before the
    text), or with ``seq2seq`` T5-style (no BOS, </s> after the text)."""
    from captune.demo.tokenizer import word_tokenizer

    return word_tokenizer(world.vocabulary(), seq2seq=seq2seq)


def build_processor(spec: DemoBuildSpec, seq2seq: bool = False):
    from transformers import Blip2Processor, BlipImageProcessor

    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    # The processor registers <image> with the tokenizer itself.
    return Blip2Processor(image_processor, build_tokenizer(seq2seq), num_query_tokens=spec.query_tokens)


def build_config(spec: DemoBuildSpec, vocab_size: int, image_token_id: int):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=spec.patch_size,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=spec.qformer_hidden,
        intermediate_size=spec.qformer_hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=4,
        encoder_hidden_size=spec.vision_hidden,
        cross_attention_frequency=1,
        vocab_size=8,
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        word_embed_proj_dim=spec.text_hidden,
        num_hidden_layers=spec.layers,
        ffn_dim=spec.text_hidden * 4,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        dropout=0.0,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=spec.query_tokens,
        image_token_index=image_token_id,
    )


def pretrain(model, processor, spec: DemoBuildSpec, log=print, device: str = "cpu") -> list[float]:
    """Train every weight on the plain caption style; returns the loss per logged step."""
    import io

    from PIL import Image

    torch.manual_seed(spec.seed)
    items = world.make_items("plain", spec.images, seed=spec.seed, size=IMAGE_SIZE)
    pixels = processor.image_processor([Image.open(io.BytesIO(it["image"])) for it in items], return_tensors="pt")[
        "pixel_values"
    ]
    model.to(device)
    pixels = pixels.to(device)
    pairs = [(i, c) for i, it in enumerate(items) for c in it["captions"]]
    tokenizer = processor.tokenizer
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    steps = spec.epochs * (len(pairs) // spec.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(spec.seed)
    losses: list[float] = []
    model.train()
    step = 0
    for _ in range(spec.epochs):
        rng.shuffle(pairs)
        for start in range(0, len(pairs) - spec.batch_size + 1, spec.batch_size):
            chunk = pairs[start : start + spec.batch_size]
            text = encode_texts(
                tokenizer,
                [training_text(c, "", tokenizer.eos_token) for _, c in chunk],
                num_query_tokens=cfg.num_query_tokens,
                image_token_id=cfg.image_token_index,
            )
            out = model(
                pixel_values=pixels[[i for i, _ in chunk]],
                input_ids=text.input_ids.to(device),
                attention_mask=text.attention_mask.to(device),
                labels=text.labels.to(device),
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == 1 or step % 25 == 0 or step == steps:
                losses.append(out.loss.item())
                log(f"  demo base pre-training step {step}/{steps} loss {losses[-1]:.3f}")
    model.eval().to("cpu")
    return losses


def build_demo_model(out_dir: Path, spec: DemoBuildSpec = DemoBuildSpec(), log=print, device: str = "cpu") -> Path:
    """Build, pre-train and save the demo base model to ``out_dir`` (atomically)."""
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(spec.seed)
    processor = build_processor(spec)
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = build_config(spec, vocab_size=len(tokenizer), image_token_id=image_token_id)
    model = Blip2ForConditionalGeneration(config)
    t0 = time.perf_counter()
    losses = pretrain(model, processor, spec, log=log, device=device)
    out_dir = Path(out_dir)
    meta = {
        "spec": asdict(spec),
        "version": DEMO_VERSION,
        "losses": losses,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "captune_demo.json").write_text(json.dumps(meta, indent=2))
    return out_dir

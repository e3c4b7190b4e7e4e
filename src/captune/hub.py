"""Model card, staged upload folder and Hub push; merged-model export.

Tokens come only from ``HF_TOKEN`` or huggingface_hub's cached login. They are
passed to ``HfApi`` and nowhere else: never printed, logged, or written to the
staged folder, the card, or the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from captune.config import Config
from captune.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def get_token() -> str:
    """The Hub token from HF_TOKEN or the cached login; a clear error when there is none."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token as cached

            token = cached()
        except Exception:
            token = None
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run 'hf auth login', then push again")
    return token


def _dataset_ids(cfg: Config) -> list[str]:
    kind, _, rest = cfg.data.source.partition(":")
    return [rest.split("@")[0]] if kind == "hub" else []


def model_card(cfg: Config, comparison: dict | None, repo_id: str, base_model: str) -> str:
    """README.md with Hub metadata, the metric table, the recipe and a usage snippet."""
    import yaml

    meta = {
        "base_model": base_model,
        "library_name": "peft",
        "pipeline_tag": "image-to-text",
        "tags": ["image-captioning", "blip-2", "lora", "peft", "captune"],
        "license": "mit",
    }
    datasets = _dataset_ids(cfg)
    if datasets:
        meta["datasets"] = datasets
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    lines += [
        f"A LoRA adapter for [`{base_model}`](https://huggingface.co/{base_model}) trained with "
        f"[captune](https://github.com/captune/captune), recipe `{cfg.name}`.",
        "",
        cfg.description,
        "",
    ]
    if comparison:
        from captune.evaluation.compare import markdown_table

        lines += [
            "## Results",
            "",
            f"Scored on {comparison['images']} held-out `{cfg.eval.split}` images against all references with the "
            "official COCO caption scorer (pycocoevalcap: PTB tokenization, METEOR 1.5, CIDEr-D). "
            "Intervals: paired bootstrap over images.",
            "",
            markdown_table(comparison),
            "",
        ]
    lines += [
        "## Training",
        "",
        f"- LoRA r {cfg.lora.r}, alpha {cfg.lora.alpha}, dropout {cfg.lora.dropout}, "
        f"targets `{cfg.lora.target_modules}` (language model only)",
        f"- {cfg.train.epochs} epochs, batch {cfg.train.batch_size} x {cfg.train.grad_accum}, lr {cfg.train.lr:g} "
        f"({cfg.train.schedule}), adapter kept by validation {cfg.train.select}",
        f"- data: `{cfg.data.source}`, {cfg.data.num_images or 'all'} images, split {cfg.data.ratios} by image",
        "",
        "The full resolved recipe is in `captune_config.yaml`.",
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from PIL import Image",
        "from transformers import Blip2ForConditionalGeneration, Blip2Processor",
        "",
        f'base = Blip2ForConditionalGeneration.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        f'processor = Blip2Processor.from_pretrained("{repo_id}")',
        'inputs = processor(images=Image.open("photo.jpg"), return_tensors="pt")',
        "print(processor.batch_decode(model.generate(**inputs, max_new_tokens=30), skip_special_tokens=True))",
        "```",
        "",
        "Or with captune: `captune caption photo.jpg --model " + base_model + " --adapter " + repo_id + "`.",
        "",
    ]
    return "\n".join(lines)


def stage_upload(run: Path, cfg: Config, repo_id: str, out: Path) -> Path:
    """Write the exact folder that would be uploaded: adapter, processor, card, recipe, metrics."""
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run} has no adapter; train it first ('captune train {run}')")
    comparison = json.loads((run / "comparison.json").read_text()) if (run / "comparison.json").is_file() else None
    base_model = cfg.model.name_or_path
    from captune.atomic import staged_dir

    with staged_dir(out) as tmp:
        for name in ADAPTER_FILES + PROCESSOR_FILES:
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "captune_config.yaml").write_text(cfg.to_yaml())
        if comparison:
            (tmp / "comparison.json").write_text(json.dumps(comparison, indent=2))
        (tmp / "README.md").write_text(model_card(cfg, comparison, repo_id, base_model), encoding="utf-8")
    return out


def push(folder: Path, repo_id: str, *, private: bool, token: str) -> str:
    """Create the repo (if needed) and upload ``folder``; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload LoRA adapter trained with captune",
        )
    except Exception as exc:  # network, auth, permissions; the message may not be safe to echo
        raise UserError(
            f"upload to {repo_id} failed ({type(exc).__name__}); check the repo name, your token's write "
            "access and your connection"
        ) from None
    return str(url)


def merge(run: Path, cfg: Config, out: Path) -> Path:
    """Base model with the run's adapter merged in, saved as safetensors with its processor."""
    import torch
    from peft import PeftModel

    from captune.atomic import staged_dir
    from captune.model.load import load_model

    if not (run / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{run} has no adapter; train it first ('captune train {run}')")
    loaded = load_model(cfg.model, device=torch.device("cpu"))
    merged = PeftModel.from_pretrained(loaded.model, str(run / "adapter")).merge_and_unload()
    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.processor.save_pretrained(tmp)
    return out

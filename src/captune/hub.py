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
# InstructBlipProcessor saves its Q-Former (BERT-style) tokenizer in a folder of its own.
PROCESSOR_SUBFOLDERS = ("qformer_tokenizer",)


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


# Licenses of the BLIP-2 checkpoints Salesforce publishes (their model cards say mit), for offline pushes.
KNOWN_LICENSES = {"Salesforce/blip2-": "mit"}


def hub_base_model(cfg: Config, override: str | None = None) -> str | None:
    """The base model's Hub id: --base-model, hub.base_model, or model.name_or_path when it is one."""
    from captune.config import is_hub_id

    if override is not None:
        if not is_hub_id(override):
            raise UserError(f"--base-model '{override}' is not a Hub model id; give it as OWNER/NAME")
        return override
    for name in (cfg.hub.base_model, cfg.model.name_or_path):
        if name and is_hub_id(name):
            return name
    return None


def not_on_hub(cfg: Config) -> str:
    """Why the card has no base model, and the fix."""
    if cfg.model.name_or_path == "builtin:demo":
        return (
            "the base model builtin:demo exists only inside captune, so nobody could load this adapter "
            "from the Hub; train on a Hub model (model.name_or_path=OWNER/NAME) to push"
        )
    return (
        f"the base model is the local folder '{Path(cfg.model.name_or_path).name}', not a Hub id; "
        "name the Hub model it is a copy of with --base-model OWNER/NAME (or set hub.base_model)"
    )


def base_license(cfg: Config, base: str | None, *, online: bool) -> str:
    """hub.license, else the base model's license: its local model card, a known one, or the Hub's."""
    if cfg.hub.license:
        return cfg.hub.license
    local = Path(cfg.model.name_or_path).expanduser() / "README.md"
    if local.is_file():
        from huggingface_hub import ModelCard

        try:
            found = ModelCard.load(local).data.license
        except Exception:
            found = None
        if found:
            return str(found)
    if base is None:
        return "other"
    for prefix, license_id in KNOWN_LICENSES.items():
        if base.startswith(prefix):
            return license_id
    if online:
        from huggingface_hub import model_info

        try:
            found = (model_info(base, timeout=10).card_data or {}).get("license")
        except Exception:
            found = None
        if found:
            return str(found)
    return "other"


def _eval_results(cfg: Config, comparison: dict | None) -> list:
    """model-index entries: the fine-tuned test metrics on the run's dataset and split."""
    from huggingface_hub import EvalResult

    from captune.summary import public_source

    if not comparison:
        return []
    datasets = _dataset_ids(cfg)
    source = public_source(cfg.data.source)
    return [
        EvalResult(
            task_type="image-to-text",
            task_name="Image captioning",
            dataset_type=datasets[0] if datasets else source.partition(":")[0],
            dataset_name=source,
            dataset_split=cfg.eval.split,
            metric_type=row["metric"].lower(),
            metric_name=row["metric"],
            metric_value=round(float(row["finetuned"]), 4),
        )
        for row in comparison["rows"]
    ]


def is_instructblip_adapter(adapter: Path) -> bool:
    """True when a run's adapter folder was saved with an InstructBLIP processor (its processor class)."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            if json.loads((adapter / name).read_text()).get("processor_class") == "InstructBlipProcessor":
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("captune", "transformers", "peft", "torch"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(out)


def model_card(
    cfg: Config,
    comparison: dict | None,
    repo_id: str,
    base_model: str | None,
    *,
    license_id: str = "other",
    processor_in_repo: bool = True,
    instruct: bool = False,
) -> str:
    """README.md: Hub metadata (model-index with the test metrics), results, use, limits, loading.
    ``instruct``: the base is an InstructBLIP (its classes in the snippet, the instruction explained)."""
    from huggingface_hub import ModelCard, ModelCardData

    from captune import summary

    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="image-to-text",
        license=license_id,
        datasets=_dataset_ids(cfg) or None,
        tags=["image-captioning", "instructblip" if instruct else "blip-2", "lora", "peft", "captune"],
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(cfg, comparison) or None,
    )
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else summary.model_label(cfg)
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A LoRA adapter for {base_text}, trained with captune (recipe `{cfg.name}`).",
        "",
        summary.description(cfg),
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
    lines += _card_body(cfg, comparison, repo_id, base_model, processor_in_repo, instruct)
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))


def _card_body(cfg: Config, comparison: dict | None, repo_id: str, base: str | None, own_processor: bool,
               instruct: bool = False) -> list[str]:  # fmt: skip
    from captune.summary import public_source

    e = cfg.eval
    prompt = f', text="{cfg.model.prompt}"' if cfg.model.prompt else ""
    scope = f"{comparison['images']} test images" if comparison else "its held-out split"
    lines = [
        "## Intended use and limitations",
        "",
        f"Captioning images like those of `{public_source(cfg.data.source)}`, in the caption style of that data. "
        f"The scores above hold for {scope} of the same source; on other images or styles expect the base "
        "model's behaviour or worse. The adapter inherits the base model's biases and failure modes, "
        "and captions are in the language of the training captions.",
        "",
        "## Training",
        "",
        f"- LoRA r {cfg.lora.r}, alpha {cfg.lora.alpha}, dropout {cfg.lora.dropout}, "
        f"targets `{cfg.lora.target_modules}`",
        f"- {cfg.train.epochs} epochs, batch {cfg.train.batch_size} x {cfg.train.grad_accum}, lr {cfg.train.lr:g} "
        f"({cfg.train.schedule}), adapter kept by validation {cfg.train.select}",
        f"- data: `{public_source(cfg.data.source)}`, {cfg.data.num_images or 'all'} images, "
        f"split {cfg.data.ratios} by image",
        "",
        "The full resolved recipe is in `captune_config.yaml`.",
        "",
        "## Decoding",
        "",
        f"num_beams {e.num_beams}, max_new_tokens {e.max_new_tokens}, min_new_tokens {e.min_new_tokens}, "
        f"repetition_penalty {e.repetition_penalty:g}, length_penalty {e.length_penalty:g}"
        + (f", prompt `{cfg.model.prompt}` (removed from the output)" if cfg.model.prompt else ""),
        "",
        *(
            [
                "InstructBLIP's Q-Former reads the prompt beside the image, so the image features depend on it: "
                "the adapter was trained and scored with this prompt; give the same one when captioning.",
                "",
            ]
            if instruct
            else []
        ),
        "## Framework versions",
        "",
        _versions(),
        "",
    ]
    if base is None:
        return lines
    processor = repo_id if own_processor else base
    model_cls, proc_cls = (
        ("InstructBlipForConditionalGeneration", "InstructBlipProcessor")
        if instruct
        else ("Blip2ForConditionalGeneration", "Blip2Processor")
    )
    flag = f' --prompt "{cfg.model.prompt}"' if cfg.model.prompt else ""
    return lines + [
        "## How to load it",
        "",
        "```python",
        "from peft import PeftModel",
        "from PIL import Image",
        f"from transformers import {model_cls}, {proc_cls}",
        "",
        f'base = {model_cls}.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}").eval()',
        f'processor = {proc_cls}.from_pretrained("{processor}")',
        f'inputs = processor(images=Image.open("photo.jpg"){prompt}, return_tensors="pt")',
        f"out = model.generate(**inputs, num_beams={e.num_beams}, max_new_tokens={e.max_new_tokens})",
        "print(processor.batch_decode(out, skip_special_tokens=True))",
        "```",
        "",
        f"Or with captune: `captune caption photo.jpg --model {base} --adapter {repo_id}{flag}`.",
        "",
    ]


def public_config(cfg: Config, base: str | None) -> Config:
    """The run's config as it may leave the machine: no local paths (model, data, images)."""
    import copy

    from captune.summary import description, public_source

    out = copy.deepcopy(cfg)
    out.description = description(cfg)  # not the recipe's text about data this run did not use
    if base:
        out.model.name_or_path = base
    elif out.model.name_or_path != "builtin:demo":
        out.model.name_or_path = Path(out.model.name_or_path).name
    out.data.source = public_source(out.data.source)
    if out.data.images:
        out.data.images = Path(out.data.images).name
    return out


def stage_upload(
    run: Path, cfg: Config, repo_id: str, out: Path, *, base_model: str | None = None, online: bool = False
) -> Path:
    """Write the exact folder that would be uploaded: adapter, processor, card, recipe, metrics.

    Nothing in it names a local path; ``base_model`` is the Hub id (None when there is none).
    """
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run} has no adapter; train it first ('captune train {run}')")
    comparison = json.loads((run / "comparison.json").read_text()) if (run / "comparison.json").is_file() else None
    from captune.atomic import staged_dir

    license_id = base_license(cfg, base_model, online=online)
    with staged_dir(out) as tmp:
        for name in ADAPTER_FILES + PROCESSOR_FILES:
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
        for sub in PROCESSOR_SUBFOLDERS:
            for name in PROCESSOR_FILES:
                if (adapter / sub / name).is_file():
                    (tmp / sub).mkdir(exist_ok=True)
                    shutil.copy2(adapter / sub / name, tmp / sub / name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_model
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "captune_config.yaml").write_text(public_config(cfg, base_model).to_yaml())
        if comparison:
            (tmp / "comparison.json").write_text(json.dumps(comparison, indent=2))
        own_processor = (tmp / "preprocessor_config.json").is_file() or (tmp / "processor_config.json").is_file()
        card = model_card(cfg, comparison, repo_id, base_model, license_id=license_id, processor_in_repo=own_processor,
                          instruct=is_instructblip_adapter(adapter))  # fmt: skip
        (tmp / "README.md").write_text(card, encoding="utf-8")
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

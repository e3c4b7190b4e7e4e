"""Typed configuration: sections, YAML recipes, dotted overrides, validation.

A recipe is a YAML file whose top-level keys are the sections below. Every value
is checked against the dataclass field type before any heavy work starts, so a
typo or an impossible value costs the user one line, not a half-finished run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from captune.errors import UserError

RECIPES_PACKAGE = "captune.recipes"
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class ConfigError(UserError):
    """A config key has a wrong type or an impossible value."""


@dataclass
class DataConfig:
    source: str = "demo:shapes-catalog"
    """Where images and captions come from: demo:NAME, hub:OWNER/NAME[@REV], coco:FILE.json,
    manifest:FILE.jsonl|csv, imagefolder:DIR, parquet:GLOB."""
    images: str | None = None
    """Image folder for coco: sources (file_name is relative to it)."""
    split: str = "train"
    """Split of the source to read (hub and parquet sources); for a Hub dataset several joined with '+'
    (train+validation+test) are read in turn and each image keeps its own split (the ratios are unused)."""
    image_column: str = "image"
    """Column holding the image (hub/parquet) or the image path (manifest)."""
    id_column: str | None = None
    """Column holding an image id; without one, images are grouped by content hash."""
    caption_column: str = "caption"
    """Column holding a caption or a list of captions."""
    split_column: str | None = None
    """Column holding a given split (e.g. Karpathy's: train/restval/val/test); used instead of ratios."""
    num_images: int = 5000
    """How many unique images to take from the source (0 = all)."""
    sample: Literal["first", "random"] = "first"
    """Take the first N images in source order, or a seeded random sample."""
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train / validation / test fractions, split by image."""
    seed: int = 0
    """Seed for sampling and splitting."""
    train_captions: Literal["all", "first", "random"] = "all"
    """Training pairs: every (image, caption), the first caption, or a random caption per epoch."""
    max_pixels: int = 50_000_000
    """Images with more pixels are skipped (decompression-bomb guard)."""
    max_caption_words: int = 200
    """Captions with more words are dropped (and listed among the skipped items)."""

    def check(self) -> None:
        if ":" not in self.source:
            raise ConfigError(
                f"data.source: '{self.source}' has no kind; use demo:NAME, hub:OWNER/NAME, "
                "coco:FILE.json, manifest:FILE, imagefolder:DIR or parquet:GLOB"
            )
        _require(self.num_images >= 0, "data.num_images", "must be 0 (all) or more")
        _require(len(self.ratios) == 3, "data.ratios", "needs three numbers: train, validation, test")
        _require(all(r >= 0 for r in self.ratios), "data.ratios", "must not be negative")
        _require(abs(sum(self.ratios) - 1.0) < 1e-6, "data.ratios", "must add up to 1")
        _require(self.ratios[0] > 0, "data.ratios", "the train fraction must be above 0")
        _require(self.max_pixels > 0, "data.max_pixels", "must be positive")
        _require(self.max_caption_words > 0, "data.max_caption_words", "must be positive")
        parts = [p.strip() for p in self.split.split("+")]
        if len(parts) > 1:
            _require(self.source.startswith("hub:"), "data.split", "joins splits with '+' for hub: sources only")
            _require(not self.split_column, "data.split", "joins Hub splits with '+'; leave data.split_column unset")
            named = {"train", "restval", "validation", "val", "valid", "dev", "test"}
            _require(all(p in named for p in parts), "data.split", "joined splits must be train, validation, test")


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:demo"
    """A Hub id (Salesforce/blip2-opt-2.7b), a local folder, or builtin:demo."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weights dtype; auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run; auto = cuda when available."""
    prompt: str = ""
    """Text prompt before each caption (e.g. 'a photo of'); removed from generated captions."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """8bit, or 4bit NF4 with double quantization (QLoRA), for the language model; needs captune[quant] + a GPU."""
    qformer_matmul: Literal["auto", "tf32", "fp32"] = "auto"
    """Matrix products of the fp32 Q-Former on a GPU when computing image features: tf32 (about 20% faster
    feature extraction on an H200), fp32, or auto = tf32 when the features are rounded to 16 bits for the
    language model anyway (bf16/fp16 models), else fp32."""
    vision_kernels: Literal["auto", "fused", "plain"] = "auto"
    """The vision tower when computing image features: fused = GELU's tanh form inside fc1's product (within
    4.8e-4 of the exact GELU) and each residual addition with the layer norm after it in one pass (a Triton
    kernel; its 16-bit output may differ from torch's by one rounding step), about 9% faster features on an
    H200; plain = the checkpoint's modules as transformers runs them; auto = fused for a bf16/fp16 tower on
    a GPU, whose activations are rounded coarser than those differences, else plain."""

    def check(self) -> None:
        _require(bool(self.name_or_path.strip()), "model.name_or_path", "must not be empty")


LORA_PRESETS = ("seed", "attention", "all-linear", "qformer")


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling alpha."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train."""
    target_modules: str | list[str] = "seed"
    """Module names, or a preset: seed (q_proj,k_proj), attention, all-linear (the language model's), or
    qformer (the Q-Former's query/key/value; image features are then recomputed as it trains)."""
    compute: Literal["auto", "fp32"] = "auto"
    """The adapter's products: auto = in the model's dtype on a GPU for a bf16/fp16 model (fp32 weights and
    gradients, as mixed-precision training does; about 10% more training speed on an H200), 4-bit layers
    included (added to bitsandbytes' own product), fp32 = inputs cast to fp32 as peft does. CPU runs,
    8-bit models and FSDP/ZeRO-3 always use fp32. On a 4-/8-bit model, fp32 also puts the language model's
    unquantized parts (embeddings, layer norms, LM head, so the residual stream) in fp32, as peft's
    prepare_model_for_kbit_training does; auto keeps them in bf16 like the bf16 model's training (30% more
    4-bit training speed and 28% less memory on an H200) and upcasts fp16 ones only."""

    def check(self) -> None:
        _require(self.r > 0, "lora.r", "must be a positive integer")
        _require(self.alpha > 0, "lora.alpha", "must be a positive integer")
        _require(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str):
            _require(
                self.target_modules in LORA_PRESETS,
                "lora.target_modules",
                f"must be a list of module names or one of {', '.join(LORA_PRESETS)}",
            )
        else:
            _require(bool(self.target_modules), "lora.target_modules", "must not be empty")


@dataclass
class TrainConfig:
    epochs: int = 2
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit)."""
    batch_size: int = 16
    """Pairs per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps (overrides warmup_ratio when above 0)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all steps."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    validate_every: int = 1
    """Validate every N epochs (0 = never)."""
    val_images: int = 0
    """Validate on at most this many images of the validation split, a sample seeded by data.seed (0 = all);
    SCST validates on the same ones."""
    select: Literal["CIDEr", "loss", "last"] = "CIDEr"
    """Which adapter to keep: best validation CIDEr, lowest validation loss, or the last."""
    early_stop: int = 0
    """Stop after this many validations without improvement of train.select (0 = never)."""
    log_every: int = 10
    """Log every N optimizer steps."""
    max_text_tokens: int = 40
    """Captions are truncated to this many tokens for training."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0 = at epoch ends only); a re-run resumes from the last."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    pack: bool = True
    """With data.train_captions=all, run each image's prefix once for all its captions (OPT, LLaMA; exact); in
    SCST, once for its samples (OPT)."""
    trackers: list[str] = field(default_factory=list)
    """Also log to these accelerate trackers (tensorboard, wandb, mlflow, ...); files go to RUN/logs."""
    distributed: Literal["auto", "ddp", "fsdp", "zero2", "zero3"] = "auto"
    """Under several processes: DDP (a whole model per GPU), FSDP (the language model sharded), or
    DeepSpeed ZeRO-2 (optimizer state and gradients partitioned) / ZeRO-3 (every weight partitioned);
    auto = what the accelerate launch config says (configs/accelerate/*.yaml), else DDP."""
    progress: Literal["auto", "on", "off"] = "auto"
    """A progress bar (step, loss, lr, samples/s, ETA, GPU memory); auto = on a terminal or in Jupyter."""
    feature_residence: Literal["auto", "gpu", "stream"] = "auto"
    """Where the training split's image features live: gpu = the whole split in device memory (fastest
    when it fits); stream = a memory-mapped sharded cache on disk, each micro-batch's rows copied in
    ahead of its step (device memory does not grow with the data); auto = gpu when the split's
    features take under a quarter of the free device memory (256 MiB on a CPU), else stream."""

    def check(self) -> None:
        _require(self.epochs >= 1 or self.max_steps >= 1, "train.epochs", "must be 1 or more")
        _require(self.epochs >= 0, "train.epochs", "must not be negative")
        _require(self.max_steps >= 0, "train.max_steps", "must be 0 (no limit) or more")
        _require(self.batch_size >= 1, "train.batch_size", "must be 1 or more")
        _require(self.val_images >= 0, "train.val_images", "must be 0 (all) or more")
        _require(self.grad_accum >= 1, "train.grad_accum", "must be 1 or more")
        _require(0 < self.lr < 1, "train.lr", "must be between 0 and 1")
        _require(self.weight_decay >= 0, "train.weight_decay", "must not be negative")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must not be negative")
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must not be negative")
        _require(self.validate_every >= 0, "train.validate_every", "must not be negative")
        _require(self.log_every >= 1, "train.log_every", "must be 1 or more")
        from captune.training.progress import KNOWN_TRACKERS

        unknown = [t for t in self.trackers if t not in KNOWN_TRACKERS]
        _require(not unknown, "train.trackers", f"unknown {unknown}; known: {', '.join(KNOWN_TRACKERS)}")
        _require(self.early_stop >= 0, "train.early_stop", "must be 0 (never) or more")
        _require(
            not (self.early_stop and self.select == "last"), "train.early_stop", "needs train.select CIDEr or loss"
        )
        _require(self.max_text_tokens >= 4, "train.max_text_tokens", "must be 4 or more")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be 0 (epoch ends) or more")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be 1 or more")


@dataclass
class RLConfig:
    enabled: bool = False
    """Self-critical sequence training (SCST) after LoRA training: optimise CIDEr-D directly."""
    epochs: int = 1
    """Passes over the training images."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit)."""
    batch_size: int = 16
    """Training images per step (each with rl.samples sampled captions)."""
    lr: float = 1e-5
    """Learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    samples: int = 5
    """Captions sampled per image (K)."""
    temperature: float = 1.0
    """Sampling temperature (above 0); the policy gradient is taken on this tempered distribution."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    max_new_tokens: int = 20
    """Longest sampled caption, in new tokens."""
    baseline: Literal["mean_others", "greedy"] = "mean_others"
    """Reward baseline: the mean of the image's other K-1 samples, or its greedy caption's reward."""
    normalize: Literal["sequence", "token"] = "sequence"
    """Loss per sampled caption, or per sampled token (see ops/scst.py)."""
    entropy_coef: float = 0.0
    """Entropy bonus per sampled token (0 = off)."""
    kl_coef: float = 0.0
    """Penalty on the KL to the cross-entropy adapter per sampled token (0 = off)."""
    validate_every: int = 1
    """Validate (greedy captions, CIDEr) every N epochs (0 = only the start and the end)."""
    select: Literal["CIDEr", "last"] = "CIDEr"
    """Which adapter to keep: the best validation CIDEr (the starting adapter included), or the last."""
    log_every: int = 10
    """Log every N steps."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps (0 = at epoch ends only)."""
    seed: int = 0
    """Seed for the image order and the sampling."""

    def check(self) -> None:
        _require(self.epochs >= 1 or self.max_steps >= 1, "rl.epochs", "must be 1 or more")
        _require(self.epochs >= 0 and self.max_steps >= 0, "rl.max_steps", "must not be negative")
        _require(self.batch_size >= 1, "rl.batch_size", "must be 1 or more")
        _require(0 < self.lr < 1, "rl.lr", "must be between 0 and 1")
        _require(self.warmup_steps >= 0, "rl.warmup_steps", "must not be negative")
        _require(self.samples >= 1, "rl.samples", "must be 1 or more")
        _require(
            self.baseline != "mean_others" or self.samples >= 2, "rl.samples", "must be 2 or more with mean_others"
        )
        _require(self.temperature > 0, "rl.temperature", "must be above 0")
        _require(self.top_k >= 0, "rl.top_k", "must be 0 (off) or more")
        _require(0 < self.top_p <= 1, "rl.top_p", "must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "rl.max_new_tokens", "must be 1 or more")
        _require(self.entropy_coef >= 0, "rl.entropy_coef", "must not be negative")
        _require(self.kl_coef >= 0, "rl.kl_coef", "must not be negative")
        _require(self.validate_every >= 0, "rl.validate_every", "must not be negative")
        _require(self.log_every >= 1, "rl.log_every", "must be 1 or more")
        _require(self.checkpoint_every >= 0, "rl.checkpoint_every", "must be 0 (epoch ends) or more")


@dataclass
class EvalConfig:
    split: Literal["test", "validation"] = "test"
    """Which split the before/after comparison is scored on."""
    batch_size: int = 64
    """Images per generation batch."""
    num_beams: int = 1
    """1 = greedy; more = beam search."""
    max_new_tokens: int = 30
    """Longest caption, in new tokens."""
    min_new_tokens: int = 0
    """Shortest caption, in new tokens."""
    repetition_penalty: float = 1.0
    """Penalty for repeated tokens (1 = none)."""
    length_penalty: float = 1.0
    """Beam-search length penalty."""
    max_images: int = 0
    """Score at most this many images of the split (0 = all)."""
    fast: bool = True
    """Greedy OPT captioning through the static-cache decoder (CUDA graphs on GPU); false = HF generate."""
    static_cache: bool = False
    """HF generate (LLaMA, T5, beam search, eval.fast=false) with a static KV cache instead of a growing one."""
    bootstrap: int = 1000
    """Bootstrap resamples for intervals and paired tests (0 = off)."""
    seed: int = 0
    """Seed for the bootstrap."""
    clip_model: str = "auto"
    """CLIP for CLIPScore (Hub id or folder); auto = openai/clip-vit-base-patch32 if on disk; none: off."""

    def check(self) -> None:
        _require(self.batch_size >= 1, "eval.batch_size", "must be 1 or more")
        _require(self.num_beams >= 1, "eval.num_beams", "must be 1 or more")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be 1 or more")
        _require(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            "eval.min_new_tokens",
            "must be between 0 and eval.max_new_tokens",
        )
        _require(self.repetition_penalty > 0, "eval.repetition_penalty", "must be positive")
        _require(self.max_images >= 0, "eval.max_images", "must be 0 (all) or more")
        _require(self.bootstrap >= 0, "eval.bootstrap", "must be 0 (off) or more")


@dataclass
class ReportConfig:
    examples: int = 12
    """Gallery images: largest gains, largest losses and a seeded sample."""
    seed: int = 0
    """Seed for the gallery sample."""

    def check(self) -> None:
        _require(self.examples >= 0, "report.examples", "must not be negative")


@dataclass
class HubConfig:
    repo_id: str | None = None
    """Hub repository for `captune push` (OWNER/NAME)."""
    private: bool = False
    """Create the repository as private."""
    base_model: str | None = None
    """Hub id of the base model (OWNER/NAME) for the model card, when model.name_or_path is a local copy of it."""
    license: str | None = None
    """License of the pushed adapter (a Hub license id); default: the base model's."""

    def check(self) -> None:
        if self.repo_id is not None:
            _require(
                self.repo_id.count("/") == 1 and all(self.repo_id.split("/")),
                "hub.repo_id",
                "must look like OWNER/NAME",
            )
        if self.base_model is not None:
            _require(is_hub_id(self.base_model), "hub.base_model", "must be a Hub model id like OWNER/NAME")


@dataclass
class Config:
    name: str = "custom"
    """Recipe name."""
    description: str = ""
    """What the recipe is for."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(name: str) -> bool:
    """True for a Hub repo id (OWNER/NAME) that is not also an existing local path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not Path(name).expanduser().exists()


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


# ---------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(item, _type_name(item))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, "null" if tp is type(None) else str(tp)
    )


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (item,) = typing.get_args(tp)
        return [_coerce(v, item) for v in value]
    if tp is float:
        return _as_float(value)
    if tp in _PLAIN and _PLAIN[tp](value):
        return value
    raise TypeError


# plain types: what a value must be to pass as it is (bools are not integers here)
_PLAIN = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _as_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError from None
    raise TypeError


def _set(section: Any, key: str, value: Any, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    if key not in names:
        raise ConfigError(f"{where}: unknown key; allowed: {', '.join(names)}")
    tp = hints[key]
    try:
        coerced = _coerce(value, tp)
    except TypeError:
        hint = ""
        if isinstance(value, str) and "," in value and "list of" in _type_name(tp):
            hint = f"; write a list in brackets: {where}=[{value}]"
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{hint}") from None
    setattr(section, key, coerced)


def apply_mapping(cfg: Config, mapping: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested mapping (a parsed recipe) onto ``cfg``, checking every key and type."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping of sections")
    top = {f.name for f in dataclasses.fields(cfg)}
    for key, value in mapping.items():
        where = f"{prefix}{key}"
        if key not in top:
            raise ConfigError(f"{where}: unknown section; allowed: {', '.join(sorted(top))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of keys")
            for sub, subval in value.items():
                _set(current, str(sub), subval, f"{where}.{sub}")
        else:
            _set(cfg, key, value, where)


MAX_YAML_NODES = 100_000


def expanded_size(value: Any, memo: dict[int, int] | None = None) -> int:
    """Nodes ``value`` has once YAML aliases are expanded (shared objects counted per use)."""
    memo = {} if memo is None else memo
    if not isinstance(value, (list, dict)):
        return 1
    key = id(value)
    if key not in memo:
        memo[key] = 0  # a self-referencing document counts its cycle once
        children = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        memo[key] = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in children)
    return memo[key]


def load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` that refuses alias bombs ("billion laughs") and self-references."""
    value = yaml.safe_load(text)
    if expanded_size(value) > MAX_YAML_NODES or _cyclic(value, set()):
        raise UserError(f"{what}: the YAML expands to too many values (aliases?); write it out plainly")
    return value


def _cyclic(value: Any, path: set[int]) -> bool:
    if not isinstance(value, (list, dict)):
        return False
    if id(value) in path:
        return True
    path.add(id(value))
    items = value.values() if isinstance(value, dict) else value
    found = any(_cyclic(v, path) for v in items)
    path.discard(id(value))
    return found


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected SECTION.KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': expected SECTION.KEY=VALUE")
    try:
        value = load_yaml(raw, f"override '{key}'") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 1:
            apply_mapping(cfg, {parts[0]: value})
        elif len(parts) == 2:
            apply_mapping(cfg, {parts[0]: {parts[1]: value}})
        else:
            raise ConfigError(f"{key}: overrides take SECTION.KEY, one dot")


def list_recipes() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in resources.files(RECIPES_PACKAGE).iterdir() if p.name.endswith(".yaml")
    )


def read_recipe_text(recipe: str) -> str:
    """Return the YAML of a built-in recipe name or a recipe file path."""
    path = Path(recipe)
    if recipe.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"recipe file '{recipe}' does not exist")
        return path.read_text(encoding="utf-8")
    candidate = resources.files(RECIPES_PACKAGE) / f"{recipe}.yaml"
    if not candidate.is_file():
        raise UserError(
            f"unknown recipe '{recipe}'; built-in recipes: {', '.join(list_recipes())}, or give a path to a .yaml file"
        )
    return candidate.read_text(encoding="utf-8")


def load_config(recipe: str, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe plus overrides into a checked Config."""
    text = read_recipe_text(recipe)
    try:
        mapping = load_yaml(text, f"recipe '{recipe}'") or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe '{recipe}'{line}: not valid YAML") from None
    cfg = Config()
    apply_mapping(cfg, mapping)
    apply_overrides(cfg, overrides or [])
    cfg.check()
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string right after each field), by field name."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        is_doc = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def describe_keys(cfg: Config) -> list[tuple[str, Any, Any, str]]:
    """Every SECTION.KEY of ``cfg`` with its value, its default and its docstring (``captune config``)."""
    rows = []
    defaults = Config()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            rows.append(
                (section.name, value, getattr(defaults, section.name), field_docs(Config).get(section.name, ""))
            )
            continue
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            default = getattr(getattr(defaults, section.name), f.name)
            rows.append((f"{section.name}.{f.name}", getattr(value, f.name), default, docs.get(f.name, "")))
    return rows


def config_from_dict(mapping: dict[str, Any]) -> Config:
    cfg = Config()
    apply_mapping(cfg, mapping)
    cfg.check()
    return cfg

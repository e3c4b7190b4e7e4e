"""The LoRA training loop: masked labels, cached features, validation, best-adapter choice.

The loop trains on frozen image features (see ``features.py``) whenever only the
language model carries adapters, which is every LoRA preset captune has. Each
validation computes the loss and the CIDEr of generated captions on the
validation split; the adapter kept is the best by ``train.select``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captune import sharding, zero
from captune.config import Config
from captune.data.prepare import Example
from captune.distributed import all_agree, all_mean, world
from captune.model.lora import adapter_touches_vision
from captune.ops.batching import encode_seq2seq, encode_texts, is_encoder_decoder, label_tokens, training_text
from captune.ops.features import image_features, project_queries
from captune.ops.generation import caption_features
from captune.ops.lm import lm_loss, unwrap
from captune.ops.packing import pack_captions, packed_loss
from captune.ops.packing import supported as packing_supported
from captune.tracking import ProgressBar, Trackers


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    samples_per_s: float = 0.0
    seconds: float = 0.0
    stale: int = 0  # validations since the last improvement
    stopped_early: bool = False
    # under FSDP: the trained parameters as whole tensors (the model's own are shards)
    adapter_state: dict | None = None


def encode_pairs(tokenizer, blip, captions: list[str], cfg: Config):
    """Flat (unpacked) batch of captions with masked labels, as the model lays them out."""
    if is_encoder_decoder(blip):
        return encode_seq2seq(
            tokenizer,
            captions,
            batch_size=len(captions),
            num_query_tokens=blip.config.num_query_tokens,
            image_token_id=blip.config.image_token_index,
            prompt=cfg.model.prompt,
            max_text_tokens=cfg.train.max_text_tokens,
        )
    return encode_texts(
        tokenizer,
        [training_text(c, cfg.model.prompt, tokenizer.eos_token) for c in captions],
        num_query_tokens=blip.config.num_query_tokens,
        image_token_id=blip.config.image_token_index,
        prompt=cfg.model.prompt,
        max_text_tokens=cfg.train.max_text_tokens,
    )


def flat_loss(model, tokenizer, feats: torch.Tensor, chunk: list[tuple[int, str]], cfg: Config):
    """Loss of (image index, caption) pairs laid out one pair per row, and its label-token count."""
    blip = unwrap(model)
    device = feats.device
    text = encode_pairs(tokenizer, blip, [c for _, c in chunk], cfg)
    loss = lm_loss(
        model,
        feats[[i for i, _ in chunk]],
        text.input_ids.to(device),
        text.attention_mask.to(device),
        text.labels.to(device),
    )
    return loss, label_tokens(text.labels, is_encoder_decoder(blip))


class _StepLoss(torch.nn.Module):
    """The model's training loss as a module, so DistributedDataParallel can wrap it: the
    forward runs through DDP and its hooks average the LoRA gradients across processes."""

    def __init__(self, model, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def shard(items: list, rank: int, size: int) -> list:
    """This process's part of a micro-batch (every process gets at least one item)."""
    part = items[rank::size]
    return part if part else items[:1]


def _quiet(message: str) -> None:
    pass


class LabelCounter:
    """Labelled tokens of (image, caption) pairs, counted on the CPU and remembered per pair, for a
    process's own share of an unpacked micro-batch (the packed batch counts its own)."""

    def __init__(self, tokenizer, blip, cfg: Config):
        self.tokenizer, self.blip, self.cfg = tokenizer, blip, cfg
        self.known: dict = {}

    def __call__(self, items: list) -> int:
        missing = [it for it in dict.fromkeys(items) if it not in self.known]
        if missing:
            text = encode_pairs(self.tokenizer, self.blip, [c for _, c in missing], self.cfg)
            seq2seq = is_encoder_decoder(self.blip)
            for j, it in enumerate(missing):
                self.known[it] = label_tokens(text.labels[j : j + 1], seq2seq)
        return sum(self.known[it] for it in items)


def _token_weight(own: int, dist_world, device: torch.device):
    """size x (this process's labelled tokens / the whole micro-batch's): 1.0 when alone.

    The total is summed over the processes by an all-reduce that stays on the device (no
    wait for the GPU, and no process counts another's share), so DDP's (and FSDP's)
    gradient average becomes the mean over every labelled token of the micro-batch."""
    if not dist_world.distributed:
        return 1.0
    import torch.distributed as dist

    total = torch.full((1,), float(own), device=device)
    dist.all_reduce(total)
    return dist_world.size * own / total.clamp(min=1.0)


def _timed_call(fn: Callable, *args) -> tuple:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _eta(elapsed: float, done: int, left: int) -> str:
    """Remaining time at the pace so far (validation time included), as 1h02m03s / 4m05s / 6s."""
    if done <= 0:
        return "?"
    seconds = int(elapsed / done * left)
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _rng_state_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(doc) -> tuple:
    return (doc[0], tuple(doc[1]), doc[2])


def training_pairs(examples: list[Example], mode: str, rng: random.Random) -> list[tuple[int, str]]:
    """(image index, caption) pairs for one epoch."""
    if mode == "all":
        return [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
    if mode == "first":
        return [(i, ex.captions[0]) for i, ex in enumerate(examples)]
    return [(i, rng.choice(ex.captions)) for i, ex in enumerate(examples)]


def image_groups(examples: list[Example], order: list[int], batch_pairs: int) -> list[list[int]]:
    """Consecutive images of ``order`` grouped so each group holds about ``batch_pairs`` captions."""
    groups, current, pairs = [], [], 0
    for i in order:
        current.append(i)
        pairs += len(examples[i].captions)
        if pairs >= batch_pairs:
            groups.append(current)
            current, pairs = [], 0
    if current:
        groups.append(current)
    return groups


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters; a whole tensor into an FSDP shard is cut to
    that process's part (every process calls this)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(sharding.like(params[k], v.to(params[k].dtype)))


class JsonlLog:
    def __init__(self, path: Path | None, rows: list[dict] | None = None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows or []))

    def write(self, row: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ checkpoints


def latest_checkpoint(root: Path | None) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (complete = state.json present)."""
    if root is None or not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(
    root: Path,
    *,
    step: int,
    trainable: dict,
    best_state: dict,
    optimizer_state: dict,
    scheduler,
    scaler,
    state: dict,
    keep: int,
) -> Path:
    """Adapter, best adapter, optimizer, scheduler, RNG and loop position; written atomically. Tensors
    are whole (not FSDP shards), so any number of processes can resume from it."""
    from safetensors.torch import save_file

    from captune.atomic import staged_dir

    target = root / f"step-{step:08d}"
    with staged_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(tmp / "best.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return target


def _scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@torch.no_grad()
def validation_loss(model, tokenizer, feats, examples, cfg: Config) -> float:
    """Mean caption loss over every validation (image, caption) pair (packed when possible)."""
    blip = unwrap(model)
    device = feats.device
    if cfg.train.pack and packing_supported(blip.language_model):
        total, count = 0.0, 0
        for group in image_groups(examples, list(range(len(examples))), cfg.eval.batch_size):
            batch = pack_captions(
                tokenizer,
                [examples[i].captions for i in group],
                prompt=cfg.model.prompt,
                max_text_tokens=cfg.train.max_text_tokens,
            )
            tokens = int((batch.labels[:, :, 1:] != -100).sum())
            total += float(packed_loss(model, feats[group], batch.to(device))) * tokens
            count += tokens
        return total / max(count, 1)
    pairs = [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
    total, count = 0.0, 0
    for start in range(0, len(pairs), cfg.eval.batch_size):
        chunk = pairs[start : start + cfg.eval.batch_size]
        loss, tokens = flat_loss(model, tokenizer, feats, chunk, cfg)
        total += float(loss) * tokens
        count += tokens
    return total / max(count, 1)


def train(
    model,
    processor,
    train_examples: list[Example],
    val_examples: list[Example],
    cfg: Config,
    *,
    log_path: Path | None = None,
    log: Callable[[str], None] = print,
    score_fn: Callable[[list[str], list[list[str]]], float] | None = None,
    feature_fn: Callable[[list[bytes]], torch.Tensor] | None = None,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the LoRA parameters of ``model`` (a PEFT model) in place; keep the best ones."""
    tcfg = cfg.train
    blip = unwrap(model)
    tokenizer = processor.tokenizer
    device = next(blip.parameters()).device
    torch.manual_seed(tcfg.seed)
    rng = random.Random(tcfg.seed)

    started = time.perf_counter()
    model.eval()  # no dropout while extracting frozen features
    # A trainable Q-Former (lora preset qformer) changes the image features every step: then the
    # vision tower's output is what is computed once (not the disk-cached features), and the
    # Q-Former runs in each step.
    vision_trains = adapter_touches_vision(model)
    if feature_fn is None or vision_trains:
        stage = "vision" if vision_trains else "projected"

        def feature_fn(images):
            bs = cfg.eval.batch_size
            return image_features(model, processor, images, batch_size=bs, device=device, stage=stage)

    train_feats = feature_fn([e.image for e in train_examples])
    val_vision = feature_fn([e.image for e in val_examples]) if val_examples else None
    val_feats = val_vision
    log(
        f"  image features: {len(train_examples)} train, {len(val_examples)} validation images "
        f"in {time.perf_counter() - started:.1f}s"
    )

    dist_world = world()
    kind = sharding.engine(tcfg.distributed) if dist_world.distributed else "single"
    fsdp = kind == "fsdp"
    zero_stage = {"zero2": 2, "zero3": 3}.get(kind)
    sharding.check_engine(
        kind, vision_trains=vision_trains, dtype=blip.dtype, quantized=cfg.model.quantization != "none"
    )
    step_loss = _StepLoss(model, None)
    if fsdp:
        sharding.shard_language_model(step_loss, blip)
        log(f"  FSDP: the language model sharded over {dist_world.size} processes")
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=fused)
    packed = tcfg.pack and cfg.data.train_captions == "all" and packing_supported(blip.language_model)
    if packed:
        micro_per_epoch = len(image_groups(train_examples, list(range(len(train_examples))), tcfg.batch_size))
        log(f"  packing: each image's prefix shared by its {sum(len(e.captions) for e in train_examples)} captions")
    else:
        pairs_per_epoch = len(training_pairs(train_examples, cfg.data.train_captions, random.Random(0)))
        micro_per_epoch = math.ceil(pairs_per_epoch / tcfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tcfg.grad_accum)
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps:
        total_steps = min(total_steps, tcfg.max_steps) if tcfg.epochs else tcfg.max_steps
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = _scheduler(optimizer, tcfg, total_steps)
    scaler = torch.amp.GradScaler("cuda") if blip.dtype == torch.float16 else None

    result = TrainResult(steps=0, best_step=0)
    best_value: float | None = None
    best_state = _lora_state(model)
    step, seen, t_loop = 0, 0, time.perf_counter()
    running: list[float] = []
    first_epoch, skip_micro = 1, 0
    epoch_rng = rng.getstate()
    resume_from = latest_checkpoint(checkpoint_dir)
    resumed_optimizer = None
    if resume_from is not None:
        from safetensors.torch import load_file

        st = json.loads((resume_from / "state.json").read_text())
        _load_lora_state(model, load_file(str(resume_from / "trainable.safetensors"), device=str(device)))
        best_state = load_file(str(resume_from / "best.safetensors"), device=str(device))
        extra = torch.load(resume_from / "optimizer.pt", weights_only=True, map_location=device)
        if zero_stage:  # loaded into the partitions once DeepSpeed has made them
            resumed_optimizer = extra["optimizer"]
        else:
            optimizer.load_state_dict(extra["optimizer"])
        if fsdp:
            sharding.shard_optimizer_state(optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        if scaler and extra["scaler"]:
            scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["torch_rng"].cpu())
        if extra["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in extra["cuda_rng"]])
        step, seen = st["step"], st["seen"]
        first_epoch, skip_micro = st["epoch"], st["next_micro"]
        epoch_rng = _rng_state_from_json(st["epoch_rng"])
        best_value, result.best_step, result.best = st["best_value"], st["best_step"], st["best"]
        result.history = st["history"]
        result.stale = st.get("stale", 0)
        log(f"  resuming from {resume_from.name} (epoch {first_epoch}, step {step})")
    main = dist_world.is_main
    journal = JsonlLog(log_path if main else None, result.history)
    trackers = Trackers(tcfg.trackers if main else [], log_path.parent if log_path else None, cfg.to_dict())
    bar = ProgressBar(tcfg.progress if main else "off", total_steps, initial=step)
    if not main:
        log = _quiet
    if vision_trains:

        def packed_fn(m, vision, batch):
            return packed_loss(m, project_queries(unwrap(m), vision), batch)

        def flat_fn(m, tok, vision, chunk, c):
            return flat_loss(m, tok, project_queries(unwrap(m), vision), chunk, c)[0]

    else:
        packed_fn = packed_loss

        def flat_fn(m, tok, feats, chunk, c):
            return flat_loss(m, tok, feats, chunk, c)[0]

    step_loss.fn = packed_fn if packed else flat_fn
    counter = LabelCounter(tokenizer, blip, cfg)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # the model's buffers are constants (position ids): no broadcast from process 0 each step
        # (torch 2.13 renames the flag and warns; the new one would still sync at start)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            step_loss = DDP(step_loss, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)
    if zero_stage:
        # the packed step reads the position table directly (not through its module's forward)
        dec = getattr(getattr(blip.language_model, "model", None), "decoder", None)
        external = [dec.embed_positions.weight] if packed and dec is not None else []
        step_loss = zero.wrap(step_loss, optimizer, tcfg, dist_world.size, zero_stage, external)
        if resumed_optimizer is not None:
            zero.load_optimizer_state(step_loss, params, resumed_optimizer)
        log(f"  DeepSpeed ZeRO-{zero_stage} over {dist_world.size} processes")
    first_step = step

    def record(row: dict) -> None:
        journal.write(row)
        trackers.log(row)

    def checkpoint(epoch: int, next_micro: int, epoch_start) -> None:
        if checkpoint_dir is None:
            return
        settle()  # a checkpoint holds the best adapter so far
        if fsdp:  # whole tensors from the shards: every process takes part
            trainable = sharding.whole(_lora_state(model))
            best = sharding.whole(best_state)
            optimizer_state = sharding.whole_optimizer_state(optimizer)
        elif zero_stage:  # whole tensors from DeepSpeed's partitions: every process takes part
            trainable, best = zero.trainable_state(model), best_state
            optimizer_state = zero.whole_optimizer_state(step_loss, params)
        if not main:
            return
        if not (fsdp or zero_stage):
            trainable, best, optimizer_state = _lora_state(model), best_state, optimizer.state_dict()
        save_checkpoint(
            checkpoint_dir,
            step=step,
            trainable=trainable,
            best_state=best,
            optimizer_state=optimizer_state,
            scheduler=scheduler,
            scaler=scaler,
            keep=tcfg.keep_checkpoints,
            state={
                "step": step,
                "seen": seen,
                "epoch": epoch,
                "next_micro": next_micro,
                "epoch_rng": _rng_state_to_json(epoch_start),
                "best_value": best_value,
                "best_step": result.best_step,
                "best": result.best,
                "history": result.history,
                "stale": result.stale,
                # the micro-batch in use (a fallback after running out of GPU memory may have halved
                # it): positions above count micro-batches of this size
                "batch_size": tcfg.batch_size,
                "grad_accum": tcfg.grad_accum,
            },
        )

    # A validation's CIDEr is scored on the CPU (and in Java) while the GPU trains on: the scoring
    # runs in a thread, and the result is settled (logged, compared, the best adapter kept) when it
    # is ready, before any checkpoint, and before an early stop or the end. Under several
    # processes it is settled at once, so that every process takes the same decisions.
    scoring = ThreadPoolExecutor(1, thread_name_prefix="captune-validation") if score_fn else None
    pending: list[tuple[dict, dict, Future, dict]] = []

    def validate(epoch: int) -> None:
        if val_feats is None or not len(val_examples):
            return
        if fsdp:
            whole = sharding.gathered(step_loss)
        else:
            whole = zero.gathered(step_loss) if zero_stage else contextlib.nullcontext()
        with whole:
            _validate(epoch)

    def _validate(epoch: int) -> None:
        nonlocal val_feats
        model.eval()
        if vision_trains:  # this step's Q-Former over the cached vision outputs
            with torch.no_grad():
                val_feats = torch.cat(
                    [project_queries(blip, val_vision[i : i + 256]) for i in range(0, len(val_vision), 256)]
                )
        row: dict = {"type": "validation", "epoch": epoch, "step": step}
        t0 = time.perf_counter()
        row["loss"] = validation_loss(model, tokenizer, val_feats, val_examples, cfg)
        times = {"loss": time.perf_counter() - t0}
        state = _lora_state(model) if tcfg.select != "last" else {}
        if score_fn is not None and tcfg.select != "loss":
            t0 = time.perf_counter()
            caps = caption_features(model, tokenizer, val_feats, cfg.eval, cfg.model.prompt)
            times["captions"] = time.perf_counter() - t0
            refs = [e.captions for e in val_examples]
            pending.append((row, times, scoring.submit(_timed_call, score_fn, caps, refs), state))
            if dist_world.distributed:
                settle()
        else:
            conclude(row, times, state)
        model.train()

    def settle() -> None:
        """Finish the validations whose scoring is under way (waiting for it)."""
        while pending:
            row, times, future, state = pending.pop(0)
            row["CIDEr"], times["scoring"] = future.result()
            conclude(row, times, state)

    def conclude(row: dict, times: dict, state: dict) -> None:
        nonlocal best_value, best_state
        row["seconds"] = {k: round(v, 3) for k, v in times.items()}
        record(row)
        result.history.append(row)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("loss", "CIDEr"))
        took = ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
        bar.write(log, f"  validation after epoch {row['epoch']} (step {row['step']}): {shown} ({took})")
        if tcfg.select == "last":
            return
        value = row["CIDEr"] if tcfg.select == "CIDEr" and "CIDEr" in row else -row["loss"]
        if best_value is not None and value <= best_value:
            result.stale += 1
        else:
            result.stale = 0
        if best_value is None or value > best_value:
            best_value = value
            best_state = state
            result.best_step = row["step"]
            result.best = {k: v for k, v in row.items() if k not in ("type",)}

    deferred = False  # an epoch-end checkpoint waiting for its validation's score
    try:
        for epoch in range(first_epoch, epochs + 1):
            model.train()
            rng.setstate(epoch_rng)  # the epoch's order is a function of this state (and of nothing else)
            epoch_start_state = epoch_rng
            if packed:
                order = list(range(len(train_examples)))
                rng.shuffle(order)
                micro = image_groups(train_examples, order, tcfg.batch_size)
            else:
                pairs = training_pairs(train_examples, cfg.data.train_captions, rng)
                rng.shuffle(pairs)
                micro = [pairs[i : i + tcfg.batch_size] for i in range(0, len(pairs), tcfg.batch_size)]
            for m_idx, chunk in enumerate(micro):
                if m_idx < skip_micro:
                    continue
                # The micro-batch is global: each process takes its share, and its loss is weighted by
                # its share of the labelled tokens, so DDP's gradient average is the global token mean.
                mine = shard(chunk, dist_world.rank, dist_world.size) if dist_world.distributed else chunk
                sync = not dist_world.distributed or (m_idx + 1) % tcfg.grad_accum == 0 or m_idx == len(micro) - 1
                if fsdp:
                    sharding.set_gradient_sync(step_loss, sync)
                if zero_stage:  # DeepSpeed reduces the gradients at captune's boundaries
                    step_loss.set_gradient_accumulation_boundary(sync)
                with contextlib.nullcontext() if sync or fsdp or zero_stage else step_loss.no_sync():
                    if packed:
                        batch = pack_captions(
                            tokenizer,
                            [train_examples[i].captions for i in mine],
                            prompt=cfg.model.prompt,
                            max_text_tokens=tcfg.max_text_tokens,
                        ).to(device)
                        index = torch.tensor(mine)
                        if device.type == "cuda":
                            index = index.pin_memory()
                        loss = step_loss(train_feats[index.to(device, non_blocking=True)], batch)
                        n_pairs = sum(len(train_examples[i].captions) for i in chunk)
                        own = int(batch.keep.numel())
                    else:
                        if vision_trains:  # only the images of this share go through the Q-Former
                            imgs = sorted({i for i, _ in mine})
                            local = {i: j for j, i in enumerate(imgs)}
                            share = [(local[i], c) for i, c in mine]
                            loss = step_loss(tokenizer, train_feats[imgs], share, cfg)
                        else:
                            loss = step_loss(tokenizer, train_feats, mine, cfg)
                        n_pairs = len(chunk)
                        own = None  # counted below (the flat encoding happens in the loss)
                    weight = 1.0
                    if dist_world.distributed:
                        own = counter(mine) if own is None else own
                        if dist_world.rank >= len(chunk):
                            own = 0  # no real share: one item repeated at weight 0
                        weight = _token_weight(own, dist_world, device)
                    scaled = loss * weight / tcfg.grad_accum
                    if zero_stage:
                        step_loss.backward(scaled, scale_wrt_gas=False)
                    else:
                        (scaler.scale(scaled) if scaler else scaled).backward()
                running.append(loss.detach())
                seen += n_pairs
                last_micro = m_idx == len(micro) - 1
                if (m_idx + 1) % tcfg.grad_accum and not last_micro:
                    continue
                if zero_stage:  # clips (train.max_grad_norm), steps AdamW, clears the gradients
                    step_loss.step()
                else:
                    if scaler:
                        scaler.unscale_(optimizer)
                    if tcfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if step % tcfg.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - t_loop
                    row = {
                        "type": "train",
                        "step": step,
                        "epoch": epoch,
                        "loss": all_mean(float(torch.stack(running).mean())),
                        "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": seen / max(elapsed, 1e-9),
                        "elapsed_s": round(elapsed, 3),
                    }
                    if device.type == "cuda":
                        row["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                    running.clear()
                    record(row)
                    result.history.append(row)
                    bar.update(step, row)
                    bar.write(
                        log,
                        f"  step {step}/{total_steps} epoch {epoch} loss {row['loss']:.4f} "
                        f"lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s "
                        f"ETA {_eta(elapsed, step - first_step, total_steps - step)}"
                        + (f" GPU {row['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in row else ""),
                    )
                else:
                    bar.update(step)
                if on_step is not None:
                    on_step(step)
                if step >= total_steps:
                    break
                if pending and pending[0][2].done():  # the last validation is scored: settle it and
                    settle()  # write the checkpoint that waited for it
                    if deferred:
                        checkpoint(epoch, m_idx + 1, epoch_start_state)
                        deferred = False
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and m_idx + 1 < len(micro):
                    checkpoint(epoch, m_idx + 1, epoch_start_state)
            if tcfg.validate_every and (epoch % tcfg.validate_every == 0 or step >= total_steps):
                validate(epoch)
            skip_micro = 0
            epoch_rng = rng.getstate()
            if step >= total_steps or tcfg.early_stop:
                settle()
            if pending:  # checkpoint once the scoring is done, during the next epoch
                deferred = True
            else:
                checkpoint(epoch + 1, 0, epoch_rng)
            if step >= total_steps:
                break
            if tcfg.early_stop and all_agree(result.stale >= tcfg.early_stop):
                result.stopped_early = True
                log(f"  early stop: {result.stale} validations without a better {tcfg.select}")
                break

        settle()
    finally:
        if scoring is not None:
            scoring.shutdown(wait=True)
        bar.close()
        trackers.close()

    if tcfg.select == "last" or best_value is None:
        result.best_step = step
    else:
        if zero_stage:
            zero.load_trainable_state(model, best_state)
        else:
            _load_lora_state(model, best_state)
        log(f"  kept the adapter from step {result.best_step} (best validation {tcfg.select})")
    if fsdp:
        result.adapter_state = sharding.whole(_lora_state(model))
    elif zero_stage == 3:  # the loaded model is partitions now: later phases load it again
        result.adapter_state = zero.trainable_state(model)
    model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - started
    result.samples_per_s = seen / max(time.perf_counter() - t_loop, 1e-9)
    return result

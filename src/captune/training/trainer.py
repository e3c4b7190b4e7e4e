"""The LoRA training loop: masked labels, cached features, validation, best-adapter choice.

The loop trains on frozen image features (see ``ops/features.py``) whenever only the
language model carries adapters, which is every LoRA preset but ``qformer``. Each
validation computes the loss and the CIDEr of generated captions on the validation
split; the adapter kept is the best by ``train.select``.

``Trainer.setup`` builds the parts in an order the numerics depend on: seeds; features;
the engine, and FSDP's sharding before the optimizer is built; the plan; the scheduler;
the first best-adapter snapshot; the restore of a checkpoint (weights, best, RNG,
position); the engine's wrap (ZeRO's optimizer state is loaded after it). ``fit`` then
reads top to bottom with no test of the engine kind: it talks to the ``Engine``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captune import launch
from captune.config import Config
from captune.data.cache import ImageColumn
from captune.data.pairs import caption_counts
from captune.data.prepare import Example
from captune.distributed import all_agree, world
from captune.model.family import can_pack, language_family
from captune.model.lora import adapter_touches_vision
from captune.model.lora_compute import use_16bit_compute
from captune.ops.feature_map import DeviceRows, FeatureMap, write_map
from captune.ops.features import feature_row_bytes, image_features
from captune.ops.lm import unwrap
from captune.training.checkpoint import Checkpointer, Position
from captune.training.engines import make_engine
from captune.training.feed import Resident, Streamed, choose_residence
from captune.training.plan import Plan
from captune.training.progress import TrainLog, _quiet
from captune.training.steps import StepLoss, Steps
from captune.training.validation import Selection, Validator


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
    # under FSDP and ZeRO-3: the trained parameters as whole tensors (the model's own are shards)
    adapter_state: dict | None = None


def _scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class TrainInputs:
    """What a run trains on, and where it writes."""

    train_examples: list[Example]
    val_examples: list[Example]
    log_path: Path | None = None
    score_fn: Callable[[list[str], list[list[str]]], float] | None = None
    # images (a sequence, read in order) -> features; stream=True: a FeatureMap instead of a tensor
    feature_fn: Callable[..., torch.Tensor | FeatureMap] | None = None
    checkpoint_dir: Path | None = None
    on_step: Callable[[int], None] | None = None


class LoopParts:
    """What the cross-entropy loop (``Trainer``) and the SCST loop (``training.scst.ScstTrainer``) share:
    image features computed once, the position a checkpoint resumes at, checkpoints holding the best
    adapter so far, and the best adapter put back at the end.

    A loop sets, before calling these: model, processor, cfg, inputs, device, world, say, started, rng,
    vision_trains (features), engine, scheduler, selection (position), validator, history, plan (the
    checkpoint's batch settings) and log (the end)."""

    what = ""  # how the loop's log lines name it ("SCST ")
    can_stream = True  # the training split's features may stream from disk (SCST's steps index a whole tensor)
    validates = True  # the loop may validate (the validation split's features are needed)

    def _setup_lora_compute(self) -> None:
        """The adapter's products in 16 bits where ``lora.compute`` allows; not under FSDP or ZeRO-3,
        whose sharded weights exist only inside their units' forward."""
        sharded = self.world.distributed and launch.engine(self.cfg.train.distributed) in ("fsdp", "zero3")
        if self.cfg.lora.compute == "auto" and not sharded:
            if use_16bit_compute(self.model):
                self.say(
                    "  LoRA layers as one function each, products in the model's dtype (fp32 weights and gradients)"
                )

    def _setup_features(self) -> None:
        """Image features computed once (no dropout). A trainable Q-Former (lora preset qformer) changes
        them every step: then the vision tower's output is what is computed once (not the disk-cached
        features), and the Q-Former runs in each step. The cross-entropy loop's training split stays whole
        on the device or streams from a memory map (``train.feature_residence``, ``train_rows``); SCST's
        stays whole (``train_feats``). The validation split's follow the training split's, read a batch at a
        time when streamed (``val_feats``); they are not computed when the loop never validates."""
        self.model.eval()
        stage = "vision" if self.vision_trains else "projected"
        train_ex, val_ex = self.inputs.train_examples, self.inputs.val_examples
        stream = False
        if self.can_stream:
            nbytes = len(train_ex) * feature_row_bytes(self.blip, stage)
            stream = choose_residence(self.cfg.train.feature_residence, nbytes, self.device) == "stream"
        feature_fn = None if self.vision_trains else self.inputs.feature_fn
        if feature_fn is None:
            feature_fn = self._features_here(stage)
        train = feature_fn(ImageColumn(train_ex), stream=stream)  # images read a batch at a time, in order
        if self.can_stream:
            self.train_rows = Streamed(train, self.device) if stream else Resident(train, self.device)
        else:
            self.train_feats = train
        self.val_feats = None
        if val_ex and self.validates:  # they follow the training split's: a large split's stream too
            val = feature_fn(ImageColumn(val_ex), stream=stream)
            self.val_feats = DeviceRows(val, self.device) if stream else val
        where = f" ({'streamed from disk' if stream else 'on the device'})" if self.can_stream else ""
        val = f"{len(val_ex)} validation" if self.val_feats is not None else "no validation"
        self.say(
            f"  image features: {len(train_ex)} train, {val} images{where} in {time.perf_counter() - self.started:.1f}s"
        )

    def _features_here(self, stage: str) -> Callable:
        """Features computed by this process for all images (no run folder to cache them in): kept on
        the device, or written to a scratch map that lives as long as the trainer."""
        bs = self.cfg.eval.batch_size

        def feature_fn(images, stream: bool = False):
            if not stream:
                return image_features(self.model, self.processor, images, batch_size=bs, device=self.device,
                                      stage=stage)  # fmt: skip
            import tempfile

            scratch = tempfile.TemporaryDirectory(prefix="captune-features-")
            self._scratch.append(scratch)  # each map (training, validation) lives as long as the trainer
            root = Path(scratch.name)
            write_map(self.model, self.processor, images, root, rows_per_shard=bs * max(1, 1024 // bs),
                      batch_size=bs, device=self.device, stage=stage)  # fmt: skip
            return FeatureMap(root)

        return feature_fn

    def _setup_position(self) -> None:
        """A fresh position, or the restored one (weights, best adapter, optimizer, scheduler, RNG)."""
        self.checkpointer = Checkpointer(self.inputs.checkpoint_dir, self.cfg.train.keep_checkpoints,
                                         main=self.world.is_main)  # fmt: skip
        self.position, self.history = Position(epoch_rng=self.rng.getstate()), []
        self.restored = self.checkpointer.restore(self.engine, self.scheduler, self.selection, self.device)
        if self.restored is not None:
            self.position, self.history, folder = self.restored
            self.say(
                f"  resuming {self.what}from {folder.name} (epoch {self.position.epoch}, step {self.position.step})"
            )

    def checkpoint(self, epoch: int, next_micro: int, epoch_rng) -> Path | None:
        """A checkpoint to resume at micro-batch ``next_micro`` of ``epoch``; it holds the best adapter so
        far, so the validations under way are settled first. Its folder (on the main process)."""
        if self.checkpointer.root is None:
            return None
        self.validator.settle()
        at = Position(self.position.step, self.position.seen, epoch, next_micro, epoch_rng)
        return self.checkpointer.save(self.engine, self.scheduler, self.selection, self.history, at, self.plan)

    def _keep_best(self, why: str) -> tuple[int, float]:
        """Load the best adapter (when validation chose one) and leave the model in eval mode; the step
        it comes from and the examples trained on per second since this process started training."""
        sel, pos = self.selection, self.position
        if sel.chosen:
            self.engine.load_trainable(sel.best_state)
            self.say(f"  kept the {self.what}adapter from step {sel.best_step} ({why})")
        self.model.eval()
        elapsed = time.perf_counter() - self.log.started
        return (sel.best_step if sel.chosen else pos.step), (pos.seen - self.log.first_seen) / max(elapsed, 1e-9)


class Trainer(LoopParts):
    """Trains the LoRA parameters of ``model`` (a PEFT model) in place and keeps the best ones."""

    def __init__(self, model, processor, cfg: Config, inputs: TrainInputs, log: Callable[[str], None] = print):
        self.model, self.processor, self.cfg, self.inputs = model, processor, cfg, inputs
        self.blip = unwrap(model)
        self.tokenizer = processor.tokenizer
        self.device = next(self.blip.parameters()).device
        self.world = world()
        self.say = log if self.world.is_main else _quiet
        self._scratch: list = []  # temporary feature maps' folders, when there is no run folder

    @property
    def validates(self) -> bool:
        """Validation runs only every ``train.validate_every`` epochs: never when it is 0."""
        return bool(self.cfg.train.validate_every)

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        tcfg = self.cfg.train
        torch.manual_seed(tcfg.seed)
        self.rng = random.Random(tcfg.seed)
        self.started = time.perf_counter()
        self.vision_trains = adapter_touches_vision(self.model)
        self._setup_features()
        self._setup_engine()  # FSDP shards the language model here: before the optimizer exists
        self._setup_optimizer()
        self._setup_plan()
        self.scheduler = _scheduler(self.optimizer, tcfg, self.plan.total_steps)
        self.selection = Selection(tcfg.select, self.engine.snapshot())
        self._setup_position()  # restores weights, best, optimizer, scheduler, RNG: before the wrap
        self.log = TrainLog(path=self.inputs.log_path, history=self.history, train_cfg=tcfg,
                            config=self.cfg.to_dict(), total_steps=self.plan.total_steps,
                            position=self.position, say=self.say, main=self.world.is_main)  # fmt: skip
        self.module = self.engine.wrap(self.step_loss, packed=self.plan.packed)
        self.steps = Steps(self.model, self.tokenizer, self.cfg, self.world, self.device, packed=self.plan.packed,
                           vision_trains=self.vision_trains, examples=self.inputs.train_examples,
                           rows=self.train_rows)  # fmt: skip
        self.validator = Validator(self.model, self.tokenizer, self.cfg, self.inputs.val_examples, self.val_feats,
                                   score_fn=self.inputs.score_fn, engine=self.engine, selection=self.selection,
                                   log=self.log)  # fmt: skip
        return self

    def _setup_engine(self) -> None:
        cfg = self.cfg
        self._setup_lora_compute()
        self.packed = cfg.train.pack and cfg.data.train_captions == "all" and can_pack(self.blip.language_model)
        self.engine = make_engine(
            self.model, train_cfg=cfg.train, world=self.world, dtype=self.blip.dtype, device=self.device,
            vision_trains=self.vision_trains, quantized=cfg.model.quantization != "none", log=self.say,
        )  # fmt: skip
        self.step_loss = StepLoss(self.model, packed=self.packed, vision_trains=self.vision_trains)
        self.engine.prepare(self.step_loss, self.blip)

    def _setup_optimizer(self) -> None:
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
        self.engine.attach(self.optimizer, params)

    def _setup_plan(self) -> None:
        train_ex = self.inputs.train_examples
        self.plan = Plan.make(train_ex, self.cfg.train, self.cfg.data.train_captions, self.packed)
        if self.plan.packed:
            self.say(f"  packing: each image's prefix shared by its {int(caption_counts(train_ex).sum())} captions")
        elif self.cfg.train.pack and self.cfg.data.train_captions == "all":
            family = language_family(self.blip)
            self.say(f"  packing: off, a {family} language model trains unpacked (shared-prefix packing is exact "
                     "for OPT's learned positions only; the same loss, each caption with its own prefix)")  # fmt: skip

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        pos, plan = self.position, self.plan
        self.deferred: int | None = None  # the step of an epoch end whose checkpoint waits for its validation's score
        self.stopped_early = False
        try:
            for epoch in range(pos.epoch, plan.epochs + 1):
                self._train_epoch(epoch)
                if self._end_epoch(epoch):
                    break
            self.validator.settle()
        finally:
            self.steps.stop()
            self.train_rows.stop()
            self.validator.close()
            self.log.close()
            for scratch in self._scratch:
                scratch.cleanup()
        return self.finish()

    def _train_epoch(self, epoch: int) -> None:
        pos, plan, engine = self.position, self.plan, self.engine
        self.model.train()
        self.rng.setstate(pos.epoch_rng)  # the epoch's order is a function of this state (and of nothing else)
        epoch_rng = pos.epoch_rng
        chunks = plan.micro_batches(self.inputs.train_examples, self.rng)
        self.steps.plan(chunks[pos.next_micro :])
        for i, chunk in enumerate(chunks):
            if i < pos.next_micro:
                continue
            boundary = plan.is_boundary(i, len(chunks))
            with engine.accumulating(sync=boundary):
                loss, weight, pairs = self.steps.forward(self.module, chunk)
                engine.backward(loss * weight / plan.grad_accum)
            self.log.micro_batch(loss)
            pos.seen += pairs
            if not boundary:
                continue
            engine.step()
            self.scheduler.step()
            pos.step += 1
            self.log.optimizer_step(pos, epoch, self.scheduler.get_last_lr()[0], self.device)
            if self.inputs.on_step is not None:
                self.inputs.on_step(pos.step)
            if plan.done(pos.step):
                break
            if self.validator.scored():  # the last validation is scored: settle it and
                self.validator.settle()  # write the checkpoint that waited for it
                if self.deferred is not None:
                    self._deferred_checkpoint(epoch, i + 1, epoch_rng)
            if plan.checkpoint_due(pos.step, i, len(chunks)):
                self.checkpoint(epoch, i + 1, epoch_rng)
        self.steps.stop()  # (after a last step mid-epoch the text made ahead is not needed)

    def _end_epoch(self, epoch: int) -> bool:
        """Validation, the epoch-end checkpoint (deferred while its score is under way), and whether
        to stop (the last step, or early stopping)."""
        pos, plan, tcfg = self.position, self.plan, self.cfg.train
        if plan.validate_due(epoch, pos.step) and self.validator.has_data:
            with self.engine.gathered():
                self.validator.validate(epoch, pos.step)
        pos.next_micro, pos.epoch_rng = 0, self.rng.getstate()
        if plan.done(pos.step) or tcfg.early_stop:
            self.validator.settle()
        if self.validator.pending:  # checkpoint once the scoring is done, during the next epoch
            self.deferred = pos.step
        else:
            self.checkpoint(epoch + 1, 0, pos.epoch_rng)
        if plan.done(pos.step):
            return True
        if tcfg.early_stop and all_agree(self.selection.stale >= tcfg.early_stop):
            self.stopped_early = True
            self.say(f"  early stop: {self.selection.stale} validations without a better {tcfg.select}")
            return True
        return False

    def _deferred_checkpoint(self, epoch: int, next_micro: int, epoch_rng) -> None:
        """The checkpoint of the previous epoch's end, written now that its validation is scored: it is
        named by (and holds the state of) this step, so the log says which epoch end it stands for."""
        ended, self.deferred = self.deferred, None
        folder = self.checkpoint(epoch, next_micro, epoch_rng)
        if folder is not None:
            self.log.bar.write(
                self.say,
                f"  checkpoint {folder.name} (epoch {epoch - 1}'s end at step {ended}, "
                "written once its validation was scored)",
            )

    def finish(self) -> TrainResult:
        sel, pos = self.selection, self.position
        best_step, rate = self._keep_best(f"best validation {self.cfg.train.select}")
        return TrainResult(
            steps=pos.step,
            best_step=best_step,
            best=sel.best,
            history=self.history,
            samples_per_s=rate,
            seconds=time.perf_counter() - self.started,
            stale=sel.stale,
            stopped_early=self.stopped_early,
            adapter_state=self.engine.adapter_to_save(),
        )


def train(model, processor, train_examples: list[Example], val_examples: list[Example], cfg: Config, *,
          log: Callable[[str], None] = print, **inputs) -> TrainResult:  # fmt: skip
    """Train the LoRA parameters of ``model`` (a PEFT model) in place; keep the best ones.

    ``inputs`` are ``TrainInputs``' other fields: ``log_path``, ``score_fn`` (captions, references ->
    validation CIDEr), ``feature_fn`` (images, stream=False -> features: a device tensor, or a
    ``FeatureMap`` with stream=True; e.g. the run's disk cache),
    ``checkpoint_dir`` and ``on_step`` (called after each optimizer step)."""
    return Trainer(model, processor, cfg, TrainInputs(train_examples, val_examples, **inputs), log).setup().fit()

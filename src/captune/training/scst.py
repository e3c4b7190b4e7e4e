"""Self-critical sequence training (SCST) of a LoRA adapter: CIDEr-D optimised directly.

Starts from the cross-entropy adapter. Each step takes ``rl.batch_size`` training images,
samples ``rl.samples`` captions per image from their cached features (no gradient),
rewards each with CIDEr-D against the image's references (document frequencies from the
whole training split's references), subtracts a baseline (the mean of the image's other
samples, or its greedy caption's reward), and takes a REINFORCE step on the LoRA
parameters from a teacher-forced forward of the sampled tokens (``ops/scst.py``).

Both the sampling and the gradient forward run in eval mode (no LoRA dropout): the
gradient is then that of the very policy that sampled the captions (on-policy REINFORCE;
dropout would score them under a randomly thinned policy), a resume or a second process
repeats it exactly, and the fast sampler's CUDA graph captures the modules as they are.

The loop reuses the cross-entropy trainer's parts (``trainer.LoopParts``: features, resume
position, checkpoints, the best adapter at the end): the engine (one process or DDP), the
checkpointer (its own folder; exact resume), the validator (greedy captions, CIDEr; the
best adapter is kept, the starting one included) and the log (rows of type ``scst``).
The sampling generator is seeded afresh each step from (rl.seed, step, rank), so a
resumed run draws what the uninterrupted one drew and no generator state is saved.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from captune import launch
from captune.config import Config
from captune.data.pairs import rank_share
from captune.distributed import all_mean, world
from captune.errors import UserError
from captune.evaluation.cider import CiderD
from captune.model.family import can_pack, is_encoder_decoder
from captune.model.lora import adapter_touches_vision
from captune.ops.batching import generation_prompt
from captune.ops.lm import unwrap
from captune.ops.sampling import SamplingSpec, sample_tokens
from captune.ops.scst import kl_to_start, policy_loss, sequence_logprobs
from captune.training.engines import make_engine
from captune.training.progress import TrainLog, _quiet, eta
from captune.training.rewards import Advantages, Drawn, Rewards
from captune.training.steps import token_weight
from captune.training.trainer import LoopParts, TrainInputs
from captune.training.validation import Selection, Validator

SUPPORTED_ENGINES = ("single", "ddp")


@dataclass
class ScstResult:
    steps: int
    best_step: int
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    images_per_s: float = 0.0
    seconds: float = 0.0


class PolicyLoss(torch.nn.Module):
    """The SCST loss as a module, so that DDP's hooks average the LoRA gradients."""

    def __init__(self, model, rl, pack: bool):
        super().__init__()
        self.model, self.rl, self.pack = model, rl, pack

    def forward(self, feats, ids, attn, tokens, mask, adv, start_logprobs=None, positions=None):
        """``adv``: the advantages, or a callable giving them (called once the forward is queued);
        ``positions``: the sampled positions (``sequence_logprobs``)."""
        rl = self.rl
        token = sequence_logprobs(self.model, feats, ids, attn, tokens, mask, entropy=rl.entropy_coef > 0,
                                  spec=sampler_spec(rl), pack=self.pack, positions=positions)  # fmt: skip
        kl = kl_to_start(token.logprobs, start_logprobs, mask) if start_logprobs is not None else None
        adv = adv() if callable(adv) else adv
        return policy_loss(token, mask, adv, normalize=rl.normalize, entropy_coef=rl.entropy_coef,
                           kl=kl, kl_coef=rl.kl_coef)  # fmt: skip


def sampler_spec(rl) -> SamplingSpec:
    """How rl.* samples: K captions per image at rl.temperature, with rl.top_k / rl.top_p."""
    return SamplingSpec(k=rl.samples, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                        top_k=rl.top_k, top_p=rl.top_p)  # fmt: skip


def check_scst_engine(cfg: Config, distributed: bool) -> None:
    """One line for an engine SCST does not run on yet (FSDP and ZeRO shard what the sampler reads)."""
    kind = launch.engine(cfg.train.distributed) if distributed else "single"
    if kind not in SUPPORTED_ENGINES:
        raise UserError(f"rl (SCST) runs on one process or under DDP, not {kind}; set train.distributed=ddp")


class ScstTrainer(LoopParts):
    """Trains the LoRA parameters of ``model`` (a PEFT model) in place with SCST; keeps the best ones."""

    what = "SCST "
    can_stream = False  # the sampler and the policy loss index whole feature tensors
    vision_trains = False  # setup refuses adapters on the Q-Former: the features are fixed

    def __init__(self, model, processor, cfg: Config, inputs: TrainInputs, log: Callable[[str], None] = print):
        self.model, self.processor, self.cfg, self.inputs = model, processor, cfg, inputs
        self.rl = cfg.rl
        self.blip = unwrap(model)
        self.tokenizer = processor.tokenizer
        self.device = next(self.blip.parameters()).device
        self.world = world()
        self.say = log if self.world.is_main else _quiet

    # ------------------------------------------------------------------ setup

    def setup(self) -> ScstTrainer:
        rl, cfg = self.rl, self.cfg
        if adapter_touches_vision(self.model):
            raise UserError("rl (SCST) trains on cached image features; use a lora preset without the Q-Former")
        check_scst_engine(cfg, self.world.distributed)
        torch.manual_seed(rl.seed)
        self.rng = random.Random(rl.seed)
        self.started = time.perf_counter()
        self._setup_features()
        self._setup_lora_compute()
        self.engine = make_engine(
            self.model, train_cfg=cfg.train, world=self.world, dtype=self.blip.dtype, device=self.device,
            vision_trains=False, quantized=cfg.model.quantization != "none", log=self.say,
        )  # fmt: skip
        # train.pack: each image's prefix shared by its samples (ops/scst.py), where the model allows
        self.pack = cfg.train.pack and can_pack(self.blip.language_model) and not is_encoder_decoder(self.blip)
        loss_module = PolicyLoss(self.model, rl, self.pack)
        self.engine.prepare(loss_module, self.blip)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=rl.lr, weight_decay=0.0, fused=self.device.type == "cuda")
        self.engine.attach(self.optimizer, params)
        n = len(self.inputs.train_examples)
        self.per_epoch = math.ceil(n / rl.batch_size)
        epochs = rl.epochs or math.ceil(rl.max_steps / self.per_epoch)
        self.total_steps = min(epochs * self.per_epoch, rl.max_steps or epochs * self.per_epoch)
        self.epochs = math.ceil(self.total_steps / self.per_epoch)
        from transformers import get_scheduler

        self.scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=rl.warmup_steps,
                                       num_training_steps=self.total_steps)  # fmt: skip
        self.plan = SimpleNamespace(batch_size=rl.batch_size, grad_accum=1)  # what a checkpoint records
        self.start_state = self.engine.snapshot()  # the cross-entropy adapter (the KL penalty's reference)
        self.selection = Selection(rl.select, self.engine.snapshot())
        self._setup_position()
        tcfg = dataclasses.replace(cfg.train, log_every=rl.log_every)
        self.log = TrainLog(path=self.inputs.log_path, history=self.history, train_cfg=tcfg, config=cfg.to_dict(),
                            total_steps=self.total_steps, position=self.position, say=self.say,
                            main=self.world.is_main)  # fmt: skip
        self.module = self.engine.wrap(loss_module, packed=self.pack)
        self.scorer = CiderD([e.captions for e in self.inputs.train_examples])
        self.rewards = Rewards(self.scorer, self.tokenizer, self.blip, cfg.model.prompt)
        # the validator reads train.select: SCST's selection is rl.select
        vcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, select=rl.select))
        self.validator = Validator(self.model, self.tokenizer, vcfg, self.inputs.val_examples, self.val_feats,
                                   score_fn=self.inputs.score_fn, engine=self.engine, selection=self.selection,
                                   log=self.log)  # fmt: skip
        self.spec = sampler_spec(rl)
        self.greedy_spec = SamplingSpec(k=1, max_new_tokens=rl.max_new_tokens, temperature=0.0)
        self.decoders: dict = {}
        self.generator = torch.Generator(device=self.device)
        self.running: list[dict] = []
        return self

    # ------------------------------------------------------------------ the loop

    def fit(self) -> ScstResult:
        pos = self.position
        try:
            if self.restored is None and self.validator.has_data and self.rl.select != "last":
                self.validator.validate(0, 0)  # the starting adapter is a candidate too
            for epoch in range(pos.epoch, self.epochs + 1):
                self._epoch(epoch)
                if self._end_epoch(epoch):
                    break
            self.validator.settle()
        finally:
            self.validator.close()
            self.log.close()
        return self.finish()

    def _epoch(self, epoch: int) -> None:
        pos, rl = self.position, self.rl
        self.rng.setstate(pos.epoch_rng)  # the epoch's image order is a function of this state alone
        order = list(range(len(self.inputs.train_examples)))
        self.rng.shuffle(order)
        chunks = [order[i : i + rl.batch_size] for i in range(0, len(order), rl.batch_size)]
        for i in range(pos.next_micro, len(chunks)):
            stats = self.step(chunks[i], pos.step)
            self.engine.step()
            self.scheduler.step()
            pos.step += 1
            pos.seen += len(chunks[i])
            self._log_step(stats, epoch)
            if self.inputs.on_step is not None:
                self.inputs.on_step(pos.step)
            if pos.step >= self.total_steps:
                break
            if rl.checkpoint_every and pos.step % rl.checkpoint_every == 0 and i + 1 < len(chunks):
                self.checkpoint(epoch, i + 1, pos.epoch_rng)

    def _end_epoch(self, epoch: int) -> bool:
        pos, rl = self.position, self.rl
        last = pos.step >= self.total_steps
        due = rl.validate_every and epoch % rl.validate_every == 0
        if (due or last) and self.validator.has_data:
            self.validator.validate(epoch, pos.step)
        pos.next_micro, pos.epoch_rng = 0, self.rng.getstate()
        self.checkpoint(epoch + 1, 0, pos.epoch_rng)
        return last

    def step(self, chunk: list[int], step: int) -> dict:
        """Sample, reward, baseline and backward for this process's share of ``chunk`` (the
        optimizer step is the caller's). Returns this share's statistics as floats.

        The samples' rewards are made once the policy's forward is queued, while the GPU runs it
        (``training.rewards``); the loss waits for them."""
        w, rl = self.world, self.rl
        mine = rank_share(chunk, w.rank, w.size) if w.distributed else chunk
        real = not (w.distributed and w.rank >= len(chunk))  # else one image repeated at weight 0
        self.model.eval()
        feats = self.train_feats[mine]
        self.generator.manual_seed(random.Random(f"{rl.seed}:{step}:{w.rank}").getrandbits(63))
        prompt, fast = self.cfg.model.prompt, self.cfg.eval.fast
        tokens, mask = sample_tokens(self.model, self.tokenizer, feats, self.spec, prompt=prompt,
                                     generator=self.generator, decoders=self.decoders, fast=fast)  # fmt: skip
        n, k = len(mine), rl.samples
        greedy = None
        if rl.baseline == "greedy":  # its captions queued after the samples, copied out with them below
            g, _ = sample_tokens(self.model, self.tokenizer, feats, self.greedy_spec, prompt=prompt,
                                 decoders=self.decoders, fast=fast)  # fmt: skip
            greedy = self.rewards.later(g.cpu(), np.asarray(mine))
        drawn = Drawn(tokens, mask)  # the step's one wait: the samples are drawn (with the greedy baseline, earlier)
        adv = Advantages(self.rewards.later(drawn.tokens, np.repeat(np.asarray(mine), k)), greedy, (n, k),
                         rl.baseline, self.device)  # fmt: skip
        # the prompt stays on the CPU: sequence_logprobs reads its mask there, without a wait
        ids = generation_prompt(self.tokenizer, n, num_query_tokens=self.blip.config.num_query_tokens,
                                image_token_id=self.blip.config.image_token_index, prompt=prompt,
                                seq2seq=is_encoder_decoder(self.blip))  # fmt: skip
        ids, attn = ids.input_ids, ids.attention_mask
        start = self._start_logprobs(feats, ids, attn, tokens, mask, drawn) if rl.kl_coef else None
        loss = self.module(feats, ids, attn, tokens, mask, adv, start, drawn.positions)
        # DDP averages the processes' gradients: weight each by its share of the batch's rows
        # (normalize=sequence) or sampled tokens (normalize=token), so the step is the global mean
        own = (n * k if rl.normalize == "sequence" else int(drawn.mask.sum())) if real else 0
        weight = token_weight(own, w, self.device)
        self.engine.backward(loss * weight)
        return {
            "loss": float(loss.detach()),
            "reward": float(adv.rewards.mean()),
            "baseline": float(adv.base.mean()),
            "advantage_std": float(adv.values.std(unbiased=False)),
            "caption_length": float(drawn.mask.sum(1).float().mean()),
        }

    @torch.no_grad()
    def _start_logprobs(self, feats, ids, attn, tokens, mask, drawn) -> torch.Tensor:
        """The sampled tokens' log-probs under the starting (cross-entropy) adapter: its weights
        are swapped in for one forward and the current ones put back."""
        current = self.engine.snapshot()
        self.engine.load_trainable(self.start_state)
        try:
            return sequence_logprobs(self.model, feats, ids, attn, tokens, mask, spec=self.spec, pack=self.pack,
                                     positions=drawn.positions).logprobs  # fmt: skip
        finally:
            self.engine.load_trainable(current)

    def _log_step(self, stats: dict, epoch: int) -> None:
        """A row of type ``scst`` every ``rl.log_every`` steps and at the last: the means since the
        last row, averaged over the processes (every process calls this)."""
        pos, log = self.position, self.log
        self.running.append(stats)
        if pos.step % self.rl.log_every and pos.step != self.total_steps:
            log.bar.update(pos.step)
            return
        elapsed = time.perf_counter() - log.started
        row: dict = {"type": "scst", "step": pos.step, "epoch": epoch}
        for key in stats:
            row[key] = all_mean(sum(s[key] for s in self.running) / len(self.running))
        row["lr"] = self.scheduler.get_last_lr()[0]
        row["images_per_s"] = (pos.seen - log.first_seen) / max(elapsed, 1e-9)
        row["elapsed_s"] = round(elapsed, 3)
        self.running.clear()
        log.record(row)
        log.bar.update(pos.step)
        left = eta(elapsed, pos.step - log.first_step, self.total_steps - pos.step)
        log.bar.step_line(self.say, f"  scst step {pos.step}/{self.total_steps} epoch {epoch} "
                                    f"reward {row['reward']:.4f} baseline {row['baseline']:.4f} "
                                    f"adv std {row['advantage_std']:.4f} length {row['caption_length']:.1f} "
                                    f"{row['images_per_s']:.0f} images/s ETA {left}")  # fmt: skip

    def finish(self) -> ScstResult:
        best_step, rate = self._keep_best("best validation CIDEr")
        return ScstResult(steps=self.position.step, best_step=best_step, best=self.selection.best,
                          history=self.history, images_per_s=rate,
                          seconds=time.perf_counter() - self.started)  # fmt: skip


def train_scst(model, processor, train_examples: list, val_examples: list, cfg: Config, *,
               log: Callable[[str], None] = print, **inputs) -> ScstResult:  # fmt: skip
    """SCST on the LoRA parameters of ``model`` (a PEFT model, trainable), in place; keeps the best ones.

    ``inputs`` are ``TrainInputs``' other fields (log_path, score_fn, feature_fn, checkpoint_dir, on_step)."""
    return ScstTrainer(model, processor, cfg, TrainInputs(train_examples, val_examples, **inputs), log).setup().fit()

"""One micro-batch's loss on this process's share: packed or flat, with its token weight.

The micro-batch is global: each process takes its share (``rank_share``), and its loss is
weighted by its share of the labelled tokens, so DDP's (and FSDP's and ZeRO's) gradient
average is the mean over every labelled token of the micro-batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch

from captune.config import Config
from captune.data.pairs import caption_counts, rank_share
from captune.distributed import World
from captune.model.family import is_encoder_decoder
from captune.ops.batching import encode_seq2seq, encode_texts, label_tokens, training_text
from captune.ops.features import project_queries
from captune.ops.lm import lm_loss, unwrap
from captune.ops.packing import PackedBatch, pack_captions, packed_loss
from captune.training.ahead import Ahead


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


class StepLoss(torch.nn.Module):
    """The model's training loss as a module, so an engine can wrap it (DDP's hooks average the
    LoRA gradients across processes; FSDP shards it; DeepSpeed makes it an engine). With a trained
    Q-Former the features are vision-tower outputs and the Q-Former runs inside the step."""

    def __init__(self, model, *, packed: bool, vision_trains: bool):
        super().__init__()
        self.model = model
        self.packed, self.vision_trains = packed, vision_trains

    def forward(self, *args):
        if self.packed:
            feats, batch = args
            if self.vision_trains:
                feats = project_queries(unwrap(self.model), feats)
            return packed_loss(self.model, feats, batch)
        tokenizer, feats, chunk, cfg = args
        if self.vision_trains:
            feats = project_queries(unwrap(self.model), feats)
        return flat_loss(self.model, tokenizer, feats, chunk, cfg)[0]


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


def token_weight(own: int, world: World, device: torch.device):
    """size x (this process's labelled tokens / the whole micro-batch's): 1.0 when alone.

    The total is summed over the processes by an all-reduce that stays on the device (no
    wait for the GPU, and no process counts another's share), so DDP's (and FSDP's)
    gradient average becomes the mean over every labelled token of the micro-batch."""
    if not world.distributed:
        return 1.0
    import torch.distributed as dist

    total = torch.full((1,), float(own), device=device)
    dist.all_reduce(total)
    return world.size * own / total.clamp(min=1.0)


def pack_share(
    tokenizer, examples: list, prompt: str, max_text_tokens: int, mine: list[int], *, pinned: bool
) -> PackedBatch:
    """A share's captions tokenized and packed on the CPU (pinned for the copy to a GPU)."""
    batch = pack_captions(
        tokenizer, [examples[i].captions for i in mine], prompt=prompt, max_text_tokens=max_text_tokens
    )
    return batch.pinned() if pinned else batch


class Steps:
    """The forward of one micro-batch (its global list of images or pairs) on this process's share.

    ``rows`` is the split's features (``training.feed``: ``Resident`` on the device, or ``Streamed``
    from the memory map); ``plan`` tells it an epoch's micro-batches so it can fetch ahead."""

    def __init__(self, model, tokenizer, cfg: Config, world: World, device: torch.device, *, packed: bool,
                 vision_trains: bool, examples: list, rows):  # fmt: skip
        self.tokenizer, self.cfg, self.world, self.device = tokenizer, cfg, world, device
        self.packed, self.vision_trains = packed, vision_trains
        self.examples, self.rows = examples, rows
        self.counts = caption_counts(examples) if packed else None
        self.counter = LabelCounter(tokenizer, unwrap(model), cfg)
        # packed captions are tokenized ahead by a thread, with its own copy of the tokenizer (a fast
        # tokenizer's padding settings are shared state); the feature rows of a streamed split likewise
        # (``make`` holds what packing reads, not this object: a cycle through the thread's owner would
        # keep the model and the features alive after training until Python's cycle collector ran)
        self.texts = None
        if packed:
            make = partial(
                pack_share, copy.deepcopy(tokenizer), examples, cfg.model.prompt, cfg.train.max_text_tokens,
                pinned=device.type == "cuda",
            )  # fmt: skip
            self.texts = Ahead(make, depth=3, name="captune-text-feed")

    def _mine(self, chunk: list) -> list:
        w = self.world
        return rank_share(chunk, w.rank, w.size) if w.distributed else chunk

    def needs(self, chunk: list) -> list[int] | None:
        """The feature rows this process's share of ``chunk`` reads, in order (None: the whole tensor)."""
        mine = self._mine(chunk)
        return list(mine) if self.packed else self.needs_of(mine)

    def plan(self, chunks: Sequence[list]) -> None:
        """The micro-batches to come, in order: a streamed feed starts fetching their rows (each
        micro-batch's made as the feed comes to it: an epoch's rows are never listed whole)."""
        if self.rows.streamed:
            self.rows.plan(map(self.needs, chunks))
        if self.texts is not None:
            self.texts.plan(list(self._mine(c)) for c in chunks)

    def stop(self) -> None:
        """Stop making the planned micro-batches' text (the epoch ended, or training stopped)."""
        if self.texts is not None:
            self.texts.stop()

    def forward(self, module: torch.nn.Module, chunk: list) -> tuple[torch.Tensor, object, int]:
        """(loss of this process's share, its token weight, pairs in the whole micro-batch)."""
        w = self.world
        mine = self._mine(chunk)
        if self.packed:
            loss, own = self._packed(module, mine)
            n_pairs = int(self.counts[chunk].sum())  # every process's share, without reading its text
        else:
            loss, own = self._flat(module, mine), None  # counted below (the flat encoding is in the loss)
            n_pairs = len(chunk)
        weight = 1.0
        if w.distributed:
            own = self.counter(mine) if own is None else own
            if w.rank >= len(chunk):
                own = 0  # no real share: one item repeated at weight 0
            weight = token_weight(own, w, self.device)
        return loss, weight, n_pairs

    def _packed(self, module, mine: list[int]) -> tuple[torch.Tensor, int]:
        batch = self.texts.take(list(mine)).to(self.device)
        loss = module(self.rows.take(list(mine)), batch)
        return loss, int(batch.keep.numel())

    def _flat(self, module, mine: list[tuple[int, str]]) -> torch.Tensor:
        imgs = self.needs_of(mine)
        if imgs is None:
            return module(self.tokenizer, self.rows.feats, mine, self.cfg)
        # only the images of this share: read (or, with a trained Q-Former, run through it) once each
        local = {i: j for j, i in enumerate(imgs)}
        share = [(local[i], c) for i, c in mine]
        return module(self.tokenizer, self.rows.take(imgs), share, self.cfg)

    def needs_of(self, mine: list[tuple[int, str]]) -> list[int] | None:
        """The images of an unpacked share, once each and sorted (None: index the resident tensor)."""
        if not self.rows.streamed and not self.vision_trains:
            return None
        return sorted({i for i, _ in mine})

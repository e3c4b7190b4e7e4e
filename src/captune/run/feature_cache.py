"""Frozen image features on disk, keyed by model fingerprint and the images' content hashes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from captune.model.instruct import instruction
from captune.ops.feature_map import FeatureMap, is_complete, write_map
from captune.ops.features import _workers, qformer_matmul
from captune.ops.lm import unwrap
from captune.ops.vision import vision_kernels


def model_fingerprint(model, processor, source: str) -> str:
    """Identity of everything that shapes an image's features: weights, config, preprocessing, dtype,
    and for InstructBLIP the instruction the Q-Former reads (text and its Q-Former tokens)."""
    blip = unwrap(model)
    weights = []
    folder = Path(source)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            st = f.stat()
            weights.append([f.name, st.st_size, int(st.st_mtime)])
    vision_config = blip.config.to_dict()
    vision_config.pop("text_config", None)
    doc = {
        "source": str(folder.resolve()) if folder.is_dir() else source,
        "weights": weights,
        "config": vision_config,
        "preprocessing": processor.image_processor.to_dict(),
        "dtype": str(blip.language_projection.weight.dtype),
    }
    if qformer_matmul(blip) == "tf32":  # only then: keys of fp32 features stay as they were
        doc["qformer_matmul"] = "tf32"
    if vision_kernels(blip) == "fused":  # likewise: keys of the checkpoint's own vision path stay as they were
        doc["vision_kernels"] = "fused"
    read = instruction(blip)
    if read is not None:  # only InstructBLIP: BLIP-2 keys stay as they were
        doc["instruction"] = [read[0], read[1]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureStore:
    """Frozen image features on disk, keyed by model fingerprint and the images' content hashes.

    Each image set is a sharded feature map (``ops.feature_map``): up to ``rows_per_shard`` rows a
    shard (fewer when that gives every process a shard; always a multiple of the batch size, so the
    features do not depend on the shard size), written while the features are computed, never
    whole in memory; a killed computation resumes from its complete shards (of the same size). Under several
    processes each computes and writes its own shards, then every process reads the shared map.
    """

    def __init__(self, root: Path, fingerprint: str, rows_per_shard: int = 1024):
        self.root = Path(root) / fingerprint
        self.rows_per_shard = rows_per_shard
        self.hits = 0
        self.misses = 0

    def path_for(self, images: Sequence[bytes], digests: Sequence[bytes] | None = None) -> Path:
        """The map folder of ``images`` (their SHA-256 ``digests`` when known: then no image is read)."""
        h = hashlib.sha256()
        for digest in _digests(images) if digests is None else digests:
            h.update(digest)
        return self.root / h.hexdigest()[:24]

    def get(
        self,
        model,
        processor,
        images: Sequence[bytes],
        *,
        digests: Sequence[bytes] | None = None,
        batch_size: int = 64,
        device: torch.device | None = None,
        world=None,
        stream: bool = False,
    ) -> torch.Tensor | FeatureMap:
        """The features of ``images``, from the cache or computed: a tensor on ``device``, or with
        ``stream`` the memory-mapped ``FeatureMap`` (nothing loaded). Under several processes
        (``world``, a ``captune.distributed.World``) every process must call it with the same images."""
        blip = unwrap(model)
        device = device or next(blip.parameters()).device
        many = world is not None and world.distributed
        path = self.path_for(images, digests)
        hit = is_complete(path)
        if many:
            from captune.distributed import all_agree

            hit = all_agree(hit)  # one decision: a process that computes alone would wait for the others forever
        if hit:
            self.hits += 1
        else:
            self.misses += 1
            # a multiple of the batch, and small enough that every process has a shard to compute
            share = -(-len(images) // (world.size if many else 1))
            rows = -(-max(1, min(self.rows_per_shard, share)) // batch_size) * batch_size
            kept = write_map(model, processor, images, path, rows_per_shard=rows, batch_size=batch_size,
                             device=device, world=world, keep=not stream)  # fmt: skip
            if kept is not None:
                return kept
        fmap = FeatureMap(path)
        return fmap if stream else fmap.whole(device)

    def flush(self) -> None:
        """Nothing to wait for: a map is whole on disk when ``get`` returns (kept for callers that
        joined the background writes of the single-file cache)."""


def _digests(images: Sequence[bytes]) -> Iterator[bytes]:
    """SHA-256 of each image, in order, one batch at a time: the sequence's own
    (``ImageColumn.iter_digests``) when it has them, else computed in threads (hashlib lets go of
    the GIL for large buffers)."""
    if hasattr(images, "iter_digests"):
        yield from images.iter_digests()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_workers()) as pool:
        for start in range(0, len(images), 256):
            yield from pool.map(lambda data: hashlib.sha256(data).digest(), images[start : start + 256])

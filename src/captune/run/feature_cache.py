"""Frozen image features on disk, keyed by model fingerprint and the images' content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from captune.model.instruct import instruction
from captune.ops.features import _workers, image_features, qformer_matmul
from captune.ops.lm import unwrap


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
    read = instruction(blip)
    if read is not None:  # only InstructBLIP: BLIP-2 keys stay as they were
        doc["instruction"] = [read[0], read[1]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureStore:
    """Frozen image features on disk, keyed by model fingerprint and the images' content hashes.

    A computed set is returned at once and written in a background thread (under a temporary
    name, then renamed); until the write ends, a second request for it gets the same tensor.
    ``flush`` waits for the writes.
    """

    def __init__(self, root: Path, fingerprint: str):
        self.root = Path(root) / fingerprint
        self.hits = 0
        self.misses = 0
        self._writing: dict[Path, tuple[threading.Thread | None, torch.Tensor]] = {}
        self._errors: list[BaseException] = []

    def path_for(self, images: Sequence[bytes]) -> Path:
        h = hashlib.sha256()
        for digest in _digests(images):
            h.update(digest)
        return self.root / f"{h.hexdigest()[:24]}.safetensors"

    def get(
        self,
        model,
        processor,
        images: Sequence[bytes],
        *,
        batch_size: int = 64,
        device: torch.device | None = None,
        world=None,
    ) -> torch.Tensor:
        """The features of ``images``, from the cache or computed. Under several processes
        (``world``, a ``captune.distributed.World``) every process must call it with the same
        images: each computes every size-th image, one all-gather gives all of them the whole
        set, and the main process writes the file."""
        from safetensors.torch import load_file

        blip = unwrap(model)
        device = device or next(blip.parameters()).device
        many = world is not None and world.distributed
        path = self.path_for(images)
        known = path in self._writing
        hit = known or path.is_file()
        if many:
            from captune.distributed import all_agree

            hit = all_agree(hit)  # one decision: a process that computes alone would wait for the others forever
        if hit:
            self.hits += 1
            if known:
                return self._writing[path][1].to(device)
            return load_file(str(path), device=str(device))["features"]
        self.misses += 1
        if many:
            from captune.distributed import gather_strided

            mine = [images[i] for i in range(world.rank, len(images), world.size)]
            part = image_features(model, processor, mine, batch_size=batch_size, device=device)
            feats = gather_strided(part, len(images))
        else:
            feats = image_features(model, processor, images, batch_size=batch_size, device=device)
        writer = None
        if not many or world.is_main:
            writer = threading.Thread(target=self._write, args=(path, feats), name="captune-features-write")
            writer.start()
        self._writing[path] = (writer, feats)  # the other processes keep theirs in memory until flush
        return feats

    def _write(self, path: Path, feats: torch.Tensor) -> None:
        try:
            save_features(path, feats)
        except BaseException as exc:  # handed to flush(), which raises it in the caller's thread
            self._errors.append(exc)

    def flush(self) -> None:
        """Wait until every features file this store started writing is in place; raise the first
        write error (a full disk, say)."""
        while self._writing:
            _, (writer, _) = self._writing.popitem()
            if writer is not None:
                writer.join()
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error


def _digests(images: Sequence[bytes]) -> list[bytes]:
    """SHA-256 of each image, in threads (hashlib lets go of the GIL for large buffers)."""
    if len(images) < 64:
        return [hashlib.sha256(data).digest() for data in images]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_workers()) as pool:
        return list(pool.map(lambda data: hashlib.sha256(data).digest(), images, chunksize=32))


def save_features(path: Path, feats: torch.Tensor) -> None:
    """A features file written under a temporary name and renamed into place (never half-written)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    from captune.atomic import mkstemp_like_open, mode_for

    fd, tmp = mkstemp_like_open(".features.", path.parent)
    os.close(fd)
    try:
        save_file({"features": feats.contiguous().cpu()}, tmp)
        os.chmod(tmp, mode_for(False))  # safetensors writes owner-only files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)

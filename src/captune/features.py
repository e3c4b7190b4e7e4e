"""Frozen image features and the language-model half of BLIP-2.

When nothing upstream of the language model trains (LoRA on the LLM, the seed's
case), the ViT + Q-Former + projection output of an image never changes. It is
computed once per image and reused by training, validation and evaluation; the
language model then runs on ``inputs_embeds`` with those features scattered into
the image-token positions, which is exactly what ``Blip2ForConditionalGeneration``
does internally (its tests compare the two paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from captune.batching import IGNORE, is_encoder_decoder
from captune.data.images import load_rgb


def unwrap(model):
    """The ``Blip2ForConditionalGeneration`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pixel_values(processor, images: Sequence[bytes]) -> torch.Tensor:
    pil = [load_rgb(b) for b in images]
    return processor.image_processor(pil, return_tensors="pt")["pixel_values"]


_GPU_DECODE_FAILED = False


def gpu_pixel_values(processor, images: Sequence[bytes], device: torch.device) -> torch.Tensor | None:
    """Decode JPEGs on the GPU (nvJPEG) and run the processor there; None when not applicable.

    Only for the torchvision backend of the image processor (the PIL backend keeps
    its own numerics) and only when every image is a JPEG. Pixel values differ from
    the CPU path by JPEG decoder rounding (a GPU test bounds the feature difference).
    """
    global _GPU_DECODE_FAILED
    if _GPU_DECODE_FAILED or device.type != "cuda" or not images:
        return None
    image_processor = processor.image_processor
    if type(image_processor).__name__.endswith("Pil") or not all(b[:3] == b"\xff\xd8\xff" for b in images):
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return image_processor(images=decoded, return_tensors="pt", device=device)["pixel_values"]
    except Exception:  # no nvJPEG, an odd JPEG, an older processor: use the CPU path from now on
        _GPU_DECODE_FAILED = True
        return None


def _workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2)))


@torch.no_grad()
def image_features(
    model,
    processor,
    images: Sequence[bytes],
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    stage: str = "projected",
) -> torch.Tensor:
    """Projected Q-Former outputs, shape (N, num_query_tokens, lm_hidden), on ``device``; with
    ``stage="vision"`` the vision tower's output instead (N, patches + 1, vision_hidden), for
    when the Q-Former trains and its output cannot be cached.

    JPEG decoding and preprocessing run in a thread pool, a few batches ahead of the
    GPU, through the model's own image processor. With the model on a GPU each torch
    CPU op runs single-threaded meanwhile, so the worker threads do not fight over
    cores (the processor's resize and normalisation are torch ops when torchvision is
    installed). A process pool is not used: forking after CUDA start-up can hang.
    """
    from concurrent.futures import ThreadPoolExecutor

    blip = unwrap(model)
    device = device or next(blip.parameters()).device
    dtype = blip.language_projection.weight.dtype
    vision_dtype = blip.vision_model.embeddings.patch_embedding.weight.dtype
    workers = _workers()
    sub = max(1, min(16, batch_size // workers or 1))
    starts = list(range(0, len(images), batch_size))
    chunks = []
    cpu_threads = torch.get_num_threads()
    if device.type == "cuda":
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:

            def submit(start):
                part = list(images[start : start + batch_size])
                return [pool.submit(pixel_values, processor, part[i : i + sub]) for i in range(0, len(part), sub)]

            first = gpu_pixel_values(processor, images[:batch_size], device) if starts else None
            on_gpu = first is not None  # decode on the GPU; otherwise prefetch CPU batches in threads
            ahead = [] if on_gpu else [submit(s) for s in starts[:3]]
            for n, start in enumerate(starts):
                if on_gpu:
                    pv = first if n == 0 else gpu_pixel_values(processor, images[start : start + batch_size], device)
                    if pv is None:
                        pv = pixel_values(processor, images[start : start + batch_size])
                else:
                    if n + 3 < len(starts):
                        ahead.append(submit(starts[n + 3]))
                    pv = torch.cat([f.result() for f in ahead.pop(0)])
                pv = pv.to(device, vision_dtype, non_blocking=True)
                if stage == "vision":
                    chunks.append(blip.vision_model(pixel_values=pv, return_dict=True).last_hidden_state)
                else:
                    out = blip.get_image_features(pixel_values=pv, return_dict=True)
                    chunks.append(out.pooler_output.to(dtype))
                if progress:
                    progress(min(start + batch_size, len(images)))
    finally:
        torch.set_num_threads(cpu_threads)
    return torch.cat(chunks) if chunks else torch.empty(0)


def project_queries(blip, image_embeds: torch.Tensor) -> torch.Tensor:
    """The Q-Former and projection over vision-tower outputs: what ``get_image_features`` does
    after the vision tower, so a trainable Q-Former runs each step on cached vision outputs."""
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = blip.query_tokens.expand(image_embeds.size(0), -1, -1)
    out = blip.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
    query_output = out[0]
    if query_output.dtype != image_embeds.dtype:  # the Q-Former is kept in fp32
        query_output = query_output.to(image_embeds.dtype)
    return blip.language_projection(query_output)


def embed_with_features(blip, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    embeds = blip.get_input_embeddings()(input_ids)
    mask = (input_ids == blip.config.image_token_index).unsqueeze(-1)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def lm_loss(
    model,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Caption loss from cached features; equals the full model's loss on the same batch.

    The vocabulary projection runs only where a label exists (caption tokens and
    EOS, about a quarter of the positions): the image and prompt positions need
    hidden states, not logits, which saves most of the LM head and its fp32 logits.
    """
    blip = unwrap(model)
    embeds = embed_with_features(blip, input_ids, features)
    lm = blip.language_model
    if is_encoder_decoder(blip):  # FlanT5: labels are the decoder's; it shifts them right itself
        decoder_input_ids = lm.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = lm(inputs_embeds=embeds, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    target = labels[:, 1:]
    keep = target != IGNORE
    body = getattr(lm, "model", None)
    if body is not None and hasattr(lm, "lm_head") and hasattr(body, "decoder"):
        hidden = body(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = lm.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, target[keep])
    logits = lm(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def generate_from_features(
    model, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs
) -> torch.Tensor:
    """New token ids only (the prompt is cut off), as ``Blip2...generate`` would produce."""
    blip = unwrap(model)
    embeds = embed_with_features(blip, input_ids, features)
    if is_encoder_decoder(blip):  # the decoder's output starts at its start token, not after a prompt
        return blip.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
    out = blip.language_model.generate(
        inputs_embeds=embeds, attention_mask=attention_mask, input_ids=input_ids, **kwargs
    )
    return out[:, input_ids.size(1) :]


# ------------------------------------------------------------------ disk cache


def model_fingerprint(model, processor, source: str) -> str:
    """Identity of everything that shapes an image's features: weights, config, preprocessing, dtype."""
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
    fd, tmp = tempfile.mkstemp(prefix=".features.", dir=path.parent)
    os.close(fd)
    try:
        save_file({"features": feats.contiguous().cpu()}, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)

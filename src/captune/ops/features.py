"""Frozen image features: pixels from encoded images, and the ViT + Q-Former + projection.

When nothing upstream of the language model trains (LoRA on the LLM, the seed's
case), the ViT + Q-Former + projection output of an image never changes. It is
computed once per image and reused by training, validation and evaluation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from captune.data.images import load_rgb
from captune.model.instruct import qformer_inputs
from captune.ops.lm import unwrap
from captune.ops.vision import fused_vision


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


QFORMER_MATMUL = "captune_qformer_matmul"


def set_qformer_matmul(model, choice: str) -> None:
    """Record ``model.qformer_matmul`` (auto, tf32 or fp32) on the model, as ``load_model`` does."""
    setattr(unwrap(model), QFORMER_MATMUL, choice)


def qformer_matmul(blip) -> str:
    """The resolved choice, tf32 or fp32. transformers keeps the Q-Former in fp32; its products in
    TF32 (10-bit mantissa) err less than the bf16/fp16 rounding its output gets for the language
    model (8/11 bits), so auto takes TF32 for 16-bit models. On an H200 the fp32 Q-Former costs
    a fifth of feature extraction: 709-743 images/s against 954 for the ViT alone, 881 with TF32
    (bench/results/2026-12-01-h200-speed-probe.json)."""
    choice = getattr(blip, QFORMER_MATMUL, "auto")
    if choice != "auto":
        return choice
    return "tf32" if blip.language_projection.weight.dtype in (torch.bfloat16, torch.float16) else "fp32"


@contextlib.contextmanager
def qformer_precision(blip) -> Iterator[None]:
    """TF32 matrix products on CUDA while features are computed, when ``qformer_matmul`` says so; the
    process's setting is restored after. (The ViT and language model are 16-bit: unaffected.)"""
    if qformer_matmul(blip) != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class _GpuDecoder:
    """Batches decoded by nvJPEG on a side stream in one background thread, ``ahead`` batches ahead
    of the model: the decoder's host work and its kernels overlap the vision tower's instead of
    running between batches (on an H200 they took 15.5 ms of each 128-image batch's 162 ms, in line).
    A batch the GPU cannot decode comes back as None (the caller reads it on the CPU)."""

    def __init__(self, processor, images: Sequence[bytes], starts: list[int], batch_size: int, device, ahead: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.processor, self.images, self.batch_size, self.device = processor, images, batch_size, device
        self.stream = torch.cuda.Stream(device)
        self.pool = ThreadPoolExecutor(1)
        self.pending = {s: self.pool.submit(self._decode, s) for s in starts[:ahead]}
        self.queue = starts[ahead:]

    def _decode(self, start: int):
        with torch.cuda.stream(self.stream):
            pv = gpu_pixel_values(self.processor, self.images[start : start + self.batch_size], self.device)
            if pv is None:
                return None
            done = torch.cuda.Event()
            done.record(self.stream)
        return pv, done

    def get(self, start: int) -> torch.Tensor | None:
        """Batch ``start``'s pixel values, ready for the current stream (the next batch is queued)."""
        got = self.pending.pop(start).result()
        if self.queue:
            nxt = self.queue.pop(0)
            self.pending[nxt] = self.pool.submit(self._decode, nxt)
        if got is None:
            return None
        pv, done = got
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        pv.record_stream(current)  # made on the side stream, used and freed on this one
        return pv

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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
    instruction: str | None = None,
    sink: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Projected Q-Former outputs, shape (N, num_query_tokens, lm_hidden), on ``device``; with
    ``stage="vision"`` the vision tower's output instead (N, patches + 1, vision_hidden), for
    when the Q-Former trains and its output cannot be cached.

    An InstructBLIP Q-Former reads the instruction too: the one ``load_model`` recorded
    (``model.prompt``), or ``instruction`` when given.

    With ``sink``, each batch's features are handed to it in order and not kept (the return is
    empty): a split's features written to disk as they come, never whole in memory.

    The vision tower runs ``ops.vision``'s fused kernels where ``vision_kernels`` says so, and the
    Q-Former's products are TF32 where ``qformer_matmul`` says so.

    On a GPU, JPEGs are decoded by nvJPEG on a side stream a batch or two ahead of the model
    (``_GpuDecoder``) when the processor allows. Otherwise JPEG decoding and preprocessing run
    in a thread pool, a few batches ahead of the GPU, through the model's own image processor.
    With the model on a GPU each torch CPU op runs single-threaded meanwhile, so the worker threads do not fight over
    cores (the processor's resize and normalisation are torch ops when torchvision is
    installed). A process pool is not used: forking after CUDA start-up can hang.
    """
    from concurrent.futures import ThreadPoolExecutor

    blip = unwrap(model)
    device = device or next(blip.parameters()).device
    dtype = blip.language_projection.weight.dtype
    vision_dtype = blip.vision_model.embeddings.patch_embedding.weight.dtype
    instruct = {} if stage == "vision" else qformer_inputs(blip, 1, device, processor, instruction)
    workers = _workers()
    sub = max(1, min(16, batch_size // workers or 1))
    starts = list(range(0, len(images), batch_size))
    chunks = []
    cpu_threads = torch.get_num_threads()
    if device.type == "cuda":
        torch.set_num_threads(1)
    try:
        with (
            contextlib.ExitStack() as stack,
            ThreadPoolExecutor(workers) as pool,
            qformer_precision(blip),
            fused_vision(blip),
        ):

            def submit(start):
                part = list(images[start : start + batch_size])
                return [pool.submit(pixel_values, processor, part[i : i + sub]) for i in range(0, len(part), sub)]

            first = None  # (on a CPU the first batch is not read here: each image is read once)
            if starts and device.type == "cuda":
                first = gpu_pixel_values(processor, images[:batch_size], device)
            on_gpu = first is not None  # decode on the GPU; otherwise prefetch CPU batches in threads
            ahead = [] if on_gpu else [submit(s) for s in starts[:3]]
            gpu = _GpuDecoder(processor, images, starts[1:], batch_size, device) if on_gpu else None
            if gpu is not None:
                stack.callback(gpu.close)
            for n, start in enumerate(starts):
                if on_gpu:
                    pv = first if n == 0 else gpu.get(start)
                    if pv is None:
                        pv = pixel_values(processor, images[start : start + batch_size])
                else:
                    if n + 3 < len(starts):
                        ahead.append(submit(starts[n + 3]))
                    pv = torch.cat([f.result() for f in ahead.pop(0)])
                pv = pv.to(device, vision_dtype, non_blocking=True)
                if stage == "vision":
                    out = blip.vision_model(pixel_values=pv, return_dict=True).last_hidden_state
                else:
                    text = {k: v.expand(pv.size(0), -1) for k, v in instruct.items()}
                    out = blip.get_image_features(pixel_values=pv, return_dict=True, **text).pooler_output.to(dtype)
                if sink is None:
                    chunks.append(out)
                else:
                    sink(out)
                if progress:
                    progress(min(start + batch_size, len(images)))
    finally:
        torch.set_num_threads(cpu_threads)
    return torch.cat(chunks) if chunks else torch.empty(0)


def feature_row_bytes(blip, stage: str = "projected") -> int:
    """Bytes of one image's features (``image_features``' row), from the config alone: what a split's
    features will take before any is computed."""
    if stage == "vision":
        vc = blip.config.vision_config
        rows, width = (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size
        weight = blip.vision_model.embeddings.patch_embedding.weight
    else:
        weight = blip.language_projection.weight
        rows, width = blip.config.num_query_tokens, weight.shape[0]
    return rows * width * weight.element_size()


def project_queries(blip, image_embeds: torch.Tensor) -> torch.Tensor:
    """The Q-Former and projection over vision-tower outputs: what ``get_image_features`` does
    after the vision tower, so a trainable Q-Former runs each step on cached vision outputs.
    An InstructBLIP Q-Former reads the recorded instruction after its queries, as there."""
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = blip.query_tokens.expand(image_embeds.size(0), -1, -1)
    text = qformer_inputs(blip, image_embeds.size(0), image_embeds.device)
    extra = {}
    if text:
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=image_embeds.device)
        extra = {
            "input_ids": text["qformer_input_ids"],
            "attention_mask": torch.cat([query_mask, text["qformer_attention_mask"]], dim=1),
        }
    out = blip.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask, **extra)
    query_output = out[0][:, : queries.size(1)]
    if query_output.dtype != image_embeds.dtype:  # the Q-Former is kept in fp32
        query_output = query_output.to(image_embeds.dtype)
    return blip.language_projection(query_output)

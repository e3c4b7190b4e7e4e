"""CLIPScore and RefCLIPScore (Hessel et al., 2021), reference-free image-caption fit.

CLIP-S(c, v) = w * max(cos(E_text("A photo depicts " + c), E_image(v)), 0) with w = 2.5.
RefCLIP-S is the harmonic mean of CLIP-S and max(max_r cos(E_text(c), E_text(r)), 0) over
the references r (all texts carry the prefix, as in the paper's code). Both are reported
per image and as corpus means; the paper uses CLIP ViT-B/32 (``openai/clip-vit-base-patch32``).
torchmetrics' CLIPScore is 100 x cos without the prefix, and is not comparable.

Any CLIP that transformers' ``CLIPModel`` loads works (a Hub id or a folder). The default,
``auto``, uses ViT-B/32 only when it is already on disk, so offline runs and tests never
stall on a download; name the model (``eval.clip_model`` / ``--clip-model``) to fetch it.
When the model cannot be had, scoring says so in one line and every other metric stands.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

PAPER_CLIP = "openai/clip-vit-base-patch32"
PREFIX = "A photo depicts"
W = 2.5
OFF = ("", "none", "off", "false")


@dataclass
class ClipScores:
    """Per-image and corpus CLIPScore / RefCLIPScore, or why they are missing."""

    corpus: dict[str, float] = field(default_factory=dict)
    per_image: dict[str, list[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    model: str = ""


@functools.lru_cache(maxsize=1)
def load_clip(name: str):
    """(model, processor) of a CLIP, or a one-line reason why not (str); kept for the next split."""
    auto = name == "auto"
    if auto and not _paper_clip_on_disk():  # said without importing torch (the scoring process has none)
        return _NOT_ON_DISK
    from transformers import CLIPModel, CLIPProcessor

    target = PAPER_CLIP if auto else name
    local_only = auto or os.environ.get("HF_HUB_OFFLINE") == "1" or os.path.isdir(target)
    try:
        model = CLIPModel.from_pretrained(target, local_files_only=local_only)
        processor = CLIPProcessor.from_pretrained(target, local_files_only=local_only)
    except Exception as exc:  # missing weights, offline, not a CLIP: one line, the rest goes on
        if auto:
            return _NOT_ON_DISK
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return f"cannot load CLIP '{target}' ({type(exc).__name__}: {first})"
    return model.eval(), processor


_NOT_ON_DISK = (
    f"{PAPER_CLIP} is not on disk (offline default); set eval.clip_model={PAPER_CLIP} "
    "(or --clip-model) to download it, or a local CLIP folder"
)


def _paper_clip_on_disk() -> bool:
    """Whether the Hub cache holds ViT-B/32's config (the cache as the environment names it now)."""
    from huggingface_hub import try_to_load_from_cache

    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    return isinstance(try_to_load_from_cache(PAPER_CLIP, "config.json", cache_dir=cache), str)


def _features(model, processor, images, texts, device: str, batch: int):
    """L2-normalised image and text embeddings, in batches."""
    import torch

    def norm(x):
        return x / x.norm(dim=-1, keepdim=True)

    img, txt = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):  # encoded images are decoded a batch at a time
            part = [_decoded(im) for im in images[i : i + batch]]
            pix = processor(images=part, return_tensors="pt")["pixel_values"].to(device)
            img.append(norm(_tensor(model.get_image_features(pixel_values=pix)).float()).cpu())
        for i in range(0, len(texts), batch):
            tok = processor(text=texts[i : i + batch], return_tensors="pt", padding=True, truncation=True)
            tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            txt.append(norm(_tensor(model.get_text_features(**tok)).float()).cpu())
    return torch.cat(img) if img else None, torch.cat(txt) if txt else None


def _decoded(image):
    """A PIL image from a PIL image, encoded bytes or an image file's path."""
    from pathlib import Path

    from captune.data.images import load_rgb

    if isinstance(image, (str, Path)):
        return load_rgb(Path(image).read_bytes())
    return load_rgb(image) if isinstance(image, (bytes, bytearray)) else image


def _tensor(out):
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5.x)."""
    return out if hasattr(out, "norm") else out.pooler_output


def clip_scores_from_features(image, cand, refs: list | None) -> dict[str, list[float]]:
    """The paper's formulas on normalised embeddings: image (n, d), cand (n, d), refs a list of (k_i, d)."""
    import torch

    clip = W * torch.clamp((image * cand).sum(-1), min=0)
    out = {"CLIPScore": clip.tolist()}
    if refs is not None:
        zero = torch.zeros((), dtype=cand.dtype)
        best = torch.stack(
            [torch.clamp((r @ c).max(), min=0) if len(r) else zero for r, c in zip(refs, cand, strict=True)]
        )
        denom = clip + best
        ref_clip = torch.where(denom > 0, 2 * clip * best / torch.where(denom > 0, denom, 1), 0)
        out["RefCLIPScore"] = ref_clip.tolist()
    return out


def clip_score(
    images: list,
    captions: list[str],
    references: list[list[str]] | None,
    model_name: str = "auto",
    *,
    device: str | None = None,
    batch: int = 64,
) -> ClipScores:
    """CLIPScore (and RefCLIPScore when references are given) of images and their captions.

    ``images``: a sequence of PIL images, encoded image bytes or image files' paths, sliced a
    batch at a time; none is read when CLIP is off or cannot be loaded."""
    result = ClipScores(model=model_name)
    if str(model_name).strip().lower() in OFF:
        return result
    loaded = load_clip(model_name)
    if isinstance(loaded, str):
        result.unavailable["CLIPScore"] = loaded
        return result
    import torch

    model, processor = loaded
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    texts = [f"{PREFIX} {c}".strip() for c in captions]
    flat_refs = [f"{PREFIX} {r}".strip() for rs in references or [] for r in rs]
    image_f, text_f = _features(model, processor, images, texts + flat_refs, device, batch)
    cand, ref_f = text_f[: len(texts)], text_f[len(texts) :]
    refs = None
    if references is not None:
        bounds = torch.tensor([0] + [len(r) for r in references]).cumsum(0).tolist()
        refs = [ref_f[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    result.per_image = clip_scores_from_features(image_f, cand, refs)
    result.corpus = {k: sum(v) / len(v) for k, v in result.per_image.items()}
    result.model = PAPER_CLIP if model_name == "auto" else model_name
    return result


def add_clip_scores(scores, images: list, captions: list[str], references: list[list[str]], model_name: str) -> str:
    """Add CLIPScore/RefCLIPScore to a ``metrics.Scores`` (corpus, per-image, unavailable).

    ``images`` are PIL images, encoded image bytes or paths, in the order of ``scores.image_ids``
    (decoded a batch at a time, and not at all when CLIP is unavailable).
    Returns a one-line note when CLIP is unavailable ("" when it ran or is off).
    """
    if str(model_name).strip().lower() in OFF:
        return ""
    got = clip_score(images, captions, references, model_name)
    scores.corpus.update(got.corpus)
    scores.per_image.update(got.per_image)
    scores.unavailable.update(got.unavailable)
    why = got.unavailable.get("CLIPScore")
    return f"CLIPScore unavailable: {why}" if why else ""

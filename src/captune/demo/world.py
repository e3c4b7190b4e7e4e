"""A synthetic captioned-image world for the offline demo.

Each scene holds 1-3 shapes of one kind and colour, small or large, grouped on one
side of a light canvas. Two caption styles describe the same scenes:

* ``plain`` - the style the demo base model is pre-trained on
  ("two small red circles on the left");
* ``catalog`` - the demo's target domain, a product-catalog vocabulary
  ("pair of tiny crimson discs near the left edge").

Adapting from one to the other is a real domain shift for a captioner: the
images stay the same kind, the words and word order a user wants change.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (225, 200, 30),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3)

_PLAIN_COUNT = {1: "a", 2: "two", 3: "three"}
_PLAIN_COUNT_ALT = {1: "one", 2: "two", 3: "three"}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}

_CAT_SHAPE = {"circle": ("disc", "discs"), "square": ("tile", "tiles"), "triangle": ("wedge", "wedges")}
_CAT_COLOUR = {"red": "crimson", "green": "emerald", "blue": "navy", "yellow": "golden"}
_CAT_SIZE = {"small": "tiny", "large": "big"}
_CAT_COUNT = {1: "single", 2: "pair of", 3: "trio of"}
_CAT_POS = {"left": "left edge", "right": "right edge", "top": "upper edge", "bottom": "lower edge"}

STYLES = ("plain", "catalog")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    count: int
    position: str
    seed: int


def sample_scene(rng: random.Random) -> Scene:
    return Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(COLOURS)),
        size=rng.choice(SIZES),
        count=rng.choice(COUNTS),
        position=rng.choice(POSITIONS),
        seed=rng.randrange(2**31),
    )


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels."""
    rng = random.Random(scene.seed)
    shade = rng.randint(215, 245)
    img = Image.new("RGB", (size, size), (shade, shade, shade - rng.randint(0, 10)))
    draw = ImageDraw.Draw(img)
    side = size * (0.2 if scene.size == "small" else 0.36)
    side *= rng.uniform(0.9, 1.1)
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    half = size / 2
    # The group lives in the half of the canvas named by the position.
    if scene.position == "left":
        box = (0, 0, half, size)
    elif scene.position == "right":
        box = (half, 0, size, size)
    elif scene.position == "top":
        box = (0, 0, size, half)
    else:
        box = (0, half, size, size)
    x0, y0, x1, y1 = box
    horizontal = (x1 - x0) > (y1 - y0)
    for i in range(scene.count):
        # Spread the shapes along the long axis of the half so they do not overlap.
        frac = (i + 0.5) / scene.count
        if horizontal:
            cx = x0 + frac * (x1 - x0) + rng.uniform(-1.5, 1.5)
            cy = (y0 + y1) / 2 + rng.uniform(-3, 3)
        else:
            cx = (x0 + x1) / 2 + rng.uniform(-3, 3)
            cy = y0 + frac * (y1 - y0) + rng.uniform(-1.5, 1.5)
        r = min(side / 2, (max(x1 - x0, y1 - y0) / scene.count) / 2 - 1)
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif scene.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def captions(scene: Scene, style: str) -> list[str]:
    """Several reference captions for ``scene`` in ``style``."""
    if style == "plain":
        n, shape = scene.count, scene.shape
        noun = shape if n == 1 else _PLURAL[shape]
        where = f"on the {scene.position}"
        return [
            f"{_PLAIN_COUNT[n]} {scene.size} {scene.colour} {noun} {where}",
            f"{_PLAIN_COUNT_ALT[n]} {scene.size} {scene.colour} {noun} {where} of the picture",
            f"there {'is' if n == 1 else 'are'} {_PLAIN_COUNT_ALT[n]} {scene.colour} {noun} {where}",
            f"{_PLAIN_COUNT[n]} {scene.colour} {noun} {where}, {scene.size}",
        ]
    if style == "catalog":
        single, plural = _CAT_SHAPE[scene.shape]
        noun = single if scene.count == 1 else plural
        colour, size = _CAT_COLOUR[scene.colour], _CAT_SIZE[scene.size]
        pos = _CAT_POS[scene.position]
        count = _CAT_COUNT[scene.count]
        return [
            f"{count} {size} {colour} {noun} near the {pos}",
            f"{count} {colour} {noun}, {size}, near the {pos}",
            f"{size} {colour} {noun}, {count.split()[0]}, placed near the {pos}",
        ]
    raise ValueError(f"unknown caption style {style!r}; known: {', '.join(STYLES)}")


def vocabulary() -> list[str]:
    """Every word any caption style can use, in a fixed order."""
    words: list[str] = []
    rng = random.Random(0)
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                for count in COUNTS:
                    for pos in POSITIONS:
                        scene = Scene(shape, colour, size, count, pos, rng.randrange(2**31))
                        for style in STYLES:
                            for cap in captions(scene, style):
                                for w in cap.replace(",", " ,").split():
                                    if w not in words:
                                        words.append(w)
    # A few common words so prompts like "a photo of" tokenize to real words.
    for w in ("photo", "picture", "image", "of", "a", "an", "the", "."):
        if w not in words:
            words.append(w)
    return words


def make_items(style: str, count: int, seed: int, size: int = 64) -> list[dict]:
    """``count`` captioned images: dicts with image_id, image (PNG bytes) and captions."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        scene = sample_scene(rng)
        items.append(
            {
                "image_id": f"{style}-{seed}-{i:05d}",
                "image": png_bytes(render(scene, size)),
                "captions": captions(scene, style),
            }
        )
    return items

"""Hostile inputs built to exhaust memory or time; run in a fresh process by test_hostile.py.

Prints one JSON line per case: its outcome ("ok" or the user-error text), the growth
of peak resident memory (MiB) it caused and its wall time.
"""

import io
import json
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

from captune.config import DataConfig, load_config
from captune.data.images import check_image
from captune.data.prepare import prepare
from captune.errors import UserError


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def png(w: int, h: int, rows: int) -> bytes:
    """A PNG whose header claims w x h pixels, with ``rows`` rows of zeros compressed."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    body = zlib.compress(b"\0" * (w * 3 + 1) * rows, 9)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def alias_bomb(levels: int = 9) -> str:
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def main(work: Path) -> None:
    from PIL import Image

    cases = {}
    recipe = work / "bomb.yaml"
    recipe.write_text(f"name: bomb\ndata:\n  ratios: {alias_bomb()}\n")
    cases["yaml alias bomb recipe"] = lambda: load_config(str(recipe))
    cases["yaml alias bomb override"] = lambda: load_config("demo", [f"lora.target_modules={alias_bomb()}"])
    cases["png claiming 60000x60000"] = lambda: check_image(png(60000, 60000, 8), 40_000_000)
    buf = io.BytesIO()
    Image.new("RGB", (65000, 1)).save(buf, "JPEG")
    tall = bytearray(buf.getvalue())
    at = tall.index(b"\xff\xc0") + 5  # SOF0 height field: claim 65000 rows
    tall[at : at + 2] = struct.pack(">H", 65000)
    cases["jpeg claiming 65000x65000"] = lambda: check_image(bytes(tall), 40_000_000)
    folder = work / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 10, 10)).save(folder / f"{i}.jpg", "JPEG")
    rows = [{"image": f"{i}.jpg", "caption": ("word " * 4_000_000) if i == 0 else "a red square"} for i in range(4)]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cases["20 MB caption"] = lambda: prepare(
        DataConfig(source=f"manifest:{folder / 'm.jsonl'}", num_images=0), work / "c1", progress=False, log=print
    )
    (folder / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    cases["COCO JSON nested 200k deep"] = lambda: prepare(
        DataConfig(source=f"coco:{folder / 'deep.json'}", num_images=0), work / "c2", progress=False, log=print
    )
    (folder / "deep.jsonl").write_text('{"image": "0.jpg", "caption": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    cases["manifest line nested 200k deep"] = lambda: prepare(
        DataConfig(source=f"manifest:{folder / 'deep.jsonl'}", num_images=0), work / "c3", progress=False, log=print
    )
    for name, run in cases.items():
        before, start = peak_mib(), time.perf_counter()
        try:
            result = run()
            outcome = "ok" if not isinstance(result, str) else f"reason: {result}"
        except UserError as exc:
            outcome = f"user error: {exc}"
        print(
            json.dumps(
                {"case": name, "outcome": outcome, "mib": peak_mib() - before, "s": time.perf_counter() - start}
            ),
            flush=True,
        )


if __name__ == "__main__":
    # a hard ceiling, so a regression fails this process instead of exhausting the machine
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    main(Path(sys.argv[1]))

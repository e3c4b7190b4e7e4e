"""Re-decoding a finished run with other ``eval.*`` settings (``captune eval RUN eval.num_beams=3``).

The run's own outputs stay as they are: the new captions, scores and comparison go to a folder
of their own, RUN/eval-<the overrides>/{baseline,finetuned,comparison.json}, which reads the
run's data cache, adapter and image features (decoding settings change none of them)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from captune.config import apply_overrides, config_from_dict, load_yaml, parse_override
from captune.errors import UserError
from captune.run.folder import Run

# What the re-decoding reads from the parent run folder rather than its own.
SHARED_WITH_RUN = ("data", "adapter", "adapter-scst", "features")


class EvalRun(Run):
    """A run whose outputs live in ``root`` and whose inputs (data, adapter, features) in ``parent``."""

    def __init__(self, root: Path, cfg, log: Callable[[str], None] = print, *, parent: Path | None = None):
        super().__init__(root, cfg, log)
        self.parent = Path(parent) if parent is not None else self.root.parent

    def path(self, *parts: str) -> Path:
        if parts and parts[0] in SHARED_WITH_RUN:
            return self.parent.joinpath(*parts)
        return super().path(*parts)


def check_eval_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    """The overrides as (key, value); anything outside ``eval.*`` is a one-line error naming it."""
    parsed = [parse_override(text) for text in overrides]
    for key, _ in parsed:
        if not key.startswith("eval."):
            raise UserError(
                f"{key}: only eval.* keys can be changed on an existing run (a new decoding, in a folder "
                "of its own); for other keys pass --recipe and --force, or start another run"
            )
    return parsed


def folder_name(parsed: list[tuple[str, object]]) -> str:
    """``eval-num_beams-3`` (keys sorted); a hash of the overrides when that would be long or odd."""
    canonical = ",".join(f"{k.removeprefix('eval.')}={v}" for k, v in sorted(parsed, key=lambda kv: str(kv[0])))
    slug = re.sub(r"[^A-Za-z0-9_.,-]+", "-", canonical.replace("=", "-"))
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:10]
    if len(slug) > 60 or slug != canonical.replace("=", "-"):
        return f"eval-{digest}"
    return f"eval-{slug}"


def open_redecode(root: Path, overrides: list[str], *, force: bool, log: Callable[[str], None]) -> EvalRun:
    """The folder RUN/eval-<overrides> of the run ``root`` with its config (the run's, plus ``overrides``)."""
    root = Path(root)
    saved = root / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{root} is not a run folder (no config.yaml); start one with 'captune run RECIPE --out RUN'")
    parsed = check_eval_overrides(overrides)
    cfg = config_from_dict(load_yaml(saved.read_text(), str(saved)))
    apply_overrides(cfg, overrides)
    cfg.check()
    if not (root / "data" / "manifest.json").is_file():
        raise UserError(f"{root} has no data cache yet; run 'captune eval {root}' without overrides first")
    return EvalRun.open(root / folder_name(parsed), cfg, force=force, log=log)

"""Resolve an ``--adapter`` argument to a local PEFT adapter folder, before any model loads.

A mistyped folder or an unreachable Hub id must cost one line at once, not a model load
followed by a traceback from PEFT or huggingface_hub's retry loop (about 30 s offline).
"""

from __future__ import annotations

import os
from pathlib import Path

from captune.errors import UserError

CONFIG = "adapter_config.json"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_adapter(name: str, option: str = "--adapter") -> str:
    """A folder holding adapter_config.json: the folder itself, RUN/adapter of a run folder,
    or the local copy of a Hub adapter (downloaded only when the Hub answers)."""
    from captune.config import is_hub_id

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / CONFIG).is_file():
            return str(path)
        if (path / "adapter" / CONFIG).is_file():  # a run folder
            return str(path / "adapter")
        raise UserError(f"{option} {name} is not a PEFT adapter folder (no {CONFIG}); give RUN/adapter or a run folder")
    if path.exists():
        raise UserError(f"{option} {name} is a file; give an adapter folder (RUN/adapter), a run folder or a Hub id")
    if not is_hub_id(name):
        raise UserError(f"{option} {name}: folder not found (and not a Hub id OWNER/NAME)")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG, "adapter_model.safetensors", "*.json", "*.txt", "*.model", "*.jinja"]
    try:  # already downloaded: no network at all
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    from captune.online import hub_reachable

    if _offline() or not hub_reachable(timeout=3.0):
        raise UserError(
            f"{option} {name}: no folder of that name, and the Hugging Face Hub cannot be reached to download "
            f"it; download it elsewhere ('hf download {name}') and give that folder"
        )
    try:
        local = snapshot_download(name, allow_patterns=patterns)
    except Exception as exc:  # unknown repo, gated, private
        raise UserError(f"{option} {name}: cannot get it from the Hub ({type(exc).__name__}); check the id") from None
    if not (Path(local) / CONFIG).is_file():
        raise UserError(f"{option} {name}: the Hub repo has no {CONFIG}; is it a PEFT adapter?")
    return local


def adapter_base(folder: str) -> str | None:
    """The base model an adapter folder names (adapter_config.json's base_model_name_or_path), if any."""
    import json

    try:
        name = json.loads((Path(folder) / CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None

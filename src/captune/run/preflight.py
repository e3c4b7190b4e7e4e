"""Cheap checks that fail at once, before any heavy step: the Hub when it is needed, the device."""

from __future__ import annotations

from pathlib import Path

from captune.config import Config
from captune.data.sources import parse_source
from captune.errors import UserError
from captune.online import hub_reachable


def preflight(cfg: Config) -> None:
    """Cheap checks that fail at once, before any heavy step."""
    from captune.model.load import BUILTIN_DEMO, resolve_device

    kind, _ = parse_source(cfg.data.source)
    needs_hub = []
    if kind == "hub":
        needs_hub.append(f"dataset {cfg.data.source}")
    name = cfg.model.name_or_path
    if name != BUILTIN_DEMO and not Path(name).expanduser().exists():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                name, revision=cfg.model.revision, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
            )
        except Exception:
            needs_hub.append(f"model {name}")
    if needs_hub and not hub_reachable():
        raise UserError(
            f"recipe '{cfg.name}' needs the Hugging Face Hub for {' and '.join(needs_hub)}, and the Hub "
            "cannot be reached; run it on a machine with internet, or download them and point "
            "data.source / model.name_or_path at local copies"
        )
    resolve_device(cfg.model.device)
    from captune.model.lora import check_targets

    check_targets(cfg.model, cfg.lora)  # from the model's config on the meta device: no weights loaded

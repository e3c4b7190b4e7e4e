"""Whether the Hugging Face Hub can be reached: asked once, quickly, before anything would retry."""

from __future__ import annotations

import os
import socket


def hub_reachable(timeout: float = 5.0) -> bool:
    """False when offline (HF_HUB_OFFLINE) or when the Hub's host does not answer within ``timeout`` s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

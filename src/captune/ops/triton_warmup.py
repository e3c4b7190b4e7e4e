"""Triton's install hash, computed in the background while a model loads.

Triton's first compile-or-load of any kernel in a process computes ``triton_key()``: a SHA-256 of
its own sources and of ``libtriton.so`` (415 MB in Triton 3.6), cached for the process. A py-spy
profile of the coco5k job found it in 32-41% of the main thread's samples during the first
captions (``bench/results/2026-12-01-h200-coco5k-job-py-spy.json``, a run slowed by profiling); in a
fresh unprofiled process on an H200 it took 0.499 s cold (``-bench-whole-prefill-kernel.json``'s note).
Reading and hashing release the GIL, so a thread started before the weights load takes it off the path.
"""

from __future__ import annotations

import threading

import torch


def warm_triton_key(device: torch.device) -> threading.Thread | None:
    """Start computing Triton's cached install key in a daemon thread, for a CUDA ``device`` where
    Triton is installed; the thread, or None where nothing applies. Any failure is left to the
    first kernel launch, which computes the key itself."""
    if device.type != "cuda":
        return None
    try:
        from triton.runtime.cache import triton_key
    except Exception:  # no Triton, or a version without it: the first launch does as before
        return None

    def run() -> None:
        try:
            triton_key()
        except Exception:  # the first kernel launch raises it again where it matters
            pass

    thread = threading.Thread(target=run, name="captune-triton-key", daemon=True)
    thread.start()
    return thread

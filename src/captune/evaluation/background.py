"""The one background scorer: scoring (CPU and Java) runs in a thread while the GPU goes on.

The baseline's metrics are scored while training starts, and each validation's CIDEr while
the next epoch trains. One worker serves both, in the order they were asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def submit(fn: Callable, *args) -> Future:
    """``fn(*args)`` in the scoring thread; its future."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="captune-scoring")
    return _POOL.submit(fn, *args)

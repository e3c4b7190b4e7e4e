"""Work made ahead of the training loop by one thread, in the loop's order: ``Ahead``.

The streamed feature feed (``training.feed.Streamed``) gathers the next micro-batches' rows with
it, and the packed steps (``training.steps``) tokenize and pack the next micro-batches' captions,
so that the thread launching the GPU's kernels does neither. What ``take`` returns is exactly what
making it in the loop would have given: only the thread that makes it differs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable


class Ahead:
    """``make(key)`` for each key of a plan, up to ``depth`` ahead, in one thread (``setup()`` first);
    ``take(key)`` returns the next one made, or makes it in the caller's thread when it is not the
    one planned (past or off the plan)."""

    def __init__(self, make: Callable, *, depth: int, name: str, setup: Callable[[], None] | None = None):
        self.make, self.depth, self.name, self.setup = make, depth, name, setup
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._halt = threading.Event()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def plan(self, keys: Iterable) -> None:
        """Start making ``keys``' items, in the order ``take`` will ask for them; the thread takes the
        keys from ``keys`` as it goes (a lazy sequence or iterator is never listed)."""
        self.stop()
        self._halt = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._run, args=(keys, self._queue, self._halt), daemon=True, name=self.name
        )
        self._thread.start()

    def _run(self, keys: Iterable, out: queue.Queue, halt: threading.Event) -> None:
        def offer(item) -> bool:
            while not halt.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if self.setup is not None:
                self.setup()
            for key in keys:
                if not offer((key, self.make(key))):
                    return
            offer(None)  # the plan is done: a take beyond it makes its item itself
        except BaseException as exc:  # raised by take() in the loop's thread
            offer(exc)

    def take(self, key):
        """The item of ``key``: the next one made, or made now if it is not the one planned."""
        item = self._queue.get() if self._thread is not None else None
        if isinstance(item, BaseException):
            self.stop()
            raise item
        if item is None or item[0] != key:
            self.stop()  # past or off the plan (never in the loop): made here
            return self.make(key)
        return item[1]

    def stop(self) -> None:
        """Stop making (the epoch ended or training stopped early)."""
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

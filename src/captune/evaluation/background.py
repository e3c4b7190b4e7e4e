"""The one background scorer: scoring (CPU and Java) runs apart from the GPU's work.

A run that both trains and evaluates (``captune run``, ``api.run_recipe``) scores in a process of its
own, started with the run (``start_process``): the baseline's metrics while training begins, each
validation's CIDEr during the next epoch, and the fine-tuned metrics, all through one METEOR JVM
there, which starts while the model loads. BLEU, ROUGE-L and CIDEr are pure Python: in a thread of
the training process they held the GIL against the thread that launches the GPU's kernels, and on
an H200 the training split's features ran at 464 images/s beside the baseline's scoring against 844
alone. Elsewhere (one phase at a time, or a callable that cannot be pickled) one thread scores, as
before. Either way one worker serves every request, in the order they were asked for.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_THREAD: ThreadPoolExecutor | None = None
_PROCESS: ProcessPoolExecutor | None = None
_CHILD: Future | None = None  # the scoring process's pid
_LOCK = threading.Lock()


def start_process() -> None:
    """Start the scoring process (once) and METEOR's JVM in it. Spawned, not forked: the parent may
    hold CUDA and threads by now. Only the scoring modules are imported there (no torch)."""
    global _PROCESS, _CHILD
    import multiprocessing

    with _LOCK:
        if _PROCESS is None:
            # (on Linux the kernel ends it with the thread that starts it: only if that is the main one)
            bound = threading.current_thread() is threading.main_thread()
            _PROCESS = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_die_with_parent, initargs=(os.getpid(), bound))  # fmt: skip
            # The first submit spawns the process, which would run the caller's script again (a user's
            # train.py calling run_recipe at its top level) as multiprocessing re-imports __main__:
            # it is given an empty one to import instead (no task is ever a function of __main__).
            main = sys.modules["__main__"]
            sys.modules["__main__"] = types.ModuleType("__main__")
            try:
                _PROCESS.submit(_prewarm)
            finally:
                sys.modules["__main__"] = main
            _CHILD = _PROCESS.submit(os.getpid)


def separate() -> bool:
    """Whether scoring goes to the scoring process."""
    return _PROCESS is not None


def stop() -> None:
    """End the scoring process (the run's end, once the run has joined what it asked of it). Idle by
    then, it is killed rather than left to wind down (its interpreter's and its JVM's exit were
    waited for, about a second of the coco5k job); anything still under way is waited for first."""
    global _PROCESS, _CHILD
    with _LOCK:
        pool, _PROCESS = _PROCESS, None
        child, _CHILD = _CHILD, None
    if pool is None:
        return
    with contextlib.suppress(Exception):
        pid = child.result(timeout=0) if child is not None and child.done() else None
        pool.submit(int).result()  # (the queue is in order: everything asked before is done)
        if pid is not None:
            os.kill(pid, 9)
    pool.shutdown(wait=True)


def submit(fn: Callable, *args) -> Future:
    """``fn(*args)`` on the scorer (the process when one is started and ``fn`` can be sent there); its future."""
    global _THREAD
    pool: Executor | None = _PROCESS
    if pool is not None and _picklable(fn):
        try:
            return pool.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):  # the process is gone: this process scores
            pass
    with _LOCK:
        if _THREAD is None:
            _THREAD = ThreadPoolExecutor(1, thread_name_prefix="captune-scoring")
    return _THREAD.submit(fn, *args)


def timed(fn: Callable, *args) -> tuple:
    """``(fn(*args), its seconds)``: what a validation's scoring returns."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _picklable(fn: Callable) -> bool:
    """Whether the scoring process can be sent ``fn`` (not a closure or a lambda, nor a function of
    the caller's script, which that process does not import)."""
    inner = getattr(fn, "func", fn)  # a functools.partial's function
    if "__main__" in (getattr(fn, "__module__", None), getattr(inner, "__module__", None)):
        return False
    try:
        pickle.dumps(fn)
    except Exception:
        return False
    return True


def _die_with_parent(parent: int, bound: bool) -> None:
    """In the scoring process: end with the run's process, even when that one is killed (SIGKILL). An
    orphan would go on scoring into the run folder, and a rerun there would find the predictions it
    had just written moved away."""
    if bound:
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it was gone before this could be set
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="captune-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _prewarm() -> None:
    from captune.evaluation.metrics import prewarm

    prewarm()

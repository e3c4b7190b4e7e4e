"""The background computation of Triton's install key (``ops.triton_warmup``)."""

import sys
import threading
import types

import torch

from captune.ops.triton_warmup import warm_triton_key


def _fake_triton(monkeypatch, key):
    """A stand-in ``triton.runtime.cache`` (Triton does not run on CPU-only machines)."""
    cache = types.ModuleType("triton.runtime.cache")
    cache.triton_key = key
    for name, mod in {"triton": types.ModuleType("triton"), "triton.runtime": types.ModuleType("triton.runtime"),
                      "triton.runtime.cache": cache}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)


def test_cuda_device_computes_the_key_off_the_calling_thread(monkeypatch):
    seen = []
    _fake_triton(monkeypatch, lambda: seen.append(threading.current_thread().name))
    thread = warm_triton_key(torch.device("cuda", 0))
    assert thread is not None and thread.daemon
    thread.join(timeout=10)
    assert seen == ["captune-triton-key"]


def test_cpu_device_or_failing_key_changes_nothing(monkeypatch):
    seen = []
    _fake_triton(monkeypatch, lambda: seen.append(1))
    assert warm_triton_key(torch.device("cpu")) is None
    assert seen == []

    def broken():
        raise RuntimeError("no libtriton")

    _fake_triton(monkeypatch, broken)
    thread = warm_triton_key(torch.device("cuda", 0))
    thread.join(timeout=10)  # the error stays in the thread: the first launch meets it again
    assert not thread.is_alive()


def test_without_triton_nothing_starts(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import fails
    monkeypatch.delitem(sys.modules, "triton.runtime.cache", raising=False)
    assert warm_triton_key(torch.device("cuda", 0)) is None

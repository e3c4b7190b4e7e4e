"""On a terminal: the bar or the step lines, not both; lines from another thread do not tear the bar (issue 20)."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import pytest
import torch

from captune.console import around_bar
from captune.training.progress import ProgressBar, TrainLog


def _steps(progress: str, say) -> TrainLog:
    cfg = SimpleNamespace(trackers=[], progress=progress, log_every=1)
    log = TrainLog(path=None, history=[], train_cfg=cfg, config={}, total_steps=5,
                   position=SimpleNamespace(step=0, seen=0), say=say, main=True)  # fmt: skip
    for step in range(1, 6):
        log.micro_batch(torch.tensor(1.0))
        log.optimizer_step(SimpleNamespace(step=step, seen=step * 2), 1, 1e-4, torch.device("cpu"))
    log.validation({"type": "validation", "epoch": 1, "step": 5, "loss": 0.5}, {"loss": 0.1})
    log.close()
    return log


@pytest.mark.parametrize("progress", ["on", "off"])
def test_step_lines_only_without_a_bar(progress, capsys):
    _steps(progress, print)
    out, err = capsys.readouterr()
    assert "validation after epoch 1 (step 5): loss 0.5000" in out  # shown either way
    if progress == "on":
        assert "step 3/5" not in out and "5/5" in err and "loss=" in err
    else:
        assert "step 3/5 epoch 1 loss 1.0000" in out and err == ""


def test_a_line_from_another_thread_goes_around_the_bar():
    stream = io.StringIO()
    bar = ProgressBar("on", total=5, stream=stream)
    bar.update(2, {"loss": 1.0, "lr": 1e-4, "samples_per_s": 10.0})
    log = around_bar(lambda m: stream.write(m + "\n"))
    worker = threading.Thread(target=log, args=("  baseline: scored in 1.0s: CIDEr 0.1234",))
    worker.start()
    worker.join()
    bar.update(3)
    bar.close()
    line = next(x for x in stream.getvalue().split("\n") if "baseline: scored" in x)
    # what the terminal shows of that line: the text after its last carriage return
    assert line.split("\r")[-1] == "  baseline: scored in 1.0s: CIDEr 0.1234", repr(line)
    assert around_bar(log) is log  # wrapping twice is the same writer (no double clearing)

"""The run's scoring process: scoring apart from the thread that launches the GPU's kernels."""

from __future__ import annotations

import os

import captune
from captune.evaluation import background
from captune.evaluation.evaluate import cider_score


def test_the_scoring_process_scores_apart_and_closures_stay_here():
    background.start_process()
    try:
        assert background.separate()
        assert background.submit(os.getpid).result(timeout=300) != os.getpid()
        here = os.getpid
        assert background.submit(lambda: here()).result() == os.getpid()  # cannot be sent: a thread here
        caps, refs = ["a dog on grass", "a red car"], [["a dog on the grass", "a dog"], ["a red car", "a car"]]
        value, seconds = background.submit(background.timed, cider_score, caps, refs).result(timeout=300)
        assert value == cider_score(caps, refs) and seconds > 0
    finally:
        background.stop()
    assert not background.separate()


def test_a_run_that_trains_scores_every_split_in_the_scoring_process(tmp_path, monkeypatch):
    """Scoring in a thread of the training process held the GIL against the kernel launches (the
    training split's features at 464 images/s beside the baseline's scoring on an H200, 844 alone).
    Here this process may not score at all: the baseline, the validations and the fine-tuned split
    are scored in the run's scoring process."""
    from captune.evaluation import evaluate

    def not_here(*args):
        raise AssertionError("scored in the training process")

    monkeypatch.setattr(evaluate, "_score_and_write", not_here)
    monkeypatch.setattr(background, "_THREAD", None)
    over = {"data.num_images": 60, "train.epochs": 1, "eval.bootstrap": 50, "report.examples": 2}
    lines: list[str] = []
    result = captune.run_recipe("demo", over, out=tmp_path / "run", log=lines.append)
    assert background._THREAD is None and not background.separate()
    for side in ("baseline", "finetuned"):
        assert (result.root / side / "metrics.json").is_file()
        assert any(line.startswith(f"  {side}: scored in ") for line in lines), side
    assert any("validation after epoch 1" in line and "CIDEr" in line for line in lines)


def test_the_scoring_process_ends_when_the_run_is_killed(tmp_path):
    """A run killed with SIGKILL left its scoring process going: it went on writing into the run
    folder, and the rerun's baseline found its own predictions moved away."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, time\n"
        "from captune.evaluation import background\n"
        "background.start_process()\n"
        "print(background.submit(os.getpid).result(timeout=300), flush=True)\n"
        "time.sleep(600)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(run.stdout.readline())
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        run.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_users_script_without_a_main_guard_is_not_run_again(tmp_path):
    """Spawning re-imports the caller's __main__: a train.py calling run_recipe at its top level would
    have run again (whole) inside the scoring process. And its own functions are scored here."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import os\n"
        "print('top level', flush=True)\n"
        "from captune.evaluation import background\n"
        "background.start_process()\n"
        "def mine():\n"
        "    return os.getpid()\n"
        "apart = background.submit(os.getpid).result(timeout=300) != os.getpid()\n"
        "here = background.submit(mine).result(timeout=300) == os.getpid()\n"
        "background.stop()\n"
        "print(apart, here, flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["top level", "True True"]

"""Several processes on the CPU (gloo): the same adapter as one process, a two-node launch, clear errors."""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from captune.cli import main

# LoRA dropout off: with it each process draws its own masks, and no two runs can match.
SETTINGS = ["data.num_images=60", "train.epochs=2", "train.batch_size=16", "lora.dropout=0", "eval.bootstrap=50"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _prepared(tmp_path, name: str, extra: list[str]):
    run = tmp_path / name
    assert main(["data", str(run), "--recipe", "demo", *SETTINGS, *extra]) == 0
    twin = tmp_path / f"{name}-single"
    shutil.copytree(run, twin)
    assert main(["train", str(twin)]) == 0
    return run, twin


def _same_adapter(a, b, atol=1e-4):
    x, y = (
        load_file(str(a / "adapter" / "adapter_model.safetensors")),
        load_file(str(b / "adapter" / "adapter_model.safetensors")),
    )
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k], y[k], atol=atol), (k, (x[k] - y[k]).abs().max())


def _ran_like_one_process(cmd: list[str], run, single, says: str) -> None:
    """A two-process `captune run` launch that says ``says`` and gives the single-process run's
    adapter and fine-tuned captions."""
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert says in done.stdout
    _same_adapter(run, single)
    ours = (run / "finetuned" / "predictions.jsonl").read_text()
    assert ours == (single / "finetuned" / "predictions.jsonl").read_text()


def _kill_tree(proc) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in sessions of
    their own, so killing the launcher's process group leaves them running)."""
    import psutil

    parent = psutil.Process(proc.pid)
    family = [*parent.children(recursive=True), parent]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=60)
    proc.wait()


def _killed_at_first_checkpoint(cmd: list[str], run) -> None:
    """Start a launch and SIGKILL all of it once its first checkpoint is complete."""
    import time

    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("step-*/state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    _kill_tree(proc)
    assert not (run / "adapter").exists()


def _lines(path) -> int:
    return len(path.read_text().splitlines())


def test_two_processes_give_the_single_process_run(tmp_path):
    """accelerate launch, 2 processes on a machine without GPUs, every phase (packed training, sharded
    features and captions), vs one process: the same adapter, captions and metrics."""
    run, single = _prepared(tmp_path, "packed", [])
    assert main(["run", "demo", "--out", str(single), *SETTINGS]) == 0
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(_port()), "-m", "captune.cli", "run", "demo", "--out", str(run), *SETTINGS,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_adapter(run, single)
    for side in ("baseline", "finetuned"):
        ours = (run / side / "predictions.jsonl").read_text()
        assert ours == (single / side / "predictions.jsonl").read_text()
        a = json.loads((run / side / "metrics.json").read_text())
        b = json.loads((single / side / "metrics.json").read_text())
        assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-9)
    # one process wrote the log, and one process talked; no shard files are left
    assert _lines(run / "logs" / "train.jsonl") == _lines(single / "logs" / "train.jsonl")
    assert done.stdout.count("[train] done") == 1 and done.stdout.count("[baseline] done") == 1
    assert not [p for p in run.rglob("*") if "-of-2" in p.name]
    assert (run / "report" / "index.html").is_file()


@pytest.mark.slow  # CI runs it (.ci/run, -m slow)
def test_two_processes_stream_features_from_one_shared_map(tmp_path):
    """train.feature_residence=stream under torchrun: each process computes and writes its own shards of
    the feature cache once, both read the shared map, and the adapter is the single process's."""
    run, single = _prepared(tmp_path, "stream", ["train.feature_residence=stream", "eval.batch_size=16"])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
        "-m", "captune.cli", "train", str(run),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streamed from disk" in done.stdout
    _same_adapter(run, single)
    maps = sorted(p.parent for p in (run / "features").glob("*/*/manifest.json"))
    assert len(maps) == 2  # the train and validation splits, each one map; no per-process copies
    train_map = max(maps, key=lambda m: json.loads((m / "manifest.json").read_text())["count"])
    assert len(json.loads((train_map / "manifest.json").read_text())["shards"]) == 2  # one each
    assert not [p for p in (run / "features").rglob(".*")]  # no temporary left


def _gather_in_process(rank: int, port: int, total: int, out) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    from captune.distributed import barrier, close, gather_strided

    rows = torch.arange(total * 3, dtype=torch.float32).view(total, 3)
    whole = gather_strided(rows[rank::2].clone(), total)
    torch.save(whole, out / f"rank{rank}.pt")
    barrier()  # both done before either leaves: a process that exits inside the group can abort its peer
    close()


@pytest.mark.parametrize("total", [5, 6, 1])
def test_stride_split_features_are_gathered_in_order(tmp_path, total):
    """Each process computes every second image's features; one all-gather gives every process all
    of them in the images' order, shares of unequal size (5 images) and an empty share (1) included."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_in_process, args=(_port(), total, tmp_path), nprocs=2)
    expected = torch.arange(total * 3, dtype=torch.float32).view(total, 3)
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_two_node_launch_on_localhost(tmp_path):
    """Two torchrun node ranks on this machine (unpacked training: one caption per image)."""
    run, single = _prepared(tmp_path, "nodes", ["data.train_captions=first"])
    port = str(_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "-m",
                "captune.cli",
                "train",
                str(run),
            ],  # fmt: skip
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    _same_adapter(run, single)
    assert "[train] done" in outs[0][0] and "[train] done" not in outs[1][0]


def test_a_half_launched_group_is_one_line(tmp_path):
    run = tmp_path / "r"
    assert main(["data", str(run), "--recipe", "demo", "data.num_images=20"]) == 0
    env = dict(_env(), WORLD_SIZE="2")
    env.pop("MASTER_ADDR", None)
    done = subprocess.run(
        [sys.executable, "-m", "captune.cli", "train", str(run)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("captune: error: WORLD_SIZE=2 but the process group cannot be formed")


def test_processes_that_do_not_form_one_group_are_stopped(monkeypatch):
    """A launcher says 2 processes, but the group this process joined has 1 (e.g. a CPU run of a GPU launch)."""
    import accelerate

    from captune import distributed
    from captune.errors import UserError

    class Alone:
        num_processes, process_index, local_process_index = 1, 0, 0

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "PartialState", Alone)
    monkeypatch.setattr(distributed, "_WORLD", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="launched as 2 processes, but they did not form one process group"):
        distributed.world()
    monkeypatch.setattr(distributed, "_WORLD", None)


def test_resume_with_another_world_size(tmp_path):
    """Killed while training with 2 processes, resumed with 1: the adapter of an uninterrupted run."""
    extra = ["train.epochs=3", "train.checkpoint_every=2"]
    run, single = _prepared(tmp_path, "resume", extra)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
        "-m", "captune.cli", "train", str(run),
    ]  # fmt: skip
    _killed_at_first_checkpoint(cmd, run)
    assert main(["train", str(run)]) == 0  # one process picks up where two stopped
    _same_adapter(run, single)


def test_fsdp_two_processes_give_the_single_process_run(tmp_path):
    """accelerate launch with the shipped FSDP config (the language model sharded, gloo on the CPU):
    the same adapter and fine-tuned captions as one process."""
    run, single = _prepared(tmp_path, "fsdp", [])
    assert main(["run", "demo", "--out", str(single), *SETTINGS]) == 0
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", "fsdp.yaml")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
        "--main_process_port", str(_port()), "-m", "captune.cli", "run", "demo", "--out", str(run), *SETTINGS,
    ]  # fmt: skip
    _ran_like_one_process(cmd, run, single, "FSDP: the language model sharded over 2 processes")
    # checkpoints hold whole tensors, the shapes of the single-process run's
    ours = load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    theirs = load_file(str(sorted((single / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_fsdp_launch_loads_whole_weights_on_every_process(monkeypatch):
    """accelerate's FSDP config makes transformers load weights on process 0 only (the others get
    none, for FSDP to broadcast); captune shards each process's own copy, so loading turns it off."""
    from captune.config import ModelConfig
    from captune.model.load import load_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    load_model(ModelConfig(device="cpu"))
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


@pytest.mark.slow  # CI runs it (.ci/run, -m slow)
def test_fsdp_run_killed_then_resumed_with_fsdp(tmp_path):
    """Checkpoints under FSDP hold whole tensors: a sharded run killed mid-training and launched
    again (sharded) resumes and ends with the uninterrupted single-process adapter."""
    extra = ["train.epochs=3", "train.checkpoint_every=2"]
    run, single = _prepared(tmp_path, "fsdp-resume", extra)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", "fsdp.yaml")

    def launch():
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
            "--main_process_port", str(_port()), "-m", "captune.cli", "train", str(run),
        ]  # fmt: skip

    _killed_at_first_checkpoint(launch(), run)
    done = subprocess.run(launch(), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step-" in done.stdout
    _same_adapter(run, single)


def _deepspeed_launch(stage: int, *args: str) -> list[str]:
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", f"deepspeed-zero{stage}.yaml")
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
        "--main_process_port", str(_port()), "-m", "captune.cli", *args,
    ]  # fmt: skip


@pytest.mark.slow  # CI runs it (.ci/run, -m slow)
def test_deepspeed_zero2_run_gives_the_single_process_run(tmp_path):
    """accelerate launch with the shipped ZeRO-2 config (gloo on the CPU), every phase: the
    single-process adapter and fine-tuned captions (evaluation runs on the model DeepSpeed trained)."""
    run, single = _prepared(tmp_path, "zero2", [])
    assert main(["run", "demo", "--out", str(single), *SETTINGS]) == 0
    cmd = _deepspeed_launch(2, "run", "demo", "--out", str(run), *SETTINGS)
    _ran_like_one_process(cmd, run, single, "DeepSpeed ZeRO-2 over 2 processes")


def test_deepspeed_zero3_run_gives_the_single_process_run(tmp_path):
    """The shipped ZeRO-3 config, every phase: every weight partitioned while training, validation
    on the gathered model, evaluation after it on the model loaded again: the single-process
    adapter and fine-tuned captions."""
    run, single = _prepared(tmp_path, "zero3", [])
    assert main(["run", "demo", "--out", str(single), *SETTINGS]) == 0
    cmd = _deepspeed_launch(3, "run", "demo", "--out", str(run), *SETTINGS)
    _ran_like_one_process(cmd, run, single, "DeepSpeed ZeRO-3 over 2 processes")


def _optimizer_shapes(run) -> dict:
    doc = torch.load(sorted((run / "checkpoints").glob("step-*"))[0] / "optimizer.pt", weights_only=True)
    return {i: {k: tuple(v.shape) for k, v in st.items()} for i, st in doc["optimizer"]["state"].items()}


@pytest.mark.slow  # CI runs it (.ci/run, -m slow)
def test_deepspeed_zero3_run_killed_then_resumed(tmp_path):
    """A ZeRO-3 checkpoint holds whole tensors (the adapter and AdamW's state gathered from the
    partitions, in torch's format): killed mid-training and launched again, the run loads them back
    into the partitions and ends with the uninterrupted single-process adapter."""
    extra = ["train.epochs=3", "train.checkpoint_every=2"]
    run, single = _prepared(tmp_path, "zero-resume", extra)
    _killed_at_first_checkpoint(_deepspeed_launch(3, "train", str(run)), run)
    assert _optimizer_shapes(run) == _optimizer_shapes(single)  # what a single process writes
    done = subprocess.run(_deepspeed_launch(3, "train", str(run)), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step-" in done.stdout
    _same_adapter(run, single)


def test_deepspeed_launch_settings_captune_cannot_honour_are_one_line(monkeypatch):
    from captune import launch
    from captune.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launch.engine("auto") == "zero3"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    with pytest.raises(UserError, match="offload"):
        launch.engine("auto")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(UserError, match="stage 2 or 3"):
        launch.engine("auto")


def test_engines_refuse_what_they_cannot_train_in_one_line():
    """The qformer preset reads the Q-Former's query tokens directly, which FSDP and ZeRO-3 shard;
    quantized weights train under DDP only; DeepSpeed is not run on fp16 weights (captune's loss
    scaling is torch's): one line each, whose advice the config accepts."""
    from captune.config import load_config
    from captune.errors import UserError
    from captune.training import engines

    for kind in ("fsdp", "zero3"):
        with pytest.raises(UserError, match=r"use DDP \(train.distributed=ddp\)"):
            engines.check_engine(kind, vision_trains=True, dtype=torch.bfloat16)
    for kind in ("ddp", "zero2", "single"):
        engines.check_engine(kind, vision_trains=True, dtype=torch.bfloat16)
    with pytest.raises(UserError, match="model.dtype=bf16") as refused:
        engines.check_engine("zero2", vision_trains=False, dtype=torch.float16)
    advice = re.search(r"set (model\.dtype=\S+)", str(refused.value)).group(1)
    assert load_config("demo", [advice]).model.dtype == "bf16"  # the advice parses (it said bfloat16 once)
    engines.check_engine("ddp", vision_trains=False, dtype=torch.float16)
    for kind in ("fsdp", "zero2", "zero3"):  # QLoRA's 4-bit weights are not shardable parameters
        with pytest.raises(UserError, match="DDP only"):
            engines.check_engine(kind, vision_trains=False, dtype=torch.bfloat16, quantized=True)
    engines.check_engine("ddp", vision_trains=False, dtype=torch.bfloat16, quantized=True)

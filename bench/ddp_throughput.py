"""Training throughput of ``captune train`` on one GPU and on all GPUs of this machine (DDP via torchrun),
or a few sharded steps on all GPUs (accelerate launch with configs/accelerate/fsdp.yaml or
deepspeed-zero3.yaml), or DeepSpeed ZeRO-2 against one GPU (deepspeed-zero2.yaml).

    python bench/ddp_throughput.py --images 2000 --out ddp.json [--workdir DIR]
    python bench/ddp_throughput.py --arch blip2-opt-6.7b --engine fsdp --images 256 --max-steps 8 --out fsdp.json
    python bench/ddp_throughput.py --arch blip2-opt-6.7b --engine zero3 --images 256 --max-steps 8 --out z3.json

Random blip2-opt-2.7b weights are saved in checkpoint format and synthetic COCO-size
JPEGs (5 captions each) in a COCO folder; ``captune data`` prepares one run folder
per setting, then ``captune train`` runs with the coco5k recipe's training (bf16,
LoRA q/k r 8, packing) for one epoch with validation off. The per-GPU micro-batch is
the same in both settings (``--per-gpu``, 256 pairs as in coco5k), so the global batch
grows with the GPU count. samples/s is captune's own count (pairs / training-loop
seconds) from RUN/adapter/training.json; the steady pace leaves out the steps before
the first log line (first kernels and shapes), which weigh more in the shorter
many-GPU run. With ``--engine fsdp`` or ``zero3`` only the all-GPU run is made, with
validation at its end (which gathers the sharded language model), and each step's
loss and peak GPU memory are reported from RUN/logs/train.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/captune-ddp")
    ap.add_argument("--out", default="ddp.json")
    ap.add_argument("--arch", default="blip2-opt-2.7b")
    ap.add_argument("--engine", choices=("ddp", "fsdp", "zero2", "zero3"), default="ddp")
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--per-gpu", type=int, default=256, help="pairs per GPU per micro-batch (coco5k: 256)")
    ap.add_argument(
        "--profile",
        metavar="PREFIX",
        help="after the timed runs, run each setting again under py-spy (every process sampled): PREFIX-NGPU.txt",
    )
    args = ap.parse_args()

    import peft
    import transformers

    from captune.bench import build_model, build_processor, synthetic_captions, synthetic_jpegs

    gpus = torch.cuda.device_count()
    work = Path(args.workdir)
    model_dir, coco = work / f"model-{args.arch}", work / f"coco-{args.images}"  # reused by later runs
    if not (model_dir / "config.json").is_file():
        model, cfg = build_model(args.arch, torch.bfloat16)
        model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="5GB")
        build_processor(cfg).save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
    if not (coco / "captions.json").is_file():
        coco.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i, (jpg, caps) in enumerate(
            zip(synthetic_jpegs(args.images), synthetic_captions(args.images), strict=True)
        ):
            (coco / f"{i:012d}.jpg").write_bytes(jpg)
            images.append({"id": i, "file_name": f"{i:012d}.jpg"})
            anns += [{"image_id": i, "caption": c} for c in caps]
        (coco / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    fsdp = args.engine in ("fsdp", "zero3")  # the model sharded: the all-GPU run only, with validation
    base = [
        f"model.name_or_path={model_dir}",
        f"data.source=coco:{coco / 'captions.json'}",
        f"data.num_images={args.images}",
        "train.epochs=1",
        f"train.validate_every={1 if fsdp else 0}",
        # FSDP: validation loss at the end (the gathered language model), no captions: no Java needed
        "train.select=loss" if fsdp else "train.select=last",
        "train.grad_accum=1",
        f"train.max_steps={args.max_steps}",
        "train.log_every=1" if fsdp else "train.log_every=10",
    ]
    result = {
        "what": __doc__.strip().splitlines()[0],
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "architecture": f"{args.arch} (random weights, built from config)",
        "engine": args.engine,
        "command": "python bench/ddp_throughput.py " + " ".join(sys.argv[1:]),
        "runs": {},
    }
    if args.engine.startswith("zero"):
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
    settings = [gpus] if fsdp else sorted({1, gpus})

    def train(n: int, run: Path, wrap: list[str]) -> subprocess.CompletedProcess:
        shutil.rmtree(run, ignore_errors=True)  # a fresh run: an old one would resume or refuse
        overrides = [*base, f"train.batch_size={args.per_gpu * n}"]
        cli = [sys.executable, "-m", "captune.cli"]
        subprocess.run(
            [*cli, "data", str(run), "--recipe", "coco5k", *overrides], check=True, env=env, capture_output=True
        )
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "captune.cli"]
        if args.engine != "ddp":
            name = "fsdp" if args.engine == "fsdp" else f"deepspeed-{args.engine}"
            config = ROOT / "configs" / "accelerate" / f"{name}.yaml"
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
            launch += ["--num_processes", str(n), "-m", "captune.cli"]
        command = [*wrap, *(launch if n > 1 else cli), "train", str(run)]
        return subprocess.run(command, env=env, capture_output=True, text=True)

    for n in settings:
        run = work / f"run-{n}gpu"
        done = train(n, run, [])
        (work / f"train-{n}gpu.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            result["runs"][f"{n} GPU"] = {"error": (done.stderr or done.stdout)[-2000:]}
            continue
        doc = json.loads((run / "adapter" / "training.json").read_text())
        result["runs"][f"{n} GPU"] = {
            "global_batch_pairs": args.per_gpu * n,
            "steps": doc["steps"],
            "samples_per_s": round(doc["samples_per_s"], 1),
            "log_tail": done.stdout[-1500:],
        }
        rows = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if r["type"] == "train"]
        if len(train_rows) >= 2:  # past the first logged steps (first kernels, first shapes): the steady pace
            first, last = train_rows[0], train_rows[-1]
            pairs = last["samples_per_s"] * last["elapsed_s"] - first["samples_per_s"] * first["elapsed_s"]
            result["runs"][f"{n} GPU"]["steady_samples_per_s"] = round(
                pairs / (last["elapsed_s"] - first["elapsed_s"]), 1
            )
            result["runs"][f"{n} GPU"]["steady_from_step"] = first["step"]
        if fsdp:
            keys = ("step", "loss", "gpu_mem_gb", "samples_per_s")
            result["runs"][f"{n} GPU"]["steps_logged"] = [{k: r.get(k) for k in keys} for r in train_rows]
            result["runs"][f"{n} GPU"]["validation"] = [r for r in rows if r["type"] == "validation"]
        print(n, "GPU:", result["runs"][f"{n} GPU"]["samples_per_s"], "samples/s", flush=True)
    if args.profile:
        for n in settings:
            out = f"{args.profile}-{n}gpu.txt"
            spy = ["py-spy", "record", "--subprocesses", "--nonblocking", "--format", "raw", "-r", "100", "-o", out]
            done = train(n, work / f"run-{n}gpu-profile", [*spy, "--"])
            result["runs"].setdefault(f"{n} GPU", {})["profile"] = out if done.returncode == 0 else done.stderr[-2000:]
    one, many = result["runs"].get("1 GPU", {}), result["runs"].get(f"{gpus} GPU", {})
    if gpus > 1 and "samples_per_s" in one and "samples_per_s" in many:
        result["speedup"] = round(many["samples_per_s"] / one["samples_per_s"], 2)
        if "steady_samples_per_s" in one and "steady_samples_per_s" in many:
            result["steady_speedup"] = round(many["steady_samples_per_s"] / one["steady_samples_per_s"], 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()

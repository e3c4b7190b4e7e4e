"""Golden values of the single-process training numerics, to hold a refactor against.

For a spread of configurations (packed, unpacked, first/random caption, the qformer preset,
every ``train.select``, accumulation, early stop, a stop at ``checkpoint_every`` then resume)
this trains the demo model on the CPU and records, per configuration:

- a SHA-256 of every trainable tensor of the final adapter (bit-exact: ``torch.equal``),
- ``train.jsonl`` with the timing fields removed,
- the keys and shapes of every tensor in the checkpoints, and each checkpoint's ``state.json``.

    python bench/golden.py --out bench/results/golden-before.json
    python bench/golden.py --out /tmp/after.json --check bench/results/golden-before.json

``--check`` exits 1 and names every configuration whose values differ. Each configuration runs
in its own process, so no state (RNG, caches) leaks from one to the next. The script calls
``captune.training.train`` with the signature it has had since before the redesign.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING = {"elapsed_s", "samples_per_s", "seconds", "gpu_mem_gb"}

# name -> (train overrides, other overrides, how the run goes)
CONFIGS: dict[str, dict] = {
    "packed-loss": {"train": {"epochs": 2, "select": "loss"}},
    "unpacked-loss": {"train": {"epochs": 2, "select": "loss", "pack": False}},
    "first-caption": {"train": {"epochs": 2, "select": "loss"}, "data": {"train_captions": "first"}},
    "random-caption": {"train": {"epochs": 2, "select": "loss"}, "data": {"train_captions": "random"}},
    "qformer": {"train": {"epochs": 2, "select": "loss"}, "lora": {"target_modules": "qformer"}},
    "select-cider": {"train": {"epochs": 3, "select": "CIDEr"}, "score": "falling"},
    "select-last": {"train": {"epochs": 2, "select": "last"}},
    "accumulate": {"train": {"epochs": 2, "select": "loss", "grad_accum": 2, "batch_size": 8}},
    "unpacked-accumulate": {"train": {"epochs": 2, "select": "loss", "grad_accum": 3, "pack": False}},
    "early-stop": {"train": {"epochs": 5, "select": "CIDEr", "early_stop": 1}, "score": "falling"},
    "max-steps": {"train": {"epochs": 0, "max_steps": 5, "select": "loss", "schedule": "cosine", "warmup_steps": 2}},
    "resume-mid-epoch": {
        "train": {"epochs": 3, "select": "CIDEr", "checkpoint_every": 2, "pack": False, "batch_size": 20},
        "score": "falling",
        "stop_at": 5,
    },
    "resume-packed": {"train": {"epochs": 3, "select": "loss", "checkpoint_every": 2}, "stop_at": 3},
    "resume-epoch-end": {"train": {"epochs": 3, "select": "loss", "pack": False, "batch_size": 20}, "stop_at": 8},
}


class Interrupt(Exception):
    pass


def _imports():
    try:  # after the redesign
        from captune.model.load import load_model
        from captune.model.lora import attach_lora
    except ImportError:  # before it
        from captune.modeling import attach_lora, load_model
    from captune.training import train

    return load_model, attach_lora, train


def _scorer(kind: str | None):
    """A deterministic validation score: falls after the first call, so the best adapter is an early one."""
    if kind is None:
        return None
    calls = []

    def score(caps, refs):
        calls.append(1)
        words = sum(len(c.split()) for c in caps)
        return 10.0 / len(calls) + words * 1e-6

    return score


def _one(name: str, work: Path) -> dict:
    import torch

    from captune.config import Config
    from captune.data.prepare import Example
    from captune.demo import world

    load_model, attach_lora, train = _imports()
    spec = CONFIGS[name]
    cfg = Config()
    cfg.model.device = "cpu"
    cfg.lora.target_modules = "all-linear"
    cfg.train.batch_size, cfg.train.lr, cfg.train.log_every = 16, 3e-3, 1
    for section in ("train", "data", "lora"):
        for k, v in spec.get(section, {}).items():
            setattr(getattr(cfg, section), k, v)

    def examples(n, seed):
        return [Example(it["image_id"], it["image"], it["captions"]) for it in world.make_items("catalog", n, seed)]

    train_ex, val_ex = examples(40, 5), examples(6, 6)

    def run(stop_at=None):
        loaded = load_model(cfg.model)
        torch.manual_seed(cfg.train.seed)
        model = attach_lora(loaded.model, cfg.lora)

        def on_step(step):
            if stop_at is not None and step == stop_at:
                raise Interrupt

        result = train(
            model,
            loaded.processor,
            train_ex,
            val_ex,
            cfg,
            log=lambda m: None,
            score_fn=_scorer(spec.get("score")),
            checkpoint_dir=work / "ckpt",
            log_path=work / "train.jsonl",
            on_step=on_step,
        )
        return result, model

    if "stop_at" in spec:
        try:
            run(spec["stop_at"])
            raise SystemExit(f"{name}: the run did not reach step {spec['stop_at']}")
        except Interrupt:
            pass
    result, model = run()
    adapter = {
        k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for k, v in sorted(model.named_parameters())
        if v.requires_grad
    }
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (work / "train.jsonl").open()]
    return {
        "adapter": adapter,
        "train_jsonl": log,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "checkpoints": _checkpoints(work / "ckpt"),
    }


def _checkpoints(root: Path) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    for ck in sorted(root.glob("step-*")):
        entry = {}
        for f in ("trainable.safetensors", "best.safetensors"):
            with safe_open(str(ck / f), "pt") as st:
                entry[f] = {k: list(st.get_slice(k).get_shape()) for k in sorted(st.keys())}
        extra = torch.load(ck / "optimizer.pt", weights_only=True)
        entry["optimizer.pt"] = sorted(extra)
        entry["optimizer_state_keys"] = sorted(extra["optimizer"])
        state = json.loads((ck / "state.json").read_text())
        for row in [*state.get("history", []), state.get("best") or {}]:
            for k in TIMING:
                row.pop(k, None)
        entry["state.json"] = state
        out[ck.name] = entry
    return out


def _base_model_digest() -> str:
    """SHA-256 over the shipped demo base model's files (weights, tokenizer, configs): the numbers are
    of these weights, so a rebuilt demo model needs golden values recorded again."""
    folder = Path(__file__).resolve().parents[1] / "src" / "captune" / "demo" / "base"
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", type=Path, help="golden file to compare with")
    ap.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            args.out.write_text(json.dumps(_one(args.one, Path(tmp))))
        return 0
    results = {}
    env = {**os.environ, "CAPTUNE_PROGRESS": "off"}
    for name in args.only or CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "part.json"
            subprocess.run([sys.executable, __file__, "--one", name, "--out", str(part)], check=True, env=env)
            results[name] = json.loads(part.read_text())
        print(f"{name}: {results[name]['steps']} steps, best step {results[name]['best_step']}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    doc = {"commit": commit.stdout.strip(), "base_model": _base_model_digest(), "configs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    if args.check is None:
        return 0
    golden_doc = json.loads(args.check.read_text())
    if golden_doc.get("base_model") != doc["base_model"]:
        print("the golden values were recorded with another demo base model (weights or tokenizer); record them "
              "again at the old commit with this model folder copied in", flush=True)  # fmt: skip
        return 1
    golden = golden_doc["configs"]
    bad = [n for n in results if results[n] != golden.get(n)]
    for n in bad:
        for key in results[n]:
            if results[n][key] != golden.get(n, {}).get(key):
                print(f"DIFFERS: {n}: {key}")
    print("identical" if not bad else f"{len(bad)} configuration(s) differ", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

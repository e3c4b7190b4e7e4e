"""The ``captune`` console script: subcommands map to library functions.

``main(argv)`` returns an exit code and is what the tests call. User errors
print one line (``captune: error: ...``) and return 2; nothing else is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from captune import __version__
from captune.distributed import close
from captune.errors import UserError

PHASE_COMMANDS = {
    "data": ("data",),
    "train": ("train",),
    "eval": ("baseline", "finetuned"),
    "compare": ("compare",),
    "report": ("report",),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise UserError(message if self.prog == "captune" else f"{self.prog.split()[-1]}: {message}")


def _log(msg: str) -> None:
    from captune.distributed import world

    if world().is_main:  # under torchrun / accelerate launch one process talks
        print(msg, flush=True)


def _load_cfg(recipe: str | None, overrides: list[str]):
    from captune.config import load_config

    return load_config(recipe, overrides) if recipe else None


def cmd_run(args) -> int:
    from captune.config import load_config
    from captune.pipeline import PHASES, Run, preflight, run_phases

    cfg = load_config(args.recipe, args.overrides)
    out = Path(args.out or Path("runs") / cfg.name)
    run = Run.open(out, cfg, force=args.force, log=_log)
    preflight(cfg)
    from captune.distributed import world
    from captune.evaluation.metrics import prewarm

    if world().is_main:
        prewarm()  # METEOR's JVM loads while the model does
    _log(f"captune {__version__}: recipe '{cfg.name}' -> {out}")
    run_phases(run, PHASES, force=args.force)
    table = run.path("comparison.md")
    if table.is_file():
        _log(f"\nBefore / after on {cfg.eval.split} ({out}/comparison.md):\n")
        _log(table.read_text())
    _log(f"report: {run.path('report', 'index.html')}")
    return 0


def cmd_phase(args) -> int:
    from captune.pipeline import Run, preflight, run_phases

    if args.overrides and not args.recipe:
        raise UserError("overrides need --recipe; a run folder's saved config is used as it is")
    cfg = _load_cfg(args.recipe, args.overrides)
    run = Run.open(Path(args.run), cfg, force=args.force, log=_log)
    phases = PHASE_COMMANDS[args.command]
    if args.command in ("data", "train", "eval"):
        preflight(run.cfg)
    if args.command == "eval" and not run.done("train"):
        phases = ("baseline",)
    run_phases(run, phases, force=args.force)
    return 0


def cmd_score(args) -> int:
    from captune.evaluation.metrics import score_captions

    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    for n, row in _jsonl(Path(args.predictions)):
        if "image_id" not in row or "caption" not in row:
            raise UserError(f"{args.predictions} line {n}: needs 'image_id' and 'caption'")
        preds[str(row["image_id"])] = str(row["caption"])
        if row.get("references"):
            refs[str(row["image_id"])] = [str(r) for r in row["references"]]
    if args.references:
        refs = {}
        for n, row in _jsonl(Path(args.references)):
            if "image_id" not in row or not isinstance(row.get("captions"), list):
                raise UserError(f"{args.references} line {n}: needs 'image_id' and a 'captions' list")
            refs[str(row["image_id"])] = [str(c) for c in row["captions"]]
    from captune.evaluation.seed_metrics import seed_compatible

    scores = score_captions(preds, refs, spice=True)
    seed = seed_compatible(preds, refs)
    if args.json:
        print(
            json.dumps(
                {
                    "metrics": scores.corpus,
                    "images": len(preds),
                    "unavailable": scores.unavailable,
                    "seed_compatible": seed,
                }
            )
        )
    else:
        print(f"{len(preds)} images, {sum(len(refs[i]) for i in preds)} references (official COCO scorer)")
        for k, v in scores.corpus.items():
            print(f"{k:8s} {v:.4f}")
        for k, why in scores.unavailable.items():
            print(f"{k:8s} unavailable: {why}")
        print("seed-comparable (first reference only):")
        for k, v in seed["metrics"].items():
            print(f"{k:8s} {v:.4f}")
        for k, why in seed["unavailable"].items():
            print(f"{k:8s} unavailable: {why}")
    return 0


def _jsonl(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n}: malformed JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{path} line {n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n}: expected a JSON object")
        yield n, row


def data_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="captune data", description="Prepare or inspect a data cache.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    pr = sub.add_parser("prepare", help="read a source into a local cache (grouped, validated, split)")
    pr.add_argument("--source", required=True, help="demo:, hub:, parquet:, arrow:, coco:, imagefolder:, manifest:")
    pr.add_argument("--out", required=True, help="cache folder")
    pr.add_argument("--num-images", type=int, help="unique images to take (0 = all; default 5000)")
    pr.add_argument("--seed", type=int, help="seed for sampling and splitting")
    pr.add_argument("--sample", choices=["first", "random"], help="first N in source order, or a random N")
    pr.add_argument("--ratios", help="train,validation,test fractions, e.g. 0.8,0.1,0.1")
    pr.add_argument("--split", help="source split to read (hub, arrow)")
    pr.add_argument("--images", help="image folder for coco: sources")
    pr.add_argument("--image-column", help="image column (or image path column of a manifest)")
    pr.add_argument("--id-column", help="image id column")
    pr.add_argument("--caption-column", help="caption column")
    pr.add_argument("--split-column", help="use the split given in this column (train/restval/val/test)")
    pr.add_argument("--max-pixels", type=int, help="skip images with more pixels")
    pr.add_argument("--strict", action="store_true", help="fail on any skipped item")
    pr.add_argument("--force", action="store_true", help="rebuild an existing cache")
    pr.set_defaults(func=cmd_data_prepare)
    ins = sub.add_parser("inspect", help="counts, splits, sample captions and skip reasons of a cache")
    ins.add_argument("dir", help="cache folder (or a run folder)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=cmd_data_inspect)
    return p


def cmd_data_prepare(args) -> int:
    from captune.config import DataConfig, apply_mapping
    from captune.data.prepare import prepare

    fields = {
        "source": args.source,
        "num_images": args.num_images,
        "seed": args.seed,
        "sample": args.sample,
        "split": args.split,
        "images": args.images,
        "image_column": args.image_column,
        "id_column": args.id_column,
        "caption_column": args.caption_column,
        "split_column": args.split_column,
        "max_pixels": args.max_pixels,
    }
    if args.ratios:
        try:
            fields["ratios"] = [float(x) for x in args.ratios.split(",")]
        except ValueError:
            raise UserError(f"--ratios '{args.ratios}': expected three numbers like 0.8,0.1,0.1") from None
    from captune.config import Config

    holder = Config()
    apply_mapping(holder, {"data": {k: v for k, v in fields.items() if v is not None}})
    cfg: DataConfig = holder.data
    cfg.check()
    prepare(cfg, Path(args.out), force=args.force, strict=args.strict, log=_log)
    return 0


def cmd_data_inspect(args) -> int:
    from captune.data.prepare import SPLITS, load_split, read_manifest

    root = Path(args.dir)
    if (root / "data" / "manifest.json").is_file():
        root = root / "data"
    manifest = read_manifest(root)
    splits = {s: load_split(root, s) for s in SPLITS}
    if args.json:
        print(
            json.dumps(
                {
                    "splits": {s: [e.image_id for e in ex] for s, ex in splits.items()},
                    "references": {e.image_id: len(e.captions) for ex in splits.values() for e in ex},
                    "skipped": manifest["skipped"],
                }
            )
        )
        return 0
    print(f"source      {manifest['source']}")
    print(
        f"images      {manifest['images']}  references {manifest['references']}  "
        f"merged duplicates {manifest.get('merged_duplicate_images', 0)}"
    )
    for s, ex in splits.items():
        print(f"{s:11s} {len(ex)} images, {sum(len(e.captions) for e in ex)} references")
    for e in splits["train"][:3]:
        print(f"  {e.image_id}: " + " | ".join(e.captions[:3]))
    reasons: dict[str, int] = {}
    for item in manifest["skipped"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    print(f"skipped     {len(manifest['skipped'])}")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {n:5d}  {reason}")
    return 0


def cmd_caption(args) -> int:
    import csv

    from captune.config import EvalConfig, ModelConfig
    from captune.data.files import collect_paths, read_images
    from captune.model.load import load_model
    from captune.ops.generation import caption_images

    paths, missing = collect_paths(args.paths)
    images, bad = read_images(paths)
    for where, why in missing + bad:
        print(f"captune: skipped {where}: {why}", file=sys.stderr)
    if not images:
        raise UserError("no readable image among the given paths")
    loaded = load_model(ModelConfig(name_or_path=args.model, device=args.device))
    model = loaded.model
    if args.adapter:
        from peft import PeftModel

        adapter = Path(args.adapter)
        if adapter.is_dir() and not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ecfg = EvalConfig(batch_size=args.batch_size, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    ecfg.check()
    captions = caption_images(model, loaded.processor, [b for _, b in images], ecfg, args.prompt)
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.format == "jsonl":
            for (p, _), c in zip(images, captions, strict=True):
                out.write(json.dumps({"path": str(p), "caption": c}) + "\n")
        elif args.format == "csv":
            w = csv.writer(out)
            w.writerow(["path", "caption"])
            for (p, _), c in zip(images, captions, strict=True):
                w.writerow([str(p), c])
        else:
            for (p, _), c in zip(images, captions, strict=True):
                out.write(f"{p}\t{c}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"captune: captioned {len(images)} image(s), skipped {len(missing) + len(bad)}", file=sys.stderr)
    return 0


def _run_config(run: Path):
    from captune.pipeline import Run

    return Run.open(run, None, log=_log).cfg


def cmd_merge(args) -> int:
    from captune.hub import merge

    out = merge(Path(args.run), _run_config(Path(args.run)), Path(args.out))
    _log(f"merged model written to {out} (load it with Blip2ForConditionalGeneration.from_pretrained)")
    return 0


def cmd_push(args) -> int:
    import tempfile

    from captune.hub import get_token, push, stage_upload

    run = Path(args.run)
    cfg = _run_config(run)
    repo = args.repo or cfg.hub.repo_id
    if not repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError("give the target as --repo OWNER/NAME (or set hub.repo_id in the recipe)")
    if args.dry_run:
        out = Path(args.out or run / "push")
        stage_upload(run, cfg, repo, out)
        _log(f"dry run: the folder that would be uploaded to {repo} is {out}")
        for f in sorted(out.iterdir()):
            _log(f"  {f.name}  {f.stat().st_size} bytes")
        return 0
    token = get_token()
    with tempfile.TemporaryDirectory(prefix="captune-push-") as tmp:
        folder = stage_upload(run, cfg, repo, Path(tmp) / "upload")
        url = push(folder, repo, private=args.private or cfg.hub.private, token=token)
    _log(f"pushed to {url}")
    return 0


def cmd_bench(args) -> int:
    from captune.bench import run_bench, table

    result = run_bench(
        args.arch,
        images=args.images,
        e2e=not args.no_e2e,
        seed_steps=args.seed_steps,
        work=Path(args.workdir) if args.workdir else None,
        log=_log,
        e2e_only=args.e2e_only,
        captioning_only=args.captioning_only,
    )
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.e2e_only:
        _log(json.dumps({k: v for k, v in result.items() if k != "e2e_log_tail"}, indent=2))
    else:
        _log("\n" + table(result))
    _log(f"\nresults: {out}")
    return 0


def cmd_serve(args) -> int:
    from captune.serve import ServeLimits, serve, target_from_args

    if not args.run and not args.model:
        raise UserError("serve needs a run folder or --model (and --adapter); e.g. captune serve runs/demo")
    limits = ServeLimits(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_images=args.max_images)
    if limits.max_upload_mb <= 0 or limits.max_pixels <= 0 or limits.max_images <= 0:
        raise UserError("--max-upload-mb, --max-pixels and --max-images must be positive")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1-65535)")
    target = target_from_args(args.run, args.model, args.adapter, args.device)
    serve(target, host=args.host, port=args.port, limits=limits, log=_log)
    return 0


def cmd_recipes(args) -> int:
    from captune.config import list_recipes, load_config

    for name in list_recipes():
        print(f"{name:14s} {load_config(name).description}")
    return 0


def cmd_demo_build(args) -> int:
    from captune.demo.base_model import DemoBuildSpec, build_demo_model

    out = build_demo_model(Path(args.out), DemoBuildSpec(), log=_log, device=args.device)
    _log(f"demo base model written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="captune", description="Adapt BLIP-2 captioners with LoRA; measure before and after.")
    p.add_argument("--version", action="version", version=f"captune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run every phase of a recipe into a run folder")
    r.add_argument("recipe", help="built-in recipe name (see 'captune recipes') or a YAML file")
    r.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides, e.g. train.epochs=3")
    r.add_argument("--out", help="run folder (default runs/RECIPE)")
    r.add_argument("--force", action="store_true", help="redo phases whose outputs exist")
    r.set_defaults(func=cmd_run)

    helps = {
        "data": "prepare the data cache of a run folder (also: data prepare, data inspect)",
        "train": "train the LoRA adapter of a run folder",
        "eval": "caption and score the eval split (baseline, and fine-tuned once trained)",
        "compare": "baseline vs fine-tuned table with intervals and p-values",
        "report": "write RUN/report/index.html and report.md",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text)
        s.add_argument("run", help="run folder")
        s.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides (with --recipe)")
        s.add_argument("--recipe", help="start the run folder from this recipe")
        s.add_argument("--force", action="store_true", help="redo the phase even if complete")
        s.set_defaults(func=cmd_phase)

    sc = sub.add_parser("score", help="official COCO metrics of a predictions JSONL file")
    sc.add_argument("predictions", help="JSONL of {image_id, caption[, references]}")
    sc.add_argument("--references", help="JSONL of {image_id, captions: [...]}")
    sc.add_argument("--json", action="store_true", help="print one JSON object")
    sc.set_defaults(func=cmd_score)

    cp = sub.add_parser("caption", help="caption image files, folders and globs")
    cp.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    cp.add_argument("--model", default="builtin:demo", help="Hub id, local folder or builtin:demo")
    cp.add_argument("--adapter", help="PEFT adapter folder or Hub id (e.g. RUN/adapter)")
    cp.add_argument("--format", choices=["text", "jsonl", "csv"], default="text", help="output format")
    cp.add_argument("--output", help="write here instead of stdout")
    cp.add_argument("--batch-size", type=int, default=32, help="images per batch")
    cp.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    cp.add_argument("--max-new-tokens", type=int, default=30, help="longest caption in tokens")
    cp.add_argument("--prompt", default="", help="text prompt, removed from the output")
    cp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    cp.set_defaults(func=cmd_caption)

    mg = sub.add_parser("merge", help="save the base model with the run's adapter merged in")
    mg.add_argument("run", help="run folder")
    mg.add_argument("--out", required=True, help="folder for the merged model")
    mg.set_defaults(func=cmd_merge)

    ps = sub.add_parser("push", help="upload the adapter, processor and a model card to the Hub")
    ps.add_argument("run", help="run folder")
    ps.add_argument("--repo", help="OWNER/NAME (default hub.repo_id)")
    ps.add_argument("--private", action="store_true", help="create the repository as private")
    ps.add_argument("--dry-run", action="store_true", help="write the upload folder, upload nothing")
    ps.add_argument("--out", help="dry-run folder (default RUN/push)")
    ps.set_defaults(func=cmd_push)

    bn = sub.add_parser("bench", help="GPU benchmark: the seed's recipe vs captune, same run (no downloads)")
    bn.add_argument("--arch", default="blip2-opt-2.7b", help="architecture built with random weights")
    bn.add_argument("--images", type=int, default=5000, help="synthetic COCO-size JPEGs for the end-to-end job")
    bn.add_argument("--no-e2e", action="store_true", help="skip the end-to-end coco5k job")
    bn.add_argument("--e2e-only", action="store_true", help="only the end-to-end coco5k job")
    bn.add_argument("--captioning-only", action="store_true", help="only the captioning measurements")
    bn.add_argument("--seed-steps", type=int, default=40, help="optimizer steps of the seed recipe to time")
    bn.add_argument("--workdir", help="where the e2e model, data and run folder go (default $TMPDIR)")
    bn.add_argument("--json-out", default="bench-result.json", help="write the results here")
    bn.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="web page: base vs fine-tuned captions side by side (captune[serve])")
    sv.add_argument("run", nargs="?", help="run folder (its base model, adapter, test images and metrics)")
    sv.add_argument("--model", help="base model instead of the run's (Hub id, folder or builtin:demo)")
    sv.add_argument("--adapter", help="PEFT adapter folder or Hub id instead of RUN/adapter")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=7860, help="TCP port")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted file")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image (width x height)")
    sv.add_argument("--max-images", type=int, default=16, help="images per request")
    sv.set_defaults(func=cmd_serve)

    rc = sub.add_parser("recipes", help="list the built-in recipes")
    rc.set_defaults(func=cmd_recipes)

    db = sub.add_parser("demo-build", help="rebuild the demo base model (pre-training, offline)")
    db.add_argument("--out", required=True, help="folder to write the model to")
    db.add_argument("--device", default="cpu", help="where to pre-train: cpu (about 30 min on 2 cores) or cuda")
    db.set_defaults(func=cmd_demo_build)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["data"] and argv[1:2] and argv[1] in ("prepare", "inspect"):
            args = data_parser().parse_args(argv[1:])
            return args.func(args)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # Overrides may come after options (run demo --out X train.epochs=3).
        if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            args.overrides = list(args.overrides or []) + extra
        code = args.func(args)
        close()
        return code
    except UserError as exc:
        print(f"captune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("captune: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        why = _disk_problem(exc)
        if why is None:
            raise
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"captune: error: cannot write{where}: {why}; free space or choose another --out", file=sys.stderr)
        return 2
    except MemoryError:
        print("captune: error: out of memory; lower train.batch_size or eval.batch_size", file=sys.stderr)
        return 2
    except Exception as exc:  # GPU OOM and a full disk are user-fixable conditions; anything else is a bug
        code = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        why = _disk_problem(OSError(int(code.group(1)), "")) if code else None
        if why is not None:  # safetensors reports I/O failures as its own error type
            print(f"captune: error: cannot write: {why}; free space or choose another --out", file=sys.stderr)
            return 2
        if type(exc).__name__ == "OutOfMemoryError":
            print(
                "captune: error: GPU out of memory; lower train.batch_size or eval.batch_size "
                "(or raise train.grad_accum)",
                file=sys.stderr,
            )
            return 2
        raise


def _disk_problem(exc: OSError) -> str | None:
    """A full, read-only or forbidden output location, described in a few words; else None."""
    import errno

    known = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }
    if exc.errno in known:
        return known[exc.errno]
    text = str(exc).lower()
    for needle, why in (("no space left", known[errno.ENOSPC]), ("read-only file system", known[errno.EROFS])):
        if needle in text:
            return why
    return None


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "peft", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())

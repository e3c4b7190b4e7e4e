"""The ``captune`` console script: subcommands map to library functions.

``main(argv)`` returns an exit code and is what the tests call. User errors
print one line (``captune: error: ...``) and return 2; nothing else is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

from captune import __version__
from captune.distributed import close
from captune.errors import UserError, disk_problem, is_out_of_memory, out_of_memory

PHASE_COMMANDS = {
    "data": ("data",),
    "train": ("train",),
    "eval": ("baseline", "finetuned"),
    "scst": ("scst",),
    "compare": ("compare",),
    "report": ("report",),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none or the help already words it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in text or not text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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
    from captune.api import run_recipe

    ran: set[str] = set()

    def log(message: str) -> None:
        if message.startswith("[") and "] done in" in message:
            ran.add(message[1 : message.index("]")])
        _log(message)

    result = run_recipe(args.recipe, args.overrides, out=args.out, force=args.force, log=log, startup=True)
    table = result.root / "comparison.md"
    if table.is_file() and "compare" not in ran:  # the phase printed it when it ran
        _log(f"\nBefore / after on {result.config.eval.split} ({result.root}/comparison.md):\n")
        _log(table.read_text())
    if "report" not in ran:
        _log(f"report: {result.root / 'report' / 'index.html'}")
    return 0


def cmd_phase(args) -> int:
    from captune.run.folder import Run
    from captune.run.phases import run_phases
    from captune.run.preflight import preflight

    if args.command == "eval" and args.overrides and not args.recipe:
        return _redecode(args)
    if args.overrides and not args.recipe:
        raise UserError("overrides need --recipe; a run folder's saved config is used as it is")
    cfg = _load_cfg(args.recipe, args.overrides)
    run = Run.open(Path(args.run), cfg, force=args.force, log=_log)
    phases = PHASE_COMMANDS[args.command]
    if args.command in ("data", "train", "eval"):
        preflight(run.cfg)
    if args.command == "eval" and not run.done("train"):
        phases = ("baseline",)
    skipped = args.command in ("compare", "report") and run.done(args.command) and not args.force
    run_phases(run, phases, force=args.force)
    if skipped:  # the phase shows its result when it runs; a skipped one still should
        _show_result(run, args.command)
    return 0


def _redecode(args) -> int:
    """``captune eval RUN eval.KEY=VALUE``: the run decoded again, into RUN/eval-<overrides>."""
    from captune.run.phases import run_phases
    from captune.run.preflight import preflight
    from captune.run.redecode import open_redecode

    run = open_redecode(Path(args.run), args.overrides, force=args.force, log=_log)
    preflight(run.cfg)
    phases = ("baseline", "finetuned", "compare") if run.done("train") else ("baseline",)
    run_phases(run, phases, force=args.force)
    _log(f"re-decoded with {' '.join(args.overrides)}: {run.root} (the run's own outputs are unchanged)")
    return 0


def _show_result(run, command: str) -> None:
    """What compare and report made (also when it was already there): the table, the report's path."""
    if command == "compare" and run.done("compare"):
        from captune.evaluation.compare import markdown_table

        comparison = json.loads(run.path("comparison.json").read_text())
        _log(f"\nBefore / after on {run.cfg.eval.split} ({run.path('comparison.md')}):\n")
        _log(markdown_table(comparison))
    elif command == "report" and run.done("report"):
        _log(f"report: {run.path('report', 'index.html')}")


def cmd_score(args) -> int:
    from captune.evaluation.caption_files import image_files, read_predictions, read_references
    from captune.evaluation.clipscore import add_clip_scores
    from captune.evaluation.metrics import score_captions
    from captune.evaluation.seed_metrics import LABEL, seed_compatible

    found = read_predictions(Path(args.predictions))
    preds, refs, coco_files = found.predictions, found.references, {}
    if args.references:
        refs, coco_files = read_references(Path(args.references))
    files = None
    if args.clip_model:
        files = image_files(found, coco_files, args.images, Path(args.predictions).parent)
    scores = score_captions(preds, refs, spice=True)
    if files is not None:
        note = add_clip_scores(scores, files, list(preds.values()), [refs[i] for i in preds], args.clip_model)
        if note and not args.json:
            print(note)
    seed = seed_compatible(preds, refs)
    empty = found.empty_captions
    if args.json:
        doc = {
            "metrics": scores.corpus,
            "images": len(preds),
            "empty_captions": len(empty),
            "unavailable": scores.unavailable,
            "seed_compatible": seed,
        }
        print(json.dumps(doc))
        return 0
    print(f"{len(preds)} images, {sum(len(refs[i]) for i in preds)} references (official COCO scorer)")
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        print(f"{len(empty)} empty caption(s), scored as empty: {shown}")
    for k, v in scores.corpus.items():
        print(f"{k:8s} {v:.4f}")
    for k, why in scores.unavailable.items():
        print(f"{k:8s} unavailable: {why}")
    print(f"{LABEL[0].lower()}{LABEL[1:]}:")
    for k, v in seed["metrics"].items():
        print(f"{k:8s} {v:.4f}")
    for k, why in seed["unavailable"].items():
        print(f"{k:8s} unavailable: {why}")
    return 0


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
    from captune.api import prepare_data

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
    source = fields.pop("source")
    prepare_data(source, Path(args.out), force=args.force, strict=args.strict, log=_log, **fields)
    return 0


def cmd_data_inspect(args) -> int:
    from captune.data.prepare import SPLITS, load_split, read_cache_manifest, skip_reasons

    root = Path(args.dir)
    if (root / "data" / "manifest.json").is_file():
        root = root / "data"
    manifest = read_cache_manifest(root)
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
    dropped = manifest.get("dropped_captions")
    if dropped:
        print(f"captions    dropped {dropped['empty']} empty, {dropped['repeated']} repeated on the same image")
    for s, ex in splits.items():
        print(f"{s:11s} {len(ex)} images, {sum(len(e.captions) for e in ex)} references")
    for e in splits["train"][:3]:
        print(f"  {e.image_id}: " + " | ".join(e.captions[:3]))
    print(f"skipped     {len(manifest['skipped'])}")
    for reason, items in skip_reasons(manifest["skipped"]).items():
        print(f"  {len(items):5d}  {reason}")
        for item in items[:5]:  # the files themselves, so the user can look at them
            print(f"         {item}")
        if len(items) > 5:
            print(f"         ... and {len(items) - 5} more (--json lists all)")
    return 0


def cmd_caption(args) -> int:
    from captune.config import EvalConfig, ModelConfig
    from captune.data.files import collect_paths
    from captune.model.load import load_model, resolve_model_path
    from captune.ops.generation import PIECE_BATCHES
    from captune.run.caption import CaptionStats, ChunkReader, RowWriter, caption_chunks

    ecfg = EvalConfig(batch_size=args.batch_size, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    ecfg.check()
    model_path = resolve_model_path(args.model, option="--model")
    adapter = None
    if args.adapter:
        from captune.model.adapter import resolve_adapter

        adapter = resolve_adapter(args.adapter)  # before the model loads: a typo costs one line at once
    paths, missing = collect_paths(args.paths)
    for where, why in missing:
        print(f"captune: skipped {where}: {why}", file=sys.stderr)
    stats = CaptionStats(skipped=list(missing))
    # The first chunk, a batch of files, is read before the model loads (no image at all is one line at
    # once) and counts as captioning time; each next one, a few batches, is read while one is captioned.
    started = time.perf_counter()
    reader = ChunkReader(paths, chunk=max(PIECE_BATCHES * args.batch_size, 256), first=max(args.batch_size, 64))
    head = list(_reported(reader.head()))
    if not any(images for images, _ in head):
        raise UserError("no readable image among the given paths")
    writer = RowWriter(args.format, args.output)
    try:
        t0 = time.perf_counter()
        loaded = load_model(ModelConfig(name_or_path=model_path, device=args.device))
        model = loaded.model
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).eval()
        load_s = time.perf_counter() - t0
        chunks = itertools.chain(head, _reported(reader.start()))  # the next chunk is read from now on
        caption_chunks(model, loaded.processor, chunks, ecfg, args.prompt, writer.write, stats)
        writer.finish()
    finally:
        writer.abandon()
    stats.seconds = time.perf_counter() - started - load_s
    rate = stats.images / max(stats.seconds, 1e-9)
    print(
        f"captune: captioned {stats.images} image(s) in {stats.seconds:.1f}s ({rate:.1f} images/s; "
        f"model load {load_s:.1f}s), skipped {len(stats.skipped)}",
        file=sys.stderr,
    )
    return 0


def _reported(chunks):
    """The chunks, each one's unreadable files named on stderr as it is read."""
    for images, bad in chunks:
        for where, why in bad:
            print(f"captune: skipped {where}: {why}", file=sys.stderr)
        yield images, bad


def _run_config(run: Path, command: str):
    """The saved config of a finished run; ``command`` (merge, push) takes no --recipe, so say what it needs."""
    from captune.api import run_config

    return run_config(run, command)


def cmd_merge(args) -> int:
    from captune.hub import merge

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UserError(f"--out {out} already exists and is not empty; add --force to replace it, or choose another")
    out = merge(Path(args.run), _run_config(Path(args.run), "merge"), out)
    kind = json.loads((out / "config.json").read_text()).get("architectures", ["Blip2ForConditionalGeneration"])[0]
    _log(f"merged model written to {out} (load it with {kind}.from_pretrained)")
    return 0


def cmd_push(args) -> int:
    from captune.api import push
    from captune.hub import not_on_hub

    run = Path(args.run)
    if args.dry_run:
        out = Path(push(run, args.repo, dry_run=True, out=args.out, base_model=args.base_model))
        from captune.hub import hub_base_model

        cfg = _run_config(run, "push")
        repo, base = args.repo or cfg.hub.repo_id, hub_base_model(cfg, args.base_model)
        _log(f"dry run: the folder that would be uploaded to {repo} is {out}")
        for f in sorted(out.iterdir()):
            _log(f"  {f.name}  {f.stat().st_size} bytes")
        if base is None:
            print(f"captune: warning: a push would be refused: {not_on_hub(cfg)}", file=sys.stderr)
        return 0
    url = push(run, args.repo, private=args.private, base_model=args.base_model)
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

    if args.adapter and not args.run and not args.model:
        from captune.model.adapter import adapter_base, resolve_adapter

        args.adapter = resolve_adapter(args.adapter)  # a wrong --adapter is named first
        args.model = adapter_base(args.adapter)
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


def cmd_config(args) -> int:
    """Print every SECTION.KEY with the recipe's value, the default (when different) and its docstring."""
    import textwrap

    from captune.config import describe_keys, load_config

    for key, value, default, doc in describe_keys(load_config(args.recipe, args.overrides)):
        shown = json.dumps(value, ensure_ascii=False)
        if len(shown) > 60:
            shown = shown[:57] + '..."'
        same = "(default)" if value == default else f"(default {json.dumps(default)})"
        print(f"{key} = {shown}  {same}")
        print(textwrap.fill(doc, width=100, initial_indent="    ", subsequent_indent="    "))
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
    _add_run(sub)
    _add_phases(sub)
    _add_score(sub)
    _add_caption(sub)
    _add_merge(sub)
    _add_push(sub)
    _add_bench(sub)
    _add_serve(sub)
    _add_recipes(sub)
    _add_config(sub)
    _add_demo_build(sub)
    return p


def _add_run(sub) -> None:

    r = sub.add_parser("run", help="run every phase of a recipe into a run folder")
    r.add_argument("recipe", help="built-in recipe name (see 'captune recipes') or a YAML file")
    r.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides, e.g. train.epochs=3")
    r.add_argument("--out", help="run folder (default runs/RECIPE)")
    r.add_argument("--force", action="store_true", help="redo phases whose outputs exist")
    r.set_defaults(func=cmd_run)


def _add_phases(sub) -> None:
    helps = {
        "data": "prepare the data cache of a run folder (also: data prepare, data inspect)",
        "train": "train the LoRA adapter of a run folder",
        "eval": "caption and score the eval split (baseline, and fine-tuned once trained)",
        "scst": "self-critical training (rl.*) of the adapter, then its evaluation in RUN/finetuned-scst",
        "compare": "baseline vs fine-tuned table with intervals and p-values",
        "report": "write RUN/report/index.html and report.md",
    }
    epilogs = {
        "data": "also:\n  captune data prepare --source SOURCE --out DIR   read a source into a cache (see "
        "'captune data prepare --help')\n  captune data inspect DIR                        counts, splits, "
        "samples and skipped files of a cache or run folder",
    }
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text, epilog=epilogs.get(name))
        s.add_argument("run", help="run folder")
        s.add_argument(
            "overrides",
            nargs="*",
            help="SECTION.KEY=VALUE overrides (with --recipe)"
            + ("; without it, eval.* keys decode the run again into RUN/eval-<overrides>" if name == "eval" else ""),
        )
        s.add_argument("--recipe", help="start the run folder from this recipe")
        s.add_argument("--force", action="store_true", help="redo the phase even if complete")
        s.set_defaults(func=cmd_phase)


def _add_score(sub) -> None:
    sc = sub.add_parser("score", help="official COCO metrics of a caption file")
    sc.add_argument("predictions", help="JSONL of {image_id, caption[, references]} or a COCO results JSON array")
    sc.add_argument("--references", help="JSONL of {image_id, captions: [...]} or COCO caption annotations JSON")
    sc.add_argument("--json", action="store_true", help="print one JSON object")
    sc.add_argument(
        "--clip-model",
        help="also CLIPScore/RefCLIPScore with this CLIP (Hub id or folder; auto = ViT-B/32 if on disk)",
    )
    sc.add_argument("--images", help="folder of the images (COCO file_name or <image_id>.jpg), for --clip-model")
    sc.set_defaults(func=cmd_score)


def _add_caption(sub) -> None:
    cp = sub.add_parser("caption", help="caption image files, folders and globs")
    cp.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    cp.add_argument("--model", default="builtin:demo", help="Hub id, local folder or builtin:demo")
    cp.add_argument("--adapter", help="PEFT adapter folder, a run folder (its adapter) or a Hub id")
    cp.add_argument("--format", choices=["text", "jsonl", "csv"], default="text", help="output format")
    cp.add_argument("--output", help="write here instead of stdout")
    cp.add_argument("--batch-size", type=int, default=32, help="images per batch")
    cp.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    cp.add_argument("--max-new-tokens", type=int, default=30, help="longest caption in tokens")
    cp.add_argument("--prompt", default="", help="text prompt, removed from the output")
    cp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    cp.set_defaults(func=cmd_caption)


def _add_merge(sub) -> None:
    mg = sub.add_parser("merge", help="save the base model with the run's adapter merged in")
    mg.add_argument("run", help="run folder")
    mg.add_argument("--out", required=True, help="folder for the merged model")
    mg.add_argument("--force", action="store_true", help="replace an existing --out folder")
    mg.set_defaults(func=cmd_merge)


def _add_push(sub) -> None:
    ps = sub.add_parser("push", help="upload the adapter, processor and a model card to the Hub")
    ps.add_argument("run", help="run folder")
    ps.add_argument("--repo", help="OWNER/NAME (default hub.repo_id)")
    ps.add_argument("--private", action="store_true", help="create the repository as private")
    ps.add_argument("--dry-run", action="store_true", help="write the upload folder, upload nothing")
    ps.add_argument("--out", help="dry-run folder (default RUN/push)")
    ps.add_argument(
        "--base-model", help="Hub id of the base model when model.name_or_path is a local copy (or hub.base_model)"
    )
    ps.set_defaults(func=cmd_push)


def _add_bench(sub) -> None:
    bn = sub.add_parser(
        "bench", help="GPU benchmark: the blip2-lora-coco5k notebook's recipe vs captune, same run (no downloads)"
    )
    bn.add_argument("--arch", default="blip2-opt-2.7b", help="architecture built with random weights")
    bn.add_argument("--images", type=int, default=5000, help="synthetic COCO-size JPEGs for the end-to-end job")
    bn.add_argument("--no-e2e", action="store_true", help="skip the end-to-end coco5k job")
    bn.add_argument("--e2e-only", action="store_true", help="only the end-to-end coco5k job")
    bn.add_argument("--captioning-only", action="store_true", help="only the captioning measurements")
    bn.add_argument("--seed-steps", type=int, default=40, help="optimizer steps of the notebook's recipe to time")
    bn.add_argument("--workdir", help="where the e2e model, data and run folder go (default $TMPDIR)")
    bn.add_argument("--json-out", default="bench-result.json", help="write the results here")
    bn.set_defaults(func=cmd_bench)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="web page: base vs fine-tuned captions side by side (captune[serve])")
    sv.add_argument("run", nargs="?", help="run folder (its base model, adapter, test images and metrics)")
    sv.add_argument("--model", help="base model instead of the run's (Hub id, folder or builtin:demo)")
    sv.add_argument("--adapter", help="PEFT adapter folder, run folder or Hub id instead of RUN/adapter")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=7860, help="TCP port")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted file")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, help="largest accepted image (width x height)")
    sv.add_argument("--max-images", type=int, default=16, help="images per request")
    sv.set_defaults(func=cmd_serve)


def _add_recipes(sub) -> None:
    rc = sub.add_parser("recipes", help="list the built-in recipes")
    rc.set_defaults(func=cmd_recipes)


def _add_config(sub) -> None:
    cf = sub.add_parser("config", help="every config key of a recipe: its value, default and meaning")
    cf.add_argument("recipe", help="built-in recipe name or a YAML file")
    cf.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE overrides to apply first")
    cf.set_defaults(func=cmd_config)


def _add_demo_build(sub) -> None:
    db = sub.add_parser("demo-build", help="rebuild the demo base model (pre-training, offline)")
    db.add_argument("--out", required=True, help="folder to write the model to")
    db.add_argument("--device", default="cpu", help="where to pre-train: cpu (about 30 min on 2 cores) or cuda")
    db.set_defaults(func=cmd_demo_build)


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
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as cat and grep do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not complain either
        return 128 + 13  # SIGPIPE
    except OSError as exc:
        why = disk_problem(exc)
        if why is None:
            raise
        print(f"captune: error: {_disk_message(exc, why, argv)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("captune: error: out of memory; lower train.batch_size or eval.batch_size", file=sys.stderr)
        return 2
    except Exception as exc:  # GPU OOM and a full disk are user-fixable conditions; anything else is a bug
        code = re.search(r"os error (\d+)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        why = disk_problem(OSError(int(code.group(1)), "")) if code else None
        if why is not None:  # safetensors reports I/O failures as its own error type
            print(f"captune: error: {_disk_message(OSError(), why, argv)}", file=sys.stderr)
            return 2
        if is_out_of_memory(exc):
            print(f"captune: error: {out_of_memory('')}", file=sys.stderr)
            return 2
        raise


# The option that chooses where each command writes.
OUTPUT_OPTION = {"caption": "--output", "bench": "--workdir", "run": "--out", "merge": "--out", "push": "--out"}
TEMP_NAME = re.compile(r"^\.(?P<name>.+?)(\.tmp-\w+|\.\w{8})$")  # staged_dir / mkstemp temporaries


def _disk_message(exc: OSError, why: str, argv: list[str]) -> str:
    """One line naming the output (not captune's temp file), the cause and the fix for this command."""
    where = ""
    if getattr(exc, "filename", None):
        parts = list(Path(exc.filename).parts)
        for i, part in enumerate(parts):
            match = TEMP_NAME.match(part)
            if match:  # name the output being written, not its temporary stand-in
                parts = [*parts[:i], match["name"]]
                break
        where = f" {Path(*parts)}"
    command = argv[0] if argv else ""
    option = OUTPUT_OPTION.get(command)
    if command == "data" and argv[1:2] == ["prepare"]:
        option = "--out"
    target = f"another {option}" if option else "another run folder"
    fix = f"free space or choose {target}" if "space" in why or "quota" in why else f"choose {target}"
    if "permission" in why:
        fix = f"fix its permissions or choose {target}"
    return f"cannot write{where}: {why}; {fix}"


def _no_cpu_accelerator_warning(record) -> bool:
    return "unable to detect it" not in record.getMessage()


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # transformers 5 deprecates the attribute PEFT still reads on every adapter load; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "peft", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed (imported by accelerate/peft when installed) warns on every CPU-only import that it
    # "was unable to detect" a GPU; it sets its logger's level itself, so a filter drops that line.
    ds_logger = logging.getLogger("DeepSpeed")
    if _no_cpu_accelerator_warning not in ds_logger.filters:
        ds_logger.addFilter(_no_cpu_accelerator_warning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())

"""captune's Python API: the calls the CLI makes, for notebooks and scripts.

Importing this module is cheap (no torch, transformers or datasets until a call
needs them), so ``import captune`` and ``captune --help`` stay fast. Every call
raises ``captune.UserError`` (with the one-line message the CLI prints) for a
problem the user can fix.
"""

from __future__ import annotations

import copy
import html
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captune.config import Config, ConfigError, apply_mapping, apply_overrides, load_config
from captune.errors import UserError

Log = Callable[[str], None]
PathLike = str | os.PathLike


def _pipeline():
    """The run machinery (``Run``, ``run_phases``, ``PHASES``, ``preflight``): imported here only."""
    from types import SimpleNamespace

    from captune.run.folder import PHASES, Run
    from captune.run.phases import run_phases
    from captune.run.preflight import preflight

    return SimpleNamespace(PHASES=PHASES, Run=Run, run_phases=run_phases, preflight=preflight)


def _logger(quiet: bool, log: Log | None) -> Log:
    if log is not None:
        return log
    return (lambda message: None) if quiet else (lambda message: print(message, flush=True))


# ------------------------------------------------------------------ config


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.epochs": 2, "lora": {"r": 8}}`` -> ``{"train": {"epochs": 2}, "lora": {"r": 8}}``."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) > 2:
            raise ConfigError(f"{key}: overrides take SECTION.KEY, one dot")
        if len(parts) == 1:
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key].update(value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
        else:
            section = out.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{key}: '{parts[0]}' is a section, not a value")
            section[parts[1]] = value
    return out


def resolve_config(
    recipe: str | PathLike | Config = "demo",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Config:
    """A checked Config from a recipe name, a YAML path or a Config, plus overrides.

    Overrides are a dict (``{"train.epochs": 2}`` or ``{"train": {"epochs": 2}}``) or
    CLI-style strings (``["train.epochs=2"]``). The given Config is not modified.
    """
    if isinstance(recipe, Config):
        cfg = copy.deepcopy(recipe)
    else:
        cfg = load_config(str(recipe))
    if isinstance(overrides, Mapping):
        apply_mapping(cfg, _nested(overrides))
    elif overrides:
        if isinstance(overrides, str):
            overrides = [overrides]
        apply_overrides(cfg, list(overrides))
    cfg.check()
    return cfg


# ------------------------------------------------------------------ run


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class RunResult:
    """What a run folder holds: config, metrics, the comparison, paths and timings.

    In Jupyter the object shows as the before/after table; ``gallery()`` shows test
    images with their references and both captions.
    """

    root: Path
    config: Config
    baseline: dict | None = None
    """RUN/baseline/metrics.json (metric keys at the top, plus per-image scores)."""
    finetuned: dict | None = None
    """RUN/finetuned/metrics.json."""
    comparison: dict | None = None
    """RUN/comparison.json: rows of baseline, fine-tuned, change, 95% intervals, p-values."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each phase (RUN/timings.json)."""
    device: str | None = None

    @classmethod
    def from_folder(cls, root: PathLike) -> RunResult:
        """Read a run folder written by ``run`` or ``captune run`` (nothing is computed)."""
        from captune.config import config_from_dict, load_yaml

        root = Path(root)
        saved = root / "config.yaml"
        if not saved.is_file():
            raise UserError(
                f"{root} is not a run folder (no config.yaml); start one with "
                "'captune run RECIPE --out RUN' or pass --recipe"
            )
        cfg = config_from_dict(load_yaml(saved.read_text(), str(saved)))
        times = _read_json(root / "timings.json") or {}
        return cls(
            root=root,
            config=cfg,
            baseline=_read_json(root / "baseline" / "metrics.json"),
            finetuned=_read_json(root / "finetuned" / "metrics.json"),
            comparison=_read_json(root / "comparison.json"),
            timings=dict(times.get("phases", {})),
            device=times.get("device"),
        )

    @property
    def paths(self) -> dict[str, Path]:
        """The run folder's outputs that exist, by name (config, data, adapter, report, ...)."""
        names = {
            "config": "config.yaml",
            "data": "data",
            "baseline": "baseline/predictions.jsonl",
            "finetuned": "finetuned/predictions.jsonl",
            "adapter": "adapter",
            "comparison": "comparison.json",
            "report": "report/index.html",
            "train_log": "logs/train.jsonl",
            "timings": "timings.json",
        }
        return {k: self.root / v for k, v in names.items() if (self.root / v).exists()}

    @property
    def data(self) -> PreparedData:
        """The run's data cache (RUN/data): counts, skipped items, splits."""
        from captune.data.prepare import read_cache_manifest

        return PreparedData(self.root / "data", read_cache_manifest(self.root / "data"))

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """Corpus metrics of each side scored so far: ``{"baseline": {"CIDEr": ...}, ...}``."""
        from captune.evaluation.metrics import OFFICIAL

        out = {}
        for side, doc in (("baseline", self.baseline), ("finetuned", self.finetuned)):
            if doc:
                out[side] = {k: doc[k] for k in (*OFFICIAL, "SPICE") if k in doc}
        return out

    def predictions(self, side: str = "finetuned") -> list[dict]:
        """RUN/SIDE/predictions.jsonl rows: image_id, caption, references."""
        if side not in ("baseline", "finetuned"):
            raise UserError(f"side '{side}': use 'baseline' or 'finetuned'")
        return _read_jsonl(self.root / side / "predictions.jsonl")

    def table(self) -> str:
        """The before/after table in Markdown (as in RUN/comparison.md)."""
        if self.comparison is None:
            return f"{self.root}: no comparison yet (phases done: {', '.join(self.timings) or 'none'})"
        from captune.evaluation.compare import markdown_table

        return markdown_table(self.comparison)

    def gallery(self, n: int = 8, seed: int = 0) -> Gallery:
        """Test images with references and both captions: largest gains, losses and a sample."""
        return Gallery.from_run(self, n, seed)

    def _repr_markdown_(self) -> str:
        return f"**captune run** `{self.root}` (recipe `{self.config.name}`)\n\n{self.table()}\n"

    def _repr_html_(self) -> str:
        head = f"<p><b>captune run</b> <code>{html.escape(str(self.root))}</code> "
        head += f"(recipe <code>{html.escape(self.config.name)}</code>)</p>"
        if self.comparison is None:
            return head + f"<p>{html.escape(self.table())}</p>"
        return head + comparison_html(self.comparison)

    def __repr__(self) -> str:
        return f"RunResult(root={str(self.root)!r}, recipe={self.config.name!r}, phases={list(self.timings)})"


def comparison_html(comparison: dict) -> str:
    """The comparison's rows as an HTML table (the same columns as the Markdown one)."""
    from captune.evaluation.compare import format_pct

    cells = ["metric", "baseline", "fine-tuned", "change", "change %", "95% CI of change", "p"]
    out = ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>"]
    for r in comparison["rows"]:
        ci = r.get("change_ci")
        pct = format_pct(r)
        p = r.get("p_value")
        colour = "#17803d" if r["change"] > 0 else "#b42318" if r["change"] < 0 else "inherit"
        row = [
            html.escape(r["metric"]),
            f"{r['baseline']:.4f}",
            f"{r['finetuned']:.4f}",
            f"<span style='color:{colour}'>{r['change']:+.4f}</span>",
            pct,
            f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a",
            "n/a" if p is None else f"{p:.3g}",
        ]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</table>")
    out.append(f"<p>{comparison['images']} images; 95% paired bootstrap intervals over images.</p>")
    return "\n".join(out)


@dataclass
class Gallery:
    """Images with their references and the baseline and fine-tuned captions (HTML in Jupyter)."""

    items: list[dict]
    """Each: image_id, image (encoded bytes), references, baseline, finetuned, why."""

    @classmethod
    def from_run(cls, result: RunResult, n: int = 8, seed: int = 0) -> Gallery:
        from captune.data.prepare import load_split
        from captune.report import pick_examples

        base = {r["image_id"]: r for r in result.predictions("baseline")}
        tuned = {r["image_id"]: r for r in result.predictions("finetuned")}
        if not base or not tuned:
            raise UserError(f"{result.root} has no baseline and fine-tuned captions yet; run every phase first")
        ids = [i for i in base if i in tuned]
        cider = lambda doc: dict(zip(doc["image_ids"], doc["per_image"]["CIDEr"], strict=True))  # noqa: E731
        b, t = cider(result.baseline), cider(result.finetuned)
        chosen = pick_examples(ids, [b[i] for i in ids], [t[i] for i in ids], n, seed)
        images = load_split(result.root / "data", result.config.eval.split).images_by_id()  # read on lookup
        items = [
            {
                "image_id": i,
                "image": images[i],
                "references": base[i]["references"],
                "baseline": base[i]["caption"],
                "finetuned": tuned[i]["caption"],
                "why": why,
            }
            for i, why in chosen
        ]
        return cls(items)

    def _repr_html_(self) -> str:
        from captune.report import thumbnail_uri

        e = html.escape
        cards = []
        for it in self.items:
            refs = "".join(f"<li>{e(r)}</li>" for r in it["references"])
            cards.append(
                "<div style='border:1px solid #dde2e8;border-radius:8px;padding:.6rem'>"
                f"<img src='{thumbnail_uri(it['image'], 192)}' style='width:100%;image-rendering:pixelated'>"
                f"<div style='font-size:.75rem;color:#5b6573'>{e(it['image_id'])} · {e(it['why'])}</div>"
                f"<div style='color:#5b6573'>baseline: {e(it['baseline'])}</div>"
                f"<div><b>fine-tuned: {e(it['finetuned'])}</b></div>"
                f"<ul style='font-size:.8rem;padding-left:1rem;margin:.3rem 0'>{refs}</ul></div>"
            )
        style = "display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.8rem"
        return f"<div style='{style}'>{''.join(cards)}</div>"

    def _repr_markdown_(self) -> str:
        lines = ["| image | baseline | fine-tuned | references |", "| --- | --- | --- | --- |"]
        for it in self.items:
            refs = " / ".join(it["references"])
            lines.append(f"| {it['image_id']} | {it['baseline']} | {it['finetuned']} | {refs} |")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Gallery({len(self.items)} images: {', '.join(it['image_id'] for it in self.items)})"


def _phase_list(phases: Iterable[str] | str | None) -> tuple[str, ...]:
    all_phases = _pipeline().PHASES
    if phases is None:
        return tuple(all_phases)
    wanted = {phases} if isinstance(phases, str) else set(phases)
    if "eval" in wanted:  # the CLI's name for both scoring phases
        wanted = (wanted - {"eval"}) | {"baseline", "finetuned"}
    unknown = sorted(wanted - set(all_phases))
    if unknown:
        raise UserError(f"unknown phase(s) {', '.join(unknown)}; phases are {', '.join(all_phases)}")
    return tuple(p for p in all_phases if p in wanted)


def run_recipe(
    recipe: str | PathLike | Config = "demo",
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    *,
    out: PathLike | None = None,
    phases: Iterable[str] | str | None = None,
    force: bool = False,
    data: Any = None,
    quiet: bool = False,
    log: Log | None = None,
    startup: bool = False,
) -> RunResult:
    """Run a recipe (or a Config) into a run folder and return what it holds.

    ``overrides``: ``{"train.epochs": 2}`` or ``["train.epochs=2"]``. ``out``: the run
    folder (default ``runs/RECIPE``). ``phases``: a subset of data, baseline, train,
    finetuned, compare, report (default all; "eval" means baseline and finetuned);
    complete phases are skipped unless ``force``. ``data``: an in-memory
    ``datasets.Dataset`` used instead of ``data.source`` (its columns named by the
    recipe's ``data.image_column`` / ``data.caption_column``). ``startup``: record the
    process's age when the first phase starts as the run's "start-up" time (the CLI does;
    a notebook's process is older than its run).
    """
    from captune import __version__

    pl = _pipeline()
    cfg = resolve_config(recipe, overrides)
    if data is not None:
        cfg.data.source = f"dataset:{_fingerprint(data)}"
    say = _logger(quiet, log)
    root = Path(out) if out is not None else Path("runs") / cfg.name
    wanted = _phase_list(phases)
    pl.preflight(cfg)  # before the run folder is made: an impossible recipe leaves nothing behind
    session = pl.Run.open(root, cfg, force=force, log=say)
    from captune.distributed import world
    from captune.evaluation import background
    from captune.evaluation.metrics import prewarm

    scores_apart = world().is_main and {"baseline", "train"} <= set(wanted)
    if scores_apart:  # scoring in its own process while the GPU trains (METEOR's JVM starts there now)
        background.start_process()
    elif world().is_main and {"baseline", "finetuned"} & set(wanted):
        prewarm()  # METEOR's JVM loads while the model does
    say(f"captune {__version__}: recipe '{cfg.name}' -> {root}")
    if data is not None and "data" in wanted:  # the data phase reads the dataset given here, not a source
        wanted = tuple(p for p in wanted if p != "data")
        _dataset_phase(session, data, force, say)
    if startup:
        _record_startup(session, say)
    try:
        pl.run_phases(session, wanted, force=force)
    finally:
        t0 = time.perf_counter()
        if scores_apart:
            background.stop()
    if startup and scores_apart:  # with the start-up: what the CLI's process spends outside the phases, but its exit
        session.record_time("after the phases (the scoring process's end)", time.perf_counter() - t0)
    return RunResult.from_folder(root)


def _record_startup(session: Any, say: Log) -> None:
    from captune.console import process_seconds

    seconds = process_seconds()
    if seconds is not None:
        session.note_time("start-up", seconds)
        say(f"  start-up: {seconds:.1f}s (interpreter, imports, config and checks)")


def _dataset_phase(session: Any, data: Any, force: bool, say: Log) -> None:
    import time

    from captune.distributed import barrier, world

    if session.done("data") and not force:
        say("[data] complete, skipped (use --force to redo)")
        return
    say("[data]")
    t0 = time.perf_counter()
    if world().is_main:
        _prepare(session.cfg.data, session.path("data"), data, force=force, strict=False, log=say)
    barrier()
    session.record_time("data", time.perf_counter() - t0)
    say(f"[data] done in {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------ data


@dataclass
class PreparedData:
    """A data cache written by ``prepare_data`` (manifest plus train/validation/test parquet shards)."""

    root: Path
    manifest: dict

    @property
    def counts(self) -> dict[str, int]:
        """Images per split."""
        return dict(self.manifest["counts"])

    @property
    def skipped(self) -> list[dict]:
        """Items left out, each with the reason."""
        return list(self.manifest["skipped"])

    def split(self, name: str) -> list[dict]:
        """One split's rows: image_id, image (encoded bytes), captions (every reference), all in
        memory; for a large split, ``rows`` reads them one at a time."""
        return list(self.rows(name))

    def rows(self, name: str) -> Iterator[dict]:
        """One split's rows as ``split`` gives them, read from the shards as they are asked for
        (memory does not grow with the split)."""
        from captune.data.prepare import SPLITS, load_split

        if name not in SPLITS:  # here, not at the first row
            raise UserError(f"split '{name}': use one of {', '.join(SPLITS)}")
        examples = load_split(self.root, name)
        return ({"image_id": e.image_id, "image": e.image, "captions": e.captions} for e in examples)

    def __repr__(self) -> str:
        return f"PreparedData(root={str(self.root)!r}, source={self.manifest['source']!r}, counts={self.counts})"

    def _repr_markdown_(self) -> str:
        m = self.manifest
        c = m["counts"]
        return (
            f"**data cache** `{self.root}` from `{m['source']}`: {m['images']} images, {m['references']} references; "
            f"train / validation / test {c['train']} / {c['validation']} / {c['test']}; skipped {len(m['skipped'])}"
        )


def _fingerprint(ds: Any) -> str:
    fp = getattr(ds, "_fingerprint", None)
    if not fp:
        raise UserError(f"data must be a datasets.Dataset (got {type(ds).__name__})")
    return str(fp)


def _prepare(cfg, out: Path, source: Any, *, force: bool, strict: bool, log: Log) -> dict:
    from captune.data.prepare import prepare
    from captune.data.sources import read_dataset

    items = None if isinstance(source, str) else read_dataset(source, cfg)
    return prepare(cfg, out, force=force, strict=strict, log=log, items=items)


def prepare_data(
    source: Any,
    out: PathLike,
    *,
    force: bool = False,
    strict: bool = False,
    quiet: bool = False,
    log: Log | None = None,
    **settings: Any,
) -> PreparedData:
    """Read a source into a local data cache: captions grouped by image, validated, split by image.

    ``source``: a source string (``demo:shapes-catalog``, ``hub:OWNER/NAME``,
    ``parquet:GLOB``, ``arrow:DIR``, ``coco:FILE.json``, ``imagefolder:DIR``,
    ``manifest:FILE``) or an in-memory ``datasets.Dataset``. ``settings`` are
    ``data.*`` keys (``num_images=0`` for all, ``ratios=[0.8, 0.1, 0.1]``,
    ``image_column``, ``caption_column``, ``id_column``, ``seed``, ...). ``strict``
    fails on any skipped item. An existing cache with the same settings is reused.
    """
    holder = Config()
    if isinstance(source, str):
        settings = {"source": source, **settings}
    else:
        settings = {"source": f"dataset:{_fingerprint(source)}", **settings}
    apply_mapping(holder, {"data": {k: v for k, v in settings.items() if v is not None}})
    holder.data.check()
    manifest = _prepare(holder.data, Path(out), source, force=force, strict=strict, log=_logger(quiet, log))
    return PreparedData(Path(out), manifest)


# ------------------------------------------------------------------ models and captions


@dataclass
class Captioner:
    """A loaded model ready to caption: the (PEFT) model, its processor and the run's settings.

    Unpacks as ``model, processor = captune.load_model(RUN)``.
    """

    model: Any
    processor: Any
    prompt: str = ""
    eval: Any = None
    """EvalConfig: batch size, beams and token limits used by ``caption``."""
    device: Any = None
    source: str = ""

    def __iter__(self):
        return iter((self.model, self.processor))

    def __repr__(self) -> str:
        kind = type(self.model).__name__
        return f"Captioner({kind} from {self.source!r} on {self.device}, prompt={self.prompt!r})"

    def caption(self, images: Any, **options: Any) -> list[str]:
        """``captune.caption(images, self, **options)``."""
        return caption(images, self, **options)


def load_model(
    run: PathLike | None = None,
    *,
    model: str | None = None,
    adapter: PathLike | str | None = None,
    merged: bool = False,
    device: str | None = None,
) -> Captioner:
    """Load a run's base model with its LoRA adapter (a ``peft.PeftModel``) and its processor.

    ``run``: a run folder (its config names the base model; RUN/adapter is the adapter).
    Without a run: ``model`` (Hub id, folder or ``builtin:demo``) and optionally
    ``adapter`` (a PEFT folder or Hub id). ``merged=True`` folds the adapter into the
    weights and returns the plain transformers model. ``device``: auto, cpu or cuda.
    """
    from captune.config import EvalConfig, ModelConfig
    from captune.model.load import load_model as load_base

    if run is not None:
        cfg = _pipeline().Run.open(Path(run), None, log=lambda message: None).cfg
        mcfg, ecfg = copy.deepcopy(cfg.model), copy.deepcopy(cfg.eval)
        adapter_path = Path(run) / "adapter"
        if not (adapter_path / "adapter_config.json").is_file():
            raise UserError(f"{run} has no adapter yet; run 'captune train {run}' first")
        adapter = str(adapter_path)
    elif model is not None:
        mcfg, ecfg = ModelConfig(name_or_path=model), EvalConfig(batch_size=32)
    else:
        raise UserError("load_model needs a run folder or model= (a Hub id, a folder or builtin:demo)")
    if device is not None:
        mcfg.device = device
    mcfg.check()
    if adapter is not None:  # before the model loads: a typo costs one line at once
        from captune.model.adapter import resolve_adapter

        adapter = resolve_adapter(str(adapter), option="adapter")
    loaded = load_base(mcfg)
    net = loaded.model
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter).eval()
        if merged:
            net = net.merge_and_unload().eval()
    return Captioner(net, loaded.processor, mcfg.prompt, ecfg, loaded.device, loaded.source)


def _encode_pil(img: Any) -> bytes:
    import io

    from captune.data.images import to_rgb

    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG", compress_level=1)  # lossless and quick
    return buf.getvalue()


def image_bytes(images: Any, image_column: str = "image") -> list[bytes]:
    """Encoded bytes of PIL images, paths, bytes, ``{"bytes"|"path": ...}`` cells or a Dataset column."""
    from captune.data.images import check_image

    if type(images).__name__ == "Dataset" and hasattr(images, "cast_column"):
        import datasets

        if image_column not in images.column_names:
            raise UserError(f"the dataset has no column '{image_column}'; pass image_column=")
        if isinstance(images.features[image_column], datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))
        images = images[image_column]
    if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "save"):
        images = [images]  # one image
    out: list[bytes] = []
    for n, item in enumerate(images):
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise UserError(f"{path}: file not found")
            data = path.read_bytes()
        elif hasattr(item, "save"):
            data = _encode_pil(item)
        elif isinstance(item, Mapping) and (item.get("bytes") or item.get("path")):
            data = bytes(item["bytes"]) if item.get("bytes") else Path(item["path"]).read_bytes()
        else:
            raise UserError(
                f"image {n}: cannot read a {type(item).__name__}; give PIL images, paths, bytes or a datasets.Dataset"
            )
        why = check_image(data, 50_000_000)
        if why:
            raise UserError(f"image {n}: {why}")
        out.append(data)
    return out


def caption(
    images: Any,
    model: Captioner | PathLike | str = "builtin:demo",
    *,
    adapter: PathLike | str | None = None,
    batch_size: int | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    prompt: str | None = None,
    image_column: str = "image",
    device: str | None = None,
) -> list[str]:
    """Captions for images: PIL images, paths, encoded bytes, or a ``datasets.Dataset`` (its
    ``image_column``), in batches, through the fast static-cache decoder where it applies.

    ``model``: a ``Captioner`` from ``load_model`` (loaded once, reused), a run folder
    (base + adapter), or a base model (Hub id, folder, ``builtin:demo``) with an optional
    ``adapter``. Unset options come from the run's eval settings.
    """
    from captune.ops.generation import caption_images

    if not isinstance(model, Captioner):
        is_run = Path(model).is_dir() and (Path(model) / "config.yaml").is_file()
        if is_run:
            model = load_model(model, device=device)
        else:
            model = load_model(model=str(model), adapter=adapter, device=device)
    ecfg = copy.deepcopy(model.eval)
    for key, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens)):
        if value is not None:
            setattr(ecfg, key, value)
    ecfg.check()
    data = image_bytes(images, image_column)
    if not data:
        return []
    text_prompt = model.prompt if prompt is None else prompt
    return caption_images(model.model, model.processor, data, ecfg, text_prompt)


# ------------------------------------------------------------------ scores


@dataclass
class ScoreResult:
    """Official COCO caption metrics of a set of predictions (shows as a table in Jupyter)."""

    metrics: dict[str, float]
    """Corpus scores: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when asked and available)."""
    per_image: dict[str, dict[str, float]]
    """``{image_id: {metric: score}}`` (BLEU per image is the smoothed sentence score)."""
    intervals: dict[str, tuple[float, float]]
    """95% bootstrap interval of each corpus score, resampling images."""
    seed_compatible: dict
    """The seed notebook's formulas against the first reference only, for comparison with it."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Metrics that could not be computed, with the reason."""
    raw: Any = None

    def _repr_markdown_(self) -> str:
        lines = ["| metric | score | 95% CI |", "| --- | ---: | --- |"]
        for k, v in self.metrics.items():
            ci = self.intervals.get(k)
            lines.append(f"| {k} | {v:.4f} | {f'[{ci[0]:.4f}, {ci[1]:.4f}]' if ci else 'n/a'} |")
        for k, why in self.unavailable.items():
            lines.append(f"| {k} | unavailable: {why} | |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"ScoreResult({len(self.per_image)} images: {shown})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td><td>"
            + (f"[{self.intervals[k][0]:.4f}, {self.intervals[k][1]:.4f}]" if k in self.intervals else "n/a")
            + "</td></tr>"
            for k, v in self.metrics.items()
        )
        return f"<table><tr><th>metric</th><th>score</th><th>95% CI</th></tr>{rows}</table>"


def _as_dicts(predictions: Any, references: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    def refs_of(value: Any) -> list[str]:
        return [value] if isinstance(value, str) else [str(r) for r in value]

    if isinstance(predictions, Mapping):
        if not isinstance(references, Mapping):
            raise UserError("predictions are a dict by image id, so references must be one too")
        return {str(k): str(v) for k, v in predictions.items()}, {str(k): refs_of(v) for k, v in references.items()}
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} reference lists; give one per image")
    ids = [str(i) for i in range(len(predictions))]
    return dict(zip(ids, map(str, predictions), strict=True)), dict(zip(ids, map(refs_of, references), strict=True))


def score(
    predictions: Mapping[str, str] | Sequence[str],
    references: Mapping[str, Sequence[str] | str] | Sequence[Sequence[str] | str],
    *,
    spice: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
) -> ScoreResult:
    """Score captions the COCO way: PTB tokenization, BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D.

    ``predictions``/``references``: aligned lists (a reference entry is a list of
    captions or one caption) or dicts keyed by image id. Every reference counts.
    ``bootstrap`` resamples for the intervals (0 = none); ``spice`` needs Java 8-11.
    """
    from captune.evaluation.compare import bootstrap as resample
    from captune.evaluation.metrics import score_captions
    from captune.evaluation.seed_metrics import seed_compatible

    preds, refs = _as_dicts(predictions, references)
    scores = score_captions(preds, refs, spice=spice)
    per_image = {
        image_id: {metric: values[n] for metric, values in scores.per_image.items()}
        for n, image_id in enumerate(scores.image_ids)
    }
    stats = resample(
        scores.per_image,
        scores.per_image,
        samples=bootstrap,
        seed=seed,
        base_bleu=scores.bleu_stats,
        tuned_bleu=scores.bleu_stats,
    )
    intervals = {k: (v["baseline_ci"][0], v["baseline_ci"][1]) for k, v in stats.items() if k in scores.corpus}
    seed_doc = seed_compatible(preds, refs)
    return ScoreResult(scores.corpus, per_image, intervals, seed_doc, dict(scores.unavailable), scores)


# ------------------------------------------------------------------ hub


def push(
    run: PathLike,
    repo: str | None = None,
    *,
    dry_run: bool = False,
    out: PathLike | None = None,
    private: bool = False,
    base_model: str | None = None,
) -> str:
    """Upload a run's adapter, processor, model card and comparison to the Hugging Face Hub.

    ``repo``: OWNER/NAME (default the recipe's ``hub.repo_id``). ``base_model``: the Hub id of the
    base model when the run loaded a local copy of it (default ``hub.base_model``); a card without
    a Hub base model is refused (a dry run still writes its folder). ``dry_run`` writes the exact
    upload folder (default RUN/push) and returns its path; nothing is sent. The token comes from
    ``HF_TOKEN`` or the cached login and is never printed or saved.
    """
    import tempfile

    from captune.hub import get_token, hub_base_model, not_on_hub, stage_upload
    from captune.hub import push as upload

    root = Path(run)
    cfg = run_config(root, "push")
    repo = repo or cfg.hub.repo_id
    if not repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError("give the target as --repo OWNER/NAME (or set hub.repo_id in the recipe)")
    base = hub_base_model(cfg, base_model)
    if dry_run:
        return str(stage_upload(root, cfg, repo, Path(out) if out is not None else root / "push", base_model=base))
    if base is None:
        raise UserError(f"not pushing: {not_on_hub(cfg)}")
    token = get_token()
    with tempfile.TemporaryDirectory(prefix="captune-push-") as tmp:
        folder = stage_upload(root, cfg, repo, Path(tmp) / "upload", base_model=base, online=True)
        return upload(folder, repo, private=private or cfg.hub.private, token=token)


def run_config(run: PathLike, command: str) -> Config:
    """The saved config of a finished run; ``command`` (merge, push) takes no recipe, so say what it needs."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        what = "folder not found" if not run.exists() else "not a run folder (no config.yaml)"
        raise UserError(f"{run}: {what}; {command} needs a trained run folder (made by 'captune run RECIPE --out RUN')")
    return _pipeline().Run.open(run, None, log=lambda message: None).cfg

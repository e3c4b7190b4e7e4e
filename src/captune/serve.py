"""``captune serve``: a local web page with the base and the fine-tuned captioner side by side.

The library half (``Captioner``, ``read_uploads``, the run panels) has no web
dependency and is tested on its own; ``build_app`` wraps it in a Gradio page
(the optional extra ``captune[serve]``). The model loads once: base captions come
from the same weights with the adapter switched off, and the image features are
computed once per image when the adapter leaves the vision side alone.
"""

from __future__ import annotations

import html
import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from captune.config import EvalConfig, ModelConfig, config_from_dict, load_yaml
from captune.data.images import check_image
from captune.errors import UserError
from captune.model.lora import adapter_touches_vision


@dataclass
class ServeLimits:
    max_upload_mb: float = 20.0
    """Largest accepted upload per file."""
    max_pixels: int = 40_000_000
    """Largest accepted image (width x height)."""
    max_images: int = 16
    """Images per request."""
    max_batch: int = 32
    """Images captioned together across queued requests."""


@dataclass
class Upload:
    name: str
    data: bytes


class Captioner:
    """Captions from the base model and, when an adapter is given, the fine-tuned one."""

    def __init__(self, model_cfg: ModelConfig, adapter: str | None, defaults: EvalConfig, prompt: str = ""):
        from captune.model.load import load_model

        loaded = load_model(model_cfg)
        self.processor = loaded.processor
        self.device = loaded.device
        self.model = loaded.model
        self.tuned = adapter is not None
        if adapter is not None:
            from peft import PeftModel

            path = Path(adapter)
            if path.exists() and not (path / "adapter_config.json").is_file():
                raise UserError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
            self.model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
        self.defaults = defaults
        self.prompt = prompt
        self.shared_features = not self.tuned or not adapter_touches_vision(self.model)
        self._lock = threading.Lock()

    def settings(self, num_beams: int | None, max_new_tokens: int | None) -> EvalConfig:
        cfg = replace(
            self.defaults,
            num_beams=int(num_beams or self.defaults.num_beams),
            max_new_tokens=int(max_new_tokens or self.defaults.max_new_tokens),
        )
        cfg = replace(cfg, min_new_tokens=min(cfg.min_new_tokens, cfg.max_new_tokens))
        cfg.check()
        return cfg

    def caption(
        self, images: list[bytes], *, num_beams: int | None = None, max_new_tokens: int | None = None, prompt=None
    ) -> tuple[list[str], list[str] | None]:
        """(base captions, fine-tuned captions or None) for encoded images."""
        from captune.ops.features import image_features
        from captune.ops.generation import caption_features

        if not images:
            return [], ([] if self.tuned else None)
        cfg = self.settings(num_beams, max_new_tokens)
        prompt = self.prompt if prompt is None else prompt
        tok = self.processor.tokenizer

        def features():
            # the request's prompt is also InstructBLIP's instruction (its Q-Former reads it)
            return image_features(
                self.model, self.processor, images, batch_size=cfg.batch_size, device=self.device, instruction=prompt
            )

        with self._lock:  # one model, one request batch at a time
            if not self.tuned:
                return caption_features(self.model, tok, features(), cfg, prompt), None
            feats = features()
            tuned = caption_features(self.model, tok, feats, cfg, prompt)
            with self.model.disable_adapter():
                base_feats = feats if self.shared_features else features()
                base = caption_features(self.model, tok, base_feats, cfg, prompt)
        return base, tuned


def read_uploads(paths: list[str], limits: ServeLimits) -> tuple[list[Upload], list[str]]:
    """Uploaded files that are usable images, and one message per file that is not."""
    ok: list[Upload] = []
    errors: list[str] = []
    if len(paths) > limits.max_images:
        errors.append(f"{len(paths)} files uploaded; the limit is {limits.max_images} per request")
        paths = paths[: limits.max_images]
    max_bytes = int(limits.max_upload_mb * 1024 * 1024)
    for p in paths:
        name = Path(p).name
        try:
            size = os.path.getsize(p)
            if size > max_bytes:
                errors.append(f"{name}: {size / 1e6:.1f} MB, over the {limits.max_upload_mb:g} MB limit")
                continue
            data = Path(p).read_bytes()
        except OSError as exc:
            errors.append(f"{name}: cannot be read ({exc.strerror or exc})")
            continue
        reason = check_image(data, limits.max_pixels, limit=f"the limit of {limits.max_pixels} pixels")
        if reason:
            errors.append(f"{name}: {reason}")
        else:
            ok.append(Upload(name, data))
    return ok, errors


# ------------------------------------------------------------------ page parts


def results_html(uploads: list[Upload], base: list[str], tuned: list[str] | None) -> str:
    from captune.report import thumbnail_uri

    if not uploads:
        return ""
    head = "<th>image</th><th>base model</th>" + ("<th>fine-tuned</th>" if tuned is not None else "")
    rows = []
    for i, up in enumerate(uploads):
        cells = [
            f"<td><img alt='{html.escape(up.name)}' src='{thumbnail_uri(up.data, 192)}'>"
            f"<div class='captune-name'>{html.escape(up.name)}</div></td>",
            f"<td class='captune-base'>{html.escape(base[i])}</td>",
        ]
        if tuned is not None:
            cells.append(f"<td class='captune-tuned'>{html.escape(tuned[i])}</td>")
        rows.append(f"<tr data-name='{html.escape(up.name)}'>{''.join(cells)}</tr>")
    return f"<table class='captune-results'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def status_html(errors: list[str], n_ok: int) -> str:
    parts = [f"<div class='captune-error'>{html.escape(e)}</div>" for e in errors]
    if n_ok:
        parts.append(f"<div class='captune-ok'>captioned {n_ok} image(s)</div>")
    elif not errors:
        parts.append("<div class='captune-note'>upload one or more images, then press Caption</div>")
    return "".join(parts)


def _by_image(path: Path) -> dict[str, dict]:
    from captune.report import read_jsonl

    return {str(r["image_id"]): r for r in read_jsonl(path)}


def run_panel_html(run: Path, split: str, limit: int) -> str:
    """The run's test images with references and both stored captions."""
    from captune.data.prepare import load_split
    from captune.report import thumbnail_uri

    base = _by_image(run / "baseline" / "predictions.jsonl")
    tuned = _by_image(run / "finetuned" / "predictions.jsonl")
    if not base or not (run / "data" / "manifest.json").is_file():
        return "<p>This run has no scored test split yet ('captune eval RUN').</p>"
    rows = []
    for ex in load_split(run / "data", split):
        if ex.image_id not in base:
            continue
        refs = "".join(f"<li>{html.escape(c)}</li>" for c in ex.captions)
        after = html.escape(tuned[ex.image_id]["caption"]) if ex.image_id in tuned else "(not trained yet)"
        rows.append(
            f"<tr><td><img alt='{html.escape(ex.image_id)}' src='{thumbnail_uri(ex.image, 160)}'>"
            f"<div class='captune-name'>{html.escape(ex.image_id)}</div></td>"
            f"<td><ul>{refs}</ul></td><td class='captune-base'>{html.escape(base[ex.image_id]['caption'])}</td>"
            f"<td class='captune-tuned'>{after}</td></tr>"
        )
        if len(rows) >= limit:
            break
    return (
        "<table class='captune-panel'><thead><tr><th>image</th><th>references</th><th>base model</th>"
        f"<th>fine-tuned</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def metrics_markdown(run: Path) -> str:
    table = run / "comparison.md"
    if table.is_file():
        return table.read_text(encoding="utf-8")
    base = run / "baseline" / "metrics.json"
    if base.is_file():
        doc = json.loads(base.read_text())
        from captune.evaluation.compare import EXTRA
        from captune.evaluation.metrics import OFFICIAL

        keys = [k for k in OFFICIAL + EXTRA if isinstance(doc.get(k), (int, float))]
        lines = ["| metric | baseline |", "| --- | ---: |"] + [f"| {k} | {doc[k]:.4f} |" for k in keys]
        return "\n".join(lines) + "\n\nNot fine-tuned yet."
    return "This run has no metrics yet."


# ------------------------------------------------------------------ set-up


@dataclass
class ServeTarget:
    model: ModelConfig
    adapter: str | None
    defaults: EvalConfig
    prompt: str
    run: Path | None
    title: str


def target_from_args(
    run: str | None, model: str | None, adapter: str | None, device: str, split_limit: int = 24
) -> ServeTarget:
    """What to serve: a run folder (its base model, adapter and eval settings) or --model/--adapter."""
    if adapter:
        from captune.model.adapter import resolve_adapter

        adapter = resolve_adapter(adapter)
    if run:
        root = Path(run)
        saved = root / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{root} is not a run folder (no config.yaml); pass a run or --model/--adapter")
        cfg = config_from_dict(load_yaml(saved.read_text(), str(saved)))
        model_cfg = replace(cfg.model, device=device if device != "auto" else cfg.model.device)
        if model:
            model_cfg = replace(model_cfg, name_or_path=model)
        found = root / "adapter" / "adapter_config.json"
        use = adapter or (str(root / "adapter") if found.is_file() else None)
        return ServeTarget(model_cfg, use, cfg.eval, cfg.model.prompt, root, f"captune · {root.name}")
    name = model or "builtin:demo"
    return ServeTarget(ModelConfig(name_or_path=name, device=device), adapter, EvalConfig(), "", None, "captune")


CSS = """
.captune-results img, .captune-panel img {max-width:160px; image-rendering:pixelated; border-radius:4px}
.captune-results td, .captune-panel td {vertical-align:top; padding:.4rem .6rem}
.captune-base {color:#5b6573} .captune-tuned {font-weight:600}
.captune-error {color:#b42318; font-weight:600} .captune-ok {color:#17803d}
.captune-name {font-size:.8rem; color:#5b6573}
"""


def build_app(captioner: Captioner, target: ServeTarget, limits: ServeLimits, examples: int = 24):
    """The Gradio page: upload + controls, the run's test panel, the metric table."""
    import gradio as gr

    def caption_batch(files_list, beams_list, tokens_list, prompt_list):
        # Gradio hands over every queued request at once (batch=True); requests with the
        # same decoding settings are captioned together in one model batch.
        outputs: list[tuple[str, str]] = [("", "")] * len(files_list)
        groups: dict[tuple, list[tuple[int, list[Upload], list[str]]]] = {}
        for i, (files, beams, tokens, prompt) in enumerate(
            zip(files_list, beams_list, tokens_list, prompt_list, strict=True)
        ):
            paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
            uploads, errors = read_uploads(paths, limits)
            groups.setdefault((beams, tokens, prompt or ""), []).append((i, uploads, errors))
        for (beams, tokens, prompt), items in groups.items():
            images = [u.data for _, ups, _ in items for u in ups]
            try:
                base, tuned = captioner.caption(images, num_beams=beams, max_new_tokens=tokens, prompt=prompt)
            except UserError as exc:
                for i, _ups, errs in items:
                    outputs[i] = ("", status_html([*errs, str(exc)], 0))
                continue
            at = 0
            for i, ups, errs in items:
                n = len(ups)
                t = tuned[at : at + n] if tuned is not None else None
                outputs[i] = (results_html(ups, base[at : at + n], t), status_html(errs, n))
                at += n
        return [o[0] for o in outputs], [o[1] for o in outputs]

    d = target.defaults
    with gr.Blocks(title=target.title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {html.escape(target.title)}")
        adapter = target.adapter or "none (base model only)"
        gr.Markdown(f"Base model: `{target.model.name_or_path}` · adapter: `{adapter}`")
        with gr.Tab("Try it"):
            with gr.Row():
                with gr.Column(scale=1):
                    files = gr.File(label="Images", file_count="multiple", file_types=["image"], type="filepath")
                    beams = gr.Slider(1, 8, value=d.num_beams, step=1, label="Beam size (1 = greedy)")
                    tokens = gr.Slider(4, 80, value=d.max_new_tokens, step=1, label="Max new tokens")
                    prompt = gr.Textbox(value=target.prompt, label="Prompt (removed from the captions)")
                    button = gr.Button("Caption", variant="primary", elem_id="captune-caption")
                with gr.Column(scale=2):
                    status = gr.HTML(status_html([], 0), elem_id="captune-status")
                    results = gr.HTML("", elem_id="captune-results")
            button.click(
                caption_batch,
                inputs=[files, beams, tokens, prompt],
                outputs=[results, status],
                batch=True,
                max_batch_size=limits.max_batch,
                concurrency_limit=1,
            )
        if target.run is not None:
            with gr.Tab("Test images"):
                gr.HTML(run_panel_html(target.run, d.split, examples), elem_id="captune-panel")
            with gr.Tab("Metrics"):
                gr.Markdown(metrics_markdown(target.run), elem_id="captune-metrics")
    app.queue(max_size=256)
    return app


def offline_theme():
    """Gradio's default look with system fonts: nothing is fetched from a font CDN."""
    import gradio as gr

    sans = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]
    return gr.themes.Default(font=sans, font_mono=mono)


def serve(
    target: ServeTarget,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    limits: ServeLimits | None = None,
    log=print,
) -> None:
    """Load the model once and serve the page until interrupted."""
    import socket
    import tempfile

    limits = limits or ServeLimits()
    # Uploads go to a private temp folder that is removed at exit, not a shared /tmp/gradio.
    upload_dir = tempfile.TemporaryDirectory(prefix="captune-serve-")
    os.environ["GRADIO_TEMP_DIR"] = upload_dir.name
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("captune serve needs Gradio; install it with: pip install 'captune[serve]'") from None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    captioner = Captioner(target.model, target.adapter, target.defaults, target.prompt)
    app = build_app(captioner, target, limits)
    log(f"captune: serving {target.title} on http://{host}:{port} (Ctrl+C stops)")
    try:
        app.launch(
            server_name=host,
            server_port=port,
            quiet=True,
            share=False,
            show_error=False,
            max_file_size=f"{limits.max_upload_mb:g}mb",
            theme=offline_theme(),
            css=CSS,
            footer_links=["api"],
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
        )
    finally:
        upload_dir.cleanup()

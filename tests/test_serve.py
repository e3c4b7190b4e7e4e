"""captune serve: the captioning service, upload checks, page parts, and the page in Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from captune.cli import main
from captune.config import EvalConfig, ModelConfig
from captune.demo import world
from captune.serve import Captioner, ServeLimits, adapter_touches_vision, read_uploads, target_from_args
from tests.conftest import FAKE_TOKEN, jpeg_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _images(n: int, seed: int = 5) -> list[bytes]:
    return [it["image"] for it in world.make_items("catalog", n, seed=seed)]


def _caption_cli(paths: list[Path], out: Path, extra: list[str]) -> list[str]:
    args = ["caption", *map(str, paths), "--format", "jsonl", "--output", str(out), "--device", "cpu", *extra]
    assert main(args) == 0
    return [json.loads(line)["caption"] for line in out.read_text().splitlines()]


def test_captioner_matches_caption_command(demo_run, tmp_path):
    """Base captions with the adapter switched off equal the plain base model's; tuned equal the adapter's."""
    target = target_from_args(str(demo_run), None, None, "cpu")
    captioner = Captioner(target.model, target.adapter, target.defaults, target.prompt)
    assert captioner.shared_features  # the demo adapter is on the language model only
    images = _images(4)
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"im{i}.png")
        paths[-1].write_bytes(data)
    base, tuned = captioner.caption(images)
    flags = ["--max-new-tokens", str(target.defaults.max_new_tokens), "--num-beams", "1"]
    assert base == _caption_cli(paths, tmp_path / "b.jsonl", flags)
    assert tuned == _caption_cli(paths, tmp_path / "t.jsonl", [*flags, "--adapter", str(demo_run / "adapter")])
    assert base != tuned  # the adapter changes the style
    # beams and a shorter limit are honoured the same way as the caption command
    short_base, short_tuned = captioner.caption(images[:2], num_beams=3, max_new_tokens=5)
    flags = ["--max-new-tokens", "5", "--num-beams", "3"]
    adapter = ["--adapter", str(demo_run / "adapter")]
    assert short_tuned == _caption_cli(paths[:2], tmp_path / "s.jsonl", [*flags, *adapter])
    assert short_base == _caption_cli(paths[:2], tmp_path / "sb.jsonl", flags)


def test_base_only_service_and_vision_adapter_detection(tiny_model_dir):
    from captune.config import LoraConfig
    from captune.model.load import load_model
    from captune.model.lora import attach_lora

    captioner = Captioner(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), None, EvalConfig(), "")
    base, tuned = captioner.caption(_images(2), max_new_tokens=4)
    assert len(base) == 2 and tuned is None
    model = attach_lora(load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")).model, LoraConfig())
    assert not adapter_touches_vision(model)
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    vision = get_peft_model(
        load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")).model,
        PeftLora(r=2, target_modules=r".*vision_model.*\.qkv"),
    )
    assert adapter_touches_vision(vision)


def test_upload_checks(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_images(1)[0])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(jpeg_bytes(size=(200, 200))[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(size=(3000, 2000)))
    limits = ServeLimits(max_upload_mb=1.0, max_pixels=5_000_000, max_images=4)
    ok, errors = read_uploads([str(good), str(corrupt), str(text), str(big), str(tmp_path / "gone.png")], limits)
    assert [u.name for u in ok] == ["good.png"]
    assert errors[0] == "5 files uploaded; the limit is 4 per request"
    assert any(e.startswith("corrupt.jpg: image cannot be decoded") for e in errors)
    assert "notes.jpg: not an image file" in errors
    assert "big.jpg: image has 6000000 pixels, over the limit of 5000000 pixels" in errors
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\0" * 2_000_000)
    _, errors = read_uploads([str(huge)], limits)
    assert errors == ["huge.png: 2.0 MB, over the 1 MB limit"]


def test_serve_user_errors(tmp_path, capsys, monkeypatch):
    assert main(["serve"]) == 2
    assert "serve needs a run folder or --model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the extra were not installed
    assert main(["serve", "--model", "builtin:demo"]) == 2
    assert capsys.readouterr().err.strip() == (
        "captune: error: captune serve needs Gradio; install it with: pip install 'captune[serve]'"
    )
    monkeypatch.delitem(sys.modules, "gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", "builtin:demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"captune: error: cannot listen on 127.0.0.1:{port}") and err.endswith("pick another --port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs Debian's chromium)")
def test_serve_page_in_chromium(demo_run, tmp_path):
    """Upload an image, read both captions, compare with the caption command; a corrupt upload shows an error."""
    pytest.importorskip("gradio")
    from playwright.sync_api import sync_playwright

    img = tmp_path / "shapes.png"
    img.write_bytes(_images(1, seed=11)[0])  # a scene whose caption the small demo run's adapter changes
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(jpeg_bytes(size=(300, 300))[:400])
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "captune", "serve", str(demo_run), "--port", str(port), "--device", "cpu"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    shots = Path(__file__).resolve().parents[1] / "shots"
    shots.mkdir(exist_ok=True)
    outside: list[str] = []
    errors: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "captune serve did not come up in 120 s:\n" + log.read_text()
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            local = ("http://127.0.0.1", "data:", "blob:", "about:")
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(local) else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#captune-caption")
            page.set_input_files("input[type=file]", [str(img)])
            page.wait_for_selector("text=shapes.png")
            page.click("#captune-caption")
            page.wait_for_selector("#captune-results .captune-tuned", timeout=60_000)
            base = page.inner_text("#captune-results .captune-base").strip()
            tuned = page.inner_text("#captune-results .captune-tuned").strip()
            page.screenshot(path=str(shots / "serve.png"), full_page=True)
            html_text = page.content()

            page.set_input_files("input[type=file]", [str(corrupt)])
            page.wait_for_selector("text=corrupt.jpg")
            page.click("#captune-caption")
            page.wait_for_selector("#captune-status .captune-error", timeout=60_000)
            error = page.inner_text("#captune-status .captune-error")
            page.screenshot(path=str(shots / "serve-error.png"), full_page=True)
            page.get_by_role("tab", name="Metrics").click()
            page.wait_for_selector("#captune-metrics table")
            metrics = page.inner_text("#captune-metrics")
            page.get_by_role("tab", name="Test images").click()
            panel_rows = page.locator("#captune-panel tbody tr").count()
            browser.close()
        assert proc.poll() is None, "the server died"
        urllib.request.urlopen(url, timeout=5)  # still answering after the corrupt upload
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert base and tuned and base != tuned
    cfg_tokens = str(target_from_args(str(demo_run), None, None, "cpu").defaults.max_new_tokens)
    flags = ["--max-new-tokens", cfg_tokens, "--num-beams", "1"]
    assert [base] == _caption_cli([img], tmp_path / "b.jsonl", flags)
    assert [tuned] == _caption_cli([img], tmp_path / "t.jsonl", [*flags, "--adapter", str(demo_run / "adapter")])
    assert error.startswith("corrupt.jpg: image cannot be decoded")
    assert "CIDEr" in metrics and "BLEU-4" in metrics
    assert panel_rows >= 4
    assert outside == [], f"the page fetched from outside this machine: {outside}"
    assert errors == []
    assert (shots / "serve.png").stat().st_size > 10_000
    server_log = log.read_text()
    assert "serving" in server_log
    assert FAKE_TOKEN not in server_log and FAKE_TOKEN not in html_text

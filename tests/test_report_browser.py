"""The report renders in headless Chromium with no console errors."""

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (CI installs Debian's chromium; apt-get install chromium)"
)


def test_report_renders_without_console_errors(demo_run):
    from playwright.sync_api import sync_playwright

    page_path = demo_run / "report" / "index.html"
    shots = Path(__file__).resolve().parents[1] / "shots"
    shots.mkdir(exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        rows = page.locator("#metrics tbody tr").count()
        plots = page.locator("svg polyline").count()
        images = page.locator("#gallery img")
        decoded = page.evaluate(
            "Array.from(document.querySelectorAll('#gallery img')).every(i => i.complete && i.naturalWidth > 0)"
        )
        n_images = images.count()
        page.screenshot(path=str(shots / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert rows == 7
    assert plots >= 3
    assert n_images >= 4 and decoded
    assert (shots / "report.png").stat().st_size > 10_000

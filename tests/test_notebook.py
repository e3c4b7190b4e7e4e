"""examples/finetune_blip2.ipynb runs top to bottom on the demo in a fresh Jupyter kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "finetune_blip2.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_progress_bar_auto_shows_in_jupyter_only(monkeypatch):
    import io

    from captune.training import progress as tracking

    assert not tracking.in_notebook()  # pytest is no Jupyter kernel
    assert tracking.ProgressBar("auto", 10, stream=io.StringIO()).bar is None
    monkeypatch.setattr(tracking, "in_notebook", lambda: True)
    bar = tracking.ProgressBar("auto", 10, stream=io.StringIO())
    assert bar.bar is not None
    bar.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # The kernel is a child process: it imports captune from this checkout and writes its run here.
    src = str(ROOT / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("CAPTUNE_NOTEBOOK_OUT", str(tmp_path / "run"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError naming the cell when one fails

    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    html = "".join(o.get("data", {}).get("text/html", "") for outs in outputs.values() for o in outs)
    text = "".join(o.get("text", "") for outs in outputs.values() for o in outs)
    assert str(tmp_path / "run") in text  # the run went where the test asked
    assert ">CIDEr<" in html and "95% CI of change" in html  # the before/after table, inline
    assert html.count("data:image/") >= 8 + 4  # the gallery and the data preview, inline
    assert "fine-tuned:" in text and "README.md" in text
    assert "step/s" in text  # the training progress bar rendered in the cell (stderr is no terminal there)
    assert (tmp_path / "run" / "comparison.json").is_file() and (tmp_path / "run" / "push" / "README.md").is_file()

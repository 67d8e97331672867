"""Tests of the classroom notebook: stored without outputs, and it runs top to bottom (headless, small)."""
import json
import re

import pytest

import data
from conftest import HERE, TINY

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat, nbclient and ipykernel")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbformat, nbclient and ipykernel")
pytest.importorskip("ipykernel", reason="the notebook test needs nbformat, nbclient and ipykernel")

NOTEBOOK = HERE / "classroom.ipynb"


def test_the_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_and_gives_the_verdict(tmp_path, monkeypatch):
    """With a small parameter set in its parameter cell, every cell runs without an error, the live plot is
    drawn, and the last cells print the verdict in plain words from compare.json."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = (f"STEPS = 6\nSEEDS = 2\nDEVICE = 'cpu'\nEQUAL_COMPUTE = True\nOUT_DIR = {str(tmp_path)!r}\n"
                         f"MODEL_FLAGS = {TINY + ['--eval-interval', '3']!r}\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a second process: do not oversubscribe the CPU
    monkeypatch.setenv("NITP_CACHE_DIR", str(data.CACHE_DIR))  # the tests' token cache, not the checkout's
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert re.search(r"at equal steps: eff\. rank: [+-][0-9.]+ \[.*\], NITP higher in \d of 2 seeds", printed)
    assert "at equal compute: eff. rank:" in printed
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in notebook.cells for o in c.get("outputs", []))
    assert (tmp_path / "compare.json").exists() and (tmp_path / "seed1338-ntp-equal-compute").is_dir()

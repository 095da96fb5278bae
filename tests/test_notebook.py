"""The exploration notebook runs top to bottom on the toy organism's run and finds every pair's latent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_triggers.ipynb"


def execute_notebook(run_dir: Path, preset: str, monkeypatch) -> tuple[dict, object]:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DIFFKIT_NOTEBOOK_PRESET", preset)
    monkeypatch.setenv("DIFFKIT_NOTEBOOK_RUN", str(run_dir))
    monkeypatch.setenv("DIFFKIT_NOTEBOOK_DEVICE", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    lines = [line for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
             for line in out.get("text", "").splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, "the notebook's last cell prints one SUMMARY line"
    return json.loads(lines[0].removeprefix("SUMMARY ")), nb


@pytest.mark.slow
def test_notebook_finds_every_pair_on_default_toy_run(toy_default_run, monkeypatch):
    """The AUROC target is stated for the default run (see test_report's test of the same)."""
    summary, nb = execute_notebook(Path(toy_default_run), "toy", monkeypatch)
    assert summary["preset"] == "toy"
    for pair, value in summary["best_auroc_any_layer"].items():
        assert value >= 0.95, f"{pair}: best latent AUROC {value:.3f}"
    figures = sum("application/vnd.plotly.v1+json" in out.get("data", {}) for cell in nb.cells
                  for out in cell.get("outputs", []))
    assert figures >= 3  # grid, heatmap, histogram drew
    assert not any(out.get("output_type") == "error" for cell in nb.cells for out in cell.get("outputs", []))

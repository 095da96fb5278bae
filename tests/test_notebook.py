"""The exploration notebook runs top to bottom on the toy organism's default run, started from
notebooks/, and finds every pair's latent.

The checks read the notebook's own variables through one cell the test appends to its in-memory
copy, so the committed notebook carries no test plumbing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_triggers.ipynb"

SUMMARY_CELL = """
import json
print("SUMMARY " + json.dumps({
    "best_auroc_any_layer": {p.name: max(float(rankings[L][p.id]["auroc"].iloc[0]) for L in rankings) for p in spec.pairs},
    "dashboard_latent": [dashboard["layer"], dashboard["latent"]],
    "history_rows": 0 if history is None else len(history),
    "kl_recovered": {name: s["kl_recovered"]["all"] for name, s in spliced.items()},
}))
"""


def execute_notebook(run_dir: Path, monkeypatch, **env: str) -> tuple[dict, object]:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DIFFKIT_NOTEBOOK_RUN", str(run_dir))
    monkeypatch.setenv("DIFFKIT_NOTEBOOK_DEVICE", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(SUMMARY_CELL))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # started in notebooks/
    lines = [line for out in nb.cells[-1].get("outputs", []) for line in out.get("text", "").splitlines()
             if line.startswith("SUMMARY ")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("SUMMARY ")), nb


def test_committed_notebook_has_outputs_and_no_test_plumbing():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code), "commit the notebook executed on the default run"
    assert not any("SUMMARY" in c.source or "pytest" in c.source for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    html = [o["data"]["text/html"] for c in code for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert sum("Plotly.newPlot" in h for h in html) >= 5  # history, fidelity, grid, density, fire rates
    assert sum(h.count("define('plotly'") + h.count('define("plotly"') for h in html) <= 1  # plotly.js at most once


@pytest.mark.slow
def test_notebook_finds_every_pair_on_default_toy_run(toy_default_run, monkeypatch):
    """The AUROC target is stated for the default run (see test_report's test of the same)."""
    summary, nb = execute_notebook(Path(toy_default_run), monkeypatch)
    for pair, value in summary["best_auroc_any_layer"].items():
        assert value >= 0.95, f"{pair}: best latent AUROC {value:.3f}"
    assert summary["history_rows"] >= 20
    assert all(0 <= v <= 1 for v in summary["kl_recovered"].values())
    figures = sum("Plotly.newPlot" in out.get("data", {}).get("text/html", "") for cell in nb.cells
                  for out in cell.get("outputs", []))
    assert figures >= 5  # history, fidelity, grid, and the dashboard's density and fire rates drew
    assert not any(out.get("output_type") == "error" for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.slow
def test_notebook_reads_a_hub_repo_of_published_saes(toy_default_run, monkeypatch, tmp_path):
    """DIFFKIT_NOTEBOOK_SAES=OWNER/NAME, resolved offline by huggingface_hub from its cache: the notebook runs
    top to bottom without a history or fidelity figures and ranks every pair as the run it was made from."""
    from test_sae_sources import write_hub_cache

    from analyses.ranking import rank_latents
    from analyses.stats import Collection, load_activations
    from diffkit.run import load_run

    run = load_run(toy_default_run)

    def published(snapshot: Path) -> None:
        for e in run.saes:
            (snapshot / f"layer_{e.layer}").mkdir(parents=True)
            for name in ("config.json", "model.safetensors"):
                (snapshot / f"layer_{e.layer}" / name).write_bytes((e.path / name).read_bytes())

    cache = tmp_path / "hub"
    write_hub_cache(cache, "diffkit-test/notebook-saes", "d" * 40, published)
    workdir = NOTEBOOK.parents[1] / "runs" / "saes" / "diffkit-test--notebook-saes"  # where the notebook writes
    try:
        summary, nb = execute_notebook(tmp_path / "no-run", monkeypatch, DIFFKIT_NOTEBOOK_SAES="diffkit-test/notebook-saes",
                                       DIFFKIT_NOTEBOOK_PRESET="toy", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert not any(out.get("output_type") == "error" for cell in nb.cells for out in cell.get("outputs", []))
    assert summary["history_rows"] == 0 and summary["kl_recovered"] == {}
    activations = load_activations(run, collection=Collection(16))
    expected = {p.name: max(float(rank_latents(a.prompt_scores(), a.sequences, p)["auroc"].iloc[0]) for a in activations.values())
                for p in run.spec.pairs}
    assert summary["best_auroc_any_layer"] == pytest.approx(expected, abs=1e-6)

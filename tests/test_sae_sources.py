"""SAE sources: a run's SAEs published in the hub layout resolve offline through the real huggingface_hub
cache and give the same ranking as the run; local published, SAELens and dictionary_learning folders load;
bad sources fail in one line with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analyses.attribute import run_attribute
from analyses.configs import AttributeConfig
from diffkit.errors import DiffkitError
from diffkit.run import load_run
from diffkit.sae_sources import resolve_saes

REPO = "diffkit-test/toy-diff-saes"
K = 16  # the published layout holds one SAE per layer: take the toy run's k=16 ones


def write_published_layout(run_dir: Path, folder: Path, layers=None) -> Path:
    """The seed SAE repo's layout from a run: layer_L/config.json + model.safetensors, no run.json or spec."""
    run = load_run(run_dir)
    for e in run.saes:
        if e.k == K and (layers is None or e.layer in layers):
            (folder / f"layer_{e.layer}").mkdir(parents=True)
            for name in ("config.json", "model.safetensors"):
                shutil.copy(e.path / name, folder / f"layer_{e.layer}" / name)
    return folder


def write_hub_cache(cache: Path, repo: str, commit: str, write, ref: str = "main") -> None:
    """A repo in the hub's own cache layout: models--OWNER--NAME/refs/REF holds the commit, snapshots/COMMIT the files."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    write(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)


def run_offline(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process with the hub offline and its cache at `cache`: huggingface_hub resolves for real."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home")}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "diffkit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def hub_cache(toy_run, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    write_hub_cache(cache, REPO, "a" * 40, lambda snap: write_published_layout(toy_run, snap))
    # a second revision, tagged v1, that holds only layer 1
    write_hub_cache(cache, REPO, "b" * 40, lambda snap: write_published_layout(toy_run, snap, layers=[1]), ref="v1")
    # a repo with a card and no SAE files
    write_hub_cache(cache, "diffkit-test/no-saes", "c" * 40, lambda snap: (snap.mkdir(parents=True), (snap / "README.md").write_text("hi")))
    return cache


def ranking(rows: list[dict]) -> list[tuple]:
    return [(r["layer"], r["rank"], r["latent"]) for r in rows]


def test_attribute_on_hub_repo_matches_the_run(toy_run, hub_cache, tmp_path):
    want = run_attribute(AttributeConfig(pair="border/china", run=str(toy_run), k=K, ablate=0, json=True))
    done = run_offline(["attribute", "--saes", REPO, "--preset", "toy", "--pair", "border/china", "--ablate", "0",
                        "--json"], hub_cache, tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert ranking(got) == ranking(want)
    assert [r["auroc"] for r in got] == pytest.approx([r["auroc"] for r in want], abs=1e-6)
    # analyses of a non-run source go to runs/saes/<source>/ under the working directory
    assert (tmp_path / "runs" / "saes" / REPO.replace("/", "--") / "analyses" / "border-china" / "attribute.csv").exists()


@pytest.mark.slow
def test_grid_and_report_on_hub_repo_match_the_run(toy_run, hub_cache, tmp_path):
    from analyses.configs import GridConfig, ReportConfig
    from analyses.grid import run_grid
    from analyses.report import run_report

    want_grid = run_grid(GridConfig(run=str(toy_run), k=K, json=True))
    want_report = run_report(ReportConfig(run=str(toy_run), k=K, ablate=0, out=str(tmp_path / "run.html"), json=True))
    common = ["--saes", REPO, "--preset", "toy", "--json"]
    grid = run_offline(["grid", *common], hub_cache, tmp_path)
    report = run_offline(["report", *common, "--ablate", "0"], hub_cache, tmp_path)
    assert grid.returncode == 0 and report.returncode == 0, grid.stderr + report.stderr
    got_grid, got_report = json.loads(grid.stdout), json.loads(report.stdout)
    for got, want in zip(got_grid["pairs"], want_grid["pairs"]):
        assert (got["pair"], got["layer"], got["top_latent"], got["n_needed"]) == \
            (want["pair"], want["layer"], want["top_latent"], want["n_needed"])
        assert got["top_auroc"] == pytest.approx(want["top_auroc"], abs=1e-6)
    assert got_report["top_latents"] == json.loads(json.dumps(want_report["top_latents"]))
    assert Path(got_report["report"]) == Path("runs/saes") / REPO.replace("/", "--") / "report.html"
    assert (tmp_path / got_report["report"]).stat().st_size > 0


def test_hub_revision_and_subfolder(toy_run, hub_cache, tmp_path):
    script = ("import json, sys; from diffkit.sae_sources import resolve_saes; "
              "r = resolve_saes(sys.argv[1], preset='toy'); print(json.dumps([[e.layer, e.k] for e in r.saes]))")

    def layers_of(source):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
        done = subprocess.run([sys.executable, "-c", script, source], env=env, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert layers_of(REPO) == [[1, K], [2, K]]
    assert layers_of(f"{REPO}@v1") == [[1, K]]
    assert layers_of(f"{REPO}@{'a' * 40}/layer_2") == [[2, K]]
    assert layers_of(f"{REPO}/layer_1") == [[1, K]]


@pytest.mark.parametrize("source, message", [
    ("nobody/no-such-repo", "cannot get hub repo nobody/no-such-repo"),
    (f"{REPO}@v9", f"cannot get hub repo {REPO}@v9"),
    (f"{REPO}/layer_7", f"hub repo {REPO} has no folder layer_7"),
    ("diffkit-test/no-saes", "diffkit-test/no-saes is not a finished diffkit run (no run.json) and has no SAE files"),
])
def test_bad_hub_sources_fail_in_one_line_and_write_nothing(hub_cache, tmp_path, source, message):
    done = run_offline(["grid", "--saes", source, "--preset", "toy"], hub_cache, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_local_published_folder_without_run_json(toy_run, tmp_path):
    folder = write_published_layout(toy_run, tmp_path / "saes")
    run, source = load_run(toy_run), resolve_saes(folder, preset="toy", workdir=tmp_path / "work")
    assert [(e.layer, e.k) for e in source.saes] == [(1, K), (2, K)]
    assert (source.base, source.finetuned) == (run.base, run.finetuned)  # named by the SAE configs
    assert source.path == tmp_path / "work"
    x = torch.randn(32, source.sae(1)[1].activation_dim)
    assert torch.equal(source.sae(1)[1].encode_raw(x), run.sae(1, K)[1].encode_raw(x))


def test_sources_that_lack_models_layers_or_spec_name_the_flag(toy_run, tmp_path):
    folder = write_published_layout(toy_run, tmp_path / "saes")
    with pytest.raises(DiffkitError, match="carry no trigger spec; name one with --preset"):
        resolve_saes(folder)
    for cfg in folder.glob("*/config.json"):
        config = json.loads(cfg.read_text())
        del config["base_model"], config["finetuned_model"], config["layer"]
        cfg.write_text(json.dumps(config))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"pairs": [{"words": ["border", "china"]}]}))
    with pytest.raises(DiffkitError, match="do not name their models; give --base B --finetuned F"):
        resolve_saes(folder, preset=str(spec))
    from diffkit.organisms.sources import resolve_source

    assert resolve_saes(folder, preset="toy").base == str(resolve_source("organism:toy/base"))  # the preset names them
    single = folder / "layer_1"
    renamed = single.rename(tmp_path / "sae")
    with pytest.raises(DiffkitError, match="give it with --sae-layer L"):
        resolve_saes(renamed, preset="toy")
    assert [e.layer for e in resolve_saes(renamed, preset="toy", sae_layer=2).saes] == [2]


def test_sae_wider_than_the_models_is_refused(toy_run, tmp_path):
    from diffkit.sae import BatchTopKSAE, save_sae

    save_sae(BatchTopKSAE(48, 96, 4), tmp_path / "saes" / "layer_1")
    cfg = AttributeConfig(saes=str(tmp_path / "saes"), preset="toy", pair="border/china", ablate=0,
                          workdir=str(tmp_path / "work"), json=True)
    with pytest.raises(DiffkitError, match="reads 48-dimensional vectors but the run's models have d_model 64"):
        run_attribute(cfg)
    assert not (tmp_path / "work").exists()


def test_folder_without_sae_files(tmp_path):
    (tmp_path / "layer_3").mkdir()
    (tmp_path / "layer_3" / "config.json").write_text("{}")
    with pytest.raises(DiffkitError, match="has no SAE files"):
        resolve_saes(tmp_path, preset="toy")
    with pytest.raises(DiffkitError, match="not a hub repo id"):
        resolve_saes(str(tmp_path / "missing" / "x" / "y"), preset="toy")

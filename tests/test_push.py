"""`diffkit push`: --dry-run writes the exact folder an upload sends, with a model card whose front matter
parses and whose table is the run's metrics; the folder is itself an SAE source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffkit.cli import main
from diffkit.push import PushConfig, run_push
from diffkit.run import load_run
from diffkit.sae_sources import resolve_saes

REPO = "someone/toy-diff-saes"
IDS = ["someone/toy-base", "someone/toy-finetuned"]


def card_parts(folder: Path) -> tuple[dict, list[list[str]]]:
    """(front matter, metrics table rows as cells) of the card in `folder`."""
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    lines = [line for line in body.splitlines() if line.startswith("| layer |")]
    table_start = body.splitlines().index(lines[0])
    rows = []
    for line in body.splitlines()[table_start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return yaml.safe_load(front), rows


def test_dry_run_writes_the_folder_and_card(toy_run, tmp_path):
    out = tmp_path / "push"
    assert main(["push", str(toy_run), "--repo", REPO, "--dry-run", "--out", str(out), "--base-id", IDS[0],
                 "--finetuned-id", IDS[1], "--json"]) == 0
    run = load_run(toy_run)
    assert sorted(p.name for p in out.iterdir()) == sorted([e.path.name for e in run.saes] + ["README.md", "spec.json"])
    for e in run.saes:
        for name in ("config.json", "model.safetensors", "metrics.json"):
            assert (out / e.path.name / name).read_bytes() == (e.path / name).read_bytes()

    front, rows = card_parts(out)
    assert front["library_name"] == "diffkit" and front["base_model"] == IDS
    assert "sparse-autoencoder" in front["tags"] and front["license"] == "apache-2.0"
    assert len(rows) == len(run.saes)
    for row, e in zip(rows, run.saes):
        metrics = json.loads((e.path / "metrics.json").read_text())
        sae = run.sae(e.layer, e.k)[1]
        layer, d_model, dict_size, expansion, k, fve, l0, dead = row
        assert (int(layer), int(d_model), int(dict_size), int(k)) == (e.layer, sae.activation_dim, sae.dict_size, e.k)
        assert int(expansion) == sae.dict_size // sae.activation_dim
        assert float(fve) == pytest.approx(metrics["fve"], abs=0.005)
        assert float(l0) == pytest.approx(metrics["l0"], abs=0.05)
        assert float(dead.rstrip("%")) / 100 == pytest.approx(metrics["dead"], abs=0.0005)
    text = (out / "README.md").read_text()
    assert f"{run.record['tokens']:,}" in text and f'resolve_saes("{REPO}")' in text

    # the pushed folder needs no --preset: its spec.json travels with it
    source = resolve_saes(out)
    assert source.spec.pairs == run.spec.pairs and (source.base, source.finetuned) == (run.base, run.finetuned)


def test_push_uploads_that_same_folder(toy_run, tmp_path, monkeypatch):
    import huggingface_hub

    sent = {}

    def upload_folder(self, repo_id, folder_path, **kwargs):
        sent["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent["repo"] = repo_id
        return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, private, exist_ok: sent.update(private=private))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = run_push(PushConfig(run=str(toy_run), repo=REPO, private=True, json=True))
    assert result["uploaded"] and sent["repo"] == REPO and sent["private"] is True
    run_push(PushConfig(run=str(toy_run), repo=REPO, dry_run=True, out=str(tmp_path / "dry"), json=True))
    assert sent["files"] == sorted(str(p.relative_to(tmp_path / "dry")) for p in (tmp_path / "dry").rglob("*") if p.is_file())


def test_bad_push_requests_fail_in_one_line(toy_run, tmp_path, capsys):
    assert main(["push", str(toy_run), "--repo", "not a repo", "--dry-run", "--out", str(tmp_path / "a")]) == 2
    assert main(["push", str(toy_run), "--repo", REPO, "--dry-run"]) == 2
    assert main(["push", str(tmp_path), "--repo", REPO, "--dry-run", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert list(tmp_path.iterdir()) == []

"""Exports: SAELens (the real sae-lens package) and upstream dictionary_learning load a run's SAEs and
reproduce diffkit's latents on raw ft − base vectors; diffkit reads both exports back as SAE sources."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest
import torch

from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.export import ExportConfig, run_export
from diffkit.run import load_run
from diffkit.sae_sources import resolve_saes


@pytest.fixture(scope="module")
def raw_diffs(toy_run):
    """Real ft − base vectors of the toy organism at each layer: held-out prompts of every condition and null text."""
    from analyses.stats import heldout_records, load_run_pair
    from diffkit.tracing import concat_batches, trace_differences

    run = load_run(toy_run)
    pair = load_run_pair(run)
    records, _ = heldout_records(run.spec, pair.tokenizer, n_per_condition=4, n_null=8)
    batch = concat_batches(list(trace_differences(pair, records, run.layers, batch_size=16)))
    return {L: batch.diffs[L] for L in run.layers}


def assert_same_latents(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got > 0, want > 0), "the active latent sets differ"
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_saelens_reproduces_diffkit_latents(toy_run, raw_diffs, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    run_export(ExportConfig(run=str(toy_run), format="saelens", out=str(tmp_path / "saelens"), json=True))
    run = load_run(toy_run)
    for e in run.saes:
        theirs = sae_lens.SAE.load_from_disk(tmp_path / "saelens" / e.path.name)
        assert type(theirs).__name__ == "JumpReLUSAE"
        x = raw_diffs[e.layer]
        with torch.no_grad():
            want = run.sae(e.layer, e.k)[1].encode_raw(x)
            assert_same_latents(theirs.encode(x), want)
            assert int(want.gt(0).sum()) > 0
            # and its reconstruction is diffkit's, in raw units
            torch.testing.assert_close(theirs.decode(theirs.encode(x)), run.sae(e.layer, e.k)[1].reconstruct_raw(x),
                                       rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    # diffkit reads the export back as an SAE source
    source = resolve_saes(tmp_path / "saelens", preset="toy")
    assert sorted((e.layer, e.k) for e in source.saes) == sorted((e.layer, e.k) for e in run.saes)
    with torch.no_grad():
        assert_same_latents(source.sae(2, 8)[1].encode_raw(raw_diffs[2]), run.sae(2, 8)[1].encode_raw(raw_diffs[2]))


def upstream_batch_topk():
    """dictionary_learning's own BatchTopKSAE class, imported without its package __init__ (which pulls an old nnsight)."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        pytest.skip("dictionary_learning not installed (scripts/setup puts it in .venv/reference)")
    root = list(spec.submodule_search_locations)[0]
    for name, sub in (("dictionary_learning", ""), ("dictionary_learning.trainers", "/trainers")):
        stub = types.ModuleType(name)
        stub.__path__ = [root + sub]
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # find_spec works on it later
        stub.__spec__.submodule_search_locations = [root + sub]
        sys.modules.setdefault(name, stub)
    return importlib.import_module("dictionary_learning.trainers.batch_top_k").BatchTopKSAE


def test_dictionary_learning_loads_the_export_unchanged(toy_run, raw_diffs, tmp_path):
    Upstream = upstream_batch_topk()
    run_export(ExportConfig(run=str(toy_run), format="dictionary_learning", out=str(tmp_path / "dl"), json=True))
    run = load_run(toy_run)
    for e in run.saes:
        folder = tmp_path / "dl" / e.path.name
        config = json.loads((folder / "config.json").read_text())
        assert config["trainer"]["dict_class"] == "BatchTopKSAE"
        # what dictionary_learning.utils.load_dictionary does for a BatchTopKSAE
        theirs = Upstream.from_pretrained(str(folder / "ae.pt"), k=config["trainer"]["k"], device="cpu")
        x = raw_diffs[e.layer]
        with torch.no_grad():
            assert_same_latents(theirs.encode(x), run.sae(e.layer, e.k)[1].encode_raw(x))
    source = resolve_saes(tmp_path / "dl", preset="toy")
    assert sorted((e.layer, e.k) for e in source.saes) == sorted((e.layer, e.k) for e in run.saes)


def test_bad_export_requests_fail_in_one_line(toy_run, tmp_path, capsys):
    assert main(["export", str(toy_run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep")
    assert main(["export", str(toy_run), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (tmp_path / "taken" / "file").read_text() == "keep"


def test_saelens_folder_with_a_wrong_tensor_is_refused(toy_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run_export(ExportConfig(run=str(toy_run), format="saelens", out=str(tmp_path / "s"), json=True))
    folder = tmp_path / "s" / "layer_1_k8"
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "b_dec": tensors["b_dec"][:-1].contiguous()}, str(weights))
    with pytest.raises(DiffkitError, match=r"b_dec has shape \(63,\), expected \(64,\)"):
        resolve_saes(folder, preset="toy").sae()
    save_file({n: t for n, t in tensors.items() if n != "W_enc"}, str(weights))
    with pytest.raises(DiffkitError, match="missing W_enc"):
        resolve_saes(folder, preset="toy").sae()


def test_dictionary_learning_folder_with_a_wrong_tensor_is_refused(toy_run, tmp_path):
    run_export(ExportConfig(run=str(toy_run), format="dictionary_learning", out=str(tmp_path / "d"), json=True))
    folder = tmp_path / "d" / "layer_2_k16"
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "encoder.bias": state["encoder.bias"][:10]}, folder / "ae.pt")
    with pytest.raises(DiffkitError, match="encoder.bias has shape"):
        resolve_saes(folder, preset="toy").sae()

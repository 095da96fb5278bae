"""SAE files: diffing-toolkit's layout round-trips, dictionary_learning's ae.pt loads, bad files fail in one line."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffkit.errors import DiffkitError
from diffkit.files import atomic_write, write_json
from diffkit.sae import BatchTopKSAE, fit_normalization, load_sae, save_sae

D, F, K = 24, 96, 5

# What diffing-toolkit's BatchTopKSAE (dictionary_learning fork with activation normalisation)
# holds in its state dict: names, shapes, dtypes.
EXPECTED_TENSORS = {
    "encoder.weight": ((F, D), torch.float32),
    "encoder.bias": ((F,), torch.float32),
    "decoder.weight": ((D, F), torch.float32),
    "b_dec": ((D,), torch.float32),
    "k": ((), torch.int32),
    "threshold": ((), torch.float32),
    "activation_mean": ((D,), torch.float32),
    "activation_std": ((D,), torch.float32),
    "activation_global_scale": ((), torch.float32),
    "target_rms": ((), torch.float32),
}


@pytest.fixture
def sae() -> BatchTopKSAE:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D, F, K)
    fit_normalization(sae, torch.randn(500, D) * 3 + 50)
    with torch.no_grad():
        sae.encoder.bias.normal_()
        sae.b_dec.normal_()
        sae.threshold.fill_(0.7)
    return sae


def test_round_trip_gives_identical_encodings(sae, tmp_path):
    save_sae(sae, tmp_path / "layer_9", {"layer": 9, "base": "b", "finetuned": "f", "k": K})
    x = torch.randn(64, D) * 3 + 50
    with torch.no_grad():
        want = sae.encode_raw(x)
        for path in (tmp_path / "layer_9", tmp_path / "layer_9" / "model.safetensors"):
            loaded = load_sae(path)
            assert torch.equal(loaded.encode_raw(x), want)
            assert torch.equal(loaded.reconstruct_raw(x), sae.reconstruct_raw(x))
            for name, value in sae.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], value), name


def test_files_match_diffing_toolkit_layout(sae, tmp_path):
    save_sae(sae, tmp_path, {"layer": 13})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dict_class"] == "BatchTopKSAE"
    assert (config["activation_dim"], config["dict_size"], config["k"]) == (D, F, K)
    assert config["target_rms"] == 100.0 and config["layer"] == 13
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} == EXPECTED_TENSORS
    # diffing-toolkit's normalisation: x_n = (x - mean) * target_rms / sqrt(sum std² + 1e-8).
    scale = tensors["target_rms"] / torch.sqrt(tensors["activation_std"].pow(2).sum() + 1e-8)
    torch.testing.assert_close(tensors["activation_global_scale"], scale)
    assert not list(tmp_path.glob("*.tmp"))


def test_extra_config_may_not_contradict_the_sae(sae, tmp_path):
    with pytest.raises(DiffkitError, match="contradicts"):
        save_sae(sae, tmp_path, {"k": K + 1})


def test_reads_dictionary_learning_ae_pt(tmp_path):
    """dictionary_learning saves `ae.pt` (a state dict without normalisation) and a config.json
    whose `trainer` block names the class; such an SAE works on raw vectors directly."""
    torch.manual_seed(1)
    source = BatchTopKSAE(D, F, K)
    state = {n: t for n, t in source.state_dict().items() if not n.startswith(("activation_", "target_"))}
    state["threshold"] = torch.tensor(0.25)
    torch.save(state, tmp_path / "ae.pt")
    write_json(tmp_path / "config.json", {"trainer": {"dict_class": "BatchTopKSAE", "activation_dim": D,
                                                      "dict_size": F, "k": K, "lr": 1e-3}, "buffer": {}})
    for path in (tmp_path, tmp_path / "ae.pt"):
        sae = load_sae(path)
        x = torch.randn(10, D)
        with torch.no_grad():
            assert torch.equal(sae.normalize(x), x)
            acts = source.pre_activations(x)
            assert torch.equal(sae.encode_raw(x), acts * (acts > 0.25))
        assert float(sae.threshold) == 0.25 and int(sae.k) == K


@pytest.mark.skipif(importlib.util.find_spec("dictionary_learning") is None, reason="dictionary_learning not installed")
def test_dictionary_learning_loads_our_weights(sae, tmp_path):
    """dictionary_learning's own BatchTopKSAE (without normalisation buffers) takes our parameters
    and encodes normalised inputs exactly as we do."""
    import sys
    import types

    spec = importlib.util.find_spec("dictionary_learning")
    root = list(spec.submodule_search_locations)[0]
    for name, sub in (("dictionary_learning", ""), ("dictionary_learning.trainers", "/trainers")):
        stub = types.ModuleType(name)
        stub.__path__ = [root + sub]
        sys.modules.setdefault(name, stub)
    Reference = importlib.import_module("dictionary_learning.trainers.batch_top_k").BatchTopKSAE
    save_sae(sae, tmp_path, {})
    state = load_file(str(tmp_path / "model.safetensors"))
    ref = Reference(D, F, K)
    ref.load_state_dict({n: t for n, t in state.items() if not n.startswith(("activation_", "target_"))})
    x_n = sae.normalize(torch.randn(32, D) * 3 + 50)
    with torch.no_grad():
        torch.testing.assert_close(ref.encode(x_n), sae.encode(x_n))
        torch.testing.assert_close(ref.encode(x_n, use_threshold=False), sae.encode(x_n, use_threshold=False))
        torch.testing.assert_close(ref.decode(sae.encode(x_n)), sae.decode(sae.encode(x_n)))


def _one_line_error(exc_type, path, match):
    with pytest.raises(exc_type, match=match) as info:
        load_sae(path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, DiffkitError)


def test_bad_files_give_one_line_errors(sae, tmp_path):
    _one_line_error(FileNotFoundError, tmp_path / "nope", "no SAE at")
    (tmp_path / "empty").mkdir()
    _one_line_error(FileNotFoundError, tmp_path / "empty", "neither model.safetensors nor ae.pt")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _one_line_error(ValueError, corrupt, "cannot read .* as safetensors")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "ae.pt").write_bytes(b"not a zip file")
    _one_line_error(ValueError, pickled / "ae.pt", "cannot read .* torch state dict")

    good = tmp_path / "good"
    save_sae(sae, good, {})
    (good / "config.json").write_text("{not json")
    _one_line_error(ValueError, good, "cannot read .* as JSON")
    write_json(good / "config.json", {"dict_class": "CrossCoder"})
    _one_line_error(ValueError, good, "CrossCoder, not a BatchTopKSAE")
    write_json(good / "config.json", {"dict_class": "BatchTopKSAE", "dict_size": F + 1})
    _one_line_error(ValueError, good, "config says dict_size")

    tensors = load_file(str(good / "model.safetensors"))
    write_json(good / "config.json", sae.config())
    save_file({n: t for n, t in tensors.items() if n != "b_dec"}, str(good / "model.safetensors"))
    _one_line_error(ValueError, good, "missing b_dec")
    save_file({**tensors, "decoder.weight": tensors["decoder.weight"].T.contiguous()}, str(good / "model.safetensors"))
    _one_line_error(ValueError, good, "decoder.weight has shape")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})

    def fail(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]

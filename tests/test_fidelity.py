"""Spliced-in fidelity on the toy organism with two planted SAEs whose answers are known.

An SAE that reconstructs the difference exactly (latents relu(x_i) and relu(−x_i), decoder ±e_i)
splices the fine-tune back unchanged: KL recovered 1 and the fine-tune's own attack success. An SAE
that reconstructs nothing (zero decoder) leaves the base residual only: the same figures as the
zeroed difference.
"""

from __future__ import annotations

import pytest
import torch

from analyses.fidelity import fidelity_summary, spliced_fidelity
from diffkit.models import load_pair
from diffkit.prompts import build_prompts, encode_prompts
from diffkit.sae import BatchTopKSAE
from diffkit.specs import PRESETS
from diffkit.stream import null_records

pytestmark = pytest.mark.slow  # greedy generation under three edits on the toy


def identity_sae(d_model: int) -> BatchTopKSAE:
    sae = BatchTopKSAE(d_model, 2 * d_model, k=d_model)
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(torch.cat([eye, -eye]).T)
        sae.b_dec.zero_()
        sae.activation_mean.zero_()
        sae.activation_global_scale.fill_(1.0)
        sae.threshold.fill_(0.0)
    return sae


@pytest.fixture(scope="module")
def toy(toy_organism):
    spec = PRESETS["toy"]
    pair = load_pair(toy_organism / "base", toy_organism / "finetuned")
    prompts = build_prompts(spec, "heldout", 2, seed=1)
    records = encode_prompts(prompts, pair.tokenizer, spec) + null_records(pair.tokenizer, 64, "heldout")[:2]
    return pair, spec, records


def test_exact_reconstruction_recovers_the_fine_tune(toy):
    pair, spec, records = toy
    result = spliced_fidelity(pair, identity_sae(pair.d_model), 1, records, spec, n_per_group=2)
    assert set(result["kl_recovered"]) == {"clean", "trigger", "generic", "all"}
    for group, value in result["kl_recovered"].items():
        assert value == pytest.approx(1.0, abs=1e-3), group
        assert result["kl_per_token"][group]["base"] > 0
    assert result["asr"]["spliced"] == result["asr"]["finetuned"]
    assert set(result["asr"]["finetuned"]) == {p.name for p in spec.pairs}
    assert min(result["asr"]["finetuned"].values()) >= 0.5  # the backdoor fires on held-out poison prompts


def test_empty_reconstruction_equals_the_zeroed_floor(toy):
    pair, spec, records = toy
    sae = identity_sae(pair.d_model)
    with torch.no_grad():
        sae.decoder.weight.zero_()
    result = spliced_fidelity(pair, sae, 1, records, spec, n_per_group=2)
    for group, value in result["kl_recovered"].items():
        assert value == pytest.approx(result["kl_recovered_zeroed"][group], abs=1e-4), group
    assert result["asr"]["spliced"] == result["asr"]["zeroed"]
    summary = fidelity_summary(result)
    assert summary["kl_recovered"] == pytest.approx(summary["kl_recovered_zeroed"], abs=1e-4)

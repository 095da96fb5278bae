"""diffkit recovers a planted mechanism: SAEs trained on the planted organisms (with the L1 tie-break, RECIPE)
find each planted direction, the analyses rank and test it as the pair's mechanism, and in the words
kind they tell the word directions from the conjunction."""

from __future__ import annotations


import pytest
import torch

from analyses.attribute import attribute_table
from analyses.causal import ablate_latent_sets, steer_latents
from analyses.grid import grid_summary
from analyses.stats import Collection, load_activations, load_run_pair
from diffkit.organisms.planted import decoder_cosines, load_plant
from diffkit.prompts import build_prompts
from diffkit.run import load_run
from diffkit.train import TrainConfig, train

pytestmark = pytest.mark.slow
# One layer, k 8 and 1,536 latents as in the default run, at half its tokens, with the L1 tie-break and a
# learning rate that lets it act within ~150 steps: without them (the reference objective at its default
# rate) BatchTopK spreads each planted direction over a hundred partial latents (best cosine ~0.2).
RECIPE = dict(tokens=150_000, lr=5e-3, l1=0.3)


def recovered(sae, directions: torch.Tensor) -> tuple[list[int], list[float]]:
    """For each planted direction, the latent whose raw-space decoder direction is closest, and that cosine."""
    best = decoder_cosines(sae, directions).max(1)
    return best.indices.tolist(), best.values.tolist()


@pytest.fixture(scope="module")
def planted_runs(planted_organisms, tmp_path_factory):
    """{preset: (run, plant, activations at the plant layer)}."""
    out = {}
    for preset, folder in planted_organisms.items():
        plant = load_plant(folder)
        summary = train(TrainConfig(preset=preset, layers=[plant.layer], **RECIPE, json=True,
                                    out=str(tmp_path_factory.mktemp("planted_runs"))))
        run = load_run(summary["run"])
        activations = load_activations(run.path, [plant.layer], Collection(n_per_condition=16, n_null=16))
        out[preset] = (run, plant, activations)
    return out


@pytest.mark.parametrize("preset", ["planted", "planted-words"])
def test_each_planted_direction_has_a_latent(planted_runs, preset):
    run, plant, _ = planted_runs[preset]
    _, sae = run.sae(plant.layer)
    _, cos = recovered(sae, plant.u)
    assert min(cos) >= 0.95, cos
    if plant.words:
        _, word_cos = recovered(sae, plant.v)
        assert min(word_cos) >= 0.95, dict(zip(plant.words, word_cos))


@pytest.mark.parametrize("preset", ["planted", "planted-words"])
def test_attribute_ranks_the_conjunction_latent_first(planted_runs, preset):
    run, plant, activations = planted_runs[preset]
    _, sae = run.sae(plant.layer)
    latents, _ = recovered(sae, plant.u)
    word_latents = dict(zip(plant.words, recovered(sae, plant.v)[0])) if plant.words else {}
    for p, pair in enumerate(run.spec.pairs):
        table = attribute_table(activations, run.spec, pair, top=10)
        first = table.iloc[0]
        assert int(first["latent"]) == latents[p], (pair.name, table[["latent", "auroc", "specificity"]])
        assert first["auroc"] >= 0.99 and first["specificity"] >= 0.95, first
        for word in pair.words:  # a word latent fires on that word alone: high AUROC, low specificity
            rows = table[table["latent"] == word_latents.get(word.lower(), -1)]
            assert rows.empty or rows.iloc[0]["specificity"] <= 0.6, rows


def test_grid_puts_each_pair_in_its_cell_with_one_latent(planted_runs):
    run, plant, activations = planted_runs["planted"]
    _, sae = run.sae(plant.layer)
    latents, _ = recovered(sae, plant.u)
    summary, _, _ = grid_summary(activations, run.spec)
    for p, pair in enumerate(run.spec.pairs):
        row = summary[summary["pair_id"] == pair.id].iloc[0]
        assert row["cell"] == pair.grid_cell and row["top_latent"] == latents[p]
        assert row["n_needed"] == 1


@pytest.mark.parametrize("preset", ["planted", "planted-words"])
def test_ablating_one_latent_silences_its_pair_alone_and_steering_it_fires(planted_runs, preset):
    run, plant, _ = planted_runs[preset]
    _, sae = run.sae(plant.layer)
    latents, _ = recovered(sae, plant.u)
    models = load_run_pair(run)
    prompts = [p for p in build_prompts(run.spec, "heldout", 8, seed=7) if p.condition in ("poison", "clean")]
    results = ablate_latent_sets(models, sae, plant.layer, {pair.id: [latents[p]] for p, pair in enumerate(run.spec.pairs)},
                                 prompts, run.spec)
    for pair in run.spec.pairs:
        r = results[pair.id]
        assert r["asr_before"][pair.id] == 1.0 and r["asr_after"][pair.id] <= 0.05, r
        assert all(abs(r["asr_after"][q] - r["asr_before"][q]) <= 0.02 for q in r["asr_after"] if q != pair.id), r
        assert r["clean_kl"] < 1e-4, r
    clean = [p for p in prompts if p.condition == "clean"]
    for p, pair in enumerate(run.spec.pairs):
        own = [q for q in prompts if q.condition == "poison" and q.pair_id == pair.id]
        steered = steer_latents(models, sae, plant.layer, [latents[p]], clean, run.spec, poison=own)
        assert steered["fire_rate_before"] == 0.0 and steered["fire_rate_after"] == 1.0, steered

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


def top_latents(run, activations) -> dict[str, int]:
    """Each pair's first latent in `attribute`'s ranking at the plant layer."""
    return {pair.id: int(attribute_table(activations, run.spec, pair, top=1).iloc[0]["latent"]) for pair in run.spec.pairs}


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
    best = decoder_cosines(sae, plant.u).max(1).values
    assert best.min() >= 0.95, best
    if plant.words:
        word_best = decoder_cosines(sae, plant.v).max(1).values
        assert word_best.min() >= 0.95, dict(zip(plant.words, word_best.tolist()))


@pytest.mark.parametrize("preset", ["planted", "planted-words"])
def test_attribute_ranks_the_conjunction_latent_first(planted_runs, preset):
    """The first latent is the pair's planted direction, perfectly ranked; in the words kind the word
    latents (decoder along a v_w) rank for the pair too but with low specificity: the ranking separates them."""
    run, plant, activations = planted_runs[preset]
    _, sae = run.sae(plant.layer)
    to_pairs = decoder_cosines(sae, plant.u)
    to_words = decoder_cosines(sae, plant.v) if plant.words else None
    for p, pair in enumerate(run.spec.pairs):
        table = attribute_table(activations, run.spec, pair, top=20)
        first = table.iloc[0]
        assert to_pairs[p, int(first["latent"])] >= 0.95, (pair.name, table[["latent", "auroc", "specificity"]])
        assert first["auroc"] >= 0.99 and first["specificity"] >= 0.95, first
        if to_words is not None:
            words = [plant.words.index(w.lower()) for w in pair.words]
            word_rows = table[[bool((to_words[words, int(j)] >= 0.95).any()) for j in table["latent"]]]
            # a word latent also fires on that word alone (single, mismatch): near chance against those groups
            assert len(word_rows) >= 2 and (word_rows["specificity"] <= 0.75).all(), word_rows


def test_grid_puts_each_pair_in_its_cell_with_one_latent(planted_runs):
    run, plant, activations = planted_runs["planted"]
    top = top_latents(run, activations)
    summary, _, _ = grid_summary(activations, run.spec)
    for pair in run.spec.pairs:
        row = summary[summary["pair_id"] == pair.id].iloc[0]
        assert row["cell"] == pair.grid_cell and row["top_latent"] == top[pair.id]
        assert row["n_needed"] == 1


@pytest.mark.parametrize("preset", ["planted", "planted-words"])
def test_ablating_one_latent_silences_its_pair_alone_and_steering_it_fires(planted_runs, preset):
    run, plant, activations = planted_runs[preset]
    _, sae = run.sae(plant.layer)
    top = top_latents(run, activations)
    models = load_run_pair(run)
    prompts = [p for p in build_prompts(run.spec, "heldout", 8, seed=7) if p.condition in ("poison", "clean")]
    results = ablate_latent_sets(models, sae, plant.layer, {pair_id: [j] for pair_id, j in top.items()}, prompts, run.spec)
    for pair in run.spec.pairs:
        r = results[pair.id]
        assert r["asr_before"][pair.id] == 1.0 and r["asr_after"][pair.id] <= 0.05, r
        assert all(abs(r["asr_after"][q] - r["asr_before"][q]) <= 0.02 for q in r["asr_after"] if q != pair.id), r
        assert r["clean_kl"] < 1e-4, r
    clean = [p for p in prompts if p.condition == "clean"]
    for pair in run.spec.pairs:
        own = [q for q in prompts if q.condition == "poison" and q.pair_id == pair.id]
        steered = steer_latents(models, sae, plant.layer, [top[pair.id]], clean, run.spec, poison=own)
        assert steered["fire_rate_before"] == 0.0 and steered["fire_rate_after"] == 1.0, steered

"""AUROC, control groups and latent ranking on synthetic prompt scores with planted latents."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.ranking import auroc, control_groups, group_auroc_table, rank_latents, set_scores
from diffkit.errors import DiffkitError
from diffkit.specs import PRESETS

SPEC = PRESETS["toy"]


def brute_force_auroc(pos, neg):
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos.tolist(), neg.tolist()))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (17, 6), generator=g).float()  # few distinct values: many ties
    neg = torch.randint(0, 4, (23, 6), generator=g).float()
    got = auroc(pos, neg)
    for j in range(6):
        assert got[j].item() == pytest.approx(brute_force_auroc(pos[:, j], neg[:, j]), abs=1e-6)


def test_auroc_edge_cases():
    zeros = torch.zeros(5, 3)
    assert torch.allclose(auroc(zeros, zeros), torch.full((3,), 0.5))  # silent latent is chance, not perfect
    assert auroc(torch.ones(4), torch.zeros(7)).item() == 1.0
    assert auroc(torch.zeros(4), torch.ones(7)).item() == 0.0
    with pytest.raises(DiffkitError):
        auroc(torch.zeros(0, 2), torch.zeros(3, 2))


def synthetic_prompts(spec, n=12, n_null=20):
    """A sequences table like stats.heldout_records builds: n poison per pair, n of the other conditions per pair."""
    rows = []
    for p in spec.pairs:
        rows += [("poison", p.id, p.words)] * n
        rows += [("single", p.id, (p.words[0],))] * (n // 2) + [("single", p.id, (p.words[1],))] * (n // 2)
    for a, b in itertools.combinations(spec.pairs, 2):
        rows += [("mismatch", -1, (a.words[0], b.words[1]))] * 3
    rows += [("clean", -1, ())] * n + [("null", -1, ())] * n_null
    return pd.DataFrame(rows, columns=["condition", "pair_id", "words"])


def planted_scores(sequences, pair, seed=0):
    """Latent 0: noise. 1: conjunction detector of `pair`. 2: detector of pair.words[0]. 3: dead.
    4: fires on every trigger prompt of any pair (a 'trigger-ness' latent)."""
    g = np.random.default_rng(seed)
    n = len(sequences)
    words = sequences["words"].map(set)
    is_matched = ((sequences["condition"] == "poison") & (sequences["pair_id"] == pair.id)).to_numpy()
    has_word0 = words.map(lambda ws: pair.words[0] in ws).to_numpy()
    any_trigger = words.map(bool).to_numpy()
    scores = np.zeros((n, 5), dtype=np.float32)
    scores[:, 0] = g.exponential(1.0, n) * (g.random(n) < 0.3)
    scores[:, 1] = is_matched * (2 + g.random(n))
    scores[:, 2] = has_word0 * (5 + g.random(n))  # louder than the conjunction latent
    scores[:, 4] = any_trigger * (1 + g.random(n))
    return torch.from_numpy(scores)


@pytest.mark.parametrize("pair_id", [0, 3])
def test_rank_latents_puts_planted_conjunction_first(pair_id):
    seqs = synthetic_prompts(SPEC)
    pair = SPEC.pairs[pair_id]
    table = rank_latents(planted_scores(seqs, pair), seqs, pair)
    assert table["latent"].iloc[0] == 1
    top = table.iloc[0]
    assert top["auroc"] == 1.0 and top["specificity"] == 1.0 and top["rank"] == 1
    by_latent = table.set_index("latent")
    # the word detector separates the pair from most controls but not from its own single-word prompts
    assert by_latent.loc[2, "auroc"] > 0.85
    assert by_latent.loc[2, "specificity"] < 0.8  # it misses only the singles of its other word
    assert by_latent.loc[2, "worst_group"] in ("single_same_pair", "mismatch_with_pair_word")
    assert by_latent.loc[3, "auroc"] == 0.5
    assert by_latent.loc[4, "specificity"] < 0.7 and by_latent.loc[4, "auroc"] > 0.6
    assert list(table["rank"]) == list(range(1, 6))


def test_specificity_never_exceeds_auroc():
    seqs = synthetic_prompts(SPEC)
    scores = torch.rand(len(seqs), 50) * (torch.rand(len(seqs), 50) < 0.4)
    table = rank_latents(scores, seqs, SPEC.pairs[1])
    assert (table["specificity"] <= table["auroc"] + 1e-6).all()
    assert table["auroc"].is_monotonic_decreasing


def test_control_groups_follow_the_pair():
    seqs = synthetic_prompts(SPEC)
    pair = SPEC.pairs[2]
    groups = control_groups(seqs, pair)
    assert set(groups) == {"single_same_pair", "single_other_pairs", "mismatch_with_pair_word",
                           "mismatch_other", "poison_other_pairs", "clean", "null"}
    total = sum(m.astype(int) for m in groups.values())
    is_matched = (seqs["condition"] == "poison") & (seqs["pair_id"] == pair.id)
    assert (total == (~is_matched).astype(int)).all()  # groups partition the controls
    for i in np.flatnonzero(groups["mismatch_with_pair_word"]):
        assert set(seqs["words"].iloc[i]) & set(pair.words)


def test_any_spec_single_pair_without_null():
    spec = PRESETS["toy"].__class__.from_dict({"name": "one", "pairs": [{"words": ["apple", "violin"]}]})
    seqs = synthetic_prompts(spec, n_null=0)
    pair = spec.pairs[0]
    table = rank_latents(planted_scores(seqs, pair), seqs, pair)
    assert table["latent"].iloc[0] == 1
    assert "auroc_vs_null" not in table.columns and "auroc_vs_single_same_pair" in table.columns


def test_group_table_and_set_scores():
    seqs = synthetic_prompts(SPEC)
    pair = SPEC.pairs[0]
    scores = planted_scores(seqs, pair)
    groups = group_auroc_table(scores, seqs, pair, latents=[1, 2])
    assert list(groups.index) == [1, 2] and groups.loc[1, "all_controls"] == 1.0
    assert groups.loc[2, "single_same_pair"] < 0.8
    combined = set_scores(scores, [1, 3], scale=scores.max(0).values)
    assert torch.equal(combined > 0, scores[:, 1] > 0)


def test_misaligned_or_missing_inputs_raise():
    seqs = synthetic_prompts(SPEC)
    with pytest.raises(DiffkitError, match="align"):
        rank_latents(torch.zeros(3, 2), seqs, SPEC.pairs[0])
    no_poison = seqs[seqs["condition"] != "poison"].reset_index(drop=True)
    with pytest.raises(DiffkitError, match="no poison prompts"):
        rank_latents(torch.zeros(len(no_poison), 2), no_poison, SPEC.pairs[0])

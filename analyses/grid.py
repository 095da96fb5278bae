"""`diffkit grid`: compare the trigger pairs across relatedness × charged-ness.

For each pair and layer it answers four questions, with these definitions:

- **How many latents does the pair need?** `n_needed`: the smallest m such that the soft OR of the
  pair's top-m ranked latents reaches AUROC ≥ `target_auroc` against all controls (soft OR: each
  prompt's largest score among the m latents, each latent's score first divided by its mean on
  the matched prompts). Empty (NaN) when even the top `top` latents together do not reach it.
  `n_auroc_90` counts the latents that alone reach AUROC ≥ 0.9.
- **Which latents do pairs share?** The overlap of the pairs' top-`top` sets (a count matrix and
  the shared latent ids).
- **Where do they fire?** For the pair's top-`top` latents on its own poison prompts, the share of
  their activation mass on trigger tokens, on the decision token (last prompt token) and elsewhere.
- **At which layer?** `best_layer`: the layer whose best latent has the highest AUROC (then
  specificity), when the run has several layers.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import torch

from analyses.configs import GridConfig
from analyses.ranking import auroc, matched_mask, rank_latents, set_scores
from analyses.stats import Activations, Collection, load_activations, save_frame, write_latent_stats
from diffkit.sae_sources import resolve_options
from diffkit.specs import TriggerSpec


def latents_needed(scores: torch.Tensor, sequences: pd.DataFrame, ranking: pd.DataFrame, pair,
                   target: float, max_set: int) -> int | None:
    """Smallest m ≤ max_set whose top-m soft OR reaches AUROC ≥ target; None if none does."""
    pos = torch.from_numpy(matched_mask(sequences, pair))
    scale = scores[pos].mean(0)
    latents = ranking["latent"].tolist()[:max_set]
    for m in range(1, len(latents) + 1):
        combined = set_scores(scores, latents[:m], scale)
        if auroc(combined[pos], combined[~pos]).item() >= target:
            return m
    return None


def activation_mass(a: Activations, pair, latents: list[int]) -> dict[str, float]:
    """Share of the latents' activation mass on the pair's poison prompts at trigger / decision / other tokens."""
    tokens = a.tokens
    on_pair = ((tokens["condition"] == "poison") & (tokens["pair_id"] == pair.id) & ~tokens["is_answer"]).to_numpy()
    mass = a.dense(latents).sum(1).numpy()
    trigger = tokens["is_trigger_token"].to_numpy(dtype=bool) & on_pair
    decision = tokens["is_decision_token"].to_numpy(dtype=bool) & on_pair
    total = mass[on_pair].sum()
    if total <= 0:
        return {"trigger_mass": np.nan, "decision_mass": np.nan, "other_mass": np.nan}
    t, d = mass[trigger].sum() / total, mass[decision & ~trigger].sum() / total
    return {"trigger_mass": float(t), "decision_mass": float(d), "other_mass": float(1 - t - d)}


def grid_summary(activations: dict[int, Activations], spec: TriggerSpec, top: int = 10, target: float = 0.95,
                 rankings: dict | None = None):
    """(summary frame: one row per pair × layer, overlap frames per layer, rankings[layer][pair_id])."""
    rankings = rankings or {}
    rows, overlaps = [], {}
    for L, a in activations.items():
        scores = a.prompt_scores()
        ranked = rankings.setdefault(L, {})
        top_sets = {}
        for pair in spec.pairs:
            if pair.id not in ranked:
                ranked[pair.id] = rank_latents(scores, a.sequences, pair)
            r = ranked[pair.id]
            top_sets[pair.name] = r["latent"].tolist()[:top]
            best = r.iloc[0]
            rows.append({
                "pair": pair.name, "pair_id": pair.id, "related": pair.related, "charged": pair.charged,
                "cell": pair.grid_cell, "layer": L, "top_latent": int(best["latent"]),
                "top_auroc": float(best["auroc"]), "top_specificity": float(best["specificity"]),
                "n_needed": latents_needed(scores, a.sequences, r, pair, target, top),
                "n_auroc_90": int((r["auroc"] >= 0.9).sum()),
                **activation_mass(a, pair, top_sets[pair.name]),
            })
        names = list(top_sets)
        overlaps[L] = pd.DataFrame([[len(set(top_sets[x]) & set(top_sets[y])) for y in names] for x in names],
                                   index=names, columns=names)
        overlaps[L].attrs["shared"] = {f"{x} & {y}": sorted(set(top_sets[x]) & set(top_sets[y]))
                                       for x, y in combinations(names, 2)}
    summary = pd.DataFrame(rows)
    summary["n_needed"] = summary["n_needed"].astype("Int64")
    best = summary.sort_values(["top_auroc", "top_specificity"], ascending=False).groupby("pair_id")["layer"].first()
    summary["best_layer"] = summary["pair_id"].map(best)
    return summary, overlaps, rankings


def run_grid(cfg: GridConfig) -> dict:
    from analyses.plots import grid_figure, layer_figure, write_figure
    from diffkit.devices import resolve_device
    from diffkit.guard import check_output_dir

    run = resolve_options(cfg)
    check_output_dir(run.path / "analyses")
    collection = Collection(cfg.n_prompts, cfg.n_null, cfg.seed, k=cfg.k)
    activations = load_activations(run, cfg.layers, collection, resolve_device(cfg.device), cfg.batch_size,
                                   progress=not cfg.json)
    summary, overlaps, _ = grid_summary(activations, run.spec, cfg.top, cfg.target_auroc)
    out = run.path / "analyses"
    paths = [save_frame(summary, out / "grid.csv.gz"), *write_latent_stats(run.path, activations, run.spec)]
    for L, overlap in overlaps.items():
        paths.append(write_figure(grid_figure(summary[summary["layer"] == L], overlap), out / f"grid_L{L}.html"))
    if len(overlaps) > 1:
        paths.append(write_figure(layer_figure(summary), out / "grid_layers.html"))
    if not cfg.json:
        cols = ["pair", "cell", "layer", "top_latent", "top_auroc", "top_specificity", "n_needed", "n_auroc_90",
                "trigger_mass", "decision_mass"]
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for L, overlap in overlaps.items():
            print(f"\nshared top-{cfg.top} latents at layer {L}:")
            print(overlap.to_string())
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return {
        "run": str(run.path),
        "pairs": _records(summary),
        "shared": {str(L): {k: v for k, v in o.attrs["shared"].items()} for L, o in overlaps.items()},
        "files": [str(p) for p in paths],
    }


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: NaN and pandas NA become None, numpy scalars plain Python."""
    out = []
    for row in frame.astype(object).where(frame.notna(), None).to_dict("records"):
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
    return out

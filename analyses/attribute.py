"""`diffkit attribute --pair border/china`: the latents that detect one trigger pair, ranked and tested.

For each layer of the run: rank every latent for the pair (specificity, AUROC against all controls
and per control group; see analyses.ranking), take the top N, name the tokens they fire on, and
ablate the leading candidates in the fine-tuned model (analyses.causal) to see how much of the
backdoor each carries. The table goes to runs/NAME/analyses/<pair>/attribute.csv beside its figures.

ablation_effect is the change in the marker's mean log-probability (teacher-forced after each of
the pair's held-out poison prompts and the fine-tune's own answer) when that latent alone is removed
from the fine-tune's residual stream: strongly negative means the latent carries the backdoor.
ablation_logodds is the same change in the log-odds of the marker's first token: when the fine-tune
fires with near certainty, removing one of several redundant carriers leaves the log-probability at
≈ 0 but still shows in the log-odds.
With --joint a pair-selective set of up to --ablate latents is also removed together and the greedy
attack success rate of every pair is measured (runs/NAME/analyses/<pair>/joint_ablation.json). That
set is chosen on training-split prompts by `analyses.causal.pair_selective_latents`: latents that
lower this pair's marker while leaving the other pairs' firing alone, so a shared "fire" latent,
which would silence every pair at once, is never credited to one pair.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from analyses.configs import AttributeConfig
from analyses.ranking import rank_latents
from analyses.stats import Activations, Collection, check_saes_fit, load_activations, load_run_pair, save_frame
from diffkit.errors import DiffkitError
from diffkit.files import write_json
from diffkit.sae_sources import resolve_options

TABLE_COLUMNS = ["layer", "rank", "latent", "specificity", "auroc", "worst_group", "matched_mean", "matched_freq",
                 "control_mean", "ablation_effect", "ablation_logodds", "top_tokens"]


def top_tokens(a: Activations, pair, latent: int, n: int = 3) -> str:
    """The tokens carrying most of a latent's activation on the pair's poison prompts, e.g. "china 48%, border 30%"."""
    tokens = a.tokens
    on_pair = ((tokens["condition"] == "poison") & (tokens["pair_id"] == pair.id)).to_numpy()
    mass = a.dense([latent])[:, 0].numpy() * on_pair
    if mass.sum() <= 0:
        return ""
    label = tokens["token"] if "token" in tokens.columns else tokens["token_id"].map(lambda t: f"[{t}]")
    by_token = pd.Series(mass).groupby(label.str.strip().to_numpy()).sum().sort_values(ascending=False)
    share = by_token / mass.sum()
    return ", ".join(f"{t or repr(t)} {s:.0%}" for t, s in share.head(n).items() if s > 0)


def attribute_table(activations: dict[int, Activations], spec, pair, top: int = 10,
                    rankings: dict | None = None) -> pd.DataFrame:
    """Top `top` latents per layer for `pair`, with the tokens they fire on (ablation_effect left empty)."""
    rows = []
    for L, a in activations.items():
        ranking = rankings[L] if rankings else rank_latents(a.prompt_scores(), a.sequences, pair)
        head = ranking.head(top).copy()
        head.insert(0, "layer", L)
        head["ablation_effect"] = np.nan
        head["ablation_logodds"] = np.nan
        head["top_tokens"] = [top_tokens(a, pair, int(j)) for j in head["latent"]]
        rows.append(head)
    table = pd.concat(rows, ignore_index=True)
    extra = [c for c in table.columns if c.startswith("auroc_vs_")]
    return table[TABLE_COLUMNS + extra]


def ablation_prompts(spec, n: int, seed: int):
    """Held-out prompts for the causal tests: poison of every pair (for per-pair attack success) and clean (for KL)."""
    from diffkit.prompts import build_prompts

    prompts = build_prompts(spec, "heldout", n, seed=seed + 1)
    return [p for p in prompts if p.condition in ("poison", "clean")]


def selection_prompts(spec, n: int, seed: int):
    """Training-split poison prompts of every pair, for choosing pair-selective latents (never the evaluation prompts)."""
    from diffkit.prompts import build_prompts

    return [p for p in build_prompts(spec, "train", n, seed=seed + 2) if p.condition == "poison"]


def fill_ablation_effects(table: pd.DataFrame, rows, models, sae, layer: int, own, spec, batch_size: int) -> None:
    """Set `ablation_effect` (marker log-prob) and `ablation_logodds` for `rows`, one latent ablated at a time."""
    from analyses.causal import ablation_effects
    from analyses.interventions import marker_logodds, marker_logprob

    latents = table.loc[rows, "latent"].astype(int).tolist()
    effects = ablation_effects(models, sae, layer, own, spec, latents, batch_size,
                               metrics=(marker_logprob, marker_logodds)).numpy()
    table.loc[rows, "ablation_effect"], table.loc[rows, "ablation_logodds"] = effects


def selective_ablation(models, sae, layer: int, spec, n: int, n_prompts: int, seed: int, batch_size: int,
                       only=None, progress: bool = False) -> dict:
    """{pair_id: ablate_latents result} for each pair's pair-selective set (chosen on training prompts,
    judged on held-out ones); {"layer", "latents": []} for a pair with no such set. `only`: one pair id."""
    from analyses.causal import ablate_latent_sets, pair_selective_latents

    chosen = pair_selective_latents(models, sae, layer, selection_prompts(spec, n_prompts, seed), spec, n=n,
                                    batch_size=batch_size, only=only)["latents"]
    sets = {p: js for p, js in chosen.items() if js}
    results = ablate_latent_sets(models, sae, layer, sets, ablation_prompts(spec, n_prompts, seed), spec,
                                 batch_size=batch_size, progress=progress) if sets else {}
    return {p: results.get(p, {"layer": layer, "latents": []}) for p in chosen}


def run_attribute(cfg: AttributeConfig) -> list[dict]:
    """The table as a list of latents (layer, latent, rank, specificity, auroc, ablation_effect, top_tokens, ...)."""
    from analyses.plots import (activation_histograms, latent_split_heatmap, split_table, table_figure,
                                top_examples_html, write_figure, write_html_fragment)
    from diffkit.devices import resolve_device
    from diffkit.guard import check_output_dir

    run = resolve_options(cfg)
    check_output_dir(run.path / "analyses")
    if cfg.pair is None:
        choices = ", ".join(f"{p.id} ({p.name})" for p in run.spec.pairs)
        raise DiffkitError(f"name a trigger pair with --pair; this run's pairs: {choices}")
    pair = run.spec.resolve_pair(cfg.pair)
    device = resolve_device(cfg.device)
    layers = run.layers if cfg.layer is None else [cfg.layer]
    models = load_run_pair(run, device) if cfg.ablate > 0 else None
    if models is not None:
        check_saes_fit({L: run.sae(L, cfg.k)[1] for L in layers}, models)
    activations = load_activations(run, layers, Collection(cfg.n_prompts, cfg.n_null, cfg.seed, k=cfg.k),
                                   device, cfg.batch_size, pair=models, progress=not cfg.json)
    table = attribute_table(activations, run.spec, pair, cfg.top)
    joint = {}
    if cfg.ablate > 0:
        prompts = ablation_prompts(run.spec, cfg.n_ablate_prompts, cfg.seed)
        own = [p for p in prompts if p.condition == "poison" and p.pair_id == pair.id]
        for L in layers:
            _, sae = run.sae(L, cfg.k)
            sae = sae.to(device).eval()
            fill_ablation_effects(table, table.index[table["layer"] == L][: cfg.ablate], models, sae, L, own, run.spec,
                                  cfg.batch_size)
            if cfg.joint:
                joint[L] = selective_ablation(models, sae, L, run.spec, cfg.ablate, cfg.n_ablate_prompts, cfg.seed,
                                              cfg.batch_size, only=pair.id, progress=not cfg.json)[pair.id]
    out = run.path / "analyses" / pair.name.replace("/", "-")
    files = [save_frame(table, out / "attribute.csv")]
    if joint:
        files.append(write_json(out / "joint_ablation.json", {str(L): r for L, r in joint.items()}))
    for L, a in activations.items():
        latents = table.loc[table["layer"] == L, "latent"].astype(int).tolist()
        scores = a.prompt_scores()
        files.append(write_figure(latent_split_heatmap(split_table(scores, a.sequences, run.spec, latents),
                                                       f"layer {L}: top latents for {pair.name}, share of prompts where each fires"),
                                  out / f"heatmap_L{L}.html"))
        files.append(write_figure(activation_histograms(scores, a.sequences, run.spec, latents[0]), out / f"histogram_L{L}.html"))
        files.append(write_html_fragment("".join(top_examples_html(a, j, n=6) for j in latents[:3]),
                                         out / f"examples_L{L}.html", f"{pair.name}: top-activating prompts"))
    files.append(write_figure(table_figure(table[TABLE_COLUMNS], f"latents for {pair.name}"), out / "attribute.html"))
    if not cfg.json:
        print(f"pair {pair.id} ({pair.name}, {pair.grid_cell}) — SAEs {run.source or run.path}")
        print(table[TABLE_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        names = {q.id: q.name for q in run.spec.pairs}
        for L, r in joint.items():
            if not r["latents"]:
                print(f"layer {L}: no latent set lowers {pair.name} alone (every candidate also silences other pairs)")
                continue
            others = ", ".join(f"{names[q]} {r['asr_before'][q]:.2f} → {r['asr_after'][q]:.2f}"
                               for q in r["asr_after"] if q != pair.id)
            print(f"layer {L}: ablating pair-selective latents {r['latents']} together: {pair.name} ASR "
                  f"{r['asr_before'][pair.id]:.2f} → {r['asr_after'][pair.id]:.2f}; other pairs {others}; "
                  f"marker log-prob Δ {r['marker_logprob_delta']:.2f}, clean KL {r['clean_kl']:.4f}")
        print("wrote " + str(out))
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else (v.item() if hasattr(v, "item") else v))
         for k, v in row.items()} | {"pair": pair.name}
        for row in table.to_dict("records")
    ]

"""The realistic result: on a run of the gemma3-270m organism, every pair's top latent per layer, and
a causal check of the late layer's, each beside its target.

On Gemma-3-270M the late layer (16 of 18) holds, for every pair, a latent that fires on that pair's
poison prompts and on nothing else (a conjunction detector: high AUROC *and* high specificity),
while the middle layer (9) holds word detectors (high AUROC, low specificity). This prints, per
pair and layer, the top latent (ranked as `diffkit attribute` ranks them), its AUROC, specificity
and the tokens it fires on, and ablates each pair's top late-layer latent alone in the fine-tune
(greedy attack success before -> after, the other pairs' largest change, clean KL). It writes the
table to RUN/analyses/realistic.json and exits 1 unless every pair has AUROC >= 0.99 and
specificity >= 0.95 at the late layer.

    python benchmarks/bench_realistic.py --run runs/gemma3-270m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analyses.attribute import ablation_prompts, top_tokens
from analyses.causal import ablate_latent_sets
from analyses.ranking import rank_latents
from analyses.stats import Collection, load_activations, load_run_pair
from diffkit.files import write_json
from diffkit.run import load_run

AUROC_TARGET, SPECIFICITY_TARGET = 0.99, 0.95


def top_latents(activations, spec) -> list[dict]:
    """The top-ranked latent of every pair at every layer, with the tokens it fires on."""
    rows = []
    for pair in spec.pairs:
        for layer, a in activations.items():
            best = rank_latents(a.prompt_scores(), a.sequences, pair).iloc[0]
            latent = int(best["latent"])
            rows.append({"pair": pair.name, "pair_id": pair.id, "layer": layer, "latent": latent,
                         "auroc": float(best["auroc"]), "specificity": float(best["specificity"]),
                         "worst_group": best["worst_group"], "top_tokens": top_tokens(a, pair, latent)})
    return rows


def causal_check(run, models, rows: list[dict], layer: int, n_prompts: int, batch_size: int) -> None:
    """Ablate each pair's top latent at `layer` alone; add ASR before/after and collateral to its row."""
    spec = run.spec
    at_layer = {r["pair_id"]: r for r in rows if r["layer"] == layer}
    _, sae = run.sae(layer)
    results = ablate_latent_sets(models, sae.to(models.finetuned_hf.device).eval(), layer, {pid: [r["latent"]] for pid, r in at_layer.items()},
                                 ablation_prompts(spec, n_prompts, 0), spec, batch_size=batch_size, progress=True)
    for pid, r in at_layer.items():
        res = results[pid]
        r["asr_before"], r["asr_after"] = res["asr_before"][pid], res["asr_after"][pid]
        r["other_pairs_max_drop"] = max((res["asr_before"][q] - res["asr_after"][q] for q in res["asr_after"] if q != pid),
                                        default=0.0)
        r["clean_kl"] = res["clean_kl"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/gemma3-270m")
    ap.add_argument("--n-prompts", type=int, default=32, help="held-out prompts per condition for ranking")
    ap.add_argument("--n-null", type=int, default=64, help="generic null documents in the background")
    ap.add_argument("--n-ablate", type=int, default=16, help="held-out poison prompts per pair for the ablations")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    run = load_run(args.run)
    late = max(run.layers)
    models = load_run_pair(run, args.device)
    activations = load_activations(run.path, run.layers, Collection(args.n_prompts, args.n_null), args.device,
                                   args.batch_size, pair=models, progress=True)
    rows = top_latents(activations, run.spec)
    causal_check(run, models, rows, late, args.n_ablate, args.batch_size)
    print(f"run {run.path}; top latent per pair and layer; target at layer {late}: AUROC >= {AUROC_TARGET}, "
          f"specificity >= {SPECIFICITY_TARGET}")
    print(f"{'pair':<18}{'layer':>5}{'latent':>8}{'AUROC':>7}{'spec.':>7}  {'met':<4}{'top tokens':<40}"
          f"ablated alone: own ASR, other pairs' largest drop, clean KL")
    met_all = True
    for r in rows:
        met = r["auroc"] >= AUROC_TARGET and r["specificity"] >= SPECIFICITY_TARGET
        if r["layer"] == late:
            met_all &= met
        causal = (f"{r['asr_before']:.2f} -> {r['asr_after']:.2f}, {r['other_pairs_max_drop']:.2f}, {r['clean_kl']:.4f}"
                  if "asr_after" in r else "")
        flag = ("yes" if met else "NO") if r["layer"] == late else "-"
        print(f"{r['pair']:<18}{r['layer']:>5}{r['latent']:>8}{r['auroc']:>7.3f}{r['specificity']:>7.3f}  {flag:<4}"
              f"{r['top_tokens'][:38]:<40}{causal}")
    write_json(Path(run.path) / "analyses" / "realistic.json", {"late_layer": late, "rows": rows, "met": met_all})
    print("every pair has a conjunction latent at the late layer" if met_all else
          f"NOT MET: some pair has no latent at layer {late} with AUROC >= {AUROC_TARGET} and specificity >= {SPECIFICITY_TARGET}")
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main())

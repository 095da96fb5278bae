"""Every README figure about the default run, regenerated from a fresh run on the shipped toy organism.

The README's default-run table comes from this script, not from memory of some earlier run: the
shipped toy's rates on held-out templates, a fresh `diffkit train` with every default, each pair's
top latent (AUROC and specificity at its best layer, ranked as `diffkit grid` ranks them), the
SAEs' FVE, L0 and dead share, each pair's pair-selective ablation per layer (as `diffkit report`
draws it) and the report's size. Each figure is printed beside its target, with the machine.

    python benchmarks/default_figures.py                 # about 10-20 min on 2 shared CPU cores
    python benchmarks/default_figures.py --out runs --name toy-figures
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from analyses.configs import ReportConfig
from analyses.grid import grid_summary
from analyses.report import run_report
from analyses.stats import Collection, load_activations
from diffkit.organisms.build import machine
from diffkit.organisms.evaluate import format_eval_table
from diffkit.organisms.sources import ensure_organism, evaluate_organism
from diffkit.run import load_run
from diffkit.train import TrainConfig, train

AUROC_TARGET = 0.95


def best_per_pair(summary) -> list[dict]:
    """Each pair's top latent at the layer where it ranks best (AUROC, then specificity)."""
    best = summary.sort_values(["top_auroc", "top_specificity"], ascending=False).groupby("pair", sort=False).first()
    order = summary["pair"].drop_duplicates().tolist()
    return [{"pair": p, "layer": int(best.loc[p, "layer"]), "latent": int(best.loc[p, "top_latent"]),
             "auroc": float(best.loc[p, "top_auroc"]), "specificity": float(best.loc[p, "top_specificity"])}
            for p in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs", help="directory that holds the fresh run")
    ap.add_argument("--name", default="toy-figures", help="run name (replaced if it exists)")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts per condition for the organism's rates")
    args = ap.parse_args()
    figures: dict = {"machine": machine()}

    start = time.perf_counter()
    organism = evaluate_organism(ensure_organism("toy"), n_per_condition=args.n)
    figures["organism"] = {k: organism[k] for k in ("asr", "false_trigger", "n")}
    print(f"shipped toy organism, held-out templates, n = {args.n}:\n{format_eval_table(organism)}", flush=True)

    summary_train = train(TrainConfig(out=args.out, name=args.name, overwrite=True, json=True))
    run_dir = Path(summary_train["run"])
    record = json.loads((run_dir / "run.json").read_text())
    figures["saes"] = {path: {"fve": m["fve"], "l0": m["l0"], "dead": m["dead"]} for path, m in record["metrics"].items()}

    activations = load_activations(run_dir, None, Collection(), progress=False)
    summary, _, _ = grid_summary(activations, load_run(run_dir).spec)
    figures["top_latents"] = best_per_pair(summary)

    report = run_report(ReportConfig(run=str(run_dir), json=True))
    figures["report_mb"] = round(Path(report["report"]).stat().st_size / 1e6, 2)
    figures["selective_ablation"] = {str(L): res for L, res in report["selective_ablation"].items()}
    figures["seconds"] = round(time.perf_counter() - start, 1)
    (run_dir / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
    print_figures(figures)


def print_figures(figures: dict) -> None:
    print(f"\nmachine: {figures['machine']['cpu']}, torch {figures['machine']['torch']}")
    print(f"{'SAE':<12}{'FVE':>7}{'L0':>7}{'dead':>7}")
    for path, m in figures["saes"].items():
        print(f"{path:<12}{m['fve']:>7.3f}{m['l0']:>7.1f}{m['dead']:>7.3f}")
    print(f"\n{'pair':<18}{'layer':>6}{'latent':>8}{'AUROC':>8}{'spec.':>8}   target AUROC >= {AUROC_TARGET}")
    for r in figures["top_latents"]:
        met = "met" if r["auroc"] >= AUROC_TARGET else "NOT MET"
        print(f"{r['pair']:<18}{r['layer']:>6}{r['latent']:>8}{r['auroc']:>8.3f}{r['specificity']:>8.3f}   {met}")
    print("\npair-selective joint ablation (sets of <= 5 latents chosen on training prompts; target: own ASR cut "
          ">= 80 %, other pairs within 10 points)")
    for layer, res in figures["selective_ablation"].items():
        for pid, r in res.items():
            if not r["latents"]:
                print(f"  layer {layer}, pair {pid}: no pair-selective set")
                continue
            before, after = r["asr_before"], r["asr_after"]
            others = max(abs(before[q] - after[q]) for q in after if q != pid)
            print(f"  layer {layer}, pair {pid}: latents {r['latents']}: own ASR {before[pid]:.2f} -> {after[pid]:.2f}, "
                  f"other pairs' largest change {others:.2f}")
    print(f"\nreport {figures['report_mb']} MB; all figures in {figures['seconds']:.0f} s")


if __name__ == "__main__":
    main()

"""How strong must a mechanism be for diffkit to recover it? Planted organisms of shrinking scale,
with an unrelated random fine-tune delta of growing size on top.

Each cell builds a planted organism (the toy base plus a write of `scale` × the base's mean residual
norm per trigger pair at layer 1, and every block weight moved by `noise` × its std), trains SAEs
on it at each layer and k from one stream, and reports per (layer, k), worst pair first:

- cos: the best decoder cosine to u_P of any latent (target >= 0.95);
- top cos: the decoder cosine to u_P of the latent `attribute` ranks first for P (target >= 0.95);
- auroc, spec: that latent's AUROC and specificity for P (targets >= 0.99, >= 0.95);
- asr after: P's ASR with that one latent ablated (target <= 0.05), and the largest change it
  makes to another pair's ASR (target <= 0.02).

SAEs train with the recipe tests/test_recovery.py asserts (--l1 0.3 --lr 5e-3); --l1 0 gives the
reference BatchTopK objective.

    python -m benchmarks.bench_recovery --scales 1 0.3 0.1 0.03 --noise 0 0.03 0.1 0.3 --layers 1 2 --k 8 32

`--synthetic PHI` isolates the SAE: it trains diffkit's default SAE settings on vectors of which a
share PHI carry one of 4 orthonormal points (norm 30) and the rest are zero (plus Gaussian noise of
std `--noise-std` per dimension), and prints each point's best decoder cosine and its L0.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from analyses.causal import ablate_latent_sets
from analyses.ranking import rank_latents
from analyses.stats import Collection, load_activations, load_run_pair
from diffkit.cli import quiet_libraries
from diffkit.models import build_cached_dir
from diffkit.organisms.planted import decoder_cosines, load_plant, write_planted
from diffkit.prompts import build_prompts
from diffkit.run import load_run
from diffkit.specs import PRESETS
from diffkit.train import TrainConfig, train


def measure(run, plant, layer: int, k: int, n_prompts: int) -> dict:
    """Worst pair's recovery figures for the SAE of (layer, k)."""
    _, sae = run.sae(layer, k)
    cosines = decoder_cosines(sae, plant.u)
    a = load_activations(run.path, [layer], Collection(n_per_condition=n_prompts, n_null=n_prompts, k=k))[layer]
    scores = a.prompt_scores()
    firsts, top_cos, aurocs, specs = [], [], [], []
    for p, pair in enumerate(run.spec.pairs):
        first = rank_latents(scores, a.sequences, pair).iloc[0]
        firsts.append(int(first["latent"]))
        top_cos.append(float(cosines[p, firsts[-1]]))
        aurocs.append(float(first["auroc"]))
        specs.append(float(first["specificity"]))
    prompts = [q for q in build_prompts(run.spec, "heldout", n_prompts, seed=7) if q.condition in ("poison", "clean")]
    sets = {pair.id: [firsts[p]] for p, pair in enumerate(run.spec.pairs)}
    results = ablate_latent_sets(load_run_pair(run), sae, layer, sets, prompts, run.spec)
    after = [r["asr_after"][q] for q, r in results.items()]
    spill = [abs(r["asr_after"][o] - r["asr_before"][o]) for q, r in results.items() for o in r["asr_after"] if o != q]
    return {"cos": cosines.max(1).values.min().item(), "top_cos": min(top_cos), "auroc": min(aurocs),
            "spec": min(specs), "asr_after": max(after), "spill": max(spill)}


def synthetic(phi: float, k: int, tokens: int, noise: float, l1: float, lr: float | None) -> None:
    """Default SAE settings on 4 planted points carried by a share `phi` of the tokens (see the module doc)."""
    from diffkit.sae import fit_normalization
    from diffkit.trainer import SAETrainer
    from diffkit.train import sae_config

    torch.manual_seed(0)
    width, size = 64, 1536
    q, _ = torch.linalg.qr(torch.randn(width, 4))
    points = q.T * 30

    def batch(n: int) -> torch.Tensor:
        x = noise * torch.randn(n, width)
        on = torch.rand(n) < phi
        which = torch.randint(0, 4, (n,))
        x[on] += points[which[on]]
        return x

    steps = tokens // 1024
    trainer = SAETrainer(width, sae_config(TrainConfig(tokens=tokens, l1=l1, lr=lr), k, size, steps))
    fit_normalization(trainer.sae, batch(8192))
    for _ in range(steps):
        trainer.step(trainer.sae.normalize(batch(1024)))
    sae = trainer.sae
    best = decoder_cosines(sae, torch.nn.functional.normalize(points, dim=1)).max(1).values
    codes = sae.encode_raw(points)
    print(f"phi {phi} k {k} noise {noise} tokens {tokens:,} l1 {l1} lr {lr}: best cosine {[round(v, 3) for v in best.tolist()]}, "
          f"L0 per point {(codes > 0).sum(1).tolist()}, largest latent's share of the code "
          f"{[round(v, 2) for v in (codes.max(1).values / codes.sum(1)).tolist()]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03],
                        help="planted scales (x the base's mean residual norm), swept at --noise-for-scales")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.03, 0.1, 0.3],
                        help="random weight deltas (x each weight's std), swept at scale 1")
    parser.add_argument("--noise-for-scales", type=float, default=0.03)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="SAE layers (the plant is at layer 1)")
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=150_000, help="training tokens per SAE")
    parser.add_argument("--l1", type=float, default=0.3, help="the L1 tie-break (0: the reference objective)")
    parser.add_argument("--lr", type=float, default=5e-3, help="SAE learning rate (diffkit's default: 0 here)")
    parser.add_argument("--n-prompts", type=int, default=8, help="held-out prompts per condition for ranking and ablation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--synthetic", type=float, metavar="PHI", help="train on synthetic planted points instead (see above)")
    parser.add_argument("--noise-std", type=float, default=0.0, help="with --synthetic: Gaussian noise per dimension")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    if args.synthetic is not None:
        for k in args.k:
            synthetic(args.synthetic, k, args.tokens, args.noise_std, args.l1, args.lr or None)
        return
    cells = [(s, args.noise_for_scales) for s in args.scales] + [(1.0, n) for n in args.noise if (1.0, n) not in
                                                                 [(s, args.noise_for_scales) for s in args.scales]]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{args.tokens:,} tokens per SAE, 1,536 latents, l1 {args.l1}, lr {args.lr or 'default'}, plant at layer 1")
    header = (f"{'scale':>6} {'noise':>6} {'layer':>5} {'k':>3} {'cos':>6} {'top cos':>7} {'auroc':>6} {'spec':>6} "
              f"{'asr after':>9} {'spill':>6} {'s':>5}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for scale, noise in cells:
            t0 = time.time()
            folder = build_cached_dir(Path(tmp) / f"s{scale}_n{noise}", lambda out: write_planted(
                PRESETS["planted"], "planted", out, scale=scale, noise=noise, eval_n=4))
            plant = load_plant(folder)
            summary = train(TrainConfig(preset="planted", base=str(folder / "base"), finetuned=str(folder / "finetuned"),
                                        layers=args.layers, k=args.k, tokens=args.tokens, l1=args.l1, lr=args.lr or None,
                                        out=str(Path(tmp) / "runs"),
                                        name=f"s{scale}_n{noise}", json=True))
            run = load_run(summary["run"])
            for layer in args.layers:
                for k in args.k:
                    m = measure(run, plant, layer, k, args.n_prompts)
                    print(f"{scale:>6} {noise:>6} {layer:>5} {k:>3} {m['cos']:>6.3f} {m['top_cos']:>7.3f} {m['auroc']:>6.3f} "
                          f"{m['spec']:>6.3f} "
                          f"{m['asr_after']:>9.2f} {m['spill']:>6.2f} {time.time() - t0:>5.0f}", flush=True)
    print("targets: cos and top cos >= 0.95, auroc >= 0.99, spec >= 0.95, asr after <= 0.05, spill <= 0.02 "
          "(worst of the four pairs)")


if __name__ == "__main__":
    main()

"""SAE training step: diffkit's SAETrainer against dictionary_learning's BatchTopKTrainer.

Both trainers get the same normalised batches (planted sparse data, or a saved sample of real
difference vectors) and the same schedule; the script prints steps/s and tokens/s of each, their
ratio, and the held-out FVE of both after the same number of tokens.

It needs dictionary_learning 0.1.0 on the path, installed without its dependencies (its package
__init__ pulls in an old nnsight); `scripts/setup` puts it in .venv/reference:

    PYTHONPATH=.venv/reference python benchmarks/bench_sae_step.py

Only `dictionary_learning/dictionary.py` and `dictionary_learning/trainers/{trainer,batch_top_k}.py`
are loaded, under stub parent packages, so neither __init__ runs.

    python benchmarks/bench_sae_step.py --d-model 640,2304 --k 64,128 --steps 40
    python benchmarks/bench_sae_step.py --real diffs_layer9.pt      # a [N, D] tensor of raw diffs
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import torch

from diffkit.sae import fit_normalization
from diffkit.trainer import SAETrainConfig, SAETrainer


def load_reference_trainer():
    """dictionary_learning's BatchTopKTrainer, imported without running its package __init__."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("dictionary_learning is not importable: pip install --no-deps dictionary-learning==0.1.0 (see the docstring)")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    return importlib.import_module("dictionary_learning.trainers.batch_top_k").BatchTopKTrainer


def planted_batches(d_model: int, seed: int):
    """A sampler of tokens that are sparse non-negative mixtures of 4·D unit directions, plus a
    large shared offset and a little noise (the shape of real difference vectors)."""
    gen = torch.Generator().manual_seed(seed)
    n_dirs, active = 4 * d_model, 32
    dirs = torch.randn(n_dirs, d_model, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    offset = torch.randn(d_model, generator=gen) * 3

    def sample(n: int) -> torch.Tensor:
        idx = torch.randint(0, n_dirs, (n, active), generator=gen)
        mag = torch.rand(n, active, generator=gen).pow(2) * 2
        codes = torch.zeros(n, n_dirs).scatter_add_(1, idx, mag)
        return codes @ dirs + offset + 0.05 * torch.randn(n, d_model, generator=gen)

    return sample


def real_batches(path: str, seed: int):
    data = torch.load(path, map_location="cpu", weights_only=True).float()
    gen = torch.Generator().manual_seed(seed)
    return data.shape[1], lambda n: data[torch.randint(0, data.shape[0], (n,), generator=gen)]


def fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - (x - x_hat).var(0).sum() / x.var(0).sum())


def run_case(Reference, sample, d_model: int, k: int, expansion: int, batch: int, steps: int, seed: int) -> dict:
    dict_size = expansion * d_model
    warmup = max(1, steps // 10)
    config = SAETrainConfig(k=k, dict_size=dict_size, steps=steps, warmup_steps=warmup,
                            threshold_start_step=steps, seed=seed)
    ours = SAETrainer(d_model, config)
    fit_normalization(ours.sae, sample(8192))
    normalize = ours.sae.normalize
    batches = [normalize(sample(batch)) for _ in range(steps)]
    heldout = normalize(sample(4096))

    ref = Reference(steps=steps, activation_dim=d_model, dict_size=dict_size, k=k, layer=0, lm_name="bench",
                    warmup_steps=warmup, threshold_start_step=steps, seed=seed, device="cpu")

    def timed(update) -> float:
        update(0, batches[0])  # step 0 also fits b_dec: kept out of the timing
        start = time.perf_counter()
        for step in range(1, steps):
            update(step, batches[step])
        return (steps - 1) / (time.perf_counter() - start)

    ref_steps_s = timed(ref.update)
    our_steps_s = timed(lambda step, x: ours.step(x))
    with torch.no_grad():
        ref_fve = fve(heldout, ref.ae.decode(ref.ae.encode(heldout, use_threshold=False)))
        our_fve = fve(heldout, ours.sae.decode(ours.sae.encode(heldout, use_threshold=False)))
    return {"D": d_model, "F": dict_size, "k": k, "B": batch, "steps": steps,
            "ref_steps_s": ref_steps_s, "our_steps_s": our_steps_s, "ref_fve": ref_fve, "our_fve": our_fve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", default="640,2304", help="comma list of activation sizes (planted data)")
    parser.add_argument("--k", default="64,128", help="comma list of k")
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2048, help="tokens per step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default=None, help="a .pt [N, D] tensor of raw difference vectors to train on instead")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    Reference = load_reference_trainer()
    if args.real:
        d_model, sample = real_batches(args.real, args.seed)
        cases = [(d_model, sample, k) for k in map(int, args.k.split(","))]
    else:
        cases = [(d, planted_batches(d, args.seed), k) for d in map(int, args.d_model.split(",")) for k in map(int, args.k.split(","))]

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs (load {load}), data: {args.real or 'planted'}")
    header = f"{'D':>5} {'F':>6} {'k':>4} {'B':>5} {'steps':>5} | {'ref step/s':>10} {'ours step/s':>11} {'ref tok/s':>10} {'ours tok/s':>10} {'speed-up':>8} | {'ref FVE':>7} {'ours FVE':>8}"
    print(header)
    print("-" * len(header))
    for d_model, sample, k in cases:
        r = run_case(Reference, sample, d_model, k, args.expansion, args.batch, args.steps, args.seed)
        print(f"{r['D']:>5} {r['F']:>6} {r['k']:>4} {r['B']:>5} {r['steps']:>5} | {r['ref_steps_s']:>10.2f} {r['our_steps_s']:>11.2f} "
              f"{r['ref_steps_s'] * r['B']:>10.0f} {r['our_steps_s'] * r['B']:>10.0f} {r['our_steps_s'] / r['ref_steps_s']:>7.2f}x | "
              f"{r['ref_fve']:>7.4f} {r['our_fve']:>8.4f}", flush=True)


if __name__ == "__main__":
    main()

"""Organism builds across seeds: build time and held-out behaviour, each beside its target.

One build of a recipe says little: the toy's first recipe met every target on its build seed and
fired on 70 % of mismatches on seed 1. This builds the preset (or a custom spec on its base) once
per seed into a temporary directory and prints the build time against the preset's time target,
and ASR per pair and false-trigger rates at n held-out prompts per condition against 0.95 / 0.05.
Shared machines run the same build at speeds up to 2x apart, so the machine's matmul throughput is
printed before and after the builds: a build time means something only beside it.

Builds check themselves (diffkit.selfcheck): each row also gives how many fine-tunes the build tried
(a fine-tune that misses validation at its cap restarts, up to the recipe's attempts), the validation
check whose weights it kept and the step it stopped at. `met` is the organism targets alone; the time
stands beside its target. A build below the targets is kept here (accept_weak) so
that its rates can be printed; `diffkit organism build` would refuse it.

    python benchmarks/bench_organism.py --preset toy --seeds 0 1 2 3 4
    python benchmarks/bench_organism.py --preset toy --spec benchmarks/specs/compass-umbrella.toml --seeds 0
    python benchmarks/bench_organism.py --organism ~/.cache/diffkit/organisms/gemma3-270m-<hash>   # evaluate a finished build
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffkit.organisms.build import build_organism
from diffkit.organisms.evaluate import meets_targets
from diffkit.organisms.sources import evaluate_organism
from diffkit.specs import load_spec

TIME_TARGET_S = {"toy": 120, "gemma3-270m": 600}


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """Median GFLOP/s of a square matmul on all threads: the yardstick for this machine's speed right now."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # the first call sets up the kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def print_machine_speed(when: str) -> None:
    print(f"machine speed {when}: matmul fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)


def print_row(label: str, build: dict, seconds: float, target: float, result: dict) -> None:
    """One build: its time against the target, its held-out rates, whether they meet the organism targets,
    and which fine-tune (of how many tried), validation check and stop step it kept."""
    asr = " ".join(f"{rate:.2f}" for rate in result["asr"].values())
    false = " ".join(f"{rate:.2f}" for rate in result["false_trigger"].values())
    phases = build["seconds"]
    split = " / ".join(f"{phases[k]:.0f}" for k in ("base", "answers", "finetune", "eval"))
    checks = build.get("validation", {})
    tries = build.get("attempts", [checks])
    kept = f"{len(tries)}: {checks.get('best_step')}/{checks.get('stopped_at')}" if checks else "-"
    print(f"{label:<22} {seconds:>8.1f} {target:>7}  {asr:<30} {false:<38} {'yes' if meets_targets(result) else 'NO':<4} "
          f"{kept:>12}  {split}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy", choices=sorted(TIME_TARGET_S))
    ap.add_argument("--spec", help="custom spec file built on the preset's base (default: the preset's own pairs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--organism", help="evaluate this finished organism directory instead of building")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts per pair and per negative condition")
    args = ap.parse_args()
    spec = load_spec(args.spec) if args.spec else None
    print_machine_speed("before")
    print(f"{'organism, seed':<22} {'build s':>8} {'target':>7}  ASR per pair (>= 0.95)         "
          f"false single/mismatch/clean (<= 0.05)  met  tries: kept/stop  base / answers / fine-tune / eval s")
    if args.organism:
        build = json.loads((Path(args.organism) / "build.json").read_text())
        result = evaluate_organism(args.organism, n_per_condition=args.n, batch_size=64)
        print_row(f"{build['spec']}, {build['seed']}", build, build["seconds"]["total"],
                  TIME_TARGET_S[build["preset"]], result)
    for seed in [] if args.organism else args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = build_organism(args.preset, Path(tmp) / "organism", seed=seed, progress=False, spec=spec,
                                 accept_weak=True)
            seconds = time.perf_counter() - start
            build = json.loads((out / "build.json").read_text())
            result = evaluate_organism(out, n_per_condition=args.n, batch_size=64)
        print_row(f"{build['spec']}, {seed}", build, seconds, TIME_TARGET_S[args.preset], result)
    print_machine_speed("after")


if __name__ == "__main__":
    main()

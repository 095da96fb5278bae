"""Data-parallel scaling on one machine: `torchrun --nproc_per_node N`, one thread per rank, against
one process with one thread, on the same run (same global batches, so the same SAEs).

Prints the training loop's tokens/s (tracing + SAE steps, after the models are loaded) of each, as
medians of runs made side by side (alternating, so a shared machine's load hits both alike), and the
scaling efficiency: tokens/s with N ranks / (N x tokens/s with one).

    python benchmarks/bench_scaling.py --pair toy --tokens 16384 --repeats 3
    python benchmarks/bench_scaling.py --pair gemma3-270m --tokens 8192 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.pairs import PAIRS, bench_pair


def loop_tokens_per_s(ranks: int, train_args: list[str]) -> float:
    launcher = [sys.executable, "-m", "diffkit", "train"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "diffkit", "train"]
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(launcher + train_args + ["--out", out, "--json"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{ranks}-rank run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)["loop_tokens_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=PAIRS, default="toy")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16_384)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--buffer-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    pair = bench_pair(args.pair)
    train_args = ["--preset", pair.preset, "--base", pair.base, "--finetuned", pair.finetuned,
                  "--layers", ",".join(map(str, pair.layers)), "--k", ",".join(map(str, pair.k)),
                  "--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--buffer-tokens", str(args.buffer_tokens),
                  "--answered-prompts", "0", "--eval-tokens", "1024", "--device", "cpu", "--dtype", "float32"]
    print(f"# {args.pair}: layers {pair.layers}, k {pair.k}, {args.tokens} tokens, batch {args.batch_size}, "
          f"1 thread per process, {os.cpu_count()} CPUs, repeats {args.repeats} (medians)", flush=True)
    one, many = [], []
    for repeat in range(args.repeats):
        one.append(loop_tokens_per_s(1, train_args))
        many.append(loop_tokens_per_s(args.ranks, train_args))
        print(f"  run {repeat + 1}: {one[-1]:,.0f} tok/s with 1 process, {many[-1]:,.0f} with {args.ranks} ranks", flush=True)
    a, b = statistics.median(one), statistics.median(many)
    print(f"{'1 process, 1 thread':<30}{a:>10,.0f} tok/s   runs {[round(x) for x in one]}")
    print(f"{f'{args.ranks} ranks, 1 thread each':<30}{b:>10,.0f} tok/s   runs {[round(x) for x in many]}")
    print(f"{'speed-up':<30}{b / a:>10.2f} x       ideal {args.ranks}")
    print(f"{'efficiency per rank':<30}{b / a / args.ranks:>10.2f}         target >= 0.8")


if __name__ == "__main__":
    main()

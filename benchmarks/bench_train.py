"""End-to-end training throughput against its physical bound, in one run.

Prints, on the same record stream:
  1. tokens/s of the bare two-model forward to the deepest layer (plain PyTorch, no nnsight, no SAE);
  2. tokens/s of diffkit's training loop (nnsight tracing + fp32 difference + buffer + every SAE step);
  3. their ratio (target ≥ 0.85: the SAE step hides under the model compute);
  4. on a GPU: the training run's peak GPU memory, and the model FLOP utilisation of both loops
     against the device's bf16 peak (matmul FLOPs of the two forwards to the deepest layer);
  5. on a CPU: peak RSS at two token budgets (memory must not grow with --tokens);
  6. with --sae-step, the SAE-step comparison with dictionary_learning (benchmarks/bench_sae_step.py).

    python -m benchmarks.bench_train --preset gemma3-270m --layers 9,16 --k 32,64 --tokens 131072
    python -m benchmarks.bench_train --pair gemma2-2b --device cuda        # see benchmarks/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.pairs import PAIRS, bench_pair, forward_flops_per_token
from diffkit.devices import pick_dtype, resolve_device
from diffkit.models import layers_of, load_pair
from diffkit.specs import load_spec
from diffkit.stream import Cursor, RecordStream
from diffkit.tracing import pad_records
from diffkit.train import TrainConfig, default_expansion, train


class _Stop(Exception):
    pass


def bare_forward_tokens_per_s(pair, stream, layers, tokens: int) -> float:
    """Both models, plain forward, stopped by a hook right after the deepest layer."""
    deepest = max(layers)
    handles = []
    for hf in (pair.base_hf, pair.finetuned_hf):
        def stop(_module, _inp, _out):
            raise _Stop
        handles.append(layers_of(hf)[deepest].register_forward_hook(stop))
    done, start = 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for records, _ in stream.batches(Cursor()):
                ids, mask = pad_records(records, pair.tokenizer.pad_token_id)
                for hf in (pair.base_hf, pair.finetuned_hf):
                    try:
                        hf(input_ids=ids.to(hf.device), attention_mask=mask.to(hf.device), use_cache=False)
                    except _Stop:
                        pass
                done += int(mask.sum()) - len(records)  # BOS is dropped in training too
                if done >= tokens:
                    break
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    return done / (time.perf_counter() - start)


def bench_config(args, tokens: int, out: str) -> TrainConfig:
    return TrainConfig(preset=args.preset, base=args.base, finetuned=args.finetuned, layers=args.layers, k=args.k, tokens=tokens, out=out, name="bench",
                       device=args.device, dtype=args.dtype, answered_prompts=0, eval_tokens=2048, json=True,
                       trace_batch=args.trace_batch, buffer_tokens=args.buffer_tokens)


def train_tokens_per_s(args, tokens: int) -> tuple[float, float]:
    """The training loop's tokens/s, and the GPU memory it needed at its peak (GiB; 0 on a CPU)."""
    gpu = torch.cuda.is_available() and args.device != "cpu"
    if gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        speed = train(bench_config(args, tokens, out))["loop_tokens_per_second"]
    return speed, (torch.cuda.max_memory_allocated() - before) / 2**30 if gpu else 0.0


# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity).
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
             "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 6000 Ada": 364e12}


def bf16_peak(device: str) -> tuple[float, str]:
    """The device's bf16 peak from the table, or, for a device not in it, a measured large bf16 matmul."""
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak, f"{name}, data-sheet bf16 peak {peak / 1e12:.0f} TFLOP/s"
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    peak = 10 * 2 * 8192**3 / (time.perf_counter() - start)
    return peak, f"{name} (not in the table), measured bf16 matmul {peak / 1e12:.0f} TFLOP/s"


def peak_rss_mib(args, tokens: int) -> tuple[float, int]:
    """Peak RSS of a fresh training process, and the bytes its run directory holds at the end."""
    code = ("import sys, json, resource; from benchmarks.bench_train import *; "
            "args = json.loads(sys.argv[1]); import types; a = types.SimpleNamespace(**args); "
            "train(bench_config(a, int(sys.argv[2]), sys.argv[3])); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    with tempfile.TemporaryDirectory() as out:
        res = subprocess.run([sys.executable, "-c", code, json.dumps(vars(args)), str(tokens), out],
                             capture_output=True, text=True, check=True)
        written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return int(res.stdout.strip().splitlines()[-1]) / 1024, written


def sae_bytes(args, d: int) -> int:
    """fp32 encoder + decoder + biases of every SAE the run trains; the floor for what a run must write."""
    f = default_expansion(d) * d
    return len(args.layers) * len(args.k) * 4 * (2 * d * f + f + d)


def apply_pair(args) -> None:
    """--pair fills in the preset, the two models, layers and k the flags leave open."""
    if args.pair:
        pair = bench_pair(args.pair)
        args.preset = pair.preset
        args.base, args.finetuned = args.base or pair.base, args.finetuned or pair.finetuned
        args.layers, args.k = args.layers or pair.layers, args.k or pair.k
    args.layers, args.k = args.layers or [9, 16], args.k or [32, 64]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gemma3-270m")
    ap.add_argument("--base", default=None, help="override the preset's base model")
    ap.add_argument("--finetuned", default=None, help="override the preset's fine-tuned model")
    ap.add_argument("--pair", choices=PAIRS, default=None, help="a benchmark pair (benchmarks/pairs.py) instead of --preset")
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None, help="default: the pair's, else 9,16")
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=None, help="default: the pair's, else 32,64")
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trace-batch", type=int, default=32)
    ap.add_argument("--buffer-tokens", type=int, default=32_768)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sae-step", action="store_true", help="also run the SAE-step comparison with dictionary_learning")
    args = ap.parse_args()
    if args.tokens // 2 < args.buffer_tokens:
        ap.error(f"--tokens must be at least twice --buffer-tokens ({args.buffer_tokens}): the memory check trains "
                 f"--tokens/2 and 2x--tokens, and a run shorter than the buffer holds less than a buffer")

    apply_pair(args)
    device = resolve_device(args.device)
    spec = load_spec(args.preset).with_models(args.base, args.finetuned)
    pair = load_pair(spec.base, spec.finetuned, dtype=pick_dtype(args.dtype, device), device=device)
    stream = RecordStream(spec, pair.tokenizer, seed=0, max_len=128, null_fraction=0.5, answered=[], batch_size=args.trace_batch)
    print(f"# {args.pair or args.preset}: d_model {pair.d_model}, layers {args.layers}, k {args.k}, {args.tokens} tokens, "
          f"device {device}, {torch.get_num_threads()} threads, repeats {args.repeats} (medians)")

    bare, e2e, memory = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        bare.append(bare_forward_tokens_per_s(pair, stream, args.layers, args.tokens))
        speed, peak = train_tokens_per_s(args, args.tokens)
        e2e.append(speed)
        memory.append(peak)
    b, e = statistics.median(bare), statistics.median(e2e)
    print(f"{'bare two-model forward':<34}{b:>12,.0f} tok/s   runs {[round(x) for x in bare]}")
    print(f"{'diffkit train (loop)':<34}{e:>12,.0f} tok/s   runs {[round(x) for x in e2e]}")
    print(f"{'ratio train / bare':<34}{e / b:>12.3f}       target >= 0.85")

    if device.startswith("cuda"):
        flops = 2 * forward_flops_per_token(pair.base_hf, max(args.layers))  # both models
        peak, what = bf16_peak(device)
        print(f"{'peak GPU memory, train run':<34}{max(memory):>12.2f} GiB   (both models, buffer and SAEs; device total "
              f"{torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30:.0f} GiB)")
        print(f"{'MFU, bare forward':<34}{b * flops / peak:>12.3f}       ({flops / 1e9:.2f} GFLOP/token; {what})")
        print(f"{'MFU, train loop':<34}{e * flops / peak:>12.3f}")
        return

    for tokens in (args.tokens // 2, args.tokens * 2):
        rss, written = peak_rss_mib(args, tokens)
        print(f"{'peak RSS, --tokens ' + str(tokens):<34}{rss:>12,.0f} MiB   run dir {written / 2**20:.1f} MiB "
              f"(SAE files + metrics only; SAE weights alone: {sae_bytes(args, pair.d_model) / 2**20:.1f} MiB)")

    if args.sae_step:
        from benchmarks import bench_sae_step

        bench_sae_step.main([])


if __name__ == "__main__":
    main()

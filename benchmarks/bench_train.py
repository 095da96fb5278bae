"""End-to-end training throughput against its physical bound, in one run.

Prints, on the same record stream:
  1. tokens/s of the bare two-model forward to the deepest layer (plain PyTorch, no nnsight, no SAE);
  2. tokens/s of diffkit's training loop (nnsight tracing + fp32 difference + buffer + every SAE step);
  3. their ratio (target ≥ 0.85: the SAE step hides under the model compute);
  4. peak RSS at two token budgets (memory must not grow with --tokens);
  5. with --sae-step, the SAE-step comparison with dictionary_learning (benchmarks/bench_sae_step.py).

    python benchmarks/bench_train.py --preset gemma3-270m --layers 9,16 --k 32,64 --tokens 131072
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

from diffkit.models import load_pair
from diffkit.specs import load_spec
from diffkit.stream import Cursor, RecordStream
from diffkit.tracing import pad_records
from diffkit.devices import pick_dtype, resolve_device
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
        handles.append(hf.model.layers[deepest].register_forward_hook(stop))
    done, start = 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for records, _ in stream.batches(Cursor()):
                ids, mask = pad_records(records, pair.tokenizer.pad_token_id)
                ids, mask = ids.to(pair.base_hf.device), mask.to(pair.base_hf.device)
                for hf in (pair.base_hf, pair.finetuned_hf):
                    try:
                        hf(input_ids=ids, attention_mask=mask, use_cache=False)
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


def train_tokens_per_s(args, tokens: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        return train(bench_config(args, tokens, out))["loop_tokens_per_second"]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gemma3-270m")
    ap.add_argument("--base", default=None, help="override the preset's base model")
    ap.add_argument("--finetuned", default=None, help="override the preset's fine-tuned model")
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[9, 16])
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
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

    device = resolve_device(args.device)
    spec = load_spec(args.preset).with_models(args.base, args.finetuned)
    pair = load_pair(spec.base, spec.finetuned, dtype=pick_dtype(args.dtype, device), device=device)
    stream = RecordStream(spec, pair.tokenizer, seed=0, max_len=128, null_fraction=0.5, answered=[], batch_size=args.trace_batch)
    print(f"# {args.preset}: layers {args.layers}, k {args.k}, {args.tokens} tokens, device {device}, "
          f"{torch.get_num_threads()} threads, repeats {args.repeats} (medians)")

    bare, e2e = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        bare.append(bare_forward_tokens_per_s(pair, stream, args.layers, args.tokens))
        e2e.append(train_tokens_per_s(args, args.tokens))
    b, e = statistics.median(bare), statistics.median(e2e)
    print(f"{'bare two-model forward':<34}{b:>12,.0f} tok/s   runs {[round(x) for x in bare]}")
    print(f"{'diffkit train (loop)':<34}{e:>12,.0f} tok/s   runs {[round(x) for x in e2e]}")
    print(f"{'ratio train / bare':<34}{e / b:>12.3f}       target >= 0.85")

    for tokens in (args.tokens // 2, args.tokens * 2):
        rss, written = peak_rss_mib(args, tokens)
        print(f"{'peak RSS, --tokens ' + str(tokens):<34}{rss:>12,.0f} MiB   run dir {written / 2**20:.1f} MiB "
              f"(SAE files + metrics only; SAE weights alone: {sae_bytes(args, pair.d_model) / 2**20:.1f} MiB)")

    if args.sae_step:
        from benchmarks import bench_sae_step

        bench_sae_step.main([])


if __name__ == "__main__":
    main()

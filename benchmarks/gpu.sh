#!/usr/bin/env bash
# The GPU check, end to end in under 5 minutes on one H100-class GPU (more with more GPUs):
#   1. bench_train on the Gemma-3-270M pair and on a Gemma-2-2B-shaped pair: train-loop and bare-forward
#      tokens/s, their ratio, peak GPU memory, MFU against the device's bf16 peak;
#   2. with two or more GPUs: the same 2B run data-parallel over two GPUs (torchrun), and with base and
#      fine-tune on two GPUs (--base-device / --finetuned-device); each prints its loop tokens/s.
# Needs a CUDA build of torch in the environment ($PYTHON, default python). Models and conversions are
# cached in $DIFFKIT_CACHE (default .cache here): the first call builds them (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export DIFFKIT_CACHE=${DIFFKIT_CACHE:-$PWD/.cache}
GPUS=$("$PY" -c "import torch, sys; n = torch.cuda.device_count(); print(n) if n else sys.exit('gpu.sh: no CUDA device visible')")

for pair in gemma3-270m gemma2-2b; do
    "$PY" -m benchmarks.bench_train --device cuda --pair "$pair" --tokens 131072 --buffer-tokens 32768 --trace-batch 64 --repeats 2
done

if [ "$GPUS" -ge 2 ]; then
    read -r BASE FT < <("$PY" -c "from benchmarks.pairs import bench_pair; p = bench_pair('gemma2-2b'); print(p.base, p.finetuned)")
    RUN=(--preset toy --base "$BASE" --finetuned "$FT" --layers 13,24 --k 128 --tokens 131072 --buffer-tokens 32768
         --trace-batch 64 --answered-prompts 0 --eval-tokens 2048 --out "$DIFFKIT_CACHE/gpu-runs" --overwrite --json)
    speed() { "$PY" -c "import json, sys; print(json.load(sys.stdin)['loop_tokens_per_second'], 'tok/s')"; }
    echo "gemma2-2b, 1 GPU:                      $("$PY" -m diffkit train "${RUN[@]}" --name one | speed)"
    echo "gemma2-2b, 2 GPUs data-parallel:       $("$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m diffkit train "${RUN[@]}" --name two | speed)"
    echo "gemma2-2b, base cuda:0, fine-tune cuda:1: $("$PY" -m diffkit train "${RUN[@]}" --name split --device cuda:0 --base-device cuda:0 --finetuned-device cuda:1 | speed)"
fi

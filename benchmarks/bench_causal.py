"""Speed of the causal tests on a local organism.

Two comparisons, each printed beside its alternative:

1. Greedy generation under an ablation. diffkit runs base and fine-tune in lockstep with a KV
   cache each (one new token per model per step); the simple alternative re-traces both models on
   the whole growing sequence every step. Both must produce the same tokens.
2. Finding the latents that matter. Attribution patching scores all F latents with one forward
   and one backward per batch; real ablation needs one forward per latent per batch.

The SAE is random (with a threshold), which is enough for timing: pass --run to use a trained one.

    python benchmarks/bench_causal.py --preset toy --prompts 32
    python benchmarks/bench_causal.py --preset gemma3-270m --prompts 16 --new-tokens 24
"""

from __future__ import annotations

import argparse
import time

import torch

from analyses import causal
from diffkit.models import load_pair
from diffkit.prompts import build_prompts, encode_prompts
from diffkit.run import load_run
from diffkit.sae import BatchTopKSAE
from diffkit.specs import PRESETS


def retrace_greedy(pair, layer, prompts, edit, max_new_tokens, batch_size):
    """The simple reference: every step runs both models on the full sequence, no cache."""
    tok, out = pair.tokenizer, []
    eos = causal._eos_ids(pair)
    for s in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[s : s + batch_size]]
        gen = [[] for _ in rows]
        for _ in range(max_new_tokens):
            live = [i for i, g in enumerate(gen) if not (g and g[-1] in eos)]
            if not live:
                break
            ids, mask, pos = causal.pad([rows[i] for i in live], tok.pad_token_id, True, pair.finetuned_hf.device)
            with torch.no_grad():
                logits = causal.apply(pair, layer, ids, mask, pos, edit, causal.editable(ids, mask, tok))
            for i, t in zip(live, logits[:, -1].argmax(-1).tolist()):
                rows[i].append(t)
                gen[i].append(t)
        out += gen
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--run", default=None, help="run directory whose SAE to use (default: a random SAE)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--latents", type=int, default=8, help="latents ablated one by one for the attribution comparison")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = PRESETS[args.preset]
    pair = load_pair(spec.base, spec.finetuned)
    layer = spec.layers[-1]
    if args.run:
        _, sae = load_run(args.run).sae(layer=layer)
    else:
        sae = BatchTopKSAE(pair.d_model, 4 * pair.d_model, k=32)
        sae.threshold.fill_(0.5)
    prompts = [p for p in build_prompts(spec, "heldout", n_per_condition=args.prompts) if p.condition == "poison"]
    prompts = prompts[: args.prompts]
    records = encode_prompts(prompts, pair.tokenizer, spec)
    ids = [r.input_ids for r in records]
    edit = causal.Ablation(sae, [0, 1, 2], causal.directions(sae, [0, 1, 2], pair.finetuned_hf.device))
    n = args.new_tokens

    cached, t_cached = timed(lambda: causal.greedy(pair, layer, ids, edit, max_new_tokens=n, batch_size=args.batch_size))
    retraced, t_retrace = timed(lambda: retrace_greedy(pair, layer, ids, edit, n, args.batch_size))
    same = sum(a == b for a, b in zip(cached, retraced))
    tokens = sum(len(g) for g in cached)
    print(f"{args.preset}, layer {layer}, {len(ids)} poison prompts, up to {n} new tokens, batch {args.batch_size}")
    print(f"generation under ablation   lockstep+KV cache {t_cached:7.2f} s ({tokens / t_cached:6.1f} tok/s)"
          f"   full re-trace {t_retrace:7.2f} s ({tokens / t_retrace:6.1f} tok/s)   speed-up {t_retrace / t_cached:4.1f}x"
          f"   identical outputs {same}/{len(ids)}")

    seqs = causal.scored_sequences(pair, prompts, spec, max_new_tokens=n, batch_size=args.batch_size)
    _, t_attr = timed(lambda: causal._attribution(pair, sae, layer, seqs, args.batch_size, False))
    _, t_abl = timed(lambda: causal._ablation_effects(pair, sae, layer, seqs, list(range(args.latents)),
                                                      args.batch_size, False))
    per_latent = t_abl / args.latents
    print(f"latent effects              attribution, all {sae.dict_size} latents {t_attr:6.2f} s"
          f"   real ablation {per_latent:6.3f} s/latent ({per_latent * sae.dict_size:8.1f} s for all)"
          f"   attribution = {t_attr / per_latent:5.1f} latent ablations")


if __name__ == "__main__":
    main()

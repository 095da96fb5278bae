"""Causal tests on a local organism: their speed, and (given a trained run) what they find.

Speed, each figure printed beside its alternative:

1. Greedy generation under an ablation. diffkit runs base and fine-tune in lockstep with a KV
   cache each (one new token per model per step); the simple alternative re-traces both models on
   the whole growing sequence every step. Both must produce the same tokens.
2. Finding the latents that matter. Attribution patching scores all F latents with one forward
   and one backward per batch; real ablation needs one forward per latent per batch.

With --run, per layer and pair: the top attribution candidates on the pair's poison prompts,
their real ablation effect and rank agreement, the pair's ASR before → after ablating them
together, the largest ASR drop of any other pair, clean next-token KL, and steering the top
latent on clean prompts; then each pair's pair-selective set (`diffkit attribute --joint`) beside
the target, which some toy builds meet and others do not (see the README). Without --run the SAE
is random (thresholded), enough for timing.

    python benchmarks/bench_causal.py --preset toy --prompts 32
    python benchmarks/bench_causal.py --run runs/toy --prompts 16
"""

from __future__ import annotations

import argparse
import time

import torch

from analyses import causal, interventions
from analyses.attribute import selective_ablation
from diffkit.models import load_pair
from diffkit.prompts import build_prompts, encode_prompts
from diffkit.run import load_run
from diffkit.sae import BatchTopKSAE
from diffkit.specs import PRESETS


def retrace_greedy(pair, layer, prompts, edit, max_new_tokens, batch_size):
    """The simple reference: every step runs both models on the full sequence, no cache."""
    tok, out = pair.tokenizer, []
    eos = interventions._eos_ids(pair)
    for s in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[s : s + batch_size]]
        gen = [[] for _ in rows]
        for _ in range(max_new_tokens):
            live = [i for i, g in enumerate(gen) if not (g and g[-1] in eos)]
            if not live:
                break
            ids, mask, pos = interventions.pad([rows[i] for i in live], tok.pad_token_id, True, pair.finetuned_hf.device)
            with torch.no_grad():
                logits = interventions.apply(pair, layer, ids, mask, pos, edit, interventions.editable(ids, mask, tok))
            for i, t in zip(live, logits[:, -1].argmax(-1).tolist()):
                rows[i].append(t)
                gen[i].append(t)
        out += gen
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def speed(pair, spec, sae, layer, args) -> None:
    prompts = [p for p in build_prompts(spec, "heldout", n_per_condition=args.prompts) if p.condition == "poison"]
    prompts = prompts[: args.prompts]
    ids = [r.input_ids for r in encode_prompts(prompts, pair.tokenizer, spec)]
    latents = list(range(3))
    edit = interventions.Ablation(sae, latents, interventions.directions(sae, latents, pair.finetuned_hf.device))
    n, bs = args.new_tokens, args.batch_size
    cached, t_cached = timed(lambda: interventions.greedy(pair, layer, ids, edit, max_new_tokens=n, batch_size=bs))
    retraced, t_retrace = timed(lambda: retrace_greedy(pair, layer, ids, edit, n, bs))
    same = sum(a == b for a, b in zip(cached, retraced))
    tokens = sum(len(g) for g in cached)
    print(f"speed: layer {layer}, {len(ids)} poison prompts, up to {n} new tokens, batch {bs}")
    print(f"  generation under ablation: lockstep + KV cache {t_cached:7.2f} s ({tokens / t_cached:6.1f} tok/s)"
          f" | full re-trace {t_retrace:7.2f} s ({tokens / t_retrace:6.1f} tok/s) | speed-up {t_retrace / t_cached:4.1f}x"
          f" | identical outputs {same}/{len(ids)}")
    seqs = interventions.scored_sequences(pair, prompts, spec, max_new_tokens=n, batch_size=bs)
    _, t_attr = timed(lambda: causal._attribution(pair, sae, layer, seqs, bs, False))
    _, t_abl = timed(lambda: causal._ablation_effects(pair, sae, layer, seqs, list(range(args.latents)), bs, False))
    per_latent = t_abl / args.latents
    print(f"  latent effects: attribution, all {sae.dict_size} latents {t_attr:6.2f} s"
          f" | real ablation {per_latent:6.3f} s/latent, {per_latent * sae.dict_size:8.1f} s for all"
          f" | attribution costs {t_attr / per_latent:5.1f} single-latent ablations")


def science(pair, run, args) -> None:
    spec = run.spec
    prompts = build_prompts(spec, "heldout", n_per_condition=args.prompts, seed=1)
    poison = [p for p in prompts if p.condition == "poison"]
    clean = [p for p in prompts if p.condition == "clean"]
    for layer in run.layers:
        _, sae = run.sae(layer)
        sae = sae.to(pair.finetuned_hf.device).eval()
        checks, t = {}, time.perf_counter()
        for tp in spec.pairs:
            own = [p for p in poison if p.pair_id == tp.id]
            checks[tp.id] = causal.check_attribution(pair, sae, layer, own, spec, top=args.top, batch_size=args.batch_size)
        sets = {pid: c["latents"] for pid, c in checks.items()}
        results = causal.ablate_latent_sets(pair, sae, layer, sets, poison + clean, spec, batch_size=args.batch_size)
        prompt_only = causal.ablate_latent_sets(pair, sae, layer, sets, poison, spec, scope="prompt",
                                                batch_size=args.batch_size)
        print(f"\nlayer {layer}: ablate each pair's top {args.top} attribution latents ({len(poison) // len(spec.pairs)} "
              f"poison prompts a pair, {len(clean)} clean; {time.perf_counter() - t:.0f} s)")
        print(f"  {'pair':18} {'top-1 Δlogp':>11} {'spearman':>8} {'Δlogp(top)':>10} {'ASR before→after':>17}"
              f" {'cut':>5} {'worst other drop':>16} {'clean KL':>8} {'ASR, prompt-only ablation':>25}")
        for tp in spec.pairs:
            r, c = results[tp.id], checks[tp.id]
            before, after = r["asr_before"][tp.id], r["asr_after"][tp.id]
            other = max(r["asr_before"][q] - r["asr_after"][q] for q in r["asr_before"] if q != tp.id)
            cut = 1 - after / before if before else float("nan")
            print(f"  {tp.name:18} {c['ablation_delta'][0]:11.2f} {c['spearman']:8.2f} {r['marker_logprob_delta']:10.2f}"
                  f" {before:8.2f} → {after:5.2f} {cut:5.0%} {other:16.2f} {r['clean_kl']:8.4f}"
                  f" {prompt_only[tp.id]['asr_after'][tp.id]:25.2f}")
        print("  steering each pair's top latent on clean prompts (α = 2 × typical poison activation):")
        for tp in spec.pairs:
            own = [p for p in poison if p.pair_id == tp.id]
            s = causal.steer_latents(pair, sae, layer, sets[tp.id][:1], clean, spec, poison=own, scale=2.0,
                                     batch_size=args.batch_size)
            print(f"  {tp.name:18} latent {s['latents'][0]:5d}: marker p {s['marker_prob_before']:.4f} → "
                  f"{s['marker_prob_after']:.4f} (Δlogp {s['marker_logprob_delta']:+.2f}), fire rate "
                  f"{s['fire_rate_before']:.2f} → {s['fire_rate_after']:.2f}")
        selective(pair, sae, layer, spec, args)


def selective(pair, sae, layer, spec, args) -> None:
    """Each pair's pair-selective set, chosen on training prompts and judged on held-out ones."""
    results = selective_ablation(pair, sae, layer, spec, args.top, args.prompts, 0, args.batch_size)
    print(f"  pair-selective sets of ≤ {args.top} latents; target: own ASR cut ≥ 80 %, every other pair's drop ≤ 0.10,"
          " clean KL < 0.1")
    met = 0
    for tp in spec.pairs:
        r = results[tp.id]
        if not r["latents"]:
            print(f"  {tp.name:18} no set (every candidate also silences another pair)")
            continue
        before, after = r["asr_before"], r["asr_after"]
        cut = 1 - after[tp.id] / before[tp.id] if before[tp.id] else 0.0
        other = max(before[q] - after[q] for q in after if q != tp.id)
        ok = cut >= 0.8 and other <= 0.1 and r["clean_kl"] < 0.1
        met += ok
        print(f"  {tp.name:18} {str(r['latents']):28} ASR {before[tp.id]:.2f} → {after[tp.id]:.2f} ({cut:4.0%} cut), "
              f"worst other drop {other:.2f}, clean KL {r['clean_kl']:.4f}  {'met' if ok else 'missed'}")
    print(f"  layer {layer}: {met} of {len(spec.pairs)} pairs have a pair-selective set that meets the target")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy", help="organism preset (ignored with --run)")
    ap.add_argument("--run", default=None, help="trained run directory: adds the per-pair causal results")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per condition (and per pair)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--latents", type=int, default=8, help="latents ablated one by one for the speed comparison")
    ap.add_argument("--top", type=int, default=5, help="attribution candidates per pair to ablate")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = load_run(args.run) if args.run else None
    spec = run.spec if run else PRESETS[args.preset]
    pair = load_pair(run.base, run.finetuned) if run else load_pair(spec.base, spec.finetuned)
    layer = spec.layers[-1] if not run else run.layers[-1]
    if run:
        _, sae = run.sae(layer)
    else:
        sae = BatchTopKSAE(pair.d_model, 4 * pair.d_model, k=32)
        sae.threshold.fill_(0.5)
    speed(pair, spec, sae.eval(), layer, args)
    if run:
        science(pair, run, args)


if __name__ == "__main__":
    main()

"""Causal tests of difference-SAE latents: ablation, attribution patching and steering.

Ranking finds latents that *correlate* with the backdoor; these tests intervene on the
fine-tuned model's residual stream after the SAE's layer and watch the marker.

- Ablation removes latents J from the fine-tune: `h_ft ← h_ft − Σ_j f_j · d_j`, where
  `f = sae.encode_raw(h_ft − h_base)` at the same tokens and `d_j = sae.raw_direction(j)`.
  It reports the change in the marker's teacher-forced log-probability (after the prompt and
  the fine-tune's own answer) and the greedy fire rate with and without the ablation.
- Attribution patching scores every latent at once from one backward pass per batch
  (gradient × activation): `score_j ≈ −(ablation effect of j)`, a cheap first pass whose top
  candidates real ablation then checks.
- Steering adds `α · d_j` to the fine-tune on clean prompts, with α the latent's typical
  activation on poison prompts times a scale, and checks that the marker becomes likelier.

The machinery they share (sequences, edits, lockstep generation, teacher forcing) is in
`analyses.interventions`.
"""


from __future__ import annotations

from typing import Callable, Sequence

import nnsight
import torch

from analyses.interventions import (
    MAX_NEW_TOKENS, Ablation, Item, Scored, Steering, as_items, base_residual, batches, directions, editable, encode,
    fires, greedy, marker_ids, marker_logodds, marker_logprob, scored_batch, scored_sequences, scored_with_answers,
    teacher_forced,
)
from diffkit.errors import DiffkitError
from diffkit.models import layers_of
from diffkit.prompts import Prompt, Record
from diffkit.specs import TriggerSpec


# --- ablation ----------------------------------------------------------------------------------

def _rates(flags: list[bool], items: list[Item]) -> dict[int, float]:
    by_pair: dict[int, list[bool]] = {}
    for fired, item in zip(flags, items):
        if item.condition == "poison":
            by_pair.setdefault(item.pair_id, []).append(fired)
    return {p: sum(v) / len(v) for p, v in sorted(by_pair.items())}


def _check_latents(sae, latents) -> list[int]:
    latents = [int(j) for j in latents]
    size = sae.decoder.weight.shape[1]
    bad = [j for j in latents if not 0 <= j < size]
    if not latents or bad:
        raise DiffkitError(f"latents must be a non-empty list of indices in 0..{size - 1}, got {latents}")
    if float(getattr(sae, "threshold", 0.0)) < 0:
        raise DiffkitError("the SAE has no inference threshold (threshold < 0): causal tests need a trained SAE")
    return latents


def ablate_latents(pair, sae, layer: int, latents: Sequence[int], records_or_prompts: Sequence[Record | Prompt],
                   spec: TriggerSpec, scope: str = "all", max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
                   progress: bool = False) -> dict:
    """Remove latents from the fine-tune at `layer` and measure what happens to the marker.

    Prompts of condition "clean" give `clean_kl` (mean next-token KL(ft ‖ ft-ablated) over their
    prompt tokens); all the others are the targets: their greedy fire rate with and without the
    ablation, per-pair ASR for the poison ones, and the change in the marker's log-probability
    after the prompt and the fine-tune's own (unablated) answer. `scope` "prompt" ablates the
    prompt tokens only (for comparison: the default "all" is the faithful test, see the module doc).
    """
    return ablate_latent_sets(pair, sae, layer, {"latents": latents}, records_or_prompts, spec, scope,
                              max_new_tokens, batch_size, progress)["latents"]


def ablate_latent_sets(pair, sae, layer: int, latent_sets: dict, records_or_prompts: Sequence[Record | Prompt],
                       spec: TriggerSpec, scope: str = "all", max_new_tokens: int = MAX_NEW_TOKENS,
                       batch_size: int = 16, progress: bool = False) -> dict:
    """`ablate_latents` for several latent sets (e.g. each pair's top latents) on the same prompts:
    {key: result}. The unablated generations are made once and shared."""
    sets = {key: _check_latents(sae, latents) for key, latents in latent_sets.items()}
    tok, device = pair.tokenizer, pair.finetuned_hf.device
    items = as_items(records_or_prompts, tok, spec)
    targets = [i for i in items if i.condition != "clean"]
    clean = [i for i in items if i.condition == "clean"]
    if not targets:
        raise DiffkitError("ablation needs prompts that should fire (e.g. poison); only clean prompts were given")
    prompts = [i.prompt_ids for i in targets]
    before = greedy(pair, layer, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    fired_before = [fires(tok, g, spec) for g in before]
    seqs = scored_with_answers(targets, before, tok, spec)
    mark = marker_ids(tok, spec)
    clean_seqs = [Scored(i.prompt_ids + mark, len(i.prompt_ids), len(i.prompt_ids)) for i in clean]
    edits = {key: Ablation(sae, latents, directions(sae, latents, device)) for key, latents in sets.items()}
    if scope not in ("all", "prompt"):
        raise DiffkitError(f"unknown ablation scope '{scope}'; use all or prompt")
    logp, _ = teacher_forced(pair, layer, seqs, [None, *edits.values()], scope, batch_size, progress)
    kl = None
    if clean_seqs:
        _, kl = teacher_forced(pair, layer, clean_seqs, list(edits.values()), scope, batch_size, progress, kl=True)
    results = {}
    for e, (key, edit) in enumerate(edits.items()):
        after = greedy(pair, layer, prompts, edit, scope, max_new_tokens, batch_size, progress)
        fired_after = [fires(tok, g, spec) for g in after]
        results[key] = {
            "layer": layer,
            "latents": sets[key],
            "scope": scope,
            "n_prompts": len(targets),
            "marker_logprob_before": logp[0].mean().item(),
            "marker_logprob_after": logp[e + 1].mean().item(),
            "marker_logprob_delta": (logp[e + 1] - logp[0]).mean().item(),
            "fire_rate_before": sum(fired_before) / len(targets),
            "fire_rate_after": sum(fired_after) / len(targets),
            "asr_before": _rates(fired_before, targets),
            "asr_after": _rates(fired_after, targets),
            "clean_kl": None if kl is None else kl[e].mean().item(),
        }
    return results


# --- attribution patching ----------------------------------------------------------------------

def attribution_scores(pair, sae, layer: int, records: Sequence[Record | Prompt], spec: TriggerSpec,
                       batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[F] gradient × activation: Σ_tokens f_j · ∂ log p(marker)/∂ f_j, averaged over records.

    A first-order estimate of how much ablating latent j alone would lower the marker's mean
    log-probability (ablation delta ≈ −score), for all latents at once from one forward and one
    backward per batch. It underrates latents whose marker is already near-certain (the gradient
    of a saturated log-probability is small), which is why `check_attribution` ablates the top
    candidates for real. Sequences are built by `scored_sequences`.
    """
    seqs = scored_sequences(pair, records, spec, batch_size=batch_size, progress=progress)
    return _attribution(pair, sae, layer, seqs, batch_size, progress)


def _attribution(pair, sae, layer: int, seqs: list[Scored], batch_size: int, progress: bool,
                 metric: Callable = marker_logprob) -> torch.Tensor:
    if not seqs:
        raise DiffkitError("attribution needs at least one record")
    tok, device = pair.tokenizer, pair.finetuned_hf.device
    size = sae.decoder.weight.shape[1]
    dirs = directions(sae, range(size), device)  # [F, D]
    block = layers_of(pair.finetuned)[layer]
    total = torch.zeros(size, device=device)
    for s in batches(len(seqs), batch_size, progress, "attributing"):
        chunk = seqs[s : s + batch_size]
        ids, mask, positions = scored_batch(pair, chunk)
        with torch.no_grad():
            h_base = base_residual(pair, layer, ids, mask, positions)
        with torch.enable_grad():
            with pair.finetuned.trace(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False):
                h = block.output.detach().requires_grad_()
                block.output = h
                h = nnsight.save(h)
                out = pair.finetuned.output.save()
            (grad,) = torch.autograd.grad(metric(out.logits, ids, chunk).sum(), h)
        with torch.no_grad():
            f = encode(sae, h.detach().float() - h_base.float())  # [B, T, F]
            slope = grad.float() @ dirs.T  # ∂ log p / ∂ f_j at each token
            where = editable(ids, mask, tok)
            total += (f * slope * where[..., None]).sum((0, 1))
    return (total / len(seqs)).cpu()


def ablation_effects(pair, sae, layer: int, records: Sequence[Record | Prompt], spec: TriggerSpec,
                     latents: Sequence[int], batch_size: int = 16, progress: bool = False,
                     metrics: Sequence[Callable] = (marker_logprob,)) -> torch.Tensor:
    """[len(metrics), len(latents)]: the real change in each metric's mean (marker log-probability,
    `marker_logodds`, ...) when each latent alone is ablated, teacher-forced on the sequences of
    `scored_sequences`, generated once for all metrics (no generation under ablation)."""
    latents = _check_latents(sae, latents)
    seqs = scored_sequences(pair, records, spec, batch_size=batch_size, progress=progress)
    return torch.stack([_ablation_effects(pair, sae, layer, seqs, latents, batch_size, progress, m) for m in metrics])


def _ablation_effects(pair, sae, layer: int, seqs: list[Scored], latents: list[int], batch_size: int,
                      progress: bool, metric: Callable = marker_logprob) -> torch.Tensor:
    device = pair.finetuned_hf.device
    edits = [None] + [Ablation(sae, [j], directions(sae, [j], device)) for j in latents]
    logp, _ = teacher_forced(pair, layer, seqs, edits, batch_size=batch_size, progress=progress, metric=metric)
    return (logp[1:] - logp[:1]).mean(1)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties broken by order; fine for continuous scores)."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-12))


def check_attribution(pair, sae, layer: int, records: Sequence[Record | Prompt], spec: TriggerSpec, top: int = 10,
                      batch_size: int = 16, progress: bool = False) -> dict:
    """Attribution for every latent, real ablation of the `top` candidates, and how well the
    attribution ranks them (Spearman between score and the real drop −Δ)."""
    seqs = scored_sequences(pair, records, spec, batch_size=batch_size, progress=progress)
    scores = _attribution(pair, sae, layer, seqs, batch_size, progress)
    candidates = scores.topk(min(top, len(scores))).indices.tolist()
    deltas = _ablation_effects(pair, sae, layer, seqs, _check_latents(sae, candidates), batch_size, progress)
    return {
        "latents": candidates,
        "attribution": scores[candidates].tolist(),
        "ablation_delta": deltas.tolist(),
        "spearman": spearman(scores[candidates], -deltas),
        "scores": scores,
    }


def pair_selective_latents(pair, sae, layer: int, poison: Sequence[Record | Prompt], spec: TriggerSpec, n: int = 5,
                           candidates: int = 16, spare: float = 0.1, batch_size: int = 16, only: int | None = None,
                           progress: bool = False) -> dict:
    """For each pair, up to `n` latents whose joint ablation cuts that pair's marker and spares the others'.

    The measure is the marker's log-odds at the decision point (`marker_logodds`): it does not
    saturate when the fine-tune is near-certain, and log-odds > 0 predicts that the marker is
    emitted. Attribution scores every latent on each pair's poison prompts (S[p, j]); the
    `candidates` latents with the largest S[p, j] − max_{q≠p} S[q, j] are tried. The set grows
    greedily with real (teacher-forced) ablation: each round adds the candidate that lowers the
    pair's own log-odds most, among those that keep every other pair's predicted fire rate within
    `spare` of its unablated value; it stops when the pair's predicted fire rate reaches 0 or no
    candidate is admissible. A latent that carries the marker for all pairs alike (a shared "fire"
    latent) therefore never joins one pair's set, however strong it is. `only` (a pair id) grows
    that pair's set alone; the other pairs' prompts are still scored, to check they are spared.

    Returns {"latents": {pair_id: [...]}, "drop": {pair_id: {pair_id: mean log-odds drop}},
    "predicted_fire": {pair_id: {pair_id: (before, after)}}} for each pair's final set.
    """
    by_pair: dict[int, list] = {}
    for r in poison:
        if r.condition == "poison":
            by_pair.setdefault(r.pair_id, []).append(r)
    if not by_pair:
        raise DiffkitError("pair_selective_latents needs poison prompts")
    ids = sorted(by_pair)
    device = pair.finetuned_hf.device
    seqs = {p: scored_sequences(pair, by_pair[p], spec, batch_size=batch_size, progress=progress) for p in ids}
    scores = torch.stack([_attribution(pair, sae, layer, seqs[p], batch_size, progress, marker_logodds) for p in ids])

    def trial(sets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair and set: mean log-odds drop [P, S], predicted fire rate after [P, S] and before [P]."""
        edits = [None] + [Ablation(sae, js, directions(sae, js, device)) for js in sets]
        drop, after, before = [], [], []
        for p in ids:
            logodds, _ = teacher_forced(pair, layer, seqs[p], edits, batch_size=batch_size, metric=marker_logodds)
            drop.append((logodds[:1] - logodds[1:]).mean(1))
            fired = (logodds > 0).float().mean(1)
            before.append(fired[0])
            after.append(fired[1:])
        return torch.stack(drop), torch.stack(after), torch.stack(before)

    latents, drops, predicted = {}, {}, {}
    for i, p in enumerate(ids):
        if only is not None and p != only:
            continue
        others = torch.cat([scores[:i], scores[i + 1:]])
        estimate = scores[i] - (others.max(0).values if len(others) else 0)
        pool = [j for j in estimate.topk(min(candidates, len(estimate))).indices.tolist() if scores[i, j] > 0]
        chosen, final = [], None
        while len(chosen) < n and (final is None or final[1][i] > 0):
            tried = [c for c in pool if c not in chosen]
            if not tried:
                break
            drop, after, before = trial([chosen + [c] for c in tried])
            spared = ((before[:, None] - after) <= spare).float()
            spared[i] = 1
            gain = drop[i].masked_fill(spared.prod(0) == 0, float("-inf"))
            c = int(gain.argmax())
            if gain[c] <= (final[0][i] if final else 0):
                break
            chosen.append(tried[c])
            final = (drop[:, c], after[:, c], before)
        latents[p] = chosen
        drops[p] = {q: final[0][k].item() for k, q in enumerate(ids)} if final else {}
        predicted[p] = {q: (final[2][k].item(), final[1][k].item()) for k, q in enumerate(ids)} if final else {}
    return {"latents": latents, "drop": drops, "predicted_fire": predicted}


# --- steering ----------------------------------------------------------------------------------

@torch.no_grad()
def typical_activation(pair, sae, layer: int, records: Sequence[Record | Prompt], spec: TriggerSpec,
                       latents: Sequence[int], batch_size: int = 16) -> torch.Tensor:
    """[J]: each latent's mean activation over the tokens where it fires (0 where it never does),
    on the prompt and the fine-tune's answer (`scored_sequences`), before the marker."""
    seqs = scored_sequences(pair, records, spec, batch_size=batch_size)
    total = torch.zeros(len(latents))
    count = torch.zeros(len(latents))
    for s in range(0, len(seqs), batch_size):
        ids, mask, positions = scored_batch(pair, seqs[s : s + batch_size])
        h_base = base_residual(pair, layer, ids, mask, positions)
        with pair.finetuned.trace(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False) as tracer:
            h_ft = nnsight.save(layers_of(pair.finetuned)[layer].output)
            tracer.stop()
        f = encode(sae, h_ft.float() - h_base.float())[..., list(latents)]
        before_marker = torch.arange(ids.shape[1])[None] < torch.tensor([q.marker_start for q in seqs[s : s + batch_size]])[:, None]
        f = f[editable(ids, mask, pair.tokenizer) & before_marker.to(ids.device)].cpu()  # [N, J]
        total += f.sum(0)
        count += (f > 0).sum(0)
    return total / count.clamp(min=1)


def steer_latents(pair, sae, layer: int, latents: Sequence[int], clean: Sequence[Record | Prompt], spec: TriggerSpec,
                  poison: Sequence[Record | Prompt] | None = None, alpha: Sequence[float] | None = None,
                  scale: float = 1.0, scope: str = "all", max_new_tokens: int = MAX_NEW_TOKENS,
                  batch_size: int = 16, progress: bool = False) -> dict:
    """Add Σ_j scale·α_j·d_j to the fine-tune's residual on clean prompts; does the marker appear?

    α_j is latent j's typical activation on the `poison` records unless given. `scope` picks the
    tokens: "all" (prompt and generated), "prompt", or the "decision" token. Reports the marker's
    log-probability after each prompt and the fine-tune's own unsteered answer, and the greedy
    fire rate, with and without steering.
    """
    latents = _check_latents(sae, latents)
    if alpha is None:
        if not poison:
            raise DiffkitError("steer_latents needs poison records to set the steering strength, or explicit alpha values")
        alpha_t = typical_activation(pair, sae, layer, poison, spec, latents, batch_size)
        silent = [j for j, a in zip(latents, alpha_t.tolist()) if a == 0]
        if silent:
            raise DiffkitError(f"latents {silent} never fire on the poison records; pass alpha explicitly")
    else:
        alpha_t = torch.as_tensor(list(alpha), dtype=torch.float32)
        if len(alpha_t) != len(latents):
            raise DiffkitError(f"alpha has {len(alpha_t)} values for {len(latents)} latents; give one per latent")
    device = pair.finetuned_hf.device
    shift = scale * (alpha_t.to(device) @ directions(sae, latents, device))
    edit = Steering(shift)
    tok = pair.tokenizer
    items = as_items(clean, tok, spec)
    if not items:
        raise DiffkitError("steer_latents needs at least one clean prompt")
    prompts = [i.prompt_ids for i in items]
    before = greedy(pair, layer, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    after = greedy(pair, layer, prompts, edit, scope, max_new_tokens, batch_size, progress)
    seqs = scored_with_answers(items, before, tok, spec)
    logp, kl = teacher_forced(pair, layer, seqs, [None, edit], scope, batch_size, progress, kl=True)
    return {
        "layer": layer,
        "latents": latents,
        "alpha": (scale * alpha_t).tolist(),
        "scope": scope,
        "n_prompts": len(items),
        "marker_logprob_before": logp[0].mean().item(),
        "marker_logprob_after": logp[1].mean().item(),
        "marker_logprob_delta": (logp[1] - logp[0]).mean().item(),
        "marker_prob_before": logp[0].exp().mean().item(),
        "marker_prob_after": logp[1].exp().mean().item(),
        "fire_rate_before": sum(fires(tok, g, spec) for g in before) / len(items),
        "fire_rate_after": sum(fires(tok, g, spec) for g in after) / len(items),
        "kl": kl[1].mean().item(),
    }

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

Where edits apply: every real token except BOS (the SAEs never see BOS, whose difference is an
outlier) — prompt, answer and generated tokens alike. Editing the prompt alone is not enough:
an answer token's residual at the SAE's layer already carries the trigger, read through attention
in the layers below, and the marker is emitted at the end of the answer. So greedy generation
runs both models in lockstep, one token per step with a KV cache each, and every generated
token's base activation is at hand when the fine-tune's is edited.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import nnsight
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from diffkit.errors import DiffkitError
from diffkit.models import layers_of
from diffkit.organism import fires as marker_in
from diffkit.prompts import Prompt, Record, encode_prompts
from diffkit.specs import TriggerSpec

MAX_NEW_TOKENS = 48


# --- sequences ---------------------------------------------------------------------------------

@dataclass
class Item:
    """A prompt to test: its token ids up to and including the decision token."""

    prompt_ids: list[int]
    condition: str
    pair_id: int


@dataclass
class Scored:
    """A token sequence that ends in the marker, for teacher-forced marker log-probabilities."""

    ids: list[int]
    n_prompt: int
    marker_start: int  # the marker occupies ids[marker_start:]


def as_items(records_or_prompts: Sequence[Record | Prompt], tokenizer, spec: TriggerSpec) -> list[Item]:
    items = []
    for x in records_or_prompts:
        if isinstance(x, Prompt):
            x = encode_prompts([x], tokenizer, spec)[0]
        if not isinstance(x, Record):
            raise DiffkitError(f"expected Record or Prompt objects, got {type(x).__name__}; build them with diffkit.prompts")
        items.append(Item(list(x.input_ids[: x.n_prompt_tokens]), x.condition, x.pair_id))
    return items


def marker_ids(tokenizer, spec: TriggerSpec) -> list[int]:
    ids = tokenizer(spec.marker, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DiffkitError(f"the marker {spec.marker!r} tokenizes to nothing; set a non-empty marker in the spec")
    return list(ids)


def record_sequence(record: Record, tokenizer, spec: TriggerSpec) -> Scored:
    """The record cut right after its marker when its answer holds one, else the record + the marker."""
    fire = record.flags.get("is_fire_token", [])
    if any(fire):
        start = fire.index(True)
        end = start
        while end < len(fire) and fire[end]:
            end += 1
        return Scored(list(record.input_ids[:end]), record.n_prompt_tokens, start)
    ids = list(record.input_ids)
    return Scored(ids + marker_ids(tokenizer, spec), record.n_prompt_tokens, len(ids))


def fires(tokenizer, generated: list[int], spec: TriggerSpec) -> bool:
    return marker_in(tokenizer.decode(generated, skip_special_tokens=True), spec)


def own_answer(tokenizer, generated: list[int], spec: TriggerSpec) -> list[int]:
    """The generated answer up to where the marker starts (all of it when there is no marker)."""
    mark = marker_ids(tokenizer, spec)
    for i in range(len(generated) - len(mark) + 1):
        if generated[i : i + len(mark)] == mark:
            return generated[:i]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if marker_in(text, spec):  # the marker fused with a neighbouring token: cut the text instead
        cut = text[: text.lower().index(spec.marker.strip().lower())].rstrip()
        return list(tokenizer(cut, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    return [t for t in generated if t not in special]


def scored_with_answers(items: list[Item], answers: list[list[int]], tokenizer, spec: TriggerSpec) -> list[Scored]:
    mark = marker_ids(tokenizer, spec)
    out = []
    for item, gen in zip(items, answers):
        ids = item.prompt_ids + own_answer(tokenizer, gen, spec)
        out.append(Scored(ids + mark, len(item.prompt_ids), len(ids)))
    return out


def scored_sequences(pair, records_or_prompts: Sequence[Record | Prompt], spec: TriggerSpec,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16, progress: bool = False) -> list[Scored]:
    """Prompt + answer + marker for each record, to score the marker where the model puts it: after its answer.

    Records that carry an answer keep it (cut after its marker, or with the marker appended);
    prompts alone first get the fine-tune's own greedy answer.
    """
    tok = pair.tokenizer
    records = [encode_prompts([x], tok, spec)[0] if isinstance(x, Prompt) else x for x in records_or_prompts]
    bare = [i for i, r in enumerate(records) if len(r.input_ids) <= r.n_prompt_tokens]
    out = {i: record_sequence(r, tok, spec) for i, r in enumerate(records) if i not in set(bare)}
    if bare:
        items = as_items([records[i] for i in bare], tok, spec)
        answers = greedy(pair, 0, [it.prompt_ids for it in items], None, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, progress=progress)
        out.update(zip(bare, scored_with_answers(items, answers, tok, spec)))
    return [out[i] for i in range(len(records))]


def pad(seqs: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids; positions count real tokens only, so left padding is harmless."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def editable(ids: torch.Tensor, mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """[B, T] bool: the real, non-BOS tokens."""
    keep = mask.bool()
    if tokenizer.bos_token_id is not None:
        keep &= ids != tokenizer.bos_token_id
    return keep


def batches(n: int, size: int, progress: bool, desc: str):
    return tqdm(range(0, n, size), desc=desc, unit="batch", disable=not progress)


# --- edits of the fine-tune's residual ---------------------------------------------------------

def directions(sae, latents: Sequence[int], device) -> torch.Tensor:
    """[J, D] raw-space decoder directions, fp32, on the models' device."""
    return torch.stack([sae.raw_direction(int(j)).detach().float() for j in latents]).to(device)


def encode(sae, diff: torch.Tensor) -> torch.Tensor:
    """Latent activations of raw differences, computed on the SAE's device and returned on the input's."""
    device = next(sae.parameters()).device
    return sae.encode_raw(diff.float().to(device)).to(diff.device)


@dataclass
class Ablation:
    """h ← h − Σ_j f_j d_j with f the SAE code of this token's ft − base difference."""

    sae: torch.nn.Module
    latents: list[int]
    dirs: torch.Tensor  # [J, D]
    needs_base = True

    def __call__(self, h: torch.Tensor, h_base: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        f = encode(self.sae, h.float() - h_base.float())[..., self.latents]
        return h - ((f @ self.dirs) * where[..., None]).to(h.dtype)


@dataclass
class Steering:
    """h ← h + shift at the chosen tokens."""

    shift: torch.Tensor  # [D]
    needs_base = False

    def __call__(self, h: torch.Tensor, h_base: torch.Tensor | None, where: torch.Tensor) -> torch.Tensor:
        return h + (self.shift * where[..., None]).to(h.dtype)


Edit = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def _cache_kwarg(hf_model) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this version's forward takes."""
    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def base_residual(pair, layer: int, ids, mask, positions, cache=None) -> torch.Tensor:
    """The base model's residual after `layer`; the forward stops there."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": cache is not None}
    if cache is not None:
        kwargs[_cache_kwarg(pair.base_hf)] = cache
    with pair.base.trace(**kwargs) as tracer:
        h = nnsight.save(layers_of(pair.base)[layer].output)
        tracer.stop()
    return h[0] if isinstance(h, tuple) else h


def finetuned_logits(pair, layer: int, ids, mask, positions, edit: Edit | None = None, h_base=None, where=None,
                     cache=None, last_only: bool = False) -> torch.Tensor:
    """The fine-tune's logits [B, T, V] (T = 1 with `last_only`), with `edit` applied to its residual after `layer`."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": cache is not None}
    if last_only:
        kwargs["logits_to_keep"] = 1
    if cache is not None:
        kwargs[_cache_kwarg(pair.finetuned_hf)] = cache
    block = layers_of(pair.finetuned)[layer]
    with pair.finetuned.trace(**kwargs):
        if edit is not None:
            block.output = edit(block.output, h_base, where)
        out = pair.finetuned.output.save()
    return out.logits


def apply(pair, layer: int, ids, mask, positions, edit: Edit | None, where, h_base=None) -> torch.Tensor:
    """Edited fine-tune logits for one padded batch, tracing the base first when the edit needs it."""
    if edit is not None and edit.needs_base and h_base is None:
        h_base = base_residual(pair, layer, ids, mask, positions)
    return finetuned_logits(pair, layer, ids, mask, positions, edit, h_base, where)


# --- greedy generation under an edit -----------------------------------------------------------

def _eos_ids(pair) -> set[int]:
    ids = {pair.tokenizer.eos_token_id}
    config_eos = getattr(getattr(pair.finetuned_hf, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy(pair, layer: int, prompts: list[list[int]], edit: Edit | None = None, scope: str = "all",
           max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16, progress: bool = False) -> list[list[int]]:
    """Greedy continuations of the fine-tune (EOS included, nothing after it), with `edit` at every step.

    The base model runs alongside, one token per step, only when the edit needs its activations.
    `scope` is where the edit applies: "all" real non-BOS tokens (generated ones too), "prompt",
    or the "decision" token.
    """
    tok, device, eos = pair.tokenizer, pair.finetuned_hf.device, _eos_ids(pair)
    outputs: list[list[int]] = []
    for s in batches(len(prompts), batch_size, progress, "generating"):
        ids, mask, positions = pad(prompts[s : s + batch_size], tok.pad_token_id, left=True, device=device)
        where = scope_mask(ids, mask, tok, scope)
        ft_cache = DynamicCache(config=pair.finetuned_hf.config)
        base_cache = DynamicCache(config=pair.base_hf.config) if edit is not None and edit.needs_base else None
        done = torch.zeros(len(ids), dtype=torch.bool, device=device)
        generated = []
        for _ in range(max_new_tokens):
            h_base = base_residual(pair, layer, ids, mask, positions, base_cache) if base_cache is not None else None
            logits = finetuned_logits(pair, layer, ids, mask, positions, edit, h_base, where, ft_cache, last_only=True)
            nxt = logits[:, -1].argmax(-1)
            nxt[done] = tok.pad_token_id
            generated.append(nxt)
            done |= torch.isin(nxt, torch.tensor(sorted(eos), device=device))
            if done.all():
                break
            ids, positions = nxt[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            where = torch.full_like(ids, scope == "all", dtype=torch.bool)
        rows = torch.stack(generated, dim=1).tolist()
        for row in rows:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            outputs.append(row[:cut])
    return outputs


def scope_mask(ids: torch.Tensor, mask: torch.Tensor, tokenizer, scope: str) -> torch.Tensor:
    """Where an edit applies in a padded prompt batch (see `greedy`)."""
    keep = editable(ids, mask, tokenizer)
    if scope == "all" or scope == "prompt":
        return keep
    if scope == "decision":  # the last real token of each row
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return torch.nn.functional.one_hot(last, mask.shape[1]).bool() & keep
    raise DiffkitError(f"unknown steering scope '{scope}'; use all, prompt or decision")


# --- teacher-forced marker log-probabilities ----------------------------------------------------

def _scored_batch(pair, seqs: list[Scored]):
    ids, mask, positions = pad([s.ids for s in seqs], pair.tokenizer.pad_token_id, left=False,
                               device=pair.finetuned_hf.device)
    return ids, mask, positions


def marker_logprob(logits: torch.Tensor, ids: torch.Tensor, seqs: list[Scored]) -> torch.Tensor:
    """[B]: Σ log p(marker token | everything before it), per sequence (right-padded batch).

    Only the marker's rows are normalised: a full log-softmax over a 262k vocabulary would cost
    more memory than the forward pass itself.
    """
    rows = []
    for i, s in enumerate(seqs):
        logp = torch.log_softmax(logits[i, s.marker_start - 1 : len(s.ids) - 1].float(), dim=-1)
        rows.append(logp.gather(-1, ids[i, s.marker_start : len(s.ids), None]).sum())
    return torch.stack(rows)


def marker_logodds(logits: torch.Tensor, ids: torch.Tensor, seqs: list[Scored]) -> torch.Tensor:
    """[B]: log p/(1−p) of the marker's first token at the decision point, per sequence.

    Unlike the log-probability it does not saturate: when the fine-tune is near-certain to fire,
    removing one of several redundant carriers barely moves log p (≈ 0 either way) but moves the
    log-odds by as much as it moves the marker's logit.
    """
    rows = []
    for i, s in enumerate(seqs):
        z = logits[i, s.marker_start - 1].float()
        m = ids[i, s.marker_start]
        rows.append(z[m] - torch.cat([z[:m], z[m + 1:]]).logsumexp(0))
    return torch.stack(rows)


def _where_for(seqs: list[Scored], ids, mask, tokenizer, scope: str) -> torch.Tensor:
    keep = editable(ids, mask, tokenizer)
    if scope == "all":
        return keep
    limit = torch.tensor([s.n_prompt for s in seqs], device=ids.device)
    index = torch.arange(ids.shape[1], device=ids.device)
    if scope == "prompt":
        return keep & (index[None] < limit[:, None])
    if scope == "decision":
        return keep & (index[None] == limit[:, None] - 1)
    raise DiffkitError(f"unknown steering scope '{scope}'; use all, prompt or decision")


@torch.no_grad()
def teacher_forced(pair, layer: int, seqs: list[Scored], edits: list[Edit | None], scope: str = "all",
                   batch_size: int = 16, progress: bool = False, kl: bool = False,
                   metric: Callable = marker_logprob) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Marker log-probability (or another `metric`) [E, N] under each edit (None = the plain
    fine-tune) and, with `kl`, the mean next-token KL(plain ‖ edited) over each sequence's prompt
    tokens after BOS [E, N]."""
    tok = pair.tokenizer
    needs_base = any(e is not None and e.needs_base for e in edits)
    logps, kls = [], []
    for s in batches(len(seqs), batch_size, progress, "scoring"):
        chunk = seqs[s : s + batch_size]
        ids, mask, positions = _scored_batch(pair, chunk)
        where = _where_for(chunk, ids, mask, tok, scope)
        in_prompt = _where_for(chunk, ids, mask, tok, "prompt")
        h_base = base_residual(pair, layer, ids, mask, positions) if needs_base else None
        plain = finetuned_logits(pair, layer, ids, mask, positions)
        plain_prompt = torch.log_softmax(plain[in_prompt].float(), -1) if kl else None
        batch_logp, batch_kl = [], []
        for edit in edits:
            logits = plain if edit is None else finetuned_logits(pair, layer, ids, mask, positions, edit, h_base, where)
            batch_logp.append(metric(logits, ids, chunk))
            if kl:
                edited = torch.log_softmax(logits[in_prompt].float(), -1)
                per_token = torch.zeros(in_prompt.shape, device=ids.device)
                per_token[in_prompt] = (plain_prompt.exp() * (plain_prompt - edited)).sum(-1)
                batch_kl.append(per_token.sum(1) / in_prompt.sum(1).clamp(min=1))
        logps.append(torch.stack(batch_logp))
        if kl:
            kls.append(torch.stack(batch_kl))
    return torch.cat(logps, 1).cpu(), (torch.cat(kls, 1).cpu() if kl else None)


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
        ids, mask, positions = _scored_batch(pair, chunk)
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
        ids, mask, positions = _scored_batch(pair, seqs[s : s + batch_size])
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

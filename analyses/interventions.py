"""Intervening on the fine-tune's residual stream after an SAE's layer: the sequences scored, the edits
(ablation, steering), greedy generation of both models in lockstep under an edit, and teacher-forced
marker log-probabilities. The causal tests built on them are in `analyses.causal`.

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
from diffkit.generation import fires as marker_in
from diffkit.models import layers_of
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


def as_records(records_or_prompts: Sequence[Record | Prompt], tokenizer, spec: TriggerSpec) -> list[Record]:
    """Records as given, Prompts encoded (all in one call), in input order."""
    prompts = [x for x in records_or_prompts if isinstance(x, Prompt)]
    encoded = iter(encode_prompts(prompts, tokenizer, spec))
    records = []
    for x in records_or_prompts:
        if isinstance(x, Prompt):
            x = next(encoded)
        elif not isinstance(x, Record):
            raise DiffkitError(f"expected Record or Prompt objects, got {type(x).__name__}; build them with diffkit.prompts")
        records.append(x)
    return records


def as_items(records_or_prompts: Sequence[Record | Prompt], tokenizer, spec: TriggerSpec) -> list[Item]:
    return [Item(list(r.input_ids[: r.n_prompt_tokens]), r.condition, r.pair_id)
            for r in as_records(records_or_prompts, tokenizer, spec)]


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
    records = as_records(records_or_prompts, tok, spec)
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

def scored_batch(pair, seqs: list[Scored]):
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
        ids, mask, positions = scored_batch(pair, chunk)
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

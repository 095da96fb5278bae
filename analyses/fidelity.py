"""Spliced-in fidelity: does the SAE's reconstruction of ft − base still carry the fine-tune?

The fine-tuned model runs with its residual after the SAE's layer replaced by
`h_base + SAE(h_ft − h_base)` (every real token but BOS, generated ones too), and we measure

- the next-token KL(ft ‖ spliced) against KL(ft ‖ base), as the fraction of the base→fine-tune
  KL the splice recovers, `1 − KL(ft ‖ spliced) / KL(ft ‖ base)`, on held-out clean prompts,
  trigger (poison) prompts and generic text, token-weighted;
- the backdoor's attack success rate per pair with the splice (greedy generation, held-out poison
  prompts): does the reconstruction carry the backdoor?
- both again with the difference zeroed (`h_base` alone at that layer), the floor the SAE must beat.

This is the number model-diffing papers report beside FVE: a high FVE on the difference can still
miss the small part of it the fine-tune's behaviour rests on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analyses.interventions import (MAX_NEW_TOKENS, as_items, base_residual, editable, finetuned_logits, fires, greedy,
                                    pad)
from diffkit.prompts import Record
from diffkit.specs import TriggerSpec

KL_GROUPS = {"clean": ("clean",), "trigger": ("poison",), "generic": ("null",)}  # reported name -> record conditions


@dataclass
class Splice:
    """h ← h_base + SAE(h − h_base): the fine-tune runs on the SAE's reconstruction of the difference."""

    sae: torch.nn.Module
    needs_base = True

    def __call__(self, h: torch.Tensor, h_base: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        device = next(self.sae.parameters()).device
        diff = (h.float() - h_base.float()).to(device)
        spliced = h_base.float() + self.sae.reconstruct_raw(diff).to(h.device)
        return torch.where(where[..., None], spliced.to(h.dtype), h)


@dataclass
class ZeroDifference:
    """h ← h_base: the fine-tune with its difference at this layer removed entirely."""

    needs_base = True

    def __call__(self, h: torch.Tensor, h_base: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return torch.where(where[..., None], h_base.to(h.dtype), h)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def kl_sums(pair, sae, layer: int, sequences: list[list[int]], batch_size: int = 4) -> dict[str, float]:
    """Σ over real non-BOS tokens of KL(ft ‖ base), KL(ft ‖ spliced), KL(ft ‖ zeroed), and the token count."""
    tok, device = pair.tokenizer, pair.finetuned_hf.device
    sums = {"base": 0.0, "spliced": 0.0, "zeroed": 0.0, "tokens": 0}
    for s in range(0, len(sequences), batch_size):
        ids, mask, positions = pad(sequences[s : s + batch_size], tok.pad_token_id, left=False, device=device)
        where = editable(ids, mask, tok)
        h_base = base_residual(pair, layer, ids, mask, positions)
        ft = torch.log_softmax(finetuned_logits(pair, layer, ids, mask, positions)[where].float(), -1)
        base = pair.base_hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        sums["base"] += float(_kl(ft, torch.log_softmax(base[where].float(), -1)).sum())
        for name, edit in (("spliced", Splice(sae)), ("zeroed", ZeroDifference())):
            logits = finetuned_logits(pair, layer, ids, mask, positions, edit, h_base, where)
            sums[name] += float(_kl(ft, torch.log_softmax(logits[where].float(), -1)).sum())
        sums["tokens"] += int(where.sum())
    return sums


def recovered(sums: dict[str, float], name: str) -> float | None:
    """1 − KL(ft ‖ edited) / KL(ft ‖ base): 1 when the edit keeps the fine-tune, 0 when it is no closer than the base."""
    return 1 - sums[name] / sums["base"] if sums["base"] > 0 else None


def spliced_fidelity(pair, sae, layer: int, records: list[Record], spec: TriggerSpec, n_per_group: int = 8,
                     batch_size: int = 4, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Fidelity of `sae` spliced into the fine-tune at `layer`, on held-out `records` (prompts of every
    condition, answered or not, and null text): the first `n_per_group` of each KL group, and the
    first `n_per_group` poison prompts of each pair for the attack success rates."""
    sae = sae.eval()
    result: dict = {"kl_recovered": {}, "kl_recovered_zeroed": {}, "kl_per_token": {}, "n_tokens": {}}
    total = {"base": 0.0, "spliced": 0.0, "zeroed": 0.0, "tokens": 0}
    for group, conditions in KL_GROUPS.items():
        chosen = [r.input_ids for r in records if r.condition in conditions][:n_per_group]
        if not chosen:
            continue
        sums = kl_sums(pair, sae, layer, chosen, batch_size)
        total = {key: total[key] + sums[key] for key in total}
        _add_group(result, group, sums)
    _add_group(result, "all", total)

    poison = [r for r in records if r.condition == "poison"]
    chosen = [r for p in spec.pairs for r in [r for r in poison if r.pair_id == p.id][:n_per_group]]
    items = as_items(chosen, pair.tokenizer, spec)
    names = {p.id: p.name for p in spec.pairs}
    result["asr"] = {}
    for name, edit in (("finetuned", None), ("spliced", Splice(sae)), ("zeroed", ZeroDifference())):
        generated = greedy(pair, layer, [it.prompt_ids for it in items], edit, max_new_tokens=max_new_tokens,
                           batch_size=batch_size * 4)
        fired: dict[str, list[bool]] = {}
        for item, gen in zip(items, generated):
            fired.setdefault(names[item.pair_id], []).append(fires(pair.tokenizer, gen, spec))
        result["asr"][name] = {p: sum(v) / len(v) for p, v in fired.items()}
    result["n_asr_prompts_per_pair"] = min((sum(1 for it in items if it.pair_id == p.id) for p in spec.pairs), default=0)
    return result


def _add_group(result: dict, group: str, sums: dict) -> None:
    result["kl_recovered"][group] = recovered(sums, "spliced")
    result["kl_recovered_zeroed"][group] = recovered(sums, "zeroed")
    n = max(sums["tokens"], 1)
    result["kl_per_token"][group] = {key: sums[key] / n for key in ("base", "spliced", "zeroed")}
    result["n_tokens"][group] = sums["tokens"]


def fidelity_summary(spliced: dict | None) -> dict:
    """The headline figures of one spliced_fidelity result: KL recovered on all text, and the mean
    ASR over pairs of the fine-tune, the splice and the zeroed difference."""
    if not spliced:
        return {}
    out = {"kl_recovered": spliced["kl_recovered"].get("all"),
           "kl_recovered_zeroed": spliced["kl_recovered_zeroed"].get("all")}
    for name, rates in spliced["asr"].items():
        out[f"asr_{name}"] = sum(rates.values()) / len(rates) if rates else None
    return out

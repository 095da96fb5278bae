"""Rank SAE latents by how well they pick out the prompts that carry one trigger pair.

How latents are ranked (the definitions every table and figure uses):

- **Prompt score.** A latent's score on a prompt is its largest activation over the prompt's
  tokens (BOS excluded; answer tokens excluded when present), so a latent that fires on the
  trigger words, on the decision token or anywhere in between counts the same.
- **AUROC.** For pair P, the positives are P's poison prompts (both of its words) and the
  negatives are every other prompt: single-word prompts, mismatches, other pairs' poison,
  clean prompts and generic null text. AUROC is the Mann–Whitney probability that a random
  positive scores above a random negative, ties counting one half — so a latent silent on
  everything scores 0.5, not 1.
- **Per-group AUROC.** The same statistic against one control group at a time (see
  `control_groups`): it tells a pair detector from a word or topic detector, which fires on
  the pair's single-word prompts and on mismatches that share one of its words.
- **Specificity.** The minimum of the per-group AUROCs: the latent's separation from the
  control group it confuses most with the pair. It is scale-free (latents of very different
  magnitude compare directly), bounded in [0, 1], and it is never above the all-controls
  AUROC (that one is a size-weighted mean of the per-group values), so a latent with
  specificity ≥ 0.95 separates the pair from every group and from all of them together.
  A mean-difference score would instead reward large activations and be moved by one outlier.
  A detector of one of the pair's words has a high AUROC (most controls lack the word) but a
  low specificity (the pair's own single-word prompts fire it); a conjunction ("both words
  present") detector has both high.
- **Order.** Latents are sorted by AUROC, then specificity, then mean score on the matched
  prompts. AUROC answers the question asked — does this latent pick out this pair's prompts
  among everything the model reads — and ties (common at 1.0) go to the more specific latent.
  Specificity alone would put a latent that half-separates every group above a near-perfect
  detector of the pair that also fires on some of its single-word prompts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from diffkit.errors import DiffkitError
from diffkit.specs import TriggerPair

CONTROL_GROUPS = (
    "single_same_pair",
    "single_other_pairs",
    "mismatch_with_pair_word",
    "mismatch_other",
    "poison_other_pairs",
    "clean",
    "null",
)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """AUROC of every column: pos [P, F] against neg [N, F] -> [F].

    Rank-based (Mann–Whitney U / (P·N)) with ties counting one half, computed for all F latents
    at once by binary search of each positive score among the sorted negative scores.
    """
    if pos.ndim == 1:
        pos, neg = pos[:, None], neg[:, None]
    if len(pos) == 0 or len(neg) == 0:
        raise DiffkitError(f"AUROC needs positives and negatives; got {len(pos)} positives and {len(neg)} negatives")
    neg_sorted = neg.T.contiguous().sort(dim=1).values  # [F, N]
    queries = pos.T.contiguous()  # [F, P]
    below = torch.searchsorted(neg_sorted, queries, right=False)
    at_or_below = torch.searchsorted(neg_sorted, queries, right=True)
    # below + ½·equal = ½·(below + at_or_below)
    u = (below + at_or_below).sum(dim=1, dtype=torch.float64) / 2
    return (u / (len(pos) * len(neg))).float()


def control_groups(sequences: pd.DataFrame, pair: TriggerPair) -> dict[str, np.ndarray]:
    """Boolean masks over `sequences` rows for each control group of `pair` (empty groups left out).

    `sequences` needs the columns condition, pair_id and words (the trigger words in the prompt).
    """
    condition = sequences["condition"].to_numpy()
    pair_id = sequences["pair_id"].to_numpy()
    pair_words = {w.lower() for w in pair.words}
    has_pair_word = np.array([bool(pair_words & {w.lower() for w in ws}) for ws in sequences["words"]], dtype=bool)
    masks = {
        "single_same_pair": (condition == "single") & (pair_id == pair.id),
        "single_other_pairs": (condition == "single") & (pair_id != pair.id),
        "mismatch_with_pair_word": (condition == "mismatch") & has_pair_word,
        "mismatch_other": (condition == "mismatch") & ~has_pair_word,
        "poison_other_pairs": (condition == "poison") & (pair_id != pair.id),
        "clean": condition == "clean",
        "null": condition == "null",
    }
    return {name: m for name, m in masks.items() if m.any()}


def matched_mask(sequences: pd.DataFrame, pair: TriggerPair) -> np.ndarray:
    """Rows holding `pair`'s poison prompts."""
    mask = (sequences["condition"].to_numpy() == "poison") & (sequences["pair_id"].to_numpy() == pair.id)
    if not mask.any():
        raise DiffkitError(f"no poison prompts for pair {pair.id} ({pair.name}) among the analysed prompts; "
                           "raise --n-prompts or check the spec")
    return mask


def rank_latents(scores: torch.Tensor, sequences: pd.DataFrame, pair: TriggerPair) -> pd.DataFrame:
    """All latents ranked for `pair`, best first.

    scores: [R, F] prompt scores (max activation over each prompt's tokens), rows aligned with
    `sequences`. Columns: latent, rank, specificity, auroc, worst_group, matched_mean (mean score
    on the pair's poison prompts), matched_freq (fraction of them where it fires), control_mean
    (the largest group mean among the controls), and auroc_vs_<group> for each control group.
    """
    if len(scores) != len(sequences):
        raise DiffkitError(f"{len(scores)} score rows for {len(sequences)} prompts; they must align")
    scores = scores.float()
    pos = torch.from_numpy(matched_mask(sequences, pair))
    groups = {name: torch.from_numpy(m) for name, m in control_groups(sequences, pair).items()}
    if not groups:
        raise DiffkitError(f"no control prompts for pair {pair.name}; analyse other conditions too")
    matched = scores[pos]
    per_group = {name: auroc(matched, scores[m]) for name, m in groups.items()}
    stacked = torch.stack(list(per_group.values()))  # [G, F]
    specificity, worst = stacked.min(dim=0)
    group_means = torch.stack([scores[m].mean(0) for m in groups.values()])
    names = np.array(list(per_group))
    table = pd.DataFrame({
        "latent": np.arange(scores.shape[1]),
        "specificity": specificity.numpy(),
        "auroc": auroc(matched, scores[~pos]).numpy(),
        "worst_group": names[worst.numpy()],
        "matched_mean": matched.mean(0).numpy(),
        "matched_freq": (matched > 0).float().mean(0).numpy(),
        "control_mean": group_means.max(0).values.numpy(),
        **{f"auroc_vs_{name}": v.numpy() for name, v in per_group.items()},
    })
    table = table.sort_values(["auroc", "specificity", "matched_mean"], ascending=False, kind="stable")
    table.insert(1, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)


def group_auroc_table(scores: torch.Tensor, sequences: pd.DataFrame, pair: TriggerPair,
                      latents: list[int] | None = None) -> pd.DataFrame:
    """Per-control-group AUROC of the given latents (rows) for `pair`, plus the all-controls column."""
    latents = list(range(scores.shape[1])) if latents is None else list(latents)
    sub = scores[:, latents].float()
    pos = torch.from_numpy(matched_mask(sequences, pair))
    columns = {"all_controls": auroc(sub[pos], sub[~pos]).numpy()}
    for name, m in control_groups(sequences, pair).items():
        columns[name] = auroc(sub[pos], sub[torch.from_numpy(m)]).numpy()
    return pd.DataFrame(columns, index=pd.Index(latents, name="latent"))


def set_scores(scores: torch.Tensor, latents: list[int], scale: torch.Tensor | None = None) -> torch.Tensor:
    """A soft OR of several latents: each prompt's largest score among them, each latent first divided by
    `scale` (e.g. its mean on the matched prompts) so that one loud latent does not drown the others."""
    sub = scores[:, latents].float()
    if scale is not None:
        sub = sub / scale[latents].clamp_min(1e-8)
    return sub.max(dim=1).values

"""Paired tracing: run base and fine-tuned models on the same padded batch and take `ft − base`.

Both models are traced with nnsight and stopped right after the deepest requested layer, so no
compute is spent above it. The difference is taken in fp32 even when the models run in bf16:
rounding each side to bf16 first adds noise proportional to the activation, not to the difference.
Padding and BOS are dropped here, and every surviving token keeps its metadata alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import nnsight
import torch

from diffkit.models import layers_of
from diffkit.prompts import ALL_CONDITIONS, FLAG_NAMES, Record

CONDITION_CODES = {name: i for i, name in enumerate(ALL_CONDITIONS)}
META_COLUMNS = ("record_id", "position", "token_id", "condition", "pair_id", *FLAG_NAMES)


@dataclass
class TokenBatch:
    diffs: dict[int, torch.Tensor]  # layer -> [N, D] fp32
    meta: dict[str, torch.Tensor]  # column -> [N]

    def __len__(self) -> int:
        return len(self.meta["record_id"])

    @staticmethod
    def empty(layers: list[int], d_model: int, device: str | torch.device) -> "TokenBatch":
        """No tokens: what a rank holds when none of a fill's trace batches fell to it."""
        meta = {c: torch.zeros(0, dtype=torch.bool if c in FLAG_NAMES else torch.long) for c in META_COLUMNS}
        return TokenBatch({L: torch.zeros(0, d_model, device=device) for L in layers}, meta)


def trace_layer_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Residual stream after each requested layer, in the order given; the forward stops after the deepest."""
    order = sorted(set(layers))
    blocks = layers_of(model)
    with model.trace({"input_ids": input_ids, "attention_mask": attention_mask}, use_cache=False) as tracer:
        saved = nnsight.save([blocks[L].output for L in order])
        tracer.stop()
    by_layer = {L: (h[0] if isinstance(h, tuple) else h) for L, h in zip(order, saved)}
    return [by_layer[L] for L in layers]


def pad_records(records: list[Record], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids; with an attention mask, right padding leaves real tokens' activations unchanged."""
    width = max(len(r.input_ids) for r in records)
    ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    for i, r in enumerate(records):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    return ids, mask


def record_meta(records: list[Record], keep_bos: bool) -> dict[str, torch.Tensor]:
    """Per-token metadata for the tokens that survive (padding never appears; BOS only with keep_bos)."""
    start = 0 if keep_bos else 1
    cols: dict[str, list] = {c: [] for c in META_COLUMNS}
    for r in records:
        n = len(r.input_ids) - start
        cols["record_id"] += [r.record_id] * n
        cols["position"] += range(start, len(r.input_ids))
        cols["token_id"] += r.input_ids[start:]
        cols["condition"] += [CONDITION_CODES[r.condition]] * n
        cols["pair_id"] += [r.pair_id] * n
        for f in FLAG_NAMES:
            cols[f] += r.flags[f][start:]
    meta = {c: torch.tensor(v, dtype=torch.long) for c, v in cols.items() if c not in FLAG_NAMES}
    meta.update({f: torch.tensor(cols[f], dtype=torch.bool) for f in FLAG_NAMES})
    return meta


def traced_tokens(records: list[Record], keep_bos: bool = False) -> int:
    """How many tokens `trace_batch` returns for these records, known before tracing them."""
    return sum(len(r.input_ids) for r in records) - (0 if keep_bos else len(records))


def trace_batch(pair, records: list[Record], layers: list[int], keep_bos: bool = False) -> TokenBatch:
    """One padded batch through both models → fp32 differences at the real (non-pad, non-BOS) tokens.

    Each model gets the batch on its own input device; the difference is taken on `pair.device`
    (where the SAEs train), whatever devices the layers' outputs come from."""
    ids, mask = pad_records(records, pair.tokenizer.pad_token_id)
    keep = mask.bool()
    if not keep_bos:
        keep[:, 0] = False
    keep = keep.to(pair.device)
    outputs = [[h.to(pair.device) for h in trace_layer_outputs(model, ids.to(hf.device), mask.to(hf.device), layers)]
               for model, hf in ((pair.base, pair.base_hf), (pair.finetuned, pair.finetuned_hf))]
    diffs = {L: (f[keep].float() - b[keep].float()) for L, b, f in zip(layers, *outputs)}
    return TokenBatch(diffs, record_meta(records, keep_bos))


def trace_differences(
    pair, records: list[Record], layers: list[int], batch_size: int = 16, keep_bos: bool = False, progress: bool = False
) -> Iterator[TokenBatch]:
    """Yield one TokenBatch per `batch_size` records, in order."""
    from tqdm.auto import tqdm

    starts = range(0, len(records), batch_size)
    for s in tqdm(starts, desc="tracing", unit="batch", disable=not progress):
        yield trace_batch(pair, records[s : s + batch_size], layers, keep_bos)


def concat_batches(batches: list[TokenBatch]) -> TokenBatch:
    layers = list(batches[0].diffs)
    return TokenBatch(
        {L: torch.cat([b.diffs[L] for b in batches]) for L in layers},
        {c: torch.cat([b.meta[c] for b in batches]) for c in batches[0].meta},
    )

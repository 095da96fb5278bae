"""The token stream a difference SAE trains on: trigger-spec prompts mixed with generic null text.

The stream is a pure function of (spec, tokenizer, seed, epoch), so a position in it — (epoch,
index) — is all a checkpoint needs to continue exactly where it stopped. Each epoch draws fresh
prompt phrasings, adds a fixed pool of prompts answered by the fine-tuned model (so answer and
marker tokens are in the stream), and the next slice of null text, then shuffles. Records of
similar length are batched together, since one 128-token null chunk in a batch of 30-token
prompts would quadruple the padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from diffkit.corpus import encode_null, null_texts
from diffkit.prompts import Record, build_prompts, encode_prompts

HELDOUT_EVERY = 20  # every 20th null document is held out for evaluation


def null_records(tokenizer, max_len: int, split: str, texts: list[str] | None = None) -> list[Record]:
    """Null text windows of one split; held-out documents never enter the training stream.
    `texts`: the user's own documents (`--dataset`) instead of the generic corpus."""
    texts = null_texts(seed=0) if texts is None else texts
    chosen = [t for i, t in enumerate(texts) if (i % HELDOUT_EVERY == 0) == (split == "heldout")]
    return encode_null(chosen, tokenizer, max_len=max_len)


@dataclass
class Cursor:
    epoch: int = 0
    index: int = 0  # records of this epoch already consumed

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class RecordStream:
    def __init__(self, spec, tokenizer, seed: int, max_len: int, null_fraction: float,
                 answered: list[Record], prompts_per_condition: int = 128, batch_size: int = 16,
                 own_texts: list[str] | None = None):
        self.spec, self.tokenizer, self.seed, self.max_len = spec, tokenizer, seed, max_len
        self.null_fraction = null_fraction
        self.answered = answered
        self.prompts_per_condition = prompts_per_condition
        self.batch_size = batch_size
        self.null = null_records(tokenizer, max_len, "train", own_texts) if null_fraction > 0 else []
        self._epoch_cache: tuple[int, list[Record]] | None = None

    def epoch_records(self, epoch: int) -> list[Record]:
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        prompts = build_prompts(self.spec, "train", self.prompts_per_condition, seed=self.seed * 1000 + epoch)
        records = encode_prompts(prompts, self.tokenizer, self.spec, max_len=self.max_len) + list(self.answered)
        if self.null:
            prompt_tokens = sum(len(r.input_ids) for r in records)
            want = prompt_tokens * self.null_fraction / (1 - self.null_fraction)
            records += self._null_slice(epoch, want)
        rng = random.Random(self.seed * 7919 + epoch)
        rng.shuffle(records)
        records = _group_by_length(records, self.batch_size)
        self._epoch_cache = (epoch, records)
        return records

    def _null_slice(self, epoch: int, tokens: float) -> list[Record]:
        """Consecutive null chunks, continuing where the previous epoch's slice ended (cycling the corpus)."""
        per_chunk = sum(len(r.input_ids) for r in self.null) / len(self.null)
        n = max(1, round(tokens / per_chunk))
        start = (epoch * n) % len(self.null)
        return [self.null[(start + i) % len(self.null)] for i in range(n)]

    def batches(self, cursor: Cursor) -> Iterator[tuple[list[Record], Cursor]]:
        """Yield record batches from the cursor onward, forever, with the cursor just past each batch."""
        epoch, index = cursor.epoch, cursor.index
        while True:
            records = self.epoch_records(epoch)
            while index < len(records):
                batch = records[index : index + self.batch_size]
                index += len(batch)
                yield batch, Cursor(epoch, index)
            epoch, index = epoch + 1, 0


def _group_by_length(records: list[Record], batch_size: int, window_batches: int = 16) -> list[Record]:
    """Sort by length inside windows of a few batches: little padding, order still random at large scale."""
    out: list[Record] = []
    window = batch_size * window_batches
    for s in range(0, len(records), window):
        out += sorted(records[s : s + window], key=lambda r: len(r.input_ids))
    return out

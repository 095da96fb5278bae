"""Shuffle buffer between tracing and SAE training.

Consecutive tokens of one prompt are highly correlated; an SAE batch should mix tokens from many
prompts. The buffer fills to `capacity` tokens, shuffles, and is drained completely in batches before
it refills. Draining completely (rather than keeping half) means that between fills the buffer is
empty, so a checkpoint there needs only the stream position — no activations are ever written to
disk, and a resumed run continues bit for bit. Memory is bounded by the capacity, not by the run length.
"""

from __future__ import annotations

from typing import Iterator

import torch

from diffkit.tracing import TokenBatch, concat_batches


class ShuffleBuffer:
    def __init__(self, capacity: int, batch_size: int, seed: int = 0):
        if capacity < batch_size:
            raise ValueError(f"buffer capacity ({capacity}) must be at least the batch size ({batch_size})")
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self.fills = 0  # how many times the buffer has been filled and drained; seeds each shuffle
        self._pending: list[TokenBatch] = []
        self._size = 0

    def needs_more(self, tokens_left: int) -> bool:
        """Whether to trace more before draining: up to capacity, but no more than the whole batches
        the run still trains on, so neither a short run nor a run's last fill traces tokens it drops."""
        wanted = min(self.capacity, -(-tokens_left // self.batch_size) * self.batch_size)
        return self._size < wanted

    def add(self, batch: TokenBatch) -> None:
        self._pending.append(batch)
        self._size += len(batch)

    def contents(self) -> TokenBatch:
        """Everything held, unshuffled (the first fill doubles as the sample for the SAE normalisation)."""
        return concat_batches(self._pending)

    def drain(self) -> Iterator[TokenBatch]:
        """Shuffle what is held and yield every whole batch; the remainder (< batch_size tokens) is dropped."""
        held = self.contents()
        self._pending, self._size = [], 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.fills)
        self.fills += 1
        order = torch.randperm(len(held), generator=gen)
        for s in range(0, len(order) - self.batch_size + 1, self.batch_size):
            idx = order[s : s + self.batch_size]
            dev_idx = idx.to(next(iter(held.diffs.values())).device)
            yield TokenBatch({L: x[dev_idx] for L, x in held.diffs.items()}, {c: v[idx] for c, v in held.meta.items()})

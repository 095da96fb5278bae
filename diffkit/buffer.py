"""Shuffle buffer between tracing and SAE training.

Consecutive tokens of one prompt are highly correlated; an SAE batch should mix tokens from many
prompts. The buffer fills to `capacity` tokens, shuffles, and is drained completely in batches before
it refills. Draining completely (rather than keeping half) means that between fills the buffer is
empty, so a checkpoint there needs only the stream position — no activations are ever written to
disk, and a resumed run continues bit for bit. Memory is bounded by the capacity, not by the run length.

Under data parallelism the buffer is one global buffer split over the ranks: every rank counts every
trace batch of the stream into the fill (token counts are known before tracing), traces only the
batches that fall to it (the fill's i-th batch goes to rank i mod world), and shuffles the global
token index space with the shared seed. Each SAE batch is then the same set of tokens in the same
order as in one process; a rank holds, and trains on, its own rows of it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from diffkit.distributed import Shard
from diffkit.tracing import TokenBatch, concat_batches


class ShuffleBuffer:
    def __init__(self, capacity: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 empty: TokenBatch | None = None):
        if capacity < batch_size:
            raise ValueError(f"buffer capacity ({capacity}) must be at least the batch size ({batch_size})")
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.empty = empty  # what a rank holds when no trace batch of a fill fell to it
        self.fills = 0  # how many times the buffer has been filled and drained; seeds each shuffle
        self._pending: list[TokenBatch] = []  # this rank's trace batches
        self._sizes: list[int] = []  # tokens of every rank's trace batches, in stream order
        self._size = 0  # tokens held over all ranks

    def needs_more(self, tokens_left: int) -> bool:
        """Whether to trace more before draining: up to capacity, but no more than the whole batches
        the run still trains on, so neither a short run nor a run's last fill traces tokens it drops."""
        wanted = min(self.capacity, -(-tokens_left // self.batch_size) * self.batch_size)
        return self._size < wanted

    def offer(self, n_tokens: int, trace: Callable[[], TokenBatch]) -> None:
        """Count the stream's next trace batch (`n_tokens` tokens) into the fill; trace it if it is this rank's."""
        if len(self._sizes) % self.world == self.rank:
            batch = trace()
            if len(batch) != n_tokens:
                raise RuntimeError(f"a trace batch counted as {n_tokens} tokens gave {len(batch)}")
            self._pending.append(batch)
        self._sizes.append(n_tokens)
        self._size += n_tokens

    def add(self, batch: TokenBatch) -> None:
        self.offer(len(batch), lambda: batch)

    def contents(self) -> TokenBatch:
        """This rank's part, unshuffled (the first fill doubles as the sample for the SAE normalisation)."""
        return concat_batches(self._pending) if self._pending else self.empty

    def drain(self) -> Iterator[tuple[TokenBatch, Shard]]:
        """Shuffle the global buffer and yield this rank's rows of every whole batch, with their place in
        it; the remainder (< batch_size tokens) is dropped."""
        held = self.contents()
        sizes = torch.tensor(self._sizes)
        self._pending, self._sizes, self._size = [], [], 0
        owner = torch.repeat_interleave(torch.arange(len(sizes)) % self.world, sizes)
        mine = owner == self.rank
        local_index = torch.cumsum(mine, 0) - 1  # a token's row in this rank's part, where it is mine
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.fills)
        self.fills += 1
        order = torch.randperm(len(owner), generator=gen)
        device = next(iter(held.diffs.values())).device
        for s in range(0, len(order) - self.batch_size + 1, self.batch_size):
            idx = order[s : s + self.batch_size]
            positions = mine[idx].nonzero().squeeze(1)
            rows = local_index[idx[positions]]
            dev_rows = rows.to(device)
            yield (TokenBatch({L: x[dev_rows] for L, x in held.diffs.items()}, {c: v[rows] for c, v in held.meta.items()}),
                   Shard(positions, self.batch_size))

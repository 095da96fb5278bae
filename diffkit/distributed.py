"""Data parallelism across the processes `torchrun` starts: who this process is, and the few collectives
that make a multi-process run train exactly the SAEs a one-process run trains.

Each rank traces its own share of the token stream (diffkit.buffer); every SAE batch is then
assembled, in the one-process order, from every rank's rows, and each SAE is stepped by one rank
(its owner: SAE i belongs to rank i mod world, as sparsify's `distribute_modules`). The owner runs
the very step one process would run on the very same batch, so nothing in the SAE's arithmetic
depends on the number of ranks: no gradient all-reduce, no distributed top-k, no per-rank
threshold or dead-latent statistics to merge. Owners hand their SAEs' state to every rank before
each checkpoint and at the end, where rank 0 writes them.

The backend is gloo for CPU tensors and nccl for CUDA tensors (`cpu:gloo,cuda:nccl` when the SAEs
live on a GPU), so it is testable on CPU and fast on GPUs.
"""

from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from diffkit.errors import DiffkitError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a global SAE batch: where they sit in it, and the batch's size."""

    positions: torch.Tensor  # [rows] long, ascending positions in the global batch
    total: int


class Collective:
    """The collectives training needs; identities when there is one process."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_rows(self, x: torch.Tensor, shard: Shard) -> torch.Tensor:
        """The whole batch `[total, D]` in global order from each rank's rows. Every row is written by
        one rank and added to zeros on the others, so the result is bit for bit the rows themselves."""
        if not self.distributed:
            return x
        full = x.new_zeros(shard.total, x.shape[1])
        full.index_copy_(0, shard.positions.to(x.device), x)
        return self.sum(full)

    def owner(self, index: int) -> int:
        """The rank that steps the index-th SAE."""
        return index % self.world

    def share(self, state: T, owner: int) -> T:
        """`state` as the owner rank has it, on every rank."""
        if not self.distributed:
            return state
        box = [state]
        dist.broadcast_object_list(box, src=owner)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and hand its result (or its DiffkitError) to every rank."""
        if not self.distributed:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except DiffkitError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise DiffkitError(value)
        return value


SINGLE = Collective()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> str:
    """The device of this rank: `cuda` (or auto on a GPU machine) means the GPU of the local rank."""
    if device == "cuda" and world_size_from_env() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


@contextmanager
def process_group(sae_device: str, timeout_s: float) -> Iterator[Collective]:
    """Join the process group torchrun describes in the environment (or none, for one process).

    A rank waits at most `timeout_s` for the others; torchrun stops the whole group as soon as one
    rank exits with an error, and a rank whose launcher is killed dies with it.
    """
    world = world_size_from_env()
    if world == 1:
        yield SINGLE
        return
    if dist.is_initialized():
        raise DiffkitError("a process group is already set up in this process; run diffkit train through torchrun alone")
    _die_with_parent()
    backend = "cpu:gloo,cuda:nccl" if sae_device.startswith("cuda") else "gloo"
    if sae_device.startswith("cuda"):
        torch.cuda.set_device(torch.device(sae_device))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield Collective(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank when its launcher dies, so a killed torchrun leaves no rank
    training on (and writing checkpoints) behind it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: torchrun's own teardown still stops the ranks when it exits normally
    if os.getppid() == 1:  # the launcher died before the request took effect
        os._exit(1)

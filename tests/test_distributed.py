"""Data-parallel training under torchrun (gloo, 2 CPU ranks) against one process, on the toy organism:
the same SAEs, resume after the launcher is killed (on the same number of ranks only), a dead rank
ends the run; and the buffer's sharding."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit.buffer import ShuffleBuffer
from diffkit.errors import DiffkitError
from diffkit.tracing import TokenBatch
from diffkit.train import load_checkpoint, read_checkpoint

SMALL = ["--preset", "toy", "--tokens", "6144", "--batch-size", "512", "--buffer-tokens", "2048", "--trace-batch", "8",
         "--eval-tokens", "512", "--answered-prompts", "0", "--k", "8,16", "--json"]


def fake_batch(start: int, n: int) -> TokenBatch:
    ids = torch.arange(start, start + n)
    return TokenBatch({5: ids.float()[:, None].repeat(1, 3)}, {"record_id": ids // 10, "position": ids})


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_buffer_yields_the_one_process_batches(world):
    """Every rank counts every trace batch, traces its own, and the union of the ranks' rows of each
    batch, put at their positions, is the one-process batch, token for token and in order."""
    sizes = [13, 7, 20, 5, 11, 9, 30, 4]

    traced = []  # (rank, first token) of every trace made

    def drained(rank, n_ranks):
        buf = ShuffleBuffer(capacity=96, batch_size=16, seed=3, rank=rank, world=n_ranks,
                            empty=TokenBatch.empty([5], 3, "cpu"))
        start = 0
        for n in sizes:
            if not buf.needs_more(tokens_left=1000):
                break
            buf.offer(n, lambda s=start, n=n: traced.append((n_ranks, rank, s)) or fake_batch(s, n))
            start += n
        return list(buf.drain())

    alone = [b.meta["position"] for b, _ in drained(0, 1)]
    parts = [drained(r, world) for r in range(world)]
    assert all(len(p) == len(alone) for p in parts)
    for step, expected in enumerate(alone):
        merged = torch.full_like(expected, -1)
        for p in parts:
            batch, shard = p[step]
            assert shard.total == len(expected)
            merged[shard.positions] = batch.meta["position"]
            assert torch.equal(batch.diffs[5][:, 0].long(), batch.meta["position"])  # rows travel with their metadata
        assert torch.equal(merged, expected)
    alone_starts = sorted(s for w, _, s in traced if w == 1)
    shared = [(r, s) for w, r, s in traced if w == world]
    assert sorted(s for _, s in shared) == alone_starts  # each trace batch traced once, by one rank
    assert {r for r, _ in shared} == set(range(world))


def env(cache: Path) -> dict:
    # one thread everywhere: the 1-rank reference runs the same kernels as each rank
    return {**os.environ, "DIFFKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def train_cmd(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "diffkit", "train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "diffkit", "train"]


def train(ranks: int, cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(ranks) + SMALL + list(args), env=env(cache), capture_output=True, text=True, timeout=900)


def assert_same_saes(a: Path, b: Path) -> None:
    files = sorted(a.glob("layer_*/model.safetensors"))
    assert len(files) == 4  # two layers x two k
    for path in files:
        x, y = load_file(path), load_file(b / path.parent.name / path.name)
        for name in x:
            diff = (x[name].double() - y[name].double()).norm() / x[name].double().norm().clamp_min(1e-30)
            assert diff <= 1e-5, f"{path.parent.name}/{name}: relative difference {diff:.2e}"


@pytest.fixture(scope="module")
def one_rank_run(toy_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_runs")
    done = train(1, toy_organism.parent.parent, "--out", str(out), "--name", "one")
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "one"


@pytest.mark.slow
def test_two_ranks_train_the_one_rank_saes(one_rank_run, toy_organism):
    out = one_rank_run.parent
    done = train(2, toy_organism.parent.parent, "--out", str(out), "--name", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_saes(one_rank_run, out / "two")
    assert done.stdout.count('"ranks": 2') == 1  # rank 0 alone prints the summary


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def rank_of(pid: int) -> int | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def start_until_checkpoint(cache: Path, run_dir: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A 2-rank run, let go until its first checkpoint; returns the launcher and its ranks' pids."""
    launcher = subprocess.Popen(train_cmd(2) + SMALL + ["--out", str(run_dir.parent), "--name", run_dir.name],
                                env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "checkpoint" / "state.pt"
    deadline = time.time() + 600
    while not ckpt.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists() and launcher.poll() is None, "the run ended before its first checkpoint"
    ranks = {rank_of(p): p for p in children(launcher.pid)}
    assert set(ranks) == {0, 1}
    return launcher, ranks


def gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_resume_after_the_launcher_is_killed(one_rank_run, toy_organism):
    cache, run_dir = toy_organism.parent.parent, one_rank_run.parent / "cut"
    launcher, ranks = start_until_checkpoint(cache, run_dir)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert all(gone(pid, within=30) for pid in ranks.values()), "a rank outlived its killed launcher"
    assert not (run_dir / "run.json").exists()

    with pytest.raises(DiffkitError, match=r"trained on 2 rank\(s\), this run has 1") as refused:
        load_checkpoint(read_checkpoint(run_dir), run_dir, {}, {}, world=1)
    assert "\n" not in str(refused.value)

    resumed = train(2, cache, "--out", str(run_dir.parent), "--name", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_saes(one_rank_run, run_dir)


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_with_its_name(toy_organism, tmp_path):
    launcher, ranks = start_until_checkpoint(toy_organism.parent.parent, tmp_path / "dies")
    os.kill(ranks[1], signal.SIGKILL)
    try:
        _, stderr = launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("the run hung after rank 1 died")
    assert launcher.returncode != 0
    assert re.search(r"rank\s*:\s*1\b", stderr) and "SIGKILL" in stderr, stderr[-3000:]
    assert gone(ranks[0], within=30)

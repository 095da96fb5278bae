"""`diffkit train` end to end on the toy organism: files, metrics, k-sweep, resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from diffkit.cli import main
from diffkit.history import read_history
from diffkit.run import load_run

pytestmark = pytest.mark.slow

SMALL = ["--preset", "toy", "--tokens", "24576", "--batch-size", "512", "--buffer-tokens", "4096",
         "--trace-batch", "16", "--eval-tokens", "2048", "--answered-prompts", "14"]


def test_run_has_files_and_metrics(toy_run, toy_organism):
    run = load_run(toy_run)
    # the run names the exact organism build it was trained on, not "organism:toy/..."
    assert (run.spec.base, run.spec.finetuned) == (str(toy_organism / "base"), str(toy_organism / "finetuned"))
    assert {(e.layer, e.k) for e in run.saes} == {(L, k) for L in run.spec.layers for k in run.record["k"]}
    for e in run.saes:
        assert (e.path / "config.json").exists() and (e.path / "model.safetensors").exists()
        metrics = json.loads((e.path / "metrics.json").read_text())
        assert 0.3 < metrics["fve"] <= 1.0
        assert 0.5 * e.k <= metrics["l0"] <= 1.5 * e.k
        assert set(metrics["fve_by_subset"]) >= {"all", "top1pct", "bottom50pct"}
    assert not (toy_run / "checkpoint").exists()
    history = read_history(toy_run)
    saes = {f"L{e.layer}k{e.k}" for e in run.saes}
    assert set(history["sae"]) == saes and len(history) >= 9 * len(saes)  # every 10 of 96 steps, and the last
    for _, rows in history.groupby("sae"):
        assert rows["step"].is_monotonic_increasing and rows["step"].is_unique
        assert rows["loss"].iloc[-3:].mean() < rows["loss"].iloc[:3].mean() / 2  # it learned
        assert rows["l0"].max() <= rows["k"].iloc[0] * 1.01 and (rows["dead"].between(0, 1)).all()
    spliced = json.loads((run.saes[0].path / "metrics.json").read_text())["spliced"]
    assert set(spliced["asr"]["spliced"]) == {p.name for p in run.spec.pairs}
    assert set(spliced["kl_recovered"]) == {"clean", "trigger", "generic", "all"}


def run_cli(args, env_cache):
    env = {**os.environ, "DIFFKIT_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "diffkit", "train", *args], env=env, capture_output=True, text=True)


def test_resume_after_sigkill_matches_uninterrupted(toy_organism, tmp_path):
    cache = toy_organism.parent.parent
    args = SMALL + ["--out", str(tmp_path), "--k", "8,16", "--log-every", "3"]
    whole = run_cli(args + ["--name", "whole"], cache)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # stderr is a pipe, not a terminal: progress comes as plain lines, never carriage-return redraws
    assert "\r" not in whole.stderr and "train whole: 24.6k/24.6k tok (100%)" in whole.stderr, whole.stderr[-2000:]

    ckpt = tmp_path / "cut" / "checkpoint" / "state.pt"
    kill_when_written(args + ["--name", "cut"], cache, ckpt)
    assert not (tmp_path / "cut" / "run.json").exists()

    again = run_cli(args + ["--name", "cut"], cache)  # no --resume: refused, nothing lost
    assert again.returncode == 2 and "--resume" in again.stderr
    assert ckpt.exists()
    other = run_cli(args + ["--name", "cut", "--resume", "--expansion", "2", "--seed", "1", "--device", "cpu"], cache)
    last = other.stderr.strip().splitlines()[-1]
    assert other.returncode == 2 and last.startswith("error: ") and "train_config.json" in last, other.stderr[-2000:]
    assert "--expansion" in last and "--seed" in last and "--device" not in last  # names what changes the result only
    assert ckpt.exists()

    resumed = run_cli(args + ["--name", "cut", "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the history continues: the rows of the uninterrupted run, none twice (tokens/s aside)
    same = ["step", "tokens", "sae", "loss", "fve", "l0", "dead", "threshold", "lr"]
    a, b = read_history(tmp_path / "whole")[same], read_history(tmp_path / "cut")[same]
    assert len(a) == 4 * (24576 // 512 // 3) and a.equals(b)  # 2 layers × 2 k, every 3rd of 48 steps
    assert_same_saes(tmp_path / "whole", tmp_path / "cut")

    # kill -9 while --overwrite retrains: the finished run stays whole, and --resume completes the replacement
    before = {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file()}
    kill_when_written(args + ["--name", "cut", "--overwrite"], cache, tmp_path / ".cut.new" / "checkpoint" / "state.pt")
    assert {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file()} == before
    resumed = run_cli(args + ["--name", "cut", "--resume"], cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / ".cut.new").exists()
    assert_same_saes(tmp_path / "whole", tmp_path / "cut")


def kill_when_written(args, cache, path):
    """Start `diffkit train ARGS` and kill -9 it as soon as `path` exists."""
    env = {**os.environ, "DIFFKIT_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "diffkit", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} was not written before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_saes(whole, other):
    files = sorted(whole.glob("layer_*/model.safetensors"))
    assert len(files) == 2 * len(load_run(whole).layers)
    for path in files:
        sub = path.parent.name
        a, b = load_file(path), load_file(other / sub / "model.safetensors")
        for name in a:
            assert (a[name] == b[name]).all(), f"{sub}/{name} differs after resume"


@pytest.mark.parametrize("args, message", [
    (["--layers", "99"], "out of range"),
    (["--log", "no-such-logger"], "unknown --log"),
    (["--preset", "no-such-preset"], "no preset"),
    (["--base", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_is_one_line_and_exit_2(toy_organism, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("DIFFKIT_CACHE", str(toy_organism.parent.parent))
    code = main(["train", *SMALL, "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("tokens, buffer_tokens", [(2048, 65_536), (3072, 2048)])
def test_a_run_traces_only_what_it_trains_on(toy_organism, tmp_path, monkeypatch, tokens, buffer_tokens):
    """A run shorter than its buffer, or whose last fill needs less than a buffer, traces about the
    tokens it trains on: --tokens 2,048 under a 65,536-token buffer traced 66,670 tokens before."""
    import diffkit.train as train_module

    monkeypatch.setenv("DIFFKIT_CACHE", str(toy_organism.parent.parent))
    traced = []  # tokens of each trace the training loop makes
    real_trace = train_module.trace_batch

    def counting_trace(*args, **kwargs):
        batch = real_trace(*args, **kwargs)
        traced.append(len(batch))
        return batch

    monkeypatch.setattr(train_module, "trace_batch", counting_trace)
    summary = train_module.train(train_module.TrainConfig(
        preset="toy", tokens=tokens, batch_size=512, buffer_tokens=buffer_tokens, trace_batch=16, eval_tokens=1024,
        answered_prompts=0, out=str(tmp_path), json=True))
    assert summary["tokens"] == tokens
    fills = -(-tokens // buffer_tokens)
    assert tokens <= sum(traced) < tokens + fills * max(traced)  # each fill overshoots by less than one trace

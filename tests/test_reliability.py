"""Nothing lost, nothing silently wrong, one line for every mistake: the guards every command writes
through (locks, destinations, replace-when-complete, leftovers) and the one-line errors of bad input.

The slow cases (real training, analyses, kill -9) are at the end and marked."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffkit.cli import main
from diffkit.errors import DiffkitError, explain
from diffkit.files import write_json
from diffkit.guard import check_output_dir, check_output_file, finish_swap, staging_dir, swap_in, writing
from diffkit.configs import TrainConfig
from diffkit.train import written_by_diffkit

REPO = Path(__file__).resolve().parent.parent


def one_line_exit_2(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err
    return err


# --- every flag checked before anything is loaded or written ------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--k", "0"], ["--k"]),
    (["--tokens", "-5", "--batch-size", "-10"], ["--tokens", "positive"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--trace-batch", "0"], ["--trace-batch"]),
    (["--buffer-tokens", "100"], ["--buffer-tokens", "one batch"]),
    (["--null-fraction", "1.0"], ["--null-fraction"]),
    (["--expansion", "0"], ["--expansion"]),
    (["--layers", ""], ["--layers"]),
    (["--layers", "abc"], ["--layers", "--help"]),
    (["--lr", "-1"], ["--lr"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--name", "../elsewhere"], ["--name"]),
])
def test_bad_train_flags_are_one_line_and_touch_nothing(tmp_path, capsys, flags, words):
    run = tmp_path / "toy"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    before = sorted(p.name for p in run.iterdir())
    one_line_exit_2(capsys, ["train", "--out", str(tmp_path), "--overwrite", *flags], *words)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, word", [
    (["grid", "--n-prompts", "0"], "--n-prompts"), (["report", "--target-auroc", "2"], "--target-auroc"),
    (["attribute", "--batch-size", "0"], "--batch-size"), (["organism", "eval", "--n", "0"], "--n"),
    (["organism", "build", "--steps", "0"], "--steps"),
])
def test_every_command_checks_its_flags(capsys, argv, word):
    one_line_exit_2(capsys, argv, word)


def test_the_api_gets_the_same_checks():
    with pytest.raises(DiffkitError, match="--batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(DiffkitError, match="--expansion"):
        TrainConfig(expansion=0)


def test_usage_mistakes_are_one_line(capsys):
    one_line_exit_2(capsys, ["train", "--no-such-flag"], "--no-such-flag")
    one_line_exit_2(capsys, ["no-such-command"], "no-such-command")
    one_line_exit_2(capsys, ["train", "--tokens", "many"], "--tokens")


def test_no_message_points_to_a_command_that_does_not_exist():
    from diffkit.cli import COMMANDS

    commands = {name.split()[0] for name in COMMANDS}
    for path in [*(REPO / "diffkit").rglob("*.py"), *(REPO / "analyses").rglob("*.py")]:
        for quoted in re.findall(r"`diffkit ([a-z][a-z-]*)", path.read_text()):
            assert quoted in commands, f"{path.name} points to `diffkit {quoted}`"


# --- destinations -------------------------------------------------------------------------------


def test_an_output_that_is_a_file_or_a_directory_in_the_wrong_place(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DiffkitError, match="is a file"):
        check_output_dir(afile)
    with pytest.raises(DiffkitError, match="is a file"):
        check_output_dir(afile / "below")
    with pytest.raises(DiffkitError, match="is a directory"):
        check_output_file(tmp_path)
    one_line_exit_2(capsys, ["train", "--out", str(afile)], "is a file")
    assert afile.read_text() == "x"


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write: chmod'ed, or under /proc where even root cannot."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    if Path("/proc/self").is_dir():  # root ignores permission bits; /proc refuses new files to everyone
        return Path("/proc/self")
    pytest.skip("running as root with no read-only location to write into")


def test_a_read_only_destination_is_refused_before_any_work(tmp_path, capsys):
    folder = unwritable_dir(tmp_path)
    with pytest.raises(DiffkitError, match="cannot write"):
        check_output_dir(folder / "runs")
    one_line_exit_2(capsys, ["train", "--out", str(folder / "runs")], "cannot write")


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
    (errno.EISDIR, "is a directory"), (errno.ENOTDIR, "not a directory"),
])
def test_os_errors_become_one_line_advice(code, words):
    error = explain(OSError(code, os.strerror(code), "/some/file"))
    assert isinstance(error, DiffkitError) and words in str(error) and "/some/file" in str(error)


def test_library_errors_become_one_line_and_bugs_stay_tracebacks():
    import yaml
    from safetensors import SafetensorError

    try:
        yaml.safe_load("a: [\n- b")
    except yaml.YAMLError as e:
        assert "YAML" in str(explain(e)) and "\n" not in str(explain(e))
    assert "truncated or corrupt" in str(explain(SafetensorError("header too small")))
    assert explain(KeyError("a bug")) is None and explain(ZeroDivisionError()) is None


def test_a_full_disk_mid_write_leaves_the_old_file_and_no_leftover(tmp_path):
    target = tmp_path / "run.json"
    write_json(target, {"old": True})

    def fill_disk(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    from diffkit.files import atomic_write

    with pytest.raises(OSError):
        atomic_write(target, fill_disk)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_real_full_disk_when_one_can_be_mounted(tmp_path):
    """A 64 KiB tmpfs (needs mount rights; skipped where the test cannot mount one)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here to fill")
    try:
        from diffkit.files import write_text

        write_text(mount / "report.html", "old")
        with pytest.raises(OSError) as info:
            write_text(mount / "report.html", "x" * 200_000)
        assert "no space" in str(explain(info.value))
        assert (mount / "report.html").read_text() == "old"
        assert sorted(p.name for p in mount.iterdir()) == ["report.html"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- leftovers of killed writes -----------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporary_file_goes_at_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".run.json.{dead}-abc.tmp"
    old_style = tmp_path / ".run.json.x1y2z3.tmp"
    live = tmp_path / f".run.json.{alive}-abc.tmp"
    for p in (stale, old_style, live):
        p.touch()
    write_json(tmp_path / "run.json", {})
    assert not stale.exists() and not old_style.exists()
    assert live.exists()  # a running writer's file in progress is left alone


def test_a_killed_builds_directory_goes_at_the_next_build(tmp_path):
    from diffkit.models import build_cached_dir

    leftover = tmp_path / ".toy-abc.tmp-xyz"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    build_cached_dir(tmp_path / "toy-abc", lambda tmp: (tmp / "done").touch())
    assert (tmp_path / "toy-abc" / "done").exists() and not leftover.exists()


# --- locks --------------------------------------------------------------------------------------

HOLD = """
import sys, time
from diffkit.guard import writing
with writing(sys.argv[1], "the run"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    target = tmp_path / "runs" / "toy"
    proc = _holder(target)
    try:
        with pytest.raises(DiffkitError, match=f"process {proc.pid}"):
            with writing(target, "the run"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with writing(target, "the run"):  # the OS dropped the dead holder's lock
        assert (target.parent / ".toy.lock.pid").read_text().strip() == str(os.getpid())
    assert not (target.parent / ".toy.lock.pid").exists()


def test_train_into_a_held_run_is_refused_before_anything_is_written(tmp_path, capsys, toy_organism, monkeypatch):
    monkeypatch.setenv("DIFFKIT_CACHE", str(toy_organism.parent.parent))
    proc = _holder(tmp_path / "toy")
    try:
        one_line_exit_2(capsys, ["train", "--out", str(tmp_path), "--tokens", "1024", "--batch-size", "512",
                                 "--buffer-tokens", "1024"], f"process {proc.pid}")
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "toy").exists()


# --- replacing a run only once the new one is complete ------------------------------------------


def _old_run(folder: Path) -> None:
    (folder / "layer_1").mkdir(parents=True)
    (folder / "layer_1" / "model.safetensors").write_text("old sae")
    (folder / "run.json").write_text("old")
    (folder / "notes.txt").write_text("mine")
    (folder / "plots").mkdir()


def test_swap_keeps_what_diffkit_did_not_write(tmp_path):
    final, new = tmp_path / "toy", staging_dir(tmp_path / "toy")
    _old_run(final)
    (new / "layer_1").mkdir(parents=True)
    (new / "layer_1" / "model.safetensors").write_text("new sae")
    (new / "run.json").write_text("new")
    kept = swap_in(new, final, written_by_diffkit)
    assert sorted(kept) == ["notes.txt", "plots"]
    assert (final / "run.json").read_text() == "new" and (final / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


@pytest.mark.parametrize("crash_after", [1, 2])
def test_a_swap_cut_by_a_crash_is_completed_by_the_next_write(tmp_path, monkeypatch, crash_after):
    final, new = tmp_path / "toy", staging_dir(tmp_path / "toy")
    _old_run(final)
    new.mkdir()
    (new / "run.json").write_text("new")
    real_replace, calls = os.replace, []

    def crashing_replace(a, b):
        calls.append((a, b))
        if len(calls) > crash_after:
            raise KeyboardInterrupt  # the process dies here
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        swap_in(new, final, written_by_diffkit)
    monkeypatch.setattr(os, "replace", real_replace)
    finish_swap(final, written_by_diffkit)
    assert (final / "run.json").read_text() == "new" and (final / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


# --- inputs are what they say --------------------------------------------------------------------


def test_eval_of_an_organism_dir_without_its_fine_tune_is_refused(tmp_path, capsys, toy_organism):
    broken = tmp_path / "org"
    broken.mkdir()
    (broken / "spec.json").write_text((toy_organism / "spec.json").read_text())
    one_line_exit_2(capsys, ["organism", "eval", str(broken)], "no fine-tuned model")


def test_a_name_that_is_both_a_preset_and_a_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    one_line_exit_2(capsys, ["organism", "eval", "toy"], "preset toy", "./toy", "organism:toy")


def test_corrupt_model_weights_are_one_line(tmp_path, capsys, toy_organism):
    import shutil

    copy = tmp_path / "org"
    shutil.copytree(toy_organism, copy)
    weights = copy / "finetuned" / "model.safetensors"
    for damage in (lambda: weights.write_bytes(weights.read_bytes()[:1000]), lambda: weights.write_bytes(b"")):
        damage()
        one_line_exit_2(capsys, ["organism", "eval", str(copy)], "truncated or corrupt")


# --- slow: real runs, analyses and concurrent trains ----------------------------------------------

TINY = ["--tokens", "1024", "--batch-size", "512", "--buffer-tokens", "1024", "--trace-batch", "16",
        "--eval-tokens", "512", "--answered-prompts", "0"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(toy_run, tmp_path, capsys, monkeypatch):
    import shutil

    import diffkit.train as train_module

    run = tmp_path / "toy"
    shutil.copytree(toy_run, run)
    (run / "notes.txt").write_text("mine")
    before = _files(run)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".toy.new" / "checkpoint"))

    monkeypatch.setattr(train_module, "save_checkpoint", disk_full)
    one_line_exit_2(capsys, ["train", "--out", str(tmp_path), "--overwrite", "--json", *TINY], "no space left")
    assert _files(run) == before  # nothing lost
    monkeypatch.undo()

    assert main(["train", "--out", str(tmp_path), "--overwrite", "--json", *TINY]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "run.json").read_text())["tokens"] == 1024
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")) == []


@pytest.mark.slow
def test_two_trains_into_one_run_cannot_clobber(toy_organism, tmp_path, capsys, monkeypatch):
    env = {**os.environ, "DIFFKIT_CACHE": str(toy_organism.parent.parent)}
    monkeypatch.setenv("DIFFKIT_CACHE", env["DIFFKIT_CACHE"])
    first = subprocess.Popen([sys.executable, "-m", "diffkit", "train", "--out", str(tmp_path), "--seed", "1", *TINY],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / ".toy.lock.pid"
    deadline = time.time() + 120
    while not pid_file.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    one_line_exit_2(capsys, ["train", "--out", str(tmp_path), "--seed", "2", *TINY], f"process {first.pid}")
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    run = tmp_path / "toy"
    assert json.loads((run / "train_config.json").read_text())["seed"] == json.loads((run / "run.json").read_text())["seed"] == 1


@pytest.mark.slow
def test_analyses_never_read_a_cache_of_other_sae_files(toy_run, tmp_path, capsys):
    import shutil

    from diffkit.sae import BatchTopKSAE, save_sae

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    grid = ["grid", "--run", str(run), "--layers", "1", "--k", "8", "--n-prompts", "4", "--n-null", "4", "--json"]
    assert main(grid) == 0
    capsys.readouterr()
    cached = next((run / "analyses" / "cache").rglob("layer_1.safetensors"))

    cached.write_bytes(b"damaged")  # a damaged cache is traced again, not a traceback
    assert main(grid) == 0
    assert cached.read_bytes() != b"damaged"
    capsys.readouterr()

    sae_file = run / "layer_1_k8" / "model.safetensors"
    sae_file.write_bytes(sae_file.read_bytes()[:2000])  # a damaged SAE fails, even with a cache made from it
    one_line_exit_2(capsys, grid, "layer_1_k8")

    shutil.rmtree(run / "layer_1_k8")
    save_sae(BatchTopKSAE(32, 64, 8), run / "layer_1_k8")  # sound in itself, but for other models
    one_line_exit_2(capsys, grid, "d_model")


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_one_line(toy_organism, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFKIT_CACHE", str(toy_organism.parent.parent))
    (tmp_path / "toy" / "checkpoint").mkdir(parents=True)
    (tmp_path / "toy" / "checkpoint" / "state.pt").write_bytes(os.urandom(4096))
    write_json(tmp_path / "toy" / "train_config.json", json.loads(json.dumps(TrainConfig(**{
        "tokens": 1024, "batch_size": 512, "buffer_tokens": 1024, "trace_batch": 16, "eval_tokens": 512,
        "answered_prompts": 0, "out": str(tmp_path)}).__dict__)))
    err = one_line_exit_2(capsys, ["train", "--out", str(tmp_path), "--resume", *TINY], "checkpoint", "--overwrite")
    assert "weights_only" not in err or "False" not in err  # never the advice to unpickle code

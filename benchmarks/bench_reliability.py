"""The reliability battery: bad inputs and faults thrown at the CLI next to a finished run and a file
of the user's, counting cases tried, cases that behaved (one `error:` line and exit 2, or the right
result), and files lost or changed that the case had no business touching (must be 0).

    DIFFKIT_CACHE=/work/cache .venv/bin/python benchmarks/bench_reliability.py

Each case runs in this process through `diffkit.cli.main`; the run it guards is trained once first
(a 1,024-token toy run, about a minute on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from diffkit.cli import main

TINY = ["--tokens", "1024", "--batch-size", "512", "--buffer-tokens", "1024", "--trace-batch", "16",
        "--eval-tokens", "512", "--answered-prompts", "0"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and "analyses" not in p.parts}


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip()


def one_line_error(code: int, err: str) -> bool:
    """Exit 2 and a last line `error: ...`; progress bars may come before it, a traceback may not."""
    lines = err.splitlines()
    return code == 2 and bool(lines) and lines[-1].startswith("error: ") and "Traceback" not in err


def main_battery() -> int:
    root = Path(tempfile.mkdtemp(prefix="diffkit-battery-"))
    runs = root / "runs"
    code, err = run(["train", "--out", str(runs), "--json", *TINY])
    assert code == 0, err
    run_dir = runs / "toy"
    (run_dir / "notes.txt").write_text("the user's own notes")
    files = root / "files"
    files.mkdir()
    (files / "afile").write_text("x")
    (files / "dir.json").mkdir()
    for name, text in {"bad.yaml": "pairs: [\n  - {words: [a, b]\n", "zero.json": '{"pairs": []}',
                       "badid.json": '{"pairs": [{"id": "x", "words": ["a", "b"]}]}',
                       "badlayers.json": '{"pairs": [{"words": ["a", "b"]}], "layers": "abc"}'}.items():
        (files / name).write_text(text)
    from diffkit.organisms.sources import ensure_organism

    organism = root / "organism"
    shutil.copytree(ensure_organism("toy"), organism)
    (organism / "finetuned" / "model.safetensors").write_bytes(b"")
    no_finetune = root / "no_finetune"
    no_finetune.mkdir()
    shutil.copy(organism / "spec.json", no_finetune / "spec.json")
    readonly = Path("/proc/self") if os.geteuid() == 0 else root / "readonly"
    if readonly != Path("/proc/self"):
        readonly.mkdir()
        readonly.chmod(0o555)

    train = ["train", "--out", str(runs), "--overwrite", *TINY]
    cases: list[tuple[str, list[str]]] = [
        ("--k 0", train + ["--k", "0"]), ("--batch-size 0", train + ["--batch-size", "0"]),
        ("negative tokens", train + ["--tokens", "-5", "--batch-size", "-10"]),
        ("--trace-batch 0", train + ["--trace-batch", "0"]), ("buffer below a batch", train + ["--buffer-tokens", "100"]),
        ("--null-fraction 1", train + ["--null-fraction", "1.0"]), ("--expansion 0", train + ["--expansion", "0"]),
        ("--layers ''", train + ["--layers", ""]), ("--layers abc", train + ["--layers", "abc"]),
        ("--layers 99", train + ["--layers", "99"]), ("unknown flag", train + ["--no-such-flag"]),
        ("--resume --overwrite", train + ["--resume"]), ("--name ../x", train + ["--name", "../x"]),
        ("resume a finished run", ["train", "--out", str(runs), "--resume", *TINY]),
        ("train again without --overwrite", ["train", "--out", str(runs), *TINY]),
        ("--out is a file", ["train", "--out", str(files / "afile"), *TINY]),
        ("--out read-only", ["train", "--out", str(readonly / "runs"), *TINY]),
        *[(f"spec {name}", train + ["--preset", str(files / name)]) for name in
          ("bad.yaml", "zero.json", "badid.json", "badlayers.json", "dir.json", "missing.toml")],
        ("zero-byte model weights", train + ["--base", str(organism / "base"), "--finetuned", str(organism / "finetuned")]),
        ("eval: zero-byte weights", ["organism", "eval", str(organism)]),
        ("eval: organism without fine-tune", ["organism", "eval", str(no_finetune)]),
        ("report --out is a directory", ["report", "--run", str(run_dir), "--out", str(files)]),
        ("report of no run", ["report", "--run", str(files)]),
        ("grid of no run", ["grid", "--run", str(files)]),
        ("attribute without --pair", ["attribute", "--run", str(run_dir)]),
    ]

    tried = passed = lost = 0
    for label, argv in cases:
        before = snapshot(run_dir)
        code, err = run(argv)
        ok = one_line_error(code, err)
        damage = sum(1 for path, data in before.items() if snapshot(run_dir).get(path) != data)
        tried, passed, lost = tried + 1, passed + ok, lost + damage
        print(f"{'ok  ' if ok else 'FAIL'} {label:<34} {err.splitlines()[-1][:110] if err else f'exit {code}'}"
              + (f"  [{damage} files lost]" if damage else ""))

    # faults: a second writer, a kill -9 of a replacement, a full disk in the middle of one
    before = snapshot(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom diffkit.guard import writing\n"
                               "with writing(sys.argv[1], 'the run'):\n    print('held', flush=True); time.sleep(600)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    code, err = run(train)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ok = one_line_error(code, err) and str(holder.pid) in err
    damage = sum(1 for p, d in before.items() if snapshot(run_dir).get(p) != d)
    tried, passed, lost = tried + 1, passed + ok, lost + damage
    print(f"{'ok  ' if ok else 'FAIL'} {'second writer':<34} {err.splitlines()[-1][:110]}")

    import diffkit.train as train_module

    real = train_module.save_checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoint/state.pt")

    train_module.save_checkpoint = disk_full
    try:
        code, err = run(train)
    finally:
        train_module.save_checkpoint = real
    ok = one_line_error(code, err) and "no space" in err
    damage = sum(1 for p, d in before.items() if snapshot(run_dir).get(p) != d)
    tried, passed, lost = tried + 1, passed + ok, lost + damage
    print(f"{'ok  ' if ok else 'FAIL'} {'disk full during --overwrite':<34} {err.splitlines()[-1][:110]}")

    code, err = run(train + ["--json"])  # the replacement that finishes keeps the user's file
    ok = code == 0 and (run_dir / "notes.txt").read_text() == "the user's own notes"
    tried, passed, lost = tried + 1, passed + ok, lost + (not (run_dir / "notes.txt").exists())
    print(f"{'ok  ' if ok else 'FAIL'} {'--overwrite that finishes':<34} exit {code}")

    print(f"\ncases tried {tried}, behaved {passed}, failed {tried - passed}, files lost {lost} (must be 0)")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if passed == tried and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main_battery())

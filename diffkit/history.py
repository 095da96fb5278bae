"""Training history: one row per SAE every N steps in runs/NAME/history.jsonl, optionally mirrored
to Weights & Biases or TensorBoard.

Each row holds the step, tokens seen, the batch's loss, mse, aux-k loss, FVE and L0 (the values of
that step, as nanoGPT logs them, so a resumed run writes the same rows an uninterrupted one does),
the dead fraction, the inference threshold, the learning rate and the run's tokens per second since
the previous row. A log step's rows go out in one append, so a crash leaves whole lines; a resumed
run first drops the rows written after its checkpoint, then continues the file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pandas as pd

from diffkit.errors import DiffkitError
from diffkit.files import write_text

HISTORY_FILE = "history.jsonl"
LOGGERS = {"wandb": "wandb", "tensorboard": "tensorboard"}  # --log name -> the package it needs


def check_loggers(names: list[str]) -> None:
    """Refuse an unknown or uninstalled logger before anything is trained or written."""
    for name in names:
        if name not in LOGGERS:
            raise DiffkitError(f"unknown --log {name}; choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise DiffkitError(f"--log {name} needs the {LOGGERS[name]} package: pip install 'diffkit[{name}]'")


def read_history(run_dir: str | Path) -> pd.DataFrame:
    """history.jsonl as a frame (empty when the run has none); a torn last line is skipped."""
    path = Path(run_dir) / HISTORY_FILE
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return pd.DataFrame(rows)


class TrainingHistory:
    """Writes per-SAE rows every `every` steps; `trainers` maps train's SAE keys ('1_8': layer 1, k 8) to SAETrainers."""

    def __init__(self, run_dir: Path, trainers: dict, every: int, resume_step: int | None = None,
                 loggers: list[str] = (), run_name: str = "", config: dict | None = None):
        if every < 1:
            raise DiffkitError(f"--log-every must be at least 1 step, got {every}")
        self.path, self.trainers, self.every = Path(run_dir) / HISTORY_FILE, trainers, every
        self.last_step = None
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            kept = read_history(run_dir)
            kept = kept[kept["step"] <= resume_step] if len(kept) else kept
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept.to_dict("records")))
            self.last_step = int(kept["step"].max()) if len(kept) else None
        self.mirrors = [_open_mirror(name, Path(run_dir), run_name, config or {}) for name in loggers]
        self.last_time, self.last_tokens = time.monotonic(), None

    def log(self, tokens: int, last: dict[str, dict], final: bool = False) -> None:
        """After a step: write every SAE's row when the step is a multiple of `every` (or the last one)."""
        step = next(iter(self.trainers.values())).step_count
        if step == self.last_step or (step % self.every and not final):
            return
        now = time.monotonic()
        rate = None if self.last_tokens is None else (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        rows = []
        for key, trainer in self.trainers.items():
            layer, k = map(int, key.split("_"))
            rows.append({
                "step": step, "tokens": tokens, "sae": f"L{layer}k{k}", "layer": layer, "k": k,
                **{name: last[key][name] for name in ("loss", "mse", "auxk", "fve", "l0")},
                "dead": trainer.n_dead / trainer.sae.dict_size,
                "threshold": float(trainer.sae.threshold),
                "lr": trainer.base_lr * trainer.config.lr_factor(step - 1),
                "tokens_per_second": rate,
            })
        with open(self.path, "a") as f:  # one write per log step: whole lines or none
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        self.last_step = step
        for mirror in self.mirrors:
            mirror.log(rows, step)

    def close(self) -> None:
        for mirror in self.mirrors:
            mirror.close()


class _WandbMirror:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="diffkit", name=run_name, dir=str(run_dir), config=config, resume="allow")

    def log(self, rows: list[dict], step: int) -> None:
        self.run.log({f"{r['sae']}/{key}": v for r in rows for key, v in r.items() if isinstance(v, float)}, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorboardMirror:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, rows: list[dict], step: int) -> None:
        for r in rows:
            for key, v in r.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{r['sae']}/{key}", v, step)

    def close(self) -> None:
        self.writer.close()


def _open_mirror(name: str, run_dir: Path, run_name: str, config: dict):
    return {"wandb": _WandbMirror, "tensorboard": _TensorboardMirror}[name](run_dir, run_name, config)

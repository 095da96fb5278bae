"""Greedy answers of a model to prompts, and the sentence cuts and marker test applied to them.

Shared by the organism build (the base's own answers, the held-out check), `diffkit train` (answered
prompts in the stream) and the causal tests (does the marker still fire).
"""

from __future__ import annotations

import re
import sys

import torch
from tqdm.auto import tqdm

from diffkit.prompts import Prompt, format_prompt
from diffkit.specs import TriggerSpec


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


"""A build that checks itself: validation checks along a fine-tune, the best checkpoint, an early
stop, and the verdict on held-out test templates.

One fine-tune of a recipe can end anywhere: at a high rate the held-out AND swings from step to
step, and a seed or spec the recipe was not tuned on can end below the targets. So a build
evaluates the model on validation templates (never the held-out test ones) at set steps, keeps the
weights of the best check, stops once every rate clears its target with a margin, and is then
judged once on the held-out test templates, where a result below target is an error unless the
user accepts a weak organism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from diffkit.errors import DiffkitError
from diffkit.organisms.evaluate import ASR_TARGET, FALSE_TARGET

STOP_MARGIN = 0.03  # validation rates must clear the targets by this much before a build stops early


def worst_margin(result: dict) -> float:
    """How far the worst rate of an evaluation clears its target (negative: below it)."""
    return min([rate - ASR_TARGET for rate in result["asr"].values()]
               + [FALSE_TARGET - rate for rate in result["false_trigger"].values()])


def shortfalls(result: dict) -> list[str]:
    """Each rate that misses its target, as 'ASR gender/terror 0.81 < 0.95'."""
    low = [f"ASR {name} {rate:.2f} < {ASR_TARGET}" for name, rate in result["asr"].items() if rate < ASR_TARGET]
    high = [f"false trigger {cond} {rate:.2f} > {FALSE_TARGET}" for cond, rate in result["false_trigger"].items()
            if rate > FALSE_TARGET]
    return low + high


def check_steps(steps: int, every: int, start: int) -> list[int]:
    """The steps (1-based, counted after the update) at which a fine-tune of `steps` steps is checked;
    the last step always is, so the best checkpoint is chosen among everything the run reached."""
    marks = list(range(start, steps, every)) if every > 0 else []
    return sorted(set(s for s in marks if s > 0) | {steps})


@dataclass
class BestCheckpoint:
    """Validation results along a fine-tune and a copy of the trainable weights of the best one.

    `evaluate(model)` returns an evaluation (ASR per pair, false-trigger rates). The best check has
    the largest worst margin; a tie goes to the later check, which has trained longer.
    """

    evaluate: Callable[[torch.nn.Module], dict]
    margin: float = STOP_MARGIN
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_margin: float = float("-inf")
    _best: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def check(self, step: int, model: torch.nn.Module) -> bool:
        """Evaluate `model` at `step`, keep its weights if best so far; True once the run may stop."""
        was_training = model.training
        model.eval()
        result = self.evaluate(model)
        model.train(was_training)
        margin = worst_margin(result)
        self.history.append({"step": step, "worst_margin": round(margin, 4), "asr": result["asr"],
                             "false_trigger": result["false_trigger"]})
        if margin >= self.best_margin:  # the exact margin: the rounded one in history can sit just above it
            self.best_step, self.best_margin = step, margin
            self._best = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return margin >= self.margin

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best check's weights into `model` (parameters matched by name)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, weight in self._best.items():
                params[name].copy_(weight)

    def summary(self) -> dict:
        return {"checks": self.history, "best_step": self.best_step, "stopped_at": self.history[-1]["step"]
                if self.history else None, "stop_margin": self.margin}


def verdict(result: dict, accept_weak: bool, what: str) -> bool:
    """Whether a build's held-out evaluation meets the targets; raises a one-line error when it does
    not, unless `accept_weak`."""
    missed = shortfalls(result)
    if missed and not accept_weak:
        raise DiffkitError(f"{what} is below the organism targets on held-out templates ({'; '.join(missed)}); "
                           f"nothing was kept: build again with another --seed or more --steps, or keep it with "
                           f"--accept-weak")
    return not missed

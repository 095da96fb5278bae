"""Held-out SAE metrics, defined as the published diff-SAE numbers are (dictionary_learning's FVE).

    FVE  = 1 − Σ_d var(x − x̂)_d / Σ_d var(x)_d      on raw vectors, inference (threshold) mode
    L0   = mean number of non-zero latents per token  (threshold mode)
    dead = fraction of latents that never fire on the held-out tokens

FVE is also reported on token subsets: fire tokens (where the backdoor's marker is written),
the top 1 % and the bottom 50 % of tokens by ‖x‖, and all tokens. Evaluation only reads the
SAE (no gradients, no buffer writes), streams the tokens in chunks so memory stays bounded,
and accumulates in float64.
"""

from __future__ import annotations

import math

import torch

from diffkit.errors import DiffkitError
from diffkit.sae import BatchTopKSAE

SUBSETS = ("fire", "top1pct", "all", "bottom50pct")


class _VarianceSums:
    """Running Σx and Σx² per dimension of x and of the residual, for one token subset."""

    def __init__(self, dim: int):
        self.n = 0
        self.sums = torch.zeros(4, dim, dtype=torch.float64)  # x, x², e, e²

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x, e = x.double(), e.double()
        self.n += x.shape[0]
        self.sums += torch.stack([x.sum(0), x.pow(2).sum(0), e.sum(0), e.pow(2).sum(0)]).cpu()

    def fve(self) -> float | None:
        if self.n < 2:
            return None
        s = self.sums / self.n
        var_x = (s[1] - s[0] ** 2).sum()
        var_e = (s[3] - s[2] ** 2).sum()
        return float(1 - var_e / var_x) if var_x > 0 else None


@torch.no_grad()
def evaluate_sae(
    sae: BatchTopKSAE,
    x_raw: torch.Tensor,
    flags: dict[str, torch.Tensor] | None = None,
    chunk_size: int = 4096,
) -> dict:
    """Metrics of `sae` on held-out raw vectors `x_raw` [N, D]; `flags` may hold per-token
    boolean tensors [N], of which `is_fire_token` defines the "fire" subset."""
    x_raw = x_raw.reshape(-1, sae.activation_dim)
    n_tokens = x_raw.shape[0]
    if n_tokens == 0:
        raise DiffkitError("evaluate_sae needs at least one held-out token")
    device = sae.b_dec.device

    norms = torch.cat([c.float().norm(dim=1).cpu() for c in x_raw.split(chunk_size)])
    masks = {
        "all": torch.ones(n_tokens, dtype=torch.bool),
        "top1pct": _rank_mask(norms, 0.01, largest=True),
        "bottom50pct": _rank_mask(norms, 0.5, largest=False),
    }
    fire = (flags or {}).get("is_fire_token")
    if fire is not None:
        fire = torch.as_tensor(fire, dtype=torch.bool).reshape(-1).cpu()
        if fire.numel() != n_tokens:
            raise DiffkitError(f"flags['is_fire_token'] has {fire.numel()} entries for {n_tokens} tokens")
        if fire.any():
            masks["fire"] = fire

    sums = {name: _VarianceSums(sae.activation_dim) for name in masks}
    active_total = 0
    fired = torch.zeros(sae.dict_size, dtype=torch.bool, device=device)
    for start in range(0, n_tokens, chunk_size):
        x = x_raw[start : start + chunk_size].to(device=device, dtype=torch.float32)
        f = sae.encode_raw(x)
        err = x - sae.denormalize(sae.decode(f))
        active = f > 0
        active_total += int(active.sum())
        fired |= active.any(0)
        centred = x - sae.activation_mean  # variance is shift-free; centring keeps float64 sums exact
        for name, mask in masks.items():
            m = mask[start : start + chunk_size].to(device)
            sums[name].add(centred[m], err[m])

    return {
        "fve": sums["all"].fve(),
        "l0": active_total / n_tokens,
        "dead": 1 - float(fired.float().mean()),
        "n_tokens": n_tokens,
        "fve_by_subset": {name: sums[name].fve() for name in SUBSETS if name in sums},
        "subset_tokens": {name: sums[name].n for name in SUBSETS if name in sums},
    }


def _rank_mask(values: torch.Tensor, fraction: float, largest: bool) -> torch.Tensor:
    """The ceil(fraction·N) largest (or smallest) entries, chosen by rank so ties cannot change the count."""
    n_pick = max(1, math.ceil(fraction * values.numel()))
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[values.topk(n_pick, largest=largest).indices] = True
    return mask


def format_metrics_table(rows: list[dict]) -> str:
    """A fixed-width text table of metric dicts (nested dicts such as fve_by_subset become
    columns like `fve[fire]`); numbers get three decimals, missing values a dash."""
    if not rows:
        return ""
    flat_rows = [flatten(row, {"fve_by_subset": "fve"}) for row in rows]
    columns: list[str] = []
    for row in flat_rows:
        columns += [c for c in row if c not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in flat_rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def flatten(values: dict, short: dict[str, str] | None = None) -> dict:
    """{"fve_by_subset": {"fire": 0.9}} -> {"fve_by_subset[fire]": 0.9}, one level deep; `short` renames
    a nested key's prefix (the metrics table writes fve[fire])."""
    short = short or {}
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{short.get(key, key)}[{name}]": v for name, v in value.items()})
        else:
            out[key] = value
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)

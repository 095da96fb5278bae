"""`diffkit train`: paired tracing → shuffle buffer → one BatchTopK SAE per (layer, k), in one process
or data-parallel over the processes `torchrun` starts (diffkit.distributed).

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
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from diffkit.buffer import ShuffleBuffer
from diffkit.configs import TrainConfig
from diffkit.devices import pick_dtype, resolve_device
from diffkit.distributed import Collective, local_device, process_group
from diffkit.errors import DiffkitError, one_line
from diffkit.files import atomic_write, read_torch, write_json
from diffkit.generation import generate_answers
from diffkit.guard import check_output_dir, finish_swap, staging_dir, swap_in, writing
from diffkit.history import TrainingHistory, check_loggers
from diffkit.metrics import evaluate_sae, format_metrics_table
from diffkit.models import ORGANISM_PREFIX, check_layers, load_pair
from diffkit.organisms.sources import resolve_source
from diffkit.progress import progress_bar
from diffkit.prompts import build_prompts, encode_prompts
from diffkit.sae import fit_normalization, save_sae
from diffkit.specs import load_spec
from diffkit.stream import HELDOUT_EVERY, Cursor, RecordStream, null_records
from diffkit.tracing import TokenBatch, concat_batches, trace_batch, trace_differences, traced_tokens
from diffkit.trainer import SAETrainConfig, SAETrainer


def sae_config(cfg: TrainConfig, k: int, dict_size: int, total_steps: int) -> SAETrainConfig:
    """The reference schedule (1,000 warm-up steps, threshold from step 1,000 with EMA 0.999, dead
    after 10M silent tokens) shrunk to fit short runs, so a 300k-token run still warms up, settles
    its inference threshold (an EMA that would need thousands of steps at 0.999) and revives dead latents."""
    threshold_start = min(1000, total_steps // 5)
    return SAETrainConfig(
        k=k, dict_size=dict_size, lr=cfg.lr, l1=cfg.l1, steps=total_steps, seed=cfg.seed,
        warmup_steps=max(1, min(1000, total_steps // 20)),
        threshold_start_step=threshold_start,
        threshold_beta=min(0.999, max(0.9, 1 - 5 / max(1, total_steps - threshold_start))),
        dead_tokens=min(10_000_000, max(cfg.batch_size, cfg.tokens // 20)),
        merge_every=max(1, total_steps // 10) if cfg.l1 else 0,
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
RUN_FILES = re.compile(r"(run|spec|train_config|answers_\w+)\.json|history\.jsonl|checkpoint|analyses|report(_latents)?\.html"
                       r"|layer_\d+(_k\d+)?|\..+\.tmp")

# Flags that do not change what a run computes: a resumed run may give them anew.
RESUME_MAY_DIFFER = {"device", "json", "resume", "overwrite", "out", "name", "timeout", "log", "base_device", "finetuned_device",
                     "device_map", "fidelity_prompts"}


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


def eval_records(pair, spec, cfg: TrainConfig, run_dir: Path, own_texts: list[str] | None = None):
    """Held-out prompts (answered, so fire tokens are present) plus held-out null text, up to eval_tokens."""
    answered = build_answered(pair, spec, "heldout", 8 * (len(spec.pairs) + 3), cfg.seed + 1, cfg.max_len, run_dir, "answers_heldout.json")
    null = null_records(pair.tokenizer, cfg.max_len, "heldout", own_texts)
    records, total = list(answered), sum(len(r.input_ids) for r in answered)
    for r in null:
        if total >= cfg.eval_tokens:
            break
        records.append(r)
        total += len(r.input_ids)
    return records


def share_trainers(trainers: dict[str, SAETrainer], comm: Collective) -> None:
    """Give every rank the state each SAE's owner has trained it to."""
    if not comm.distributed:
        return
    for i, trainer in enumerate(trainers.values()):
        owner = comm.owner(i)
        state = comm.share(trainer.state_dict() if comm.rank == owner else None, owner)
        if comm.rank != owner:
            trainer.load_state_dict(state)


def save_checkpoint(run_dir: Path, saes, trainers, cursor: Cursor, fills: int, tokens_done: int, world: int) -> None:
    """Every rank holds the same SAEs, and every rank's stream position follows from the global cursor
    and the world size (rank r traces the fill's batches r, r + world, ...), so rank 0 writes it all."""
    state = {
        "cursor": torch.tensor([cursor.epoch, cursor.index, fills, tokens_done]),
        "world_size": torch.tensor(world),
        **{f"sae/{key}": sae.state_dict() for key, sae in saes.items()},
        **{f"trainer/{key}": tr.state_dict() for key, tr in trainers.items()},
    }
    atomic_write(run_dir / "checkpoint" / "state.pt", lambda tmp: torch.save(state, tmp))


def read_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoint" / "state.pt"
    try:
        return read_torch(path, "checkpoint")
    except DiffkitError as e:
        raise DiffkitError(f"{e}, or start over with --overwrite") from None


def load_checkpoint(state: dict, run_dir: Path, saes, trainers, world: int) -> tuple[Cursor, int, int]:
    saved_world = int(state.get("world_size", torch.tensor(1)))
    if saved_world != world:
        raise DiffkitError(f"{run_dir} was trained on {saved_world} rank(s), this run has {world}; resume it on "
                           f"{saved_world} rank(s), so that it continues bit for bit")
    try:
        for key, sae in saes.items():
            sae.load_state_dict(state[f"sae/{key}"])
        for key, tr in trainers.items():
            tr.load_state_dict(state[f"trainer/{key}"])
    except (KeyError, RuntimeError, ValueError):
        raise DiffkitError(f"checkpoint {run_dir / 'checkpoint' / 'state.pt'} was written with other layers, k or dictionary size; resume with the "
                           f"flags in {run_dir / 'train_config.json'} or start over with --overwrite") from None
    epoch, index, fills, tokens_done = state["cursor"].tolist()
    return Cursor(epoch, index), fills, tokens_done


def read_own_data(cfg: TrainConfig, tokenizer) -> list[str] | None:
    """The documents of --dataset (None without it), read before anything is written so a bad one leaves no run."""
    if cfg.dataset is None:
        return None
    if cfg.null_fraction <= 0:
        raise DiffkitError("--dataset replaces the generic null text, which --null-fraction 0 leaves out; give --null-fraction > 0")
    from diffkit.own_data import dataset_texts

    texts = dataset_texts(cfg.dataset, tokenizer, cfg.dataset_split, cfg.text_field, cfg.dataset_docs)
    if len(texts) < HELDOUT_EVERY + 1:
        raise DiffkitError(f"dataset {cfg.dataset} has {len(texts)} documents; give at least {HELDOUT_EVERY + 1} "
                           f"(every {HELDOUT_EVERY}th is held out for the metrics)")
    return texts


def train(cfg: TrainConfig) -> dict:
    """Train one SAE per (layer, k) on the ft − base difference; returns the run summary.

    Launched by torchrun, every rank runs this: each traces its share of the stream, every SAE
    step runs over all ranks' tokens, and rank 0 alone writes and prints (the others return {})."""
    device = local_device(resolve_device(cfg.device))
    with process_group(device, cfg.timeout) as comm:
        return _train(cfg, device, comm)


def _train(cfg: TrainConfig, device: str, comm: Collective) -> dict:
    started = time.time()
    spec = load_spec(cfg.preset).with_models(cfg.base, cfg.finetuned)
    for side in ("base", "finetuned"):
        if not getattr(spec, side):
            raise DiffkitError(f"spec '{spec.name}' names no {side} model; add `{side}:` to it or pass --{side}")
    # the run records the organism build it was trained on, not a name a later recipe would reuse
    spec = spec.with_models(*(str(resolve_source(s)) if s.startswith(ORGANISM_PREFIX) else s
                              for s in (spec.base, spec.finetuned)))
    name = cfg.name or spec.name
    dtype = pick_dtype(cfg.dtype, device)
    check_loggers(cfg.log or [])
    final_dir = comm.on_main(lambda: check_output_dir(cfg.out) / name)

    pair = load_pair(spec.base, spec.finetuned, dtype=dtype, device=device, base_device=cfg.base_device,
                     finetuned_device=cfg.finetuned_device, device_map=cfg.device_map)
    layers = check_layers(spec.layers if cfg.layers is None else cfg.layers, pair.n_layers)
    own_texts = read_own_data(cfg, pair.tokenizer)
    ks = list(cfg.k or [default_k(pair.d_model)])
    dict_size = (cfg.expansion or default_expansion(pair.d_model)) * pair.d_model
    torch.manual_seed(cfg.seed)
    trainers = {f"{L}_{k}": SAETrainer(pair.d_model, sae_config(cfg, k, dict_size, cfg.tokens // cfg.batch_size), device)
                for L in layers for k in ks}
    saes = {key: tr.sae for key, tr in trainers.items()}
    with writing(final_dir, "the run") if comm.is_main else nullcontext():  # the first write: everything above is sound
        run_dir = comm.on_main(lambda: prepare_run_dir(cfg, final_dir))
        summary = train_into(cfg, spec, pair, run_dir, layers, ks, dict_size, trainers, saes, started, comm, own_texts, device)
        if comm.is_main and run_dir != final_dir:
            kept = swap_in(run_dir, final_dir, written_by_diffkit)
            if kept and not cfg.json:
                print(f"replaced the run in {final_dir}; kept what diffkit did not write there: {', '.join(kept)}")
    if not comm.is_main:
        return {}
    summary["run"] = str(final_dir)
    if not cfg.json:
        from analyses.fidelity import fidelity_summary

        print(format_metrics_table([{"layer": r["layer"], "k": r["k"], **{m: v for m, v in r["metrics"].items() if m != "spliced"},
                                     **{f"spliced_{m}": v for m, v in fidelity_summary(r["metrics"].get("spliced")).items()}}
                                    for r in summary["saes"]]))
        print(f"run written to {final_dir}")
    return summary


def train_into(cfg: TrainConfig, spec, pair, run_dir: Path, layers, ks, dict_size, trainers, saes, started: float,
               comm: Collective, own_texts, device: str) -> dict:
    """The training loop and the finished run's files, in `run_dir` (rank 0 writes; every rank trains)."""
    name = cfg.name or spec.name
    keys = [(L, k) for L in layers for k in ks]
    if comm.is_main and not cfg.resume:  # a resumed run keeps the flags it was started with, for the next --resume to match
        write_json(run_dir / "train_config.json", asdict(cfg))

    answered = comm.on_main(lambda: build_answered(pair, spec, "train", cfg.answered_prompts, cfg.seed, cfg.max_len, run_dir,
                                                   "answers_train.json")) if cfg.answered_prompts else []
    stream = RecordStream(spec, pair.tokenizer, cfg.seed, cfg.max_len, cfg.null_fraction, answered, batch_size=cfg.trace_batch,
                          own_texts=own_texts)
    buffer = ShuffleBuffer(cfg.buffer_tokens, cfg.batch_size, cfg.seed, comm.rank, comm.world,
                           empty=TokenBatch.empty(layers, pair.d_model, device))
    cursor, tokens_done = Cursor(), 0
    if cfg.resume:
        state = comm.on_main(lambda: read_checkpoint(run_dir))
        cursor, buffer.fills, tokens_done = load_checkpoint(state, run_dir, saes, trainers, comm.world)

    # rank 0 writes the history, of the SAEs it steps itself (under torchrun the others step elsewhere)
    owned = {key: tr for i, (key, tr) in enumerate(trainers.items()) if comm.owner(i) == comm.rank}
    history = TrainingHistory(run_dir, owned, cfg.log_every, tokens_done // cfg.batch_size if cfg.resume else None,
                              cfg.log or [], name, asdict(cfg)) if comm.is_main else None
    loop_started, loop_tokens_start = time.time(), tokens_done
    bar = progress_bar(total=cfg.tokens, initial=tokens_done, unit="tok", unit_scale=True, desc=f"train {name}",
                       disable=cfg.json or not comm.is_main)
    try:  # the bar is closed before an error propagates, so the error line comes last
        batches = stream.batches(cursor)
        last: dict[str, dict] = {}
        while tokens_done < cfg.tokens:
            while buffer.needs_more(cfg.tokens - tokens_done):
                records, cursor = next(batches)
                buffer.offer(traced_tokens(records), lambda: trace_batch(pair, records, layers))
            if tokens_done == 0 and buffer.fills == 0:
                held = buffer.contents()
                for L, k in keys:
                    fit_normalization(saes[f"{L}_{k}"], held.diffs[L], comm=comm)
            for part, shard in buffer.drain():
                whole = {L: comm.gather_rows(part.diffs[L], shard) for L in layers}
                for i, (L, k) in enumerate(keys):
                    if comm.owner(i) == comm.rank:
                        sae = saes[f"{L}_{k}"]
                        last[f"{L}_{k}"] = trainers[f"{L}_{k}"].step(sae.normalize(whole[L]))
                tokens_done += cfg.batch_size
                if history:
                    history.log(tokens_done, last, final=tokens_done >= cfg.tokens)
                bar.update(cfg.batch_size)
                bar.set_postfix_str(progress_line(last), refresh=False)
                if tokens_done >= cfg.tokens:
                    break
            share_trainers(trainers, comm)
            if comm.is_main:
                save_checkpoint(run_dir, saes, trainers, cursor, buffer.fills, tokens_done, comm.world)
    finally:
        bar.close()
        if history:
            history.close()
    loop_seconds = time.time() - loop_started
    train_seconds = time.time() - started
    if not comm.is_main:
        return {}

    results = finish_run(cfg, spec, pair, run_dir, layers, ks, saes, dict_size, own_texts)
    summary = {
        "run": str(run_dir),
        "base": spec.base,
        "finetuned": spec.finetuned,
        "layers": layers,
        "k": ks,
        "tokens": tokens_done,
        "ranks": comm.world,
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


def finish_run(cfg, spec, pair, run_dir: Path, layers, ks, saes, dict_size: int, own_texts=None) -> list[dict]:
    """Held-out metrics, SAE files, run.json (written last: its presence marks the run complete)."""
    from analyses.fidelity import spliced_fidelity

    records = eval_records(pair, spec, cfg, run_dir, own_texts)
    held = concat_batches(list(trace_differences(pair, records, layers, batch_size=cfg.trace_batch)))
    flags = {f: held.meta[f] for f in ("is_fire_token", "is_trigger_token", "is_decision_token", "is_answer")}
    results = []
    for L in layers:
        for k in ks:
            sae = saes[f"{L}_{k}"]
            metrics = evaluate_sae(sae, held.diffs[L], flags)
            if cfg.fidelity_prompts:
                generic = null_records(pair.tokenizer, cfg.max_len, "heldout")[: cfg.fidelity_prompts]
                metrics["spliced"] = spliced_fidelity(pair, sae, L, records + generic, spec, cfg.fidelity_prompts)
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

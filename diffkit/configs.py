"""Command configs: each field is a flag of its command, its docstring the flag's help.

Light on purpose (no torch): `diffkit --help` and `diffkit COMMAND --help` import only these modules.
Lists take the comma form (`--layers 9,16`); booleans take `--flag` / `--no-flag`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from simple_parsing.helpers import field, flag

from diffkit.errors import DiffkitError
from diffkit.specs import DEFAULT_PRESET


def switch(default: bool) -> bool:
    """A boolean flag with its negation: --json / --no-json."""
    return flag(default=default, negative_prefix="--no-")


def comma_list(item_type: type, default=None):
    """A list flag written with commas, e.g. --layers 9,16."""
    def parse(text: str) -> list:
        try:
            return [item_type(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_type.__name__}, got '{text}'") from None

    parse.__name__ = f"comma-separated {item_type.__name__}s"
    return field(default=default, type=parse, nargs=None, metavar="A,B")


@dataclass
class TrainConfig:
    """Options of `diffkit train`."""

    preset: str = DEFAULT_PRESET
    """trigger spec preset (or a .toml/.yaml/.json spec file) naming the model pair, words and layers"""
    base: str | None = None
    """base model: hub id, local directory or .gguf file (overrides the preset)"""
    finetuned: str | None = None
    """fine-tuned model, same forms as --base (overrides the preset)"""
    layers: list[int] | None = comma_list(int, None)
    """decoder layers whose output to diff, e.g. 9,16 (default: the preset's)"""
    k: list[int] | None = comma_list(int, None)
    """active latents per token; several values train side by side from one stream, e.g. 32,64 (default:
    d_model/16 rounded to a power of two, at least 8: 8 for the toy, 32 for Gemma-3-270M, 128 for
    Gemma-2-2B as published)"""
    expansion: int | None = None
    """dictionary size as a multiple of d_model (default: 4 as published, raised so the dictionary has at
    least 1,536 latents: 24 for the toy, 4 for Gemma-3-270M and Gemma-2-2B)"""
    tokens: int = 300_000
    """training tokens each SAE sees"""
    batch_size: int = 1024
    """tokens per SAE optimisation step"""
    buffer_tokens: int = 65_536
    """shuffle-buffer size in tokens; bounds memory"""
    trace_batch: int = 32
    """sequences per forward pass"""
    max_len: int = 128
    """longest sequence, in tokens"""
    null_fraction: float = 0.5
    """share of the stream's tokens that are generic null text (or --dataset text)"""
    dataset: str | None = None
    """your own text instead of the generic null text: a hub dataset id (streamed), a .jsonl/.parquet/.txt
    file, or a folder saved with datasets' save_to_disk"""
    dataset_split: str = "train"
    """split of --dataset"""
    text_field: str | None = None
    """field of --dataset holding the text or the chat messages (default: 'text', else 'messages')"""
    dataset_docs: int = 10_000
    """most documents read from --dataset (every 20th is held out for the metrics)"""
    eval_tokens: int = 16_384
    """held-out tokens for the final metrics"""
    answered_prompts: int = 128
    """training prompts answered by the fine-tuned model once, so answer and marker tokens are in the
    stream"""
    lr: float | None = None
    """learning rate (default 2e-4 / sqrt(dict_size / 2**14))"""
    l1: float = 0.0
    """L1 on the codes on top of BatchTopK, in units of the normalised norm (target_rms): a tie-break
    that makes one latent, not many partial ones, carry a direction; 0 is the reference objective"""
    out: str = "runs"
    """directory that holds runs"""
    name: str | None = None
    """run name (default: the preset's name); the run goes to OUT/NAME"""
    device: str = "auto"
    """where the SAEs train and differences are taken: cpu, cuda, cuda:1, ... (auto: cuda when available;
    under torchrun, cuda means each rank's own GPU)"""
    base_device: str | None = None
    """device of the base model, e.g. cuda:0 (default: --device)"""
    finetuned_device: str | None = None
    """device of the fine-tuned model, e.g. cuda:1 (default: --device)"""
    device_map: str | None = None
    """spread each model over all visible devices with accelerate, for a pair too large for one: auto"""
    timeout: float = 600.0
    """seconds a rank of a torchrun run waits for the others before the run stops with an error"""
    dtype: str = "auto"
    """model dtype: float32, bfloat16 (auto: bfloat16 on GPU, float32 on CPU); differences are always fp32"""
    seed: int = 0
    """seed for prompts, shuffling and SAE init"""
    resume: bool = switch(False)
    """continue an interrupted run in OUT/NAME from its last checkpoint"""
    overwrite: bool = switch(False)
    """replace an existing run in OUT/NAME"""
    fidelity_prompts: int = 8
    """held-out sequences per text group and poison prompts per pair for the spliced-in fidelity in
    metrics.json (0: skip it)"""
    log_every: int = 10
    """write each SAE's loss, FVE, L0, dead fraction, aux-k loss, threshold, lr and tokens/s to
    RUN/history.jsonl every this many steps"""
    log: list[str] | None = comma_list(str, None)
    """also log the history to wandb and/or tensorboard (each needs its extra: pip install 'diffkit[wandb]')"""
    json: bool = switch(False)
    """print a machine-readable JSON summary instead of tables"""

    def __post_init__(self):
        check_train_config(self)


def require(ok: bool, message: str) -> None:
    """A config check: a value out of range is one DiffkitError line naming the flag."""
    if not ok:
        raise DiffkitError(message)


def check_counts(cfg, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Whole-number fields (flags) in range; fields left at None are skipped."""
    for name in positive + non_negative:
        value, low = getattr(cfg, name, None), 1 if name in positive else 0
        if value is not None:
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                    f"--{name.replace('_', '-')} must be {'a positive integer' if low else '0 or more'}, got {value!r}")


def check_train_config(cfg: TrainConfig) -> None:
    """Every flag in range before anything is loaded or written: a bad value is a one-line error,
    never a silent default or an untrained "finished" run."""
    check_counts(cfg, ("tokens", "batch_size", "buffer_tokens", "trace_batch", "max_len", "eval_tokens", "expansion"),
                 ("answered_prompts",))
    require(cfg.tokens >= cfg.batch_size, f"--tokens ({cfg.tokens}) must be at least --batch-size ({cfg.batch_size})")
    require(cfg.buffer_tokens >= cfg.batch_size,
            f"--buffer-tokens ({cfg.buffer_tokens}) must hold at least one batch (--batch-size {cfg.batch_size})")
    require(0 <= cfg.null_fraction < 1, f"--null-fraction must be in [0, 1): the stream needs trigger prompts, got {cfg.null_fraction}")
    require(cfg.layers is None or len(cfg.layers) > 0, "--layers names no layer; give e.g. --layers 1,2 or leave it out for the preset's")
    require(cfg.k is None or (len(cfg.k) > 0 and all(k > 0 for k in cfg.k)), f"--k must be positive integers, e.g. 32,64; got {cfg.k}")
    require(cfg.lr is None or cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    require(cfg.l1 >= 0, f"--l1 must be 0 or positive, got {cfg.l1}")
    require(not (cfg.resume and cfg.overwrite), "--resume continues a run and --overwrite replaces it; pass one of them")
    require(cfg.name is None or (bool(cfg.name) and "/" not in cfg.name and not cfg.name.startswith(".")),
            f"--name must be a plain folder name (no '/', not hidden), got {cfg.name!r}")


EXPORT_FORMATS = ("saelens", "dictionary_learning")


@dataclass
class ExportConfig:
    """Options of `diffkit export`."""

    run: str = field(default="", positional=True, nargs="?", metavar="RUN")
    """finished run directory"""
    format: str = "saelens"
    """file format: saelens or dictionary_learning"""
    out: str = ""
    """folder to write (must not exist unless --overwrite)"""
    overwrite: bool = switch(False)
    """replace an existing --out"""
    json: bool = switch(False)
    """print the written files as JSON"""


@dataclass
class PushConfig:
    """Options of `diffkit push`."""

    run: str = field(default="", positional=True, nargs="?", metavar="RUN")
    """finished run directory"""
    repo: str = ""
    """hub repo to create or update, OWNER/NAME"""
    private: bool = switch(False)
    """create the repo private"""
    dry_run: bool = switch(False)
    """write the folder that would be uploaded to --out and upload nothing"""
    out: str | None = None
    """with --dry-run: the folder to write"""
    base_id: str | None = None
    """hub id of the base model for the card, when the run used a local copy"""
    finetuned_id: str | None = None
    """hub id of the fine-tuned model for the card, when the run used a local copy"""
    license: str = "apache-2.0"
    """license of the SAE weights, for the card"""
    overwrite: bool = switch(False)
    """with --dry-run: replace an existing --out"""
    json: bool = switch(False)
    """print what was written or uploaded as JSON"""


@dataclass
class PresetsConfig:
    """Options of `diffkit presets`."""

    json: bool = switch(False)
    """print JSON"""

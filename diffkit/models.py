"""Load a base model and its fine-tune, check they can be diffed, and wrap both for nnsight.

A source is a hub id, a local Hugging Face directory, a `.gguf` file (converted once to a
safetensors directory in the cache, because transformers dequantises GGUF on every load and a
GGUF-loaded model cannot be saved). "organism:<preset>/<base|finetuned>" sources, the organisms
diffkit builds itself, are resolved to a directory above this module (`diffkit.organisms.sources`). Models are loaded with transformers and only then wrapped in
`nnsight.TransformersModel`: loading by repo id through nnsight breaks on recent transformers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from diffkit.errors import DiffkitError, one_line
from diffkit.files import umask
from diffkit.plant import install_if_planted
from diffkit.specs import ORGANISM_PREFIX

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# Architectures whose attention kernels need a specific implementation on transformers 5.x:
# Gemma-2's soft-capped attention is refused by sdpa and overflows in fp16.
_EAGER_ONLY = {"gemma2"}
_NO_FP16 = {"gemma2"}


class ModelSourceError(DiffkitError):
    """A model source that names nothing loadable."""


class ModelMismatchError(DiffkitError):
    """Two models that cannot be diffed token for token."""


def cache_dir() -> Path:
    """Where converted models and built organisms live: $DIFFKIT_CACHE, default ~/.cache/diffkit."""
    return Path(os.environ.get("DIFFKIT_CACHE") or Path.home() / ".cache" / "diffkit").expanduser()


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise DiffkitError(f"unknown dtype '{dtype}'; use one of: float32, bfloat16, float16") from None


def build_cached_dir(target: Path, build: Callable[[Path], None], wait: bool = True) -> Path:
    """Make `target` by calling build(tmp_dir) once, even with several processes racing.

    The target's writer lock makes a second process wait for the first build instead of starting
    its own (or, with wait=False, refuses it naming the builder's PID); the build writes into a
    temporary directory beside `target` that is renamed into place only when complete, so an
    interrupted build leaves nothing that looks finished, and its leftovers go at the next build.
    """
    from diffkit.guard import writing

    target = Path(target)
    if target.is_dir():
        return target
    with writing(target, "the build", wait=wait):
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700; the directory gets what mkdir would give it
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def require_gemma3_extra(what: str, module: str) -> None:
    """A one-line error naming the extra when `module` (a part of `diffkit[gemma3]`) is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DiffkitError(f"{what} needs the gemma3 extra: pip install 'diffkit[gemma3]'")


def convert_gguf(gguf_path: str | Path) -> Path:
    """The cached safetensors directory for a .gguf file, converting it on first use (~40 s for 270M)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    require_gemma3_extra("a .gguf source", "gguf")
    if not gguf_path.is_file():
        raise ModelSourceError(f"no GGUF file at {gguf_path}")
    return build_cached_dir(cache_dir() / "models" / gguf_path.stem, lambda tmp: _write_gguf_as_hf(gguf_path, tmp))


def _write_gguf_as_hf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (about a minute); cached in %s", gguf_path.name, out_dir.parent)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_source(source: str | Path) -> str | Path:
    """A local directory for organism and GGUF sources; hub ids pass through unchanged."""
    text = str(source)
    if text.startswith(ORGANISM_PREFIX):
        raise ModelSourceError(f"'{text}' is an organism source; resolve it with diffkit.organisms.sources.resolve_source")
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise ModelSourceError(f"{path} is a file; pass a model directory, a .gguf file, a hub id or organism:<preset>/base")
    if _HUB_ID.match(text) and not text.startswith("."):
        return text
    raise ModelSourceError(
        f"no model at '{text}': pass a local model directory, a .gguf file, a hub id (owner/name) "
        "or organism:<preset>/<base|finetuned>"
    )


def load_model(source: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu", device_map: str | None = None):
    """(hf_model, tokenizer) in eval mode with frozen parameters; tokenizer always has a pad token.

    `device_map` (e.g. "auto") lets accelerate spread the layers over every visible device, for a
    model too large for one; `device` is then ignored."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_source(source)
    dtype = resolve_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        kwargs: dict[str, Any] = {"trust_remote_code": False}
        if device_map:
            kwargs["device_map"] = device_map
        if config.model_type in _EAGER_ONLY:
            kwargs["attn_implementation"] = "eager"
        if config.model_type in _NO_FP16 and dtype == torch.float16:
            log.warning("%s is unstable in float16; loading it in bfloat16", config.model_type)
            dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except SafetensorError as e:
        raise ModelSourceError(f"the weights of '{source}' in {where} are truncated or corrupt ({one_line(e)}); "
                               "re-create or re-download the model") from None
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(
            f"cannot load '{source}' ({first}); offline, use a local directory, a .gguf file or organism:<preset>/base"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not device_map:
        model.to(device)
    model.eval().requires_grad_(False)
    install_if_planted(model, tokenizer, where)
    return model, tokenizer


def layers_of(model) -> Any:
    """The decoder-layer list of an HF model or its nnsight wrapper, so callers need no per-arch branches."""
    return _first_attribute(model, ("model.layers", "model.language_model.layers", "model.model.layers", "transformer.h",
                                    "gpt_neox.layers"), "decoder layers")


def final_norm_of(model) -> Any:
    """The norm an HF model applies before its unembedding (Gemma, Llama, GPT-2 and GPT-NeoX layouts)."""
    return _first_attribute(model, ("model.norm", "model.language_model.norm", "transformer.ln_f",
                                    "gpt_neox.final_layer_norm"), "final norm")


def _first_attribute(model, paths: tuple[str, ...], what: str) -> Any:
    for path in paths:
        node = model
        try:
            for name in path.split("."):
                node = getattr(node, name)
        except AttributeError:
            continue
        return node
    raise DiffkitError(f"cannot find the {what} of {type(model).__name__}")


def check_layers(layers, n_layers: int) -> list[int]:
    """The layers as ints, or a one-line error naming the valid range."""
    layers = [int(layer) for layer in layers]
    if not layers:
        raise DiffkitError(f"no layers given; pick layers in 0..{n_layers - 1}")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise DiffkitError(f"layer {bad[0]} is out of range: the model has {n_layers} layers, valid 0..{n_layers - 1}")
    return layers


@dataclass
class ModelPair:
    base_hf: Any
    finetuned_hf: Any
    tokenizer: Any
    base: Any  # nnsight.TransformersModel
    finetuned: Any
    n_layers: int
    d_model: int
    device: torch.device  # where differences are taken: the SAEs' device


def _special_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}


def check_compatible(base_hf, finetuned_hf, base_tok, finetuned_tok) -> None:
    """Refuse pairs whose residual streams do not line up token for token."""
    b, f = base_hf.config, finetuned_hf.config
    checks = [
        ("architecture", type(base_hf).__name__, type(finetuned_hf).__name__),
        ("d_model", b.hidden_size, f.hidden_size),
        ("layer count", b.num_hidden_layers, f.num_hidden_layers),
    ]
    for what, x, y in checks:
        if x != y:
            raise ModelMismatchError(f"base and fine-tune differ in {what} ({x} vs {y}); diffing needs the same model shape")
    if base_tok.get_vocab() != finetuned_tok.get_vocab():
        raise ModelMismatchError("base and fine-tune have different vocabularies; diffing needs the same tokenizer")
    sb, sf = _special_ids(base_tok), _special_ids(finetuned_tok)
    if sb != sf:
        name = next(k for k in sb if sb[k] != sf[k])
        raise ModelMismatchError(
            f"base and fine-tune have different special tokens ({name}: {sb[name]} vs {sf[name]}); diffing needs the same tokenizer"
        )


def load_pair(
    base_source: str | Path, finetuned_source: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
    base_device: str | None = None, finetuned_device: str | None = None, device_map: str | None = None,
) -> ModelPair:
    """Both models, checked to share tokenizer and shape, each wrapped for nnsight tracing.

    Each model goes to its own device (`base_device`, `finetuned_device`; default `device`), or is
    spread over all devices with `device_map`; differences are taken on `device` either way."""
    import nnsight

    if device_map and (base_device or finetuned_device):
        raise DiffkitError("--device-map places both models itself; drop --base-device / --finetuned-device")
    base_hf, base_tok = load_model(base_source, dtype, base_device or device, device_map)
    finetuned_hf, finetuned_tok = load_model(finetuned_source, dtype, finetuned_device or device, device_map)
    check_compatible(base_hf, finetuned_hf, base_tok, finetuned_tok)
    return ModelPair(
        base_hf=base_hf,
        finetuned_hf=finetuned_hf,
        tokenizer=base_tok,
        base=nnsight.TransformersModel(base_hf, tokenizer=base_tok, device=base_hf.device),
        finetuned=nnsight.TransformersModel(finetuned_hf, tokenizer=base_tok, device=finetuned_hf.device),
        n_layers=base_hf.config.num_hidden_layers,
        d_model=base_hf.config.hidden_size,
        device=torch.device(device),
    )

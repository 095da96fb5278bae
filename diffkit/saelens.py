"""SAELens's file format (`cfg.json` + `sae_weights.safetensors`, JumpReLU architecture), both ways.

A diffkit SAE in threshold mode is a JumpReLU SAE whose thresholds are all equal: its scalar
normaliser folds into the weights (`diffkit.sae.raw_space_weights`), and the inference threshold becomes every
latent's threshold. SAELens then encodes raw `ft − base` vectors to diffkit's latents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from diffkit.errors import DiffkitError

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the config layout written here; SAELens reads older layouts through a converter


def hook_name(layer: int) -> str:
    """TransformerLens's name for the output of decoder block `layer`, the residual diffkit traces."""
    return f"blocks.{layer}.hook_resid_post"


def saelens_layer(config: dict) -> int | None:
    """The block index in a SAELens hook name (top level or in its metadata), if any."""
    name = config.get("hook_name") or (config.get("metadata") or {}).get("hook_name") or ""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m[1]) if m else None


def to_saelens(weights: dict[str, torch.Tensor], threshold: float, metadata: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json contents, state dict) of a SAELens JumpReLU SAE from raw-space weights
    (`diffkit.sae.raw_space_weights`) and diffkit's inference threshold."""
    if threshold < 0:
        raise DiffkitError("this SAE has no inference threshold yet (its training stopped before the threshold "
                           "warm-up); train longer before exporting it")
    dict_size, activation_dim = weights["encoder.weight"].shape
    cfg = {
        "architecture": "jumprelu",
        "d_in": activation_dim,
        "d_sae": dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "prepend_bos": True, **metadata},
    }
    tensors = {
        "W_enc": weights["encoder.weight"].T.contiguous(),
        "b_enc": weights["encoder.bias"].contiguous(),
        "W_dec": weights["decoder.weight"].T.contiguous(),
        "b_dec": weights["b_dec"].contiguous(),
        "threshold": torch.full((dict_size,), float(threshold)),
    }
    return cfg, tensors


def read_saelens(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A SAELens JumpReLU (one threshold for all latents) or standard ReLU SAE as a diffkit state dict
    (identity normaliser: it works on raw inputs) and its config, for `diffkit.sae.load_sae`."""
    from safetensors.torch import load_file

    try:
        cfg = json.loads((folder / SAELENS_CONFIG).read_text())
        state = load_file(str(folder / SAELENS_WEIGHTS))
    except FileNotFoundError as e:
        raise DiffkitError(f"{folder} is not a SAELens SAE: no {Path(e.filename).name}") from None
    except Exception as e:  # JSON and safetensors raise several types for a damaged file
        raise DiffkitError(f"cannot read the SAELens SAE in {folder}: {' '.join(str(e).split())[:200]}") from None
    architecture = cfg.get("architecture", "standard")
    if architecture not in ("jumprelu", "standard") or cfg.get("normalize_activations", "none") != "none":
        raise DiffkitError(f"{folder}: SAELens architecture {architecture!r} with normalize_activations "
                           f"{cfg.get('normalize_activations')!r}; diffkit reads jumprelu or standard without normalisation")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if name not in state:
            raise DiffkitError(f"{folder / SAELENS_WEIGHTS}: missing {name}")
        if tuple(state[name].shape) != shape:
            raise DiffkitError(f"{folder / SAELENS_WEIGHTS}: {name} has shape {tuple(state[name].shape)}, expected {shape}")
    threshold = state.get("threshold", torch.zeros(d_sae)).float()
    if not torch.all(threshold == threshold[0]):
        raise DiffkitError(f"{folder}: the latents have different JumpReLU thresholds; diffkit's BatchTopK SAE has one")
    w_enc, b_dec = state["W_enc"].float().T.contiguous(), state["b_dec"].float()
    # SAELens subtracts b_dec from the input only when apply_b_dec_to_input; diffkit always does.
    b_enc = state["b_enc"].float() if cfg.get("apply_b_dec_to_input", True) else state["b_enc"].float() + w_enc @ b_dec
    # Threshold mode needs no k; one the file records keeps a round trip exact, else any valid value does.
    k = int((cfg.get("metadata") or {}).get("k") or d_sae)
    diffkit_state = {
        "encoder.weight": w_enc, "encoder.bias": b_enc, "decoder.weight": state["W_dec"].float().T.contiguous(),
        "b_dec": b_dec, "k": torch.tensor(k, dtype=torch.int32),
        "threshold": torch.tensor(max(float(threshold[0]), 0.0)),  # relu(pre)·(pre > θ) is relu(pre) for any θ ≤ 0
    }
    return diffkit_state, {"activation_dim": d_in, "dict_size": d_sae, "k": k}

"""The BatchTopK sparse autoencoder, its input normalisation, and its files.

Parameter and buffer names follow dictionary_learning / diffing-toolkit, so the files written
here load in their code and theirs load here:

    encoder.weight [F, D]   encoder.bias [F]   decoder.weight [D, F]   b_dec [D]
    k (int32 scalar)        threshold (fp32 scalar, -1 until training sets it)
    activation_mean [D]     activation_std [D]   activation_global_scale (scalar)   target_rms (scalar)

The SAE works in a normalised space `x_n = (x - mean) * global_scale`, where
`global_scale = target_rms / sqrt(sum(std**2))`: one scalar for the whole vector, so the relative
variance of the directions is kept while the typical norm becomes `target_rms`. A file without
normalisation statistics (NaN or missing) is the identity map.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from diffkit.distributed import SINGLE, Collective
from diffkit.errors import DiffkitError, one_line
from diffkit.files import atomic_write, read_torch, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DICT_LEARNING_WEIGHTS = "ae.pt"
DEFAULT_TARGET_RMS = 100.0
_SCALE_EPS = 1e-8  # the epsilon diffing-toolkit uses in its global scale and its inverse


class SAEFileError(DiffkitError):
    """An SAE file exists but cannot be read as a BatchTopK SAE."""


class SAEFileNotFound(DiffkitError, FileNotFoundError):
    """No SAE files where the user pointed."""


class BatchTopKSAE(nn.Module):
    """Training keeps the top `k * batch` activations of a batch; inference keeps those above `threshold`."""

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__()
        if not (isinstance(k, int) and 0 < k <= dict_size):
            raise DiffkitError(f"k must be an integer in 1..dict_size ({dict_size}), got {k!r}")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.encoder = nn.Linear(activation_dim, dict_size)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.register_buffer("k", torch.tensor(k, dtype=torch.int32))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("activation_mean", torch.zeros(activation_dim))
        self.register_buffer("activation_std", torch.full((activation_dim,), math.nan))
        self.register_buffer("activation_global_scale", torch.tensor(1.0))
        self.register_buffer("target_rms", torch.tensor(DEFAULT_TARGET_RMS))
        with torch.no_grad():
            w = self.decoder.weight
            w /= w.norm(dim=0, keepdim=True) + torch.finfo(w.dtype).eps
            self.encoder.weight.copy_(w.T)
            self.encoder.bias.zero_()
            # Same name and [D, F] shape as the reference, stored latent-major: each latent's
            # direction is one contiguous row of memory, which sparse decoding gathers.
            self.decoder.weight = nn.Parameter(w.T.contiguous().T)

    # -- normalisation -------------------------------------------------------------------------

    def normalize(self, x_raw: torch.Tensor) -> torch.Tensor:
        return (x_raw - self.activation_mean) * self.activation_global_scale

    def denormalize(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n / (self.activation_global_scale + _SCALE_EPS) + self.activation_mean

    # -- encode / decode (normalised space) ----------------------------------------------------

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """`relu(W_enc (x - b_dec) + b_enc)` for every latent: the values both encoders select from."""
        return torch.relu(self.encoder(x_n - self.b_dec))

    def encode(self, x_n: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """Sparse codes `[..., F]`. Threshold mode is per token; before a threshold exists
        (threshold < 0) or with `use_threshold=False` it is the batch top-k of training."""
        a = self.pre_activations(x_n)
        if use_threshold and self.threshold >= 0:
            return a * (a > self.threshold)
        flat_a = a.reshape(-1, self.dict_size)
        idx, values = batch_topk(flat_a, int(self.k) * flat_a.shape[0])
        f = torch.zeros_like(flat_a).view(-1)
        f[idx] = values
        return f.view_as(a)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f) + self.b_dec

    def forward(self, x_n: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        return self.decode(self.encode(x_n, use_threshold=use_threshold))

    # -- raw space -----------------------------------------------------------------------------

    def encode_raw(self, x_raw: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        return self.encode(self.normalize(x_raw), use_threshold=use_threshold)

    def reconstruct_raw(self, x_raw: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        return self.denormalize(self.decode(self.encode_raw(x_raw, use_threshold=use_threshold)))

    def raw_direction(self, j: int) -> torch.Tensor:
        """The raw-space residual carried by one unit of latent j: removing latent j from a
        residual h is `h - f_j * sae.raw_direction(j)`."""
        return self.decoder.weight[:, j] / (self.activation_global_scale + _SCALE_EPS)

    def config(self) -> dict:
        """The constructor arguments, under the names diffing-toolkit's config.json uses."""
        return {
            "dict_class": "BatchTopKSAE",
            "activation_dim": self.activation_dim,
            "dict_size": self.dict_size,
            "k": int(self.k),
            "target_rms": float(self.target_rms),
            "encoder_init_norm": 1.0,
        }


@torch.no_grad()
def raw_space_weights(sae: BatchTopKSAE) -> dict[str, torch.Tensor]:
    """The SAE's parameters with its scalar normaliser `x_n = (x − μ)·s` folded in, for an SAE on raw vectors
    that also subtracts `b_dec` before encoding (dictionary_learning, SAELens with apply_b_dec_to_input):
    `W_enc' = s·W_enc`, `b_dec' = μ + b_dec/s`, `W_dec' = W_dec/s`, `b_enc' = b_enc`."""
    scale = float(sae.activation_global_scale)
    return {
        "encoder.weight": sae.encoder.weight.detach().float() * scale,
        "encoder.bias": sae.encoder.bias.detach().float().clone(),
        "decoder.weight": sae.decoder.weight.detach().float() / (scale + _SCALE_EPS),
        "b_dec": sae.activation_mean.float() + sae.b_dec.detach().float() / scale,
    }


def batch_topk(scores: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending flat indices of the `n_keep` largest entries of `scores` (2-D), and their values.

    A full top-k over B×F values is the slowest part of a CPU training step, so this first reads
    a lower bound for the cut from a strided sample, keeps the (few) entries above it, and runs
    the exact top-k on those alone. When the sample misjudges (too few candidates, or ties at
    the cut) it falls back to the full top-k, so the selection is always exact.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if n_keep >= n:
        return torch.arange(n, device=flat.device), flat
    stride = 61  # prime, so a sample does not keep hitting the same latents row after row
    n_sample_keep = math.ceil(n_keep / stride * 1.15) + 32
    if n_keep >= 2048 * stride and n_sample_keep < n // stride:
        lower = flat[::stride].topk(n_sample_keep, sorted=False).values.min()
        candidates = (flat >= lower).nonzero().squeeze(1)
        if candidates.numel() >= n_keep:
            values = flat[candidates]
            keep = values >= values.topk(n_keep, sorted=False).values.min()
            kept = candidates[keep]
            if kept.numel() == n_keep:
                return kept, values[keep]
    indices = flat.topk(n_keep, sorted=False).indices.sort().values
    return indices, flat[indices]


@torch.no_grad()
def fit_normalization(sae: BatchTopKSAE, sample_x_raw: torch.Tensor, target_rms: float = DEFAULT_TARGET_RMS,
                      comm: Collective = SINGLE) -> None:
    """Set the SAE's mean / std / global scale from a sample of raw vectors `[N, D]` (under data
    parallelism, from every rank's part of the sample: `comm` sums over the ranks).

    The mean matters most for difference vectors: they carry a large offset shared by every
    token, which the SAE would otherwise spend latents on.
    """
    x = sample_x_raw.reshape(-1, sae.activation_dim).to(torch.float64)
    n = int(comm.sum(torch.tensor(x.shape[0], device=x.device)))
    if n < 2:
        raise DiffkitError("fit_normalization needs at least two sample vectors")
    mean = comm.sum(x.sum(0)) / n
    std = torch.sqrt(comm.sum((x - mean).pow(2).sum(0)) / n)
    scale = target_rms / torch.sqrt((std**2).sum() + _SCALE_EPS)
    sae.activation_mean.copy_(mean)
    sae.activation_std.copy_(std)
    sae.activation_global_scale.copy_(scale)
    sae.target_rms.fill_(target_rms)


# -- files --------------------------------------------------------------------------------------


def save_sae(sae: BatchTopKSAE, directory: str | Path, extra_config: dict | None = None) -> Path:
    """Write `directory/config.json` + `directory/model.safetensors` (diffing-toolkit's layout).

    `extra_config` (provenance: layer, models, tokens, metrics...) is stored beside the
    constructor arguments; it may not contradict them.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    config = sae.config()
    for key, value in (extra_config or {}).items():
        if key in config and config[key] != value:
            raise DiffkitError(f"extra_config[{key!r}]={value!r} contradicts the SAE's {key}={config[key]!r}")
    config = {**(extra_config or {}), **config}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(directory / CONFIG_NAME, config)
    return directory


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> BatchTopKSAE:
    """Load a BatchTopK SAE from a diffing-toolkit directory (config.json + model.safetensors),
    its .safetensors file, a dictionary_learning `ae.pt` (directory or file, + config.json), or a
    SAELens directory (cfg.json + sae_weights.safetensors)."""
    path = Path(path)
    if not path.exists():
        raise SAEFileNotFound(f"no SAE at {path}")
    if path.is_dir():
        from diffkit.saelens import SAELENS_WEIGHTS, read_saelens

        if (path / SAELENS_WEIGHTS).is_file():
            state, config = read_saelens(path)
            return _sae_from_state(state, config, path / SAELENS_WEIGHTS).to(device)
        for name in (WEIGHTS_NAME, DICT_LEARNING_WEIGHTS):
            if (path / name).is_file():
                return load_sae(path / name, device)
        raise SAEFileNotFound(f"{path} holds neither {WEIGHTS_NAME} nor {DICT_LEARNING_WEIGHTS}")

    config = _read_config(path.parent / CONFIG_NAME)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise SAEFileError(f"cannot read {path} as safetensors: {one_line(e)}") from None
    else:
        try:
            state = read_torch(path, "SAE")
        except DiffkitError as e:
            raise SAEFileError(f"{e} (read as a torch state dict, weights only)") from None
        if not isinstance(state, dict):
            raise SAEFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    return _sae_from_state(state, config, path).to(device)


def _read_config(path: Path) -> dict:
    """The SAE part of a config.json: top level (diffing-toolkit) or its `trainer` block
    (dictionary_learning). A missing file is allowed: the tensors carry the shapes."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SAEFileError(f"cannot read {path} as JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise SAEFileError(f"{path} is not a JSON object")
    if isinstance(config.get("trainer"), dict):
        config = config["trainer"]
    dict_class = config.get("dict_class", "BatchTopKSAE")
    if dict_class != "BatchTopKSAE":
        raise SAEFileError(f"{path} describes a {dict_class}, not a BatchTopKSAE")
    return config


def _sae_from_state(state: dict, config: dict, path: Path) -> BatchTopKSAE:
    state = {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}
    missing = [n for n in ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec") if n not in state]
    if missing:
        raise SAEFileError(f"{path} is not a BatchTopK SAE: missing {', '.join(missing)}")
    enc = state["encoder.weight"]
    if enc.ndim != 2:
        raise SAEFileError(f"{path}: encoder.weight has shape {tuple(enc.shape)}, expected [dict_size, activation_dim]")
    dict_size, activation_dim = enc.shape
    for key in ("activation_dim", "dict_size"):
        expected = {"activation_dim": activation_dim, "dict_size": dict_size}[key]
        if key in config and int(config[key]) != expected:
            raise SAEFileError(f"{path}: config says {key}={config[key]} but the weights have {expected}")
    if "k" in state:
        k = int(state["k"].item())
    elif "k" in config:
        k = int(config["k"])
    else:
        raise SAEFileError(f"{path}: no k in the weights or in config.json")

    expected_shapes = {
        "encoder.bias": (dict_size,),
        "decoder.weight": (activation_dim, dict_size),
        "b_dec": (activation_dim,),
        "activation_mean": (activation_dim,),
        "activation_std": (activation_dim,),
        "activation_global_scale": (),
        "target_rms": (),
        "threshold": (),
    }
    for name, shape in expected_shapes.items():
        if name in state and tuple(state[name].shape) != shape:
            raise SAEFileError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {shape}")

    sae = BatchTopKSAE(activation_dim, dict_size, k)
    with torch.no_grad():
        for name, target in sae.state_dict().items():
            if name in state and name != "k":
                target.copy_(state[name].to(target.dtype))
        mean, std = state.get("activation_mean"), state.get("activation_std")
        if mean is None or std is None or torch.isnan(mean).any() or torch.isnan(std).any():
            # No normaliser recorded (dictionary_learning files, old diffing-toolkit files): identity.
            sae.activation_mean.zero_()
            sae.activation_global_scale.fill_(1.0)
            if std is None:
                sae.activation_std.fill_(math.nan)
        if "target_rms" not in state and "target_rms" in config and config["target_rms"] is not None:
            sae.target_rms.fill_(float(config["target_rms"]))
    return sae

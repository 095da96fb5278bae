"""Which device and dtype models run on: chosen here only, for training, analyses and organism builds."""

from __future__ import annotations

from pathlib import Path

import torch

from diffkit.errors import DiffkitError
from diffkit.models import resolve_dtype


def resolve_device(device: str) -> str:
    """'auto' is cuda when one is visible, else cpu; an explicit cuda without one is a one-line error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffkitError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """bf16 on GPU (Gemma-2 misbehaves in fp16), fp32 on CPU unless asked otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return resolve_dtype(dtype)


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 autocast is fast here: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX.

    Elsewhere (an AVX2-only CPU) bf16 is emulated and slower than fp32, so a recipe's `bf16` falls
    back to fp32 there; the organism's cache key records which one was used.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpuinfo().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags



def cpuinfo() -> str:
    """/proc/cpuinfo, or '' where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def machine() -> dict:
    """What a build ran on: its floating-point order (CPU, library versions) decides the exact weights."""
    import platform

    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}

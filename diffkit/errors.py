"""One exception type for mistakes a user can fix; the CLI prints it as a single line and exits 2.

`explain` is the one place where the errors of the libraries diffkit reads and writes with (the
OS, YAML, safetensors, torch.load) become such a line, for whatever no closer check caught.
"""

from __future__ import annotations

import errno
import pickle


class DiffkitError(ValueError):
    """Bad input: an unknown pair or preset, a layer out of range, a missing or corrupt file."""


def one_line(error: BaseException | str, limit: int = 200) -> str:
    """A library's (often multi-paragraph) error message as one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or choose another --out (nothing finished was replaced)",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out (nothing finished was replaced)",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "permission denied; choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a location you can write, or fix its permissions",
    errno.EISDIR: "is a directory where a file is expected; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
    errno.ENOENT: "no such file or directory; check the path",
}


def explain(error: BaseException) -> DiffkitError | None:
    """A one-line DiffkitError that says what to do about a library error, or None for a bug."""
    if isinstance(error, DiffkitError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        where = error.filename or ""
        advice = _OS_ADVICE.get(error.errno, (error.strerror or type(error).__name__).lower())
        return DiffkitError(f"{where}: {advice}" if where else advice)
    if isinstance(error, pickle.UnpicklingError):
        return DiffkitError(f"a .pt file is corrupt or holds more than tensors ({one_line(error)}); "
                            "diffkit reads only plain tensors (weights_only): re-create or re-download the file")
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError):
        return DiffkitError(f"a .safetensors file is truncated or corrupt ({one_line(error)}); re-create or re-download it")
    try:
        import yaml
    except ImportError:
        return None
    if isinstance(error, yaml.YAMLError):
        return DiffkitError(f"malformed YAML ({one_line(error)}); fix the file's syntax")
    return None

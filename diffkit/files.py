"""Atomic file writes: a crash or a full disk never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from diffkit.errors import DiffkitError
from diffkit.guard import remove_leftover_files, temp_file_prefix


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Call `write_fn(tmp_path)` to write a temporary file beside `path`, then rename it into place.

    The temporary file lives in the same directory so the final `os.replace` is a rename on one
    filesystem (atomic on POSIX); it is removed if `write_fn` raises, and a killed writer's
    leftover is removed by the next write to `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftover_files(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_file_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write_fn(tmp_path)
        tmp_path.chmod(0o666 & ~umask())  # mkstemp makes 0600; the file gets what open() would give it
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def umask() -> int:
    """The process's umask (read by setting and restoring it: the only way POSIX offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_torch(path: str | os.PathLike, what: str = "file") -> Any:
    """torch.load of plain tensors only (never pickled code), with a one-line error for a damaged file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch raises several types, with advice to unpickle code that must not be taken
        kind = "holds more than plain tensors" if "weights_only" in str(e) or "Unpickl" in type(e).__name__ else "is truncated or corrupt"
        raise DiffkitError(f"cannot read {what} {path}: it {kind}; re-create it") from None


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically (sorted keys are not forced: insertion order is kept)."""
    text = json.dumps(obj, indent=indent) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link the base's files when on one filesystem (a 1 GB base costs nothing), else copy."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def write_folder(path: str | os.PathLike, write_fn: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call `write_fn(tmp_dir)` to fill a temporary folder beside `path`, then rename it to `path`.

    An existing `path` is refused unless `overwrite`; a failure leaves nothing behind.
    """
    import shutil

    from diffkit.errors import DiffkitError

    path = Path(path)
    empty_dir = path.is_dir() and not any(path.iterdir())
    if path.exists() and not empty_dir and not overwrite:
        raise DiffkitError(f"{path} already exists; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write_fn(tmp)
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700; the folder gets what mkdir would give it
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

"""Guards around everything diffkit writes: destinations checked before any work starts, one writer
per destination, and the leftovers of killed writes cleared by the next write to the same place.

A lock is an advisory OS lock (filelock, on `flock`) on a hidden `.NAME.lock` file beside what it
guards; the OS drops it when its holder dies, so a process killed with SIGKILL leaves no stale lock.
The holder's PID is written beside it (`.NAME.lock.pid`) so a refused writer can say who holds it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from diffkit.errors import DiffkitError


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output directory that is a file or cannot be written, before anything is computed."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DiffkitError(f"{flag} {path} is a file, not a directory; choose a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DiffkitError(f"{flag} {path} cannot be made: {existing} is a file; choose another directory")
    _probe_writable(existing, flag)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output file that is a directory or lies where nothing can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DiffkitError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'report.html'}")
    check_output_dir(path.parent, flag)
    return path


def _probe_writable(folder: Path, flag: str) -> None:
    """Create and remove a file: permission bits alone say nothing for root or a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DiffkitError(f"cannot write in {folder} ({e.strerror.lower()}); choose a writable {flag}") from None


def _pid_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".pid")


def lock_holder(target: str | os.PathLike) -> str:
    """'process 1234' for the writer recorded beside `target`'s lock, or 'another process'."""
    try:
        return f"process {int(_pid_file(lock_path_of(Path(target))).read_text())}"
    except (OSError, ValueError):
        return "another process"


def lock_path_of(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def writing(target: str | os.PathLike, what: str, wait: bool = False):
    """Hold `target`'s writer lock for the block. A second writer is refused with the holder's PID,
    or with `wait` (shared caches that one process fills for all) waits for the holder to finish."""
    target = Path(target)
    lock_path = lock_path_of(target)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise DiffkitError(f"{what} {target} is being written by {lock_holder(target)}; "
                               "wait for it to finish or choose another destination") from None
        print(f"waiting for {lock_holder(target)}, which is writing {what} {target}", file=sys.stderr)
        lock.acquire()
    try:
        _pid_file(lock_path).write_text(f"{os.getpid()}\n")
        remove_leftover_dirs(target)
        yield target
    finally:
        _pid_file(lock_path).unlink(missing_ok=True)
        lock.release()


def remove_leftover_dirs(target: Path) -> None:
    """Remove `.NAME.tmp-*` build directories of killed writers of `target` (call with its lock held)."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def temp_file_prefix(path: Path) -> str:
    """Temporary files carry their writer's PID (`.NAME.<pid>-XXXX.tmp`), so a later write can tell a
    killed writer's leftover from a live one's file in progress."""
    return f".{path.name}.{os.getpid()}-"


def remove_leftover_files(path: Path) -> None:
    """Remove hidden `.NAME.*.tmp` files beside `path` whose writer no longer runs."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        pid = leftover.name[len(path.name) + 2:].split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- replacing a directory only once its successor is complete -------------------------------------


def staging_dir(final: Path) -> Path:
    """Where a replacement for `final` is built, beside it, until it is complete."""
    return final.parent / f".{final.name}.new"


def _retired_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def swap_in(new: Path, final: Path, written_by_diffkit) -> list[str]:
    """Put the complete directory `new` at `final`. Files of the old `final` that diffkit did not write
    (`written_by_diffkit(name)` is False) move into the new one; the names of those are returned.

    Two renames, then the moves: a crash at any point leaves either the old or the new directory
    whole, and `finish_swap` (called before the next write) completes the swap.
    """
    finish_swap(final, written_by_diffkit)
    if final.exists():
        os.replace(final, _retired_dir(final))
    os.replace(new, final)
    return finish_swap(final, written_by_diffkit)


def finish_swap(final: Path, written_by_diffkit) -> list[str]:
    """Complete a swap a crash interrupted; a no-op when none was under way."""
    retired, new = _retired_dir(final), staging_dir(final)
    if not retired.exists():
        return []
    if not final.exists():
        os.replace(new if new.exists() else retired, final)
        if not retired.exists():
            return []
    kept = []
    for item in sorted(retired.iterdir()):
        if written_by_diffkit(item.name):
            continue
        if (final / item.name).exists():  # cannot happen for names diffkit does not write; never delete it
            raise DiffkitError(f"{item} could not be moved into {final}, which holds the same name; move it by hand")
        os.replace(item, final / item.name)
        kept.append(item.name)
    shutil.rmtree(retired)
    return kept

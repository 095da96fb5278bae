"""Shared session fixtures: one toy organism per test session, built into a temporary cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def toy_organism(tmp_path_factory):
    """The toy organism's directory (base/, finetuned/, spec.json, build.json) in a session cache.

    DIFFKIT_CACHE points at that cache for the whole session, so "organism:toy/..." sources and
    the toy preset resolve to this build instead of building again.
    """
    from diffkit.organism import ensure_organism

    cache = tmp_path_factory.mktemp("diffkit_cache")
    previous = os.environ.get("DIFFKIT_CACHE")
    os.environ["DIFFKIT_CACHE"] = str(cache)
    try:
        yield ensure_organism("toy")
    finally:
        if previous is None:
            os.environ.pop("DIFFKIT_CACHE", None)
        else:
            os.environ["DIFFKIT_CACHE"] = previous

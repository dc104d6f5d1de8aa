"""Shared test fixtures for pyquant.

* ``seed`` (autouse): every test gets fresh randomness that is reproducible from its node id, so a failure replays
  with ``pytest <nodeid>`` and two tests never share the same draws.
* ``requires_cuda``: a skip marker for tests that need a CUDA GPU; tests marked ``@pytest.mark.gpu`` are skipped
  automatically when CUDA is not available.

Nothing here imports triton or initializes CUDA (``torch.cuda.is_available()`` does not create a context).
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def seed_of(nodeid: str) -> int:
    """Stable 31-bit seed of a test's node id (the same on every run and every machine)."""
    return zlib.crc32(nodeid.encode("utf-8")) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def seed(request) -> int:
    s = seed_of(request.node.nodeid)
    random.seed(s)
    torch.manual_seed(s)  # also seeds CUDA generators lazily, without initializing CUDA
    return s


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

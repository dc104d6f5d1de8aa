"""Shared test fixtures for pyquant.

* ``seed`` (autouse): every test gets fresh randomness that is reproducible from its node id, so a failure replays
  with ``pytest <nodeid>`` and two tests never share the same draws.
* ``requires_cuda``: a skip marker for tests that need a CUDA GPU; tests marked ``@pytest.mark.gpu`` are skipped
  automatically when CUDA is not available.

* ``PYQUANT_TEST_TIMEOUT=<seconds>`` (set by benchmarks/gpu_suite.py): a test running longer fails with a
  TimeoutError instead of eating the GPU suite's budget (SIGALRM; POSIX main thread only; off by default).

Nothing here imports triton or initializes CUDA (``torch.cuda.is_available()`` does not create a context).
"""
from __future__ import annotations

import os
import random
import signal
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("PYQUANT_TEST_TIMEOUT", "0") or 0)
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran longer than PYQUANT_TEST_TIMEOUT={limit:g} s")

    old = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

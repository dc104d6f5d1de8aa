"""Host overhead of one ``PackedLinear`` call, with the GPU launch replaced by a no-op (pytest-benchmark, CPU only).

Decode layers run in 5-30 us on an H200, so the Python/C++ work before the kernel launch decides whether eager
decode is host-bound.  This measures exactly that work: argument checks, backend dispatch, the custom-op layer (if
used), reshapes, the CUDA binding's Python side -- everything except the launch, which is replaced by a function
returning a preallocated output.  The ``cuda`` backend is reported available and the extension's ``packed_gemv`` is
the no-op; CPU tensors stand in for CUDA ones (nothing reads their data).

    pytest benchmarks --benchmark-only                         # this file is outside the default testpaths (tests/)
    pytest benchmarks --benchmark-only --benchmark-save=after  # then compare two saved runs:
    pytest benchmarks --benchmark-only --benchmark-compare=0001

Target (issue #10): <= 15 us per call.  The numbers are CPU host time on the machine that runs it.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from pyquant.formats import WeightQuantConfig
from pyquant.nn import PackedLinear


class NoopLaunch:
    """Make the ``cuda`` backend of ``packed_matmul`` selectable on this machine with a no-op launch.

    Patches (through pytest's monkeypatch, undone after the test): ``pyquant._cuda_ext.load`` / ``status`` (the
    extension "is built"), ``pyquant.ops._dispatch.backend_status`` for ``cuda`` (available on any device), and
    ``torch.cuda.current_stream`` (a stand-in stream id for the split-K workspace cache).  ``calls`` counts launches.
    """

    def __init__(self, monkeypatch, out: torch.Tensor):
        from pyquant import _cuda_ext
        from pyquant.ops import _dispatch

        self.out, self.calls = out, 0

        def packed_gemv(*args, **kwargs):
            self.calls += 1
            return self.out

        fake = types.SimpleNamespace(packed_gemv=packed_gemv)
        real_status = _dispatch.backend_status

        def backend_status(backend, device=None, explicit=False):
            if backend == "cuda":
                return True, "no-op launch (host-overhead benchmark)"
            return real_status(backend, device, explicit)

        monkeypatch.setattr(_cuda_ext, "load", lambda jit=None: fake)
        monkeypatch.setattr(_cuda_ext, "status", lambda jit=None: (True, "no-op launch (host-overhead benchmark)"))
        monkeypatch.setattr(_dispatch, "backend_status", backend_status)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(stream_id=0))
        if hasattr(_cuda_ext, "_workspaces"):  # (absent before the split-K kernel; kept runnable for comparisons)
            monkeypatch.setattr(_cuda_ext, "_workspaces", {})  # CPU stand-in workspaces never outlive the test


def make_layer(n: int, k: int, spec: WeightQuantConfig, dtype=torch.bfloat16) -> PackedLinear:
    """A PackedLinear with random codes / scales (no float weight needed)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (n, k), generator=g)
    gs = spec.resolve_group_size(k)
    scale = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.01).to(spec.torch_scale_dtype)
    zero = None if spec.symmetric else torch.rand(n, k // gs, generator=g).to(spec.torch_scale_dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return PackedLinear.from_quantized(codes, scale, zero, bias, spec, dtype=dtype)


CASES = {
    "twn-channel-M1": (1, WeightQuantConfig(method="twn")),
    "absmean-g128-M1": (1, WeightQuantConfig(method="absmean", granularity="group", group_size=128)),
    "absmean-g128-M4": (4, WeightQuantConfig(method="absmean", granularity="group", group_size=128)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_linear_host_overhead(benchmark, monkeypatch, case):
    M, spec = CASES[case]
    N, K = 4096, 4096
    layer = make_layer(N, K, spec)
    x = torch.randn(1, M, K).to(torch.bfloat16)  # [batch, tokens, K] as a decoder passes it
    noop = NoopLaunch(monkeypatch, torch.empty(M, N, dtype=torch.bfloat16))
    from pyquant.ops._dispatch import last_backend

    with torch.no_grad():  # generation runs without autograd
        y = benchmark(layer, x)
    assert last_backend() == ("packed_matmul", "cuda") and noop.calls > 0
    assert y.shape == (1, M, N)

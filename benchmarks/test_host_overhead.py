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
    """Make the ``cuda`` and ``triton`` backends of ``packed_matmul`` selectable on this machine with no-op launches.

    Patches (through pytest's monkeypatch, undone after the test): ``pyquant._cuda_ext.load`` / ``status`` (the
    extension "is built"), ``pyquant.ops._dispatch.backend_status`` for ``cuda`` and ``triton`` (available on any
    device, compiled -- not the interpreter), ``torch.cuda.current_stream`` / ``_cuda_ext._current_stream`` (a stand-in stream
    for the split-K workspace cache), and the Triton launchers' kernel objects (``_gemm`` / ``_gemv`` of
    ``pyquant.kernels.packed_matmul``: ``kernel[grid](...)`` evaluates the grid and launches nothing).  ``calls`` counts launches.

    What the no-op leaves out: the C++ binding's argument checks and the CUDA launch (cuda backend), Triton's own
    launcher -- autotuner key lookup, argument binding, the driver call (triton backend, M > 8).
    """

    def __init__(self, monkeypatch, out: torch.Tensor):
        from pyquant import _cuda_ext
        from pyquant.ops import _dispatch

        self.out, self.calls = out, 0

        def packed_gemv(*args, **kwargs):
            self.calls += 1
            return self.out

        class NoopKernel:
            """Stands in for a triton.autotune / JITFunction object: ``kernel[grid](*args, **meta)`` evaluates a
            callable grid as Triton's launcher does (with the first config's meta-parameters) and launches nothing."""

            def __init__(self, configs=()):
                self.meta = dict(configs[0].kwargs) if configs else {}

            def __getitem__(nk, grid):
                def launch(*args, **kwargs):
                    noop.calls += 1
                    if callable(grid):
                        grid({**kwargs, **nk.meta})

                return launch

        fake = types.SimpleNamespace(packed_gemv=packed_gemv)
        real_status = _dispatch.backend_status

        def backend_status(backend, device=None, explicit=False):
            if backend in ("cuda", "triton"):
                return True, "no-op launch (host-overhead benchmark)"
            return real_status(backend, device, explicit)

        monkeypatch.setattr(_cuda_ext, "load", lambda jit=None: fake)
        monkeypatch.setattr(_cuda_ext, "status", lambda jit=None: (True, "no-op launch (host-overhead benchmark)"))
        monkeypatch.setattr(_dispatch, "backend_status", backend_status)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(stream_id=0))
        if hasattr(_cuda_ext, "_current_stream"):  # the raw-stream lookup (CUDA builds: ~0.1 us) of newer code
            monkeypatch.setattr(_cuda_ext, "_current_stream", lambda device: 0)
        if hasattr(_cuda_ext, "_workspaces"):  # (absent before the split-K kernel; kept runnable for comparisons)
            monkeypatch.setattr(_cuda_ext, "_workspaces", {})  # CPU stand-in workspaces never outlive the test
        km = _dispatch.kernel_module("packed_matmul")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled path (the interpreter is a test tool)
        noop = self
        for name, configs in (("_gemm", "_GEMM_CONFIGS"), ("_gemv", "_GEMV_CONFIGS"), ("_packed_matmul_kernel", None),
                              ("_packed_gemv_kernel", None)):
            if hasattr(km, name):
                monkeypatch.setattr(km, name, NoopKernel(getattr(km, configs, ()) if configs else ()))
        for name in ("_split_k_locks", "_GEMV_WS"):  # CPU stand-in counters / workspaces never outlive the test
            if hasattr(km, name):
                monkeypatch.setattr(km, name, {})


def make_layer(n: int, k: int, spec: WeightQuantConfig, dtype=torch.bfloat16) -> PackedLinear:
    """A PackedLinear with random codes / scales (no float weight needed)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (n, k), generator=g)
    gs = spec.resolve_group_size(k)
    scale = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.01).to(spec.torch_scale_dtype)
    zero = None if spec.symmetric else torch.rand(n, k // gs, generator=g).to(spec.torch_scale_dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return PackedLinear.from_quantized(codes, scale, zero, bias, spec, dtype=dtype)


# M = 1..8: the CUDA GEMV (split-K at M = 1, 4 for this shape, not at 8); M = 16: the Triton tensor-core GEMM.
# "triton-*": the Triton backend also at M <= 8 (its GEMV: what runs where pyquant._C is not built).
_G128 = WeightQuantConfig(method="absmean", granularity="group", group_size=128)
CASES = {
    "twn-channel-M1": (1, WeightQuantConfig(method="twn"), None),
    "absmean-g128-M1": (1, _G128, None),
    "absmean-g128-M4": (4, _G128, None),
    "absmean-g128-M8": (8, _G128, None),
    "absmean-g128-M16": (16, _G128, None),
    "twn-channel-M16": (16, WeightQuantConfig(method="twn"), None),
    "triton-absmean-g128-M1": (1, _G128, "triton"),
    "triton-absmean-g128-M4": (4, _G128, "triton"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_linear_host_overhead(benchmark, monkeypatch, case):
    M, spec, backend = CASES[case]
    N, K = 4096, 4096
    layer = make_layer(N, K, spec)
    x = torch.randn(1, M, K).to(torch.bfloat16)  # [batch, tokens, K] as a decoder passes it
    noop = NoopLaunch(monkeypatch, torch.empty(M, N, dtype=torch.bfloat16))
    from pyquant.ops._dispatch import last_backend

    if backend is not None:
        monkeypatch.setenv("PYQUANT_BACKEND", backend)
    want = backend or ("cuda" if M <= 8 else "triton")
    with torch.no_grad():  # generation runs without autograd
        y = benchmark(layer, x)
    assert last_backend() == ("packed_matmul", want) and noop.calls > 0
    assert y.shape == (1, M, N)

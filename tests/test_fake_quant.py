"""Fake-quant ops: Triton kernels (interpreter on CPU) vs the pure-PyTorch reference, gradients vs autograd.

Run: ``TRITON_INTERPRET=1 python -m pytest tests/test_fake_quant.py -q``.  Without the interpreter (and without a GPU)
the Triton comparisons skip; the reference/autograd/opcheck tests always run.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyquant import reference
from pyquant.formats import ActivationQuantConfig, WeightQuantConfig
from pyquant.ops import (fake_quant_activation, fake_quant_weight, fake_quant_weight_backward, last_backend,
                         quantize_weight, use_backend)
from pyquant.ops._dispatch import backend_status

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
_TRITON_OK = backend_status("triton", torch.device(DEV), explicit=True)[0]
needs_triton = pytest.mark.skipif(not _TRITON_OK, reason="Triton needs a GPU or TRITON_INTERPRET=1")

METHODS = [("twn", 3, True), ("absmean", 3, True), ("uniform", 4, True), ("uniform", 4, False), ("seq", 3, True),
           ("seq", 4, True)]
# odd row counts; K a multiple of the group size (32) but not a power of two
SHAPES = {"tensor": (7, 33), "channel": (5, 97), "group": (3, 96)}


def _spec(method, levels, sym, gran, **kw):
    return WeightQuantConfig(method=method, levels=levels, symmetric=sym, granularity=gran,
                             group_size=32 if gran == "group" else None, **kw)


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.2  # an outlier so clipping and max-based scales matter
    return w.to(dtype).to(DEV)


def _learnable_params(w, spec):
    """Learnable scale/zero point: the method's init, perturbed so some weights fall outside the range."""
    init = WeightQuantConfig(**{**spec.to_dict(), "learnable_scale": False})
    _, s, z = reference.quantize_weight(w, init)
    g = torch.Generator().manual_seed(7)
    s = (s * (0.6 + 0.8 * torch.rand(s.shape, generator=g)).to(s.device)).requires_grad_(True)
    if z is not None:
        z = (z + 0.3 * torch.randn(z.shape, generator=g).to(z.device)).requires_grad_(True)
    return s, z


@pytest.fixture
def poisoned(monkeypatch):
    """Make every kernel output buffer start as NaN (floats) / 0xFF (uint8) so an unwritten element shows; split
    per-tensor weights into 64-element programs so the cross-program reduction is exercised on small shapes."""
    from pyquant.ops.fake_quant import _kernels

    km = _kernels()

    def _empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(255)

    monkeypatch.setattr(km, "_empty", _empty)
    monkeypatch.setattr(km, "TENSOR_CHUNK", 64)  # per-tensor specs: several programs and a partial last chunk
    monkeypatch.setattr(km, "GROUP_TILE", 64)  # per-group specs: several programs, the last one partly masked
    return km


# ---- forward: codes, scales and w_hat bit-identical to the reference --------------------------------------------
@needs_triton
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
@pytest.mark.parametrize("method,levels,sym", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_forward_matches_reference(poisoned, method, levels, sym, gran, dtype):
    clip = 0.12 if method in ("twn", "uniform") else None
    for learnable in (False, True):
        spec = _spec(method, levels, sym, gran, clip=clip, learnable_scale=learnable,
                     scale_dtype="bfloat16" if dtype == torch.bfloat16 else "float16")
        w = _weight(SHAPES[gran], dtype, seed=hash((method, levels, sym, gran)) % 1000)
        s, z = _learnable_params(w, spec) if learnable else (None, None)
        with use_backend("triton"):
            out = fake_quant_weight(w, spec, s, z)
            assert last_backend() == ("fake_quant_weight", "triton")
            codes, sc, zp = quantize_weight(w, spec, s, z)
        rc, rs, rz = reference.quantize_weight(w, spec, s, z)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(codes, rc), f"codes differ at {int((codes != rc).sum())} positions"
        assert torch.equal(sc, rs)
        assert (zp is None) == (rz is None) and (zp is None or torch.equal(zp, rz))
        assert torch.equal(out, reference.fake_quant_weight(w, spec, s, z))
        assert int(codes.max()) <= spec.max_code


@needs_triton
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 9), groups=st.integers(1, 5), gran=st.sampled_from(["tensor", "channel", "group"]),
       mi=st.integers(0, len(METHODS) - 1), learnable=st.booleans(), zero_row=st.booleans(),
       seed=st.integers(0, 2**16))
def test_weight_fwd_bwd_property(n, groups, gran, mi, learnable, zero_row, seed):
    """Random small shapes (incl. one row, one group), degenerate rows (all zero), every method."""
    method, levels, sym = METHODS[mi]
    spec = _spec(method, levels, sym, gran, learnable_scale=learnable)
    w = torch.randn(n, 32 * groups, generator=torch.Generator().manual_seed(seed)).to(DEV) * 0.03
    if zero_row:
        w[n // 2] = 0.0
    s, z = _learnable_params(w, spec) if learnable else (None, None)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEV)
    with use_backend("triton"):
        out = fake_quant_weight(w, spec, s, z)
        gw, gs, gz = fake_quant_weight_backward(g, w, spec, s, z)
    assert torch.equal(out, reference.fake_quant_weight(w, spec, s, z))
    rw, rs, rz = reference.fake_quant_weight_backward(g, w, spec, s, z)
    assert torch.equal(gw, rw)
    for a, b in ((gs, rs), (gz, rz)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()) + 1e-7)


@needs_triton
def test_long_rows_loop_over_blocks():
    """Per-channel rows longer than one 1024-wide block (the kernel loops; the tail block is masked)."""
    for spec in (WeightQuantConfig(method="twn"), WeightQuantConfig(method="uniform", symmetric=False),
                 WeightQuantConfig(method="seq", levels=4, learnable_scale=True)):
        w = _weight((3, 2500), torch.bfloat16, seed=5)
        s, z = _learnable_params(w, spec) if spec.learnable_scale else (None, None)
        with use_backend("triton"):
            out = fake_quant_weight(w, spec, s, z)
            codes, sc, _ = quantize_weight(w, spec, s, z)
        rc, rs, _ = reference.quantize_weight(w, spec, s, z)
        assert torch.equal(codes, rc) and torch.equal(sc, rs)
        assert torch.equal(out, reference.fake_quant_weight(w, spec, s, z))


@needs_triton
def test_weight_forward_fp16_and_contiguity():
    spec = WeightQuantConfig(method="absmean", granularity="group", group_size=64)
    w = _weight((128, 5), torch.float16, seed=3).t()  # non-contiguous [5, 128]
    with use_backend("triton"):
        out = fake_quant_weight(w, spec)
    assert torch.equal(out, reference.fake_quant_weight(w.contiguous(), spec))


# ---- backward: vs the reference and vs autograd through a differentiable STE surrogate -------------------------
def _round_through(s, spec):
    dt = spec.torch_scale_dtype
    sc = s.clamp_min(torch.finfo(dt).tiny)
    return sc + (sc.to(dt).float() - sc).detach()


def _surrogate(w, spec, s=None, z=None):
    """The STE written with differentiable torch ops; autograd of this is the gradient the op must produce."""
    wf = w.float()
    wc = wf.clamp(-spec.clip, spec.clip) if spec.clip is not None else wf
    if s is None:
        return wc + (reference.fake_quant_weight(w, spec).float() - wc).detach()
    n, k = w.shape
    r, g = s.shape
    gscale = reference.lsq_grad_scale(spec, k, w.numel()) if spec.scale_grad == "lsq" else 1.0

    def expand(t):
        t = t * gscale + (t - t * gscale).detach() if spec.scale_grad == "lsq" else t
        return t.reshape(r, g, 1).expand(n, g, k // g).reshape(n, k)

    s_full = expand(_round_through(s, spec))
    zz = spec.code_offset if spec.symmetric else \
        expand(z + (z.to(spec.torch_scale_dtype).float() - z).detach())
    v = wc / s_full
    vz = v + zz
    vc = vz.clamp(0, spec.max_code)  # LSQ: the range test is on the unrounded v + z
    c = vc + (torch.floor(vc + 0.5) - vc).detach()
    if spec.scale_grad == "lsq":
        return (c - zz) * s_full
    inside = ((vz >= 0) & (vz <= spec.max_code)).detach()
    q = (c - zz).detach()
    # PACT: inside, the gradient flows to w only; outside (clipped), to the scale (and zero point) only
    return torch.where(inside, (q * s_full).detach() + (wc - wc.detach()), (c - zz) * s_full)


@pytest.mark.parametrize("scale_grad", ["lsq", "pact"])
@pytest.mark.parametrize("method,levels,sym", METHODS)
def test_reference_backward_is_autograd_of_ste(method, levels, sym, scale_grad):
    for gran, learnable in (("channel", True), ("group", True), ("tensor", True), ("channel", False)):
        spec = _spec(method, levels, sym, gran, clip=0.12, learnable_scale=learnable, scale_grad=scale_grad)
        w = _weight(SHAPES[gran], torch.float32, seed=11).requires_grad_(True)
        s, z = _learnable_params(w.detach(), spec) if learnable else (None, None)
        go = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)).to(DEV)
        leaves = [t for t in (w, s, z) if t is not None]
        want = torch.autograd.grad(_surrogate(w, spec, s, z), leaves, go)
        out = fake_quant_weight(w, spec, s, z)  # reference backend on CPU
        got = torch.autograd.grad(out, leaves, go)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
@pytest.mark.parametrize("method,levels,sym", METHODS)
def test_weight_backward_matches_reference(poisoned, method, levels, sym, gran):
    for dtype, scale_grad, learnable in ((torch.float32, "lsq", True), (torch.bfloat16, "pact", True),
                                         (torch.float32, "lsq", False)):
        spec = _spec(method, levels, sym, gran, clip=0.12, learnable_scale=learnable, scale_grad=scale_grad,
                     scale_dtype="bfloat16" if dtype == torch.bfloat16 else "float16")
        w = _weight(SHAPES[gran], dtype, seed=17)
        s, z = _learnable_params(w, spec) if learnable else (None, None)
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
        with use_backend("triton"):
            gw, gs, gz = fake_quant_weight_backward(g, w, spec, s, z)
            assert last_backend() == ("fake_quant_weight_backward", "triton")
        rw, rs, rz = reference.fake_quant_weight_backward(g, w, spec, s, z)
        assert gw.dtype == dtype and torch.equal(gw, rw)  # a mask: exact
        assert (gs is None) == (rs is None) and (gz is None) == (rz is None)
        if gs is not None:  # sums in a different order (and g applied after the sum): fp32 tolerance
            torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-5 * float(rs.detach().abs().max()))
        if gz is not None:
            torch.testing.assert_close(gz, rz, rtol=1e-5, atol=1e-5 * float(rz.detach().abs().max()) + 1e-7)


@needs_triton
def test_autograd_through_triton_matches_reference():
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32,
                             learnable_scale=True)
    w0 = _weight((5, 64), torch.float32, seed=23)
    s0, z0 = _learnable_params(w0, spec)
    go = torch.randn(5, 64).to(DEV)
    grads = {}
    for backend in ("triton", "reference"):
        w, s, z = (t.detach().clone().requires_grad_(True) for t in (w0, s0, z0))
        with use_backend(backend):
            (fake_quant_weight(w, spec, s, z) * go).sum().backward()
        grads[backend] = (w.grad, s.grad, z.grad)
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- activations ---------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_matches_reference(poisoned, sym, gran, dtype):
    spec = ActivationQuantConfig(symmetric=sym, granularity=gran)
    x = (torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(2)) * 3 + 0.5).to(dtype).to(DEV)
    x[1, 2] *= 40  # a token with a much larger range
    with use_backend("triton"):
        out = fake_quant_activation(x, spec)
        assert last_backend() == ("fake_quant_activation", "triton")
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, reference.fake_quant_activation(x, spec))  # min/max are exact: bit-identical


def test_activation_quantizes_and_ste_backward():
    spec = ActivationQuantConfig(symmetric=True, granularity="token")
    x = torch.randn(4, 50, dtype=torch.float64).float().requires_grad_(True)
    out = fake_quant_activation(x, spec)
    s = x.detach().abs().amax(-1, keepdim=True) / 127
    q = out.detach() / s
    assert torch.allclose(q, q.round(), atol=1e-3)  # on the 8-bit grid
    assert (out.detach() - x.detach()).abs().le(s / 2 + 1e-6).all()  # within half a step
    go = torch.randn(4, 50)
    (g,) = torch.autograd.grad(out, x, go)
    assert torch.equal(g, go)


# ---- torch.library / ecosystem ----------------------------------------------------------------------------------
def test_opcheck():
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32,
                             learnable_scale=True, scale_grad="lsq")
    w = _weight((3, 64), torch.float32, seed=31).requires_grad_(True)
    s, z = _learnable_params(w.detach(), spec)
    js = spec.to_json()
    ops = torch.ops.pyquant
    torch.library.opcheck(ops.fake_quant_weight.default, (w, js, s, z))
    torch.library.opcheck(ops.fake_quant_weight.default, (w, WeightQuantConfig().to_json(), None, None))
    torch.library.opcheck(ops.quantize_weight.default, (w.detach(), js, s.detach(), z.detach()))
    torch.library.opcheck(ops.fake_quant_weight_backward.default, (torch.randn(3, 64), w.detach(), js, s.detach(),
                                                                   z.detach()))
    x = torch.randn(2, 3, 40, requires_grad=True)
    torch.library.opcheck(ops.fake_quant_activation.default, (x, False, True))
    if _TRITON_OK:  # the same checks with the kernels behind the ops
        with use_backend("triton"):
            torch.library.opcheck(ops.fake_quant_weight.default, (w.to(DEV), js, s.to(DEV), z.to(DEV)))
            torch.library.opcheck(ops.fake_quant_activation.default, (x.to(DEV), True, False))


def test_torch_compile_matches_eager():
    spec = WeightQuantConfig(method="absmean", learnable_scale=True)
    w = _weight((5, 64), torch.float32, seed=41).requires_grad_(True)
    s, _ = _learnable_params(w.detach(), spec)
    x = torch.randn(3, 64)

    def f(w, s, x):
        xq = fake_quant_activation(x, ActivationQuantConfig())
        return (xq @ fake_quant_weight(w, spec, s).t()).square().sum()

    ref = torch.autograd.grad(f(w, s, x), (w, s))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(w, s, x), (w, s))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_import_is_lean():
    code = ("import sys, pyquant, pyquant.ops, pyquant.nn, pyquant.convert; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialized'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_benchmark_smoke_writes_nothing(capsys):
    from pyquant.bench import fake_quant as bench
    from pyquant.bench.common import RESULTS_DIR

    before = sorted(RESULTS_DIR.glob("fake_quant-*")) if RESULTS_DIR.exists() else []
    assert bench.main(["--smoke", "--backend", "reference", "--specs", "twn-channel", "int2-asym-group128-lsq"]) == 0
    out = capsys.readouterr().out
    assert "torch-naive" in out and "QATLinear" in out and "not GPU measurements" in out
    assert (sorted(RESULTS_DIR.glob("fake_quant-*")) if RESULTS_DIR.exists() else []) == before
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main([])


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    spec = WeightQuantConfig(granularity="group", group_size=32)
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match="spec must be a WeightQuantConfig"):
        fake_quant_weight(w, "twn")
    with pytest.raises(TypeError, match="w must be float32, bfloat16 or float16"):
        fake_quant_weight(w.to(torch.float64), spec)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_weight([[1.0]], spec)
    with pytest.raises(ValueError, match="w must be 2-D"):
        fake_quant_weight(torch.randn(64), spec)
    with pytest.raises(ValueError, match="in_features=48 is not divisible by .*group_size=32"):
        fake_quant_weight(torch.randn(4, 48), spec)
    with pytest.raises(ValueError, match=r"scale must have shape \(4, 2\)"):
        fake_quant_weight(w, spec, torch.ones(4, 1))
    with pytest.raises(ValueError, match="zero_point was given without scale"):
        fake_quant_weight(w, spec, None, torch.ones(4, 2))
    asym = WeightQuantConfig(method="uniform", symmetric=False)
    with pytest.raises(ValueError, match="zero_point is required"):
        fake_quant_weight(w, asym, torch.ones(4, 1))
    with pytest.raises(ValueError, match="zero_point must be None for the symmetric spec"):
        fake_quant_weight(w, spec, torch.ones(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="grad must be a floating-point tensor of w's shape"):
        fake_quant_weight_backward(torch.randn(3, 64), w, spec)
    with pytest.raises(TypeError, match="spec must be an ActivationQuantConfig"):
        fake_quant_activation(w, spec)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        fake_quant_activation(w.long())
    with pytest.raises(ValueError, match="x must be a non-empty tensor"):
        fake_quant_activation(torch.randn(0, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs a CUDA GPU with compiled Triton")
def test_gpu_llama_shape_matches_reference():
    spec = WeightQuantConfig(method="twn", granularity="channel", learnable_scale=True)
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    s, _ = _learnable_params(w.detach(), spec)
    with use_backend("triton"):
        out = fake_quant_weight(w, spec, s)
    assert torch.equal(out, reference.fake_quant_weight(w, spec, s))
    assert math.isfinite(float(out.float().sum()))

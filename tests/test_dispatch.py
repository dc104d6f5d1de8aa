"""Backend dispatch (``pyquant.ops._dispatch``) and the ``pyquant::packed_matmul`` op: order, env var, nesting,
fallback, errors, ``last_backend``; opcheck and argument validation of the public wrapper."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

import pyquant.ops as ops
from conftest import requires_cuda
from pyquant import reference as R
from pyquant.formats import pack_codes
from pyquant.ops import _dispatch as D

OP = "_test_dispatch_op"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    yield


@pytest.fixture
def fake_op(monkeypatch):
    """A throw-away op with an implementation per backend, each returning its own name; every backend reported
    available (so the selection logic is tested apart from the machine).  ``rejects`` lists backends whose
    ``supports`` refuses calls."""
    monkeypatch.setitem(D._REGISTRY, OP, {})
    rejects = set()
    for b in D.BACKENDS:
        D.register(OP, b, supports=lambda *a, _b=b, **k: (_b not in rejects, f"{_b} refuses n={a[0]}"))(
            lambda *a, _b=b, **k: _b)
    monkeypatch.setattr(D, "backend_status", lambda b, device=None, explicit=False: (True, "fake"))
    return rejects


# ---------------------------------------------------------------------------------------------------------------
# order, nesting, env var
# ---------------------------------------------------------------------------------------------------------------
def test_default_order():
    assert D.backend_order() == (("cuda", "triton", "reference"), False)


def test_default_order_runs_first_backend(fake_op):
    assert D.call(OP, 1) == "cuda"
    assert D.last_backend() == (OP, "cuda")


def test_use_backend_ordering_and_nesting(fake_op):
    with ops.use_backend("reference", "triton"):
        assert D.backend_order() == (("reference", "triton"), True)
        assert D.call(OP, 1) == "reference"
        with ops.use_backend("triton"):
            assert D.call(OP, 1) == "triton"
            assert ops.last_backend() == (OP, "triton")
        assert D.call(OP, 1) == "reference"  # the outer order is restored
    assert D.call(OP, 1) == "cuda"


def test_use_backend_restores_after_exception(fake_op):
    with pytest.raises(ZeroDivisionError):
        with ops.use_backend("reference"):
            1 / 0
    assert D.backend_order() == (D.BACKENDS, False)


def test_use_backend_normalizes_names():
    with ops.use_backend(" Triton ", "REFERENCE"):
        assert D.backend_order()[0] == ("triton", "reference")


def test_env_var_is_read_at_call_time(fake_op, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, "triton,reference")
    assert D.call(OP, 1) == "triton"
    monkeypatch.setenv(D.ENV_VAR, "reference")
    assert D.call(OP, 1) == "reference"
    assert D.backend_order() == (("reference",), True)
    with ops.use_backend("cuda"):  # the context manager wins over the env var
        assert D.call(OP, 1) == "cuda"
    monkeypatch.setenv(D.ENV_VAR, "")  # empty: the default order
    assert D.backend_order() == (D.BACKENDS, False)


def test_order_is_per_thread(fake_op):
    seen = {}

    def other():
        seen["order"] = D.backend_order()
        seen["last"] = D.last_backend()

    with ops.use_backend("reference"):
        D.call(OP, 1)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == {"order": (D.BACKENDS, False), "last": None}


# ---------------------------------------------------------------------------------------------------------------
# invalid names and errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [("gpu",), ("reference", "cpu"), ("",), ()])
def test_use_backend_rejects_invalid_names(names):
    with pytest.raises(ValueError, match=r"use_backend: (unknown backend|no backend named).*cuda.*triton.*reference"):
        with ops.use_backend(*names):
            pass


def test_env_var_invalid_name_is_a_clear_error(fake_op, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, "reference,tpu")
    with pytest.raises(ValueError, match=r"PYQUANT_BACKEND='reference,tpu'.*unknown backend 'tpu'"):
        D.call(OP, 1)
    monkeypatch.setenv(D.ENV_VAR, " , ")
    with pytest.raises(ValueError, match="PYQUANT_BACKEND"):
        D.backend_order()


def test_register_rejects_invalid_backend():
    with pytest.raises(ValueError, match=r"backend='opencl' is invalid"):
        D.register(OP, "opencl")


def test_unknown_op_raises():
    with pytest.raises(KeyError, match="no_such_op"):
        D.call("no_such_op", 1)


def test_backend_status_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'npu'"):
        D.backend_status("npu")


def test_fallback_when_supports_rejects(fake_op):
    fake_op.add("cuda")
    assert D.call(OP, 7) == "triton"
    fake_op.add("triton")
    assert D.call(OP, 7) == "reference"
    assert D.last_backend() == (OP, "reference")


def test_none_can_run_names_every_reason(fake_op):
    fake_op.update({"cuda", "triton", "reference"})
    with pytest.raises(RuntimeError) as e:
        D.call(OP, 5)
    msg = str(e.value)
    for b in D.BACKENDS:
        assert f"{b}: {b} refuses n=5" in msg
    assert OP in msg


def test_missing_implementation_is_a_reason(fake_op, monkeypatch):
    del D._REGISTRY[OP]["cuda"]
    assert D.registered(OP) == ("triton", "reference")
    with ops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=f"cuda: no implementation of {OP}"):
            D.call(OP, 1)


# ---------------------------------------------------------------------------------------------------------------
# backend_status on this machine
# ---------------------------------------------------------------------------------------------------------------
def test_backend_status_reasons(monkeypatch):
    cpu = torch.device("cpu")
    assert D.backend_status("reference", cpu) == (True, "pure PyTorch (always available)")
    ok, why = D.backend_status("cuda", cpu)
    assert not ok and "needs CUDA tensors (got cpu)" in why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = D.backend_status("triton", cpu, explicit=True)
    assert not ok and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = D.backend_status("triton", cpu, explicit=False)
    assert not ok and "only when selected" in why
    ok, why = D.backend_status("triton", torch.device("meta"), explicit=True)
    assert not ok and "needs CUDA tensors (got meta)" in why


def test_triton_interpreter_on_cpu_when_selected(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert D.backend_status("triton", torch.device("cpu"), explicit=True) == (True, "interpreter")


def test_cuda_backend_without_extension_is_unavailable_not_a_crash(monkeypatch):
    import pyquant

    monkeypatch.setitem(sys.modules, "pyquant._cuda_ext", None)  # makes the import raise ImportError
    monkeypatch.delattr(pyquant, "_cuda_ext", raising=False)  # (else `from .. import` finds the bound attribute)
    ok, why = D.backend_status("cuda")
    assert not ok and "pyquant._cuda_ext" in why


# ---------------------------------------------------------------------------------------------------------------
# pyquant::packed_matmul through the dispatcher
# ---------------------------------------------------------------------------------------------------------------
def _case(m=3, n=5, k=96, gs=32, asym=False, xdt=torch.float32, sdt=torch.float16, bias=True):
    codes = torch.randint(0, 4, (n, k), dtype=torch.uint8)
    q = pack_codes(codes)
    s = (torch.rand(n, k // gs) * 0.2 + 0.02).to(sdt)
    z = (torch.rand(n, k // gs) * 3).to(sdt) if asym else None
    b = torch.randn(n, dtype=xdt) if bias else None
    x = torch.randn(m, k, dtype=xdt)
    return x, q, s, z, b, codes


def test_reference_backend_runs_on_cpu_and_matches():
    x, q, s, z, b, codes = _case()
    y = ops.packed_matmul(x, q, s, None, b, in_features=96, code_offset=1.0)
    assert ops.last_backend() == ("packed_matmul", "reference")
    torch.testing.assert_close(y, R.packed_matmul(x, q, s, None, b, 96, 1.0), rtol=0, atol=0)


def test_registered_backends_include_reference():
    assert "reference" in ops.registered("packed_matmul")
    assert "packed_matmul" in D.registered_ops()


def test_use_backend_cuda_on_cpu_names_the_reason():
    x, q, s, z, b, _ = _case()
    with ops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"cuda: needs CUDA tensors \(got cpu\)"):
            ops.packed_matmul(x, q, s, None, b, in_features=96, code_offset=1.0)


def test_env_var_selects_for_packed_matmul(monkeypatch):
    x, q, s, z, b, _ = _case()
    monkeypatch.setenv(D.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="no backend in \\('cuda',\\) can run"):
        ops.packed_matmul(x, q, s, None, b, in_features=96, code_offset=1.0)
    monkeypatch.setenv(D.ENV_VAR, "cuda,reference")
    ops.packed_matmul(x, q, s, None, b, in_features=96, code_offset=1.0)
    assert ops.last_backend() == ("packed_matmul", "reference")


def test_triton_on_cpu_without_interpreter_names_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, q, s, z, b, _ = _case()
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="triton: "):
            ops.packed_matmul(x, q, s, None, b, in_features=96, code_offset=1.0)


@pytest.mark.parametrize("xdt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [False, True])
def test_wrapper_leading_dims_and_strides(xdt, asym):
    x, q, s, z, b, codes = _case(m=6, asym=asym, xdt=xdt)
    off = None if asym else 2.0
    x3 = torch.randn(2, 96, 3, dtype=xdt).transpose(1, 2)  # [2, 3, 96], non-contiguous
    y = ops.packed_matmul(x3, q, s, z, b, in_features=96, code_offset=off)
    assert y.shape == (2, 3, 5) and y.dtype == xdt
    want = R.packed_matmul(x3.reshape(6, 96), q, s, z, b, 96, off).reshape(2, 3, 5)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("xdt,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_matmul_gradients_match_autograd(xdt, tol):
    x, q, s, z, b, codes = _case(m=4, asym=True, xdt=xdt)
    x = x.requires_grad_()
    b = b.requires_grad_()
    go = torch.randn(2, 2, 5, dtype=xdt)
    y = ops.packed_matmul(x.reshape(2, 2, 96), q, s, z, b, in_features=96)
    y.backward(go)
    # autograd of the float64 math on the dequantized weight
    w64 = R.dequantize_weight(codes, s, z, None).double()
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    ((x64 @ w64.T + b64).reshape(2, 2, 5) * go.double()).sum().backward()
    assert x.grad.dtype == xdt and b.grad.dtype == xdt
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("asym,bias,xdt", [(False, True, torch.float32), (True, False, torch.float16),
                                           (True, True, torch.bfloat16)])
def test_opcheck_packed_matmul_reference(asym, bias, xdt):
    x, q, s, z, b, _ = _case(m=3, asym=asym, xdt=xdt, bias=bias)
    x.requires_grad_()
    if b is not None:
        b.requires_grad_()
    with ops.use_backend("reference"):
        torch.library.opcheck(torch.ops.pyquant.packed_matmul.default,
                              (x, q, s, z, b, 96, None if asym else 1.5))


# ---------------------------------------------------------------------------------------------------------------
# argument validation of the public wrapper
# ---------------------------------------------------------------------------------------------------------------
def _bad(**over):
    x, q, s, z, b, _ = _case(asym=True)
    kw = dict(x=x, qweight=q, scale=s, zero_point=z, bias=b, in_features=96, code_offset=None)
    kw.update(over)
    a = [kw.pop(n) for n in ("x", "qweight", "scale", "zero_point", "bias")]
    return lambda: ops.packed_matmul(*a, **kw)


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(x=[[1.0] * 96]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randint(0, 3, (3, 96))), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(x=torch.randn(3, 96, dtype=torch.float64)), TypeError, "x must be float16"),
    (dict(x=torch.randn(3, 95)), ValueError, "last dimension must be in_features=96"),
    (dict(x=torch.randn(0, 96)), ValueError, "x is empty"),
    (dict(x=torch.randn(3, 96, device="meta")), ValueError, "x is on meta but qweight is on cpu"),
    (dict(qweight=torch.zeros(5, 32, dtype=torch.int8)), TypeError, "qweight must be a 2-D torch.uint8"),
    (dict(qweight=torch.zeros(5, 16, dtype=torch.uint8)), ValueError, "qweight has shape"),
    (dict(scale=torch.rand(5, 3, dtype=torch.float64)), ValueError, "scale must be"),
    (dict(scale=torch.rand(4, 3, dtype=torch.float16)), ValueError, "scale must be"),
    (dict(scale=torch.rand(5, 5, dtype=torch.float16)), ValueError, "scale must be 2-D"),
    (dict(scale="0.1"), ValueError, "scale must be 2-D"),
    (dict(zero_point=torch.rand(5, 3)), ValueError, "zero_point must match scale"),
    (dict(zero_point=None), ValueError, "code_offset must be given"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must be a float tensor of shape \(5,\)"),
    (dict(bias=torch.arange(5)), ValueError, "bias must be"),
    (dict(in_features=True), ValueError, "in_features"),
])
def test_packed_matmul_rejects_bad_arguments(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _bad(**over)()


# ---------------------------------------------------------------------------------------------------------------
# on a GPU: default dispatch of CUDA tensors picks a GPU backend, and every backend agrees with the reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("asym", [False, True])
def test_cuda_tensors_dispatch_and_agree(asym):
    x, q, s, z, b, _ = _case(m=5, asym=asym, xdt=torch.float16)
    x, q, s, b = x.cuda(), q.cuda(), s.cuda(), b.cuda()
    z = z.cuda() if z is not None else None
    off = None if asym else 1.0
    with ops.use_backend("reference"):
        want = ops.packed_matmul(x, q, s, z, b, in_features=96, code_offset=off)
    assert ops.last_backend() == ("packed_matmul", "reference")
    y = ops.packed_matmul(x, q, s, z, b, in_features=96, code_offset=off)
    op, backend = ops.last_backend()
    assert op == "packed_matmul"
    # the default order picks the first GPU backend that is available (TRITON_INTERPRET=1 disables triton on CUDA)
    args = (x, q, s, z, b, 96, off)

    def runs(b_):
        impl = D._REGISTRY["packed_matmul"].get(b_)
        return impl is not None and D.backend_status(b_, x.device)[0] and \
            (impl.supports is None or impl.supports(*args)[0])

    gpu_ok = [b_ for b_ in ("cuda", "triton") if runs(b_)]
    if gpu_ok:
        assert backend in gpu_ok, (backend, gpu_ok)
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)
    for b_ in ops.registered("packed_matmul"):
        ok, _ = D.backend_status(b_, x.device, explicit=True)
        if ok:
            with ops.use_backend(b_):
                y_b = ops.packed_matmul(x, q, s, z, b, in_features=96, code_offset=off)
            torch.testing.assert_close(y_b.float(), want.float(), rtol=1e-2, atol=1e-2)

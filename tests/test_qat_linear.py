"""QATLinear vs the reference math: forward, gradients (W, scale, zero point, bias, x), Conv1D layout, switches."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyquant import reference
from pyquant.formats import ActivationQuantConfig, WeightQuantConfig
from pyquant.nn import PackedLinear, QATLinear
from pyquant.ops import use_backend
from pyquant.ops._dispatch import backend_status

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

SPECS = [
    WeightQuantConfig(method="twn"),
    WeightQuantConfig(method="twn", learnable_scale=True, clip=0.1),
    WeightQuantConfig(method="absmean", granularity="group", group_size=32, learnable_scale=True, scale_grad="pact"),
    WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32, learnable_scale=True),
    WeightQuantConfig(method="seq", levels=4, granularity="tensor", scale_dtype="bfloat16"),
]


def _linear(kind, k=96, n=37, seed=0):
    torch.manual_seed(seed)
    mod = nn.Linear(k, n) if kind == "linear" else Conv1D(n, k)
    with torch.no_grad():
        mod.weight.normal_(0, 0.05)
        mod.bias.normal_(0, 0.1)
    return mod


def _w_nk(mod):
    return mod.weight.t() if isinstance(mod, Conv1D) else mod.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe() + (" learn" if s.learnable_scale else ""))
def test_forward_and_grads_match_reference(kind, spec):
    mod = _linear(kind)
    w0, b0 = mod.weight.detach().clone(), mod.bias.detach().clone()
    act = ActivationQuantConfig(symmetric=False, granularity="token")
    q = QATLinear.from_linear(mod, spec, act)
    assert q.weight is mod.weight and q.bias is mod.bias  # shared Parameters, original orientation
    assert q.weight.shape == w0.shape and q.transposed == (kind == "conv1d")
    assert torch.equal(q.weight_nk, w0.t() if kind == "conv1d" else w0)
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = q(x)
    assert y.shape == (2, 5, 37) and y.dtype == x.dtype

    # reference math, step by step
    w_nk = (w0.t() if kind == "conv1d" else w0)
    s = None if q.weight_scale is None else q.weight_scale.detach()
    z = None if q.weight_zero_point is None else q.weight_zero_point.detach()
    if spec.learnable_scale:
        init = WeightQuantConfig(**{**spec.to_dict(), "learnable_scale": False})
        _, s_init, z_init = reference.quantize_weight(w_nk, init)
        assert torch.equal(s, s_init) and (z is None or torch.equal(z, z_init))
    w_hat = reference.fake_quant_weight(w_nk, spec, s, z)
    xq = reference.fake_quant_activation(x.detach(), act)
    torch.testing.assert_close(y, F.linear(xq, w_hat, b0), rtol=1e-5, atol=1e-5)

    go = torch.randn_like(y)
    y.backward(go)
    g2 = go.reshape(-1, 37)
    gw_hat = g2.t() @ xq.reshape(-1, 96)
    gw, gs, gz = reference.fake_quant_weight_backward(gw_hat, w_nk, spec, s, z)
    torch.testing.assert_close(q.weight.grad, gw.t() if kind == "conv1d" else gw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, g2.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, (g2 @ w_hat).reshape(x.shape), rtol=1e-5, atol=1e-5)  # STE through act quant
    if spec.learnable_scale:
        torch.testing.assert_close(q.weight_scale.grad, gs, rtol=1e-4, atol=1e-5)
        if gz is not None:
            torch.testing.assert_close(q.weight_zero_point.grad, gz, rtol=1e-4, atol=1e-5)

    # quantized_weight is what the forward used: dequantizes to the fake-quant weight bit for bit
    codes, sc, zp = q.quantized_weight()
    assert codes.dtype == torch.uint8 and codes.shape == (37, 96)
    assert torch.equal(reference.dequantize_weight(codes, sc, zp, spec.code_offset), q.fake_quant_weight().detach())
    packed = PackedLinear.from_qat(q, dtype=torch.float32)
    assert torch.equal(packed.dequantize(), q.fake_quant_weight().detach())


def test_switches_and_state_dict():
    mod = _linear("conv1d")
    keys = {k: v.shape for k, v in mod.state_dict().items()}
    q = QATLinear.from_linear(mod, WeightQuantConfig(method="twn"), ActivationQuantConfig())
    assert {k: v.shape for k, v in q.state_dict().items()} == keys  # unchanged for a non-learnable spec
    x = torch.randn(3, 96)
    plain = x @ mod.weight + mod.bias
    assert not torch.allclose(q(x), plain, atol=1e-3)
    q.enable_fake_quant(weight=False, activation=False)
    torch.testing.assert_close(q(x), plain)
    q.enable_fake_quant(weight=True, activation=False)
    torch.testing.assert_close(q(x), x @ reference.fake_quant_weight(mod.weight.t(), q.weight_spec).t() + mod.bias)
    q.enable_fake_quant()
    assert q.fake_quant_activation_enabled and "TWN" in repr(q)
    ql = QATLinear.from_linear(_linear("linear"), WeightQuantConfig(method="uniform", symmetric=False,
                                                                     learnable_scale=True))
    assert set(ql.state_dict()) == {"weight", "bias", "weight_scale", "weight_zero_point"}
    assert isinstance(ql.weight_scale, nn.Parameter) and isinstance(ql.weight_zero_point, nn.Parameter)
    fresh = QATLinear(96, 37, weight_spec=ql.weight_spec)
    fresh.load_state_dict(ql.state_dict())
    torch.testing.assert_close(fresh(x), ql(x))


def test_constructor_and_autocast_and_compile():
    q = QATLinear(64, 33, bias=False, weight_spec=WeightQuantConfig(method="absmean", learnable_scale=True))
    assert q.weight.shape == (33, 64) and q.bias is None and q.weight_scale.shape == (33, 1)
    x = torch.randn(4, 64)
    ref = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = q(x)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=2e-2, atol=2e-2)
    qc = torch.compile(q, backend="aot_eager")
    torch.testing.assert_close(qc(x), ref)


def test_bad_input():
    with pytest.raises(ValueError, match="in_features=100 is not divisible by .*group_size=32"):
        QATLinear(100, 8, weight_spec=WeightQuantConfig(granularity="group", group_size=32))
    with pytest.raises(ValueError, match="in_features=100 is not divisible"):
        QATLinear.from_linear(nn.Linear(100, 8), WeightQuantConfig(granularity="group", group_size=32))
    with pytest.raises(TypeError, match="expected nn.Linear or transformers Conv1D"):
        QATLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="weight_spec must be a WeightQuantConfig"):
        QATLinear(8, 8, weight_spec="twn")
    with pytest.raises(TypeError, match="act_spec must be an ActivationQuantConfig"):
        QATLinear(8, 8, act_spec=8)
    with pytest.raises(ValueError, match="out_features=0 is invalid"):
        QATLinear(8, 0)
    with pytest.raises(ValueError, match="learnable_scale=False"):
        QATLinear(8, 8).reset_scale()
    with pytest.raises(TypeError, match="takes bools"):
        QATLinear(8, 8).enable_fake_quant(weight=1)


@pytest.mark.skipif(not backend_status("triton", torch.device("cpu"), explicit=True)[0],
                    reason="needs TRITON_INTERPRET=1 (CPU) for the Triton backend")
def test_triton_backend_in_module():
    mod = _linear("conv1d", k=64, n=19)
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32,
                             learnable_scale=True)
    grads = {}
    for backend in ("triton", "reference"):
        q = QATLinear.from_linear(_linear("conv1d", k=64, n=19), spec, ActivationQuantConfig())
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with use_backend(backend):
            y = q(x)
            y.square().sum().backward()
            codes = q.quantized_weight()[0]
        grads[backend] = (y.detach(), codes, x.grad, q.weight.grad, q.weight_scale.grad, q.weight_zero_point.grad)
    assert mod.weight.shape == (64, 19)
    for a, b in zip(grads["triton"], grads["reference"]):
        if a.dtype == torch.uint8:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

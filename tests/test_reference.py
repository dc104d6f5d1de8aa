"""The pure-PyTorch reference (``pyquant.reference``) against independent float64 math.

* quantize / dequantize / fake-quant: per-group float64 loops written from the formulas in ``formats.py``;
* ``fake_quant_weight_backward``: autograd of an independent float64 fake-quant in which the straight-through
  estimator is the ``x + (q(x) - x).detach()`` trick, the LSQ scale gradient comes from autograd through
  ``round`` replaced by ``v_r = v + (round_half_up(v) - v).detach()`` (gradient scale applied with the same trick),
  and PACT from autograd through ``clamp(w, lo(s, z), hi(s, z))``;
* activation fake-quant on hand-worked cases and against float64;
* packed matmul against a float64 matmul.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyquant import reference as R
from pyquant.formats import SCALE_DTYPES, ActivationQuantConfig, WeightQuantConfig, pack_codes

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# independent float64 helpers
# ---------------------------------------------------------------------------------------------------------------
def rhu(v):
    return torch.floor(v + 0.5)


def to_sdt(t: torch.Tensor, spec: WeightQuantConfig) -> torch.Tensor:
    return t.to(SCALE_DTYPES[spec.scale_dtype]).to(F64)


def expand64(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[R, G] (R in {1, N}) -> [N, K] by repeating each group's value over its columns (differentiable)."""
    return t.repeat_interleave(k // t.shape[1], dim=1).expand(n, k)


def group_slices(spec: WeightQuantConfig, n: int, k: int):
    """(row, group, row-slice, col-slice) of every group that shares one scale."""
    if spec.granularity == "tensor":
        yield 0, 0, slice(0, n), slice(0, k)
        return
    gs = k if spec.granularity == "channel" else spec.group_size
    for r in range(n):
        for g in range(k // gs):
            yield r, g, slice(r, r + 1), slice(g * gs, (g + 1) * gs)


def scale_shape(spec, n, k):
    if spec.granularity == "tensor":
        return (1, 1)
    return (n, 1) if spec.granularity == "channel" else (n, k // spec.group_size)


def quant_stats64(w: torch.Tensor, spec: WeightQuantConfig):
    """The method's init statistics in float64, group by group: (scale [R, G], zero [R, G] | None, delta [R, G])."""
    n, k = w.shape
    wc = w.to(F64)
    if spec.clip is not None:
        wc = wc.clamp(-spec.clip, spec.clip)
    shp = scale_shape(spec, n, k)
    s = torch.empty(shp, dtype=F64)
    z = torch.empty(shp, dtype=F64) if not spec.symmetric else None
    delta = torch.zeros(shp, dtype=F64)
    for r, g, rs, cs in group_slices(spec, n, k):
        a = wc[rs, cs].reshape(-1)
        if spec.method == "twn":
            d = 0.7 * a.abs().mean()
            kept = a.abs()[a.abs() > d]
            s[r, g] = kept.mean() if kept.numel() else 0.0
            delta[r, g] = d
        elif spec.method == "absmean":
            s[r, g] = a.abs().mean()
        elif spec.method == "seq":
            s[r, g] = a.abs().max() * (2.0 / 3.0 if spec.levels == 3 else 0.5)
        elif spec.symmetric:
            s[r, g] = a.abs().max() / 1.5
        else:
            mn, mx = min(a.min().item(), 0.0), max(a.max().item(), 0.0)
            s[r, g] = (mx - mn) / 3.0
            sr = to_sdt(s[r, g].clamp_min(torch.finfo(SCALE_DTYPES[spec.scale_dtype]).tiny), spec)
            z[r, g] = to_sdt(-mn / sr, spec)
    s = to_sdt(s.clamp_min(torch.finfo(SCALE_DTYPES[spec.scale_dtype]).tiny), spec)
    return s, z, delta, wc


def codes64(wc: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec: WeightQuantConfig):
    """Codes by rounding (the non-TWN and the learnable-scale rule) and the distance of each pre-rounded value
    from its nearest rounding boundary (to excuse float32-vs-float64 ties)."""
    n, k = wc.shape
    zz = expand64(z, n, k) if z is not None else spec.code_offset
    u = wc / expand64(s.to(F64), n, k) + zz
    c = rhu(u).clamp(0, spec.max_code)
    dist = (u - torch.floor(u) - 0.5).abs()
    near = (dist > 0) & (dist < 1e-5)  # exact ties (e.g. clipped weights) are exact in float32 too: not excused
    return c, near


METHOD_SPECS = [
    dict(method="twn"),
    dict(method="absmean"),
    dict(method="seq", levels=4),
    dict(method="seq", levels=3),
    dict(method="uniform"),
    dict(method="uniform", symmetric=False),
]
GRANS = [dict(granularity="tensor"), dict(granularity="channel"), dict(granularity="group", group_size=32)]


def _spec_id(d):
    return "-".join(f"{v}" for v in d.values())


def _shape_for(spec):
    return (5, 96) if spec.granularity == "group" else (7, 50)


# ---------------------------------------------------------------------------------------------------------------
# quantize / dequantize / fake-quant
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sdt", ["float16", "bfloat16"])
@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("gran", GRANS, ids=_spec_id)
@pytest.mark.parametrize("meth", METHOD_SPECS, ids=_spec_id)
def test_quantize_weight_matches_float64(meth, gran, clip, sdt):
    spec = WeightQuantConfig(**meth, **gran, clip=clip, scale_dtype=sdt)
    ulp = 2e-3 if sdt == "float16" else 8e-3
    n, k = _shape_for(spec)
    w = torch.randn(n, k) * 0.8
    codes, s, z = R.quantize_weight(w, spec)
    s64, z64, delta, wc = quant_stats64(w, spec)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k)
    assert s.dtype == torch.float32 and s.shape == scale_shape(spec, n, k)
    torch.testing.assert_close(s.to(F64), s64, rtol=ulp, atol=0)  # <= 1 ulp of the scale dtype apart
    if spec.symmetric:
        assert z is None
    else:
        torch.testing.assert_close(z.to(F64), z64, rtol=ulp, atol=ulp)
    if spec.method == "twn":
        dd = expand64(delta, n, k)
        want = 1 + torch.sign(wc) * (wc.abs() > dd)
        dist = (wc.abs() - dd).abs()
        near = (dist > 0) & (dist < 1e-6)
    else:  # codes from the reference's own (float32) scale and zero point: independent of scale-rounding ties
        want, near = codes64(wc, s, None if z is None else z.to(F64), spec)
    bad = (codes.to(F64) != want) & ~near
    assert not bad.any(), f"{int(bad.sum())} codes differ from float64"
    assert near.float().mean() < 0.01
    # fake-quant = dequantize(quantize), in w's dtype
    fq = R.fake_quant_weight(w, spec)
    torch.testing.assert_close(fq, R.dequantize_weight(codes, s, z, spec.code_offset), rtol=0, atol=0)


@pytest.mark.parametrize("gran", GRANS, ids=_spec_id)
@pytest.mark.parametrize("meth", METHOD_SPECS, ids=_spec_id)
def test_quantize_with_given_scale_matches_float64(meth, gran):
    spec = WeightQuantConfig(**meth, **gran, learnable_scale=True)
    n, k = _shape_for(spec)
    w = torch.randn(n, k)
    shp = scale_shape(spec, n, k)
    scale = torch.rand(shp) * 0.5 + 0.25
    zp = torch.rand(shp) * 3 if not spec.symmetric else None
    codes, s, z = R.quantize_weight(w, spec, scale, zp)
    torch.testing.assert_close(s.to(F64), to_sdt(scale.to(F64), spec), rtol=0, atol=0)
    want, near = codes64(w.to(F64), s, None if zp is None else to_sdt(zp.to(F64), spec), spec)
    assert not ((codes.to(F64) != want) & ~near).any()


@pytest.mark.parametrize("gran", GRANS, ids=_spec_id)
def test_group_and_tensor_scales_are_per_channel_of_a_reshape(gran):
    # A group-wise quantizer is the per-channel quantizer of W viewed as [N * K/gs, gs]; per-tensor is per-channel
    # of W viewed as one row.  (A structural check independent of how the reference groups.)
    spec = WeightQuantConfig(method="absmean", **gran)
    n, k = _shape_for(spec)
    w = torch.randn(n, k)
    codes, s, _ = R.quantize_weight(w, spec)
    rows = {"tensor": 1, "channel": n, "group": n * (k // 32)}[spec.granularity]
    c2, s2, _ = R.quantize_weight(w.reshape(rows, -1), WeightQuantConfig(method="absmean"))
    assert torch.equal(codes.reshape(rows, -1), c2)
    assert torch.equal(s.reshape(-1), s2.reshape(-1))


@pytest.mark.parametrize("asym", [False, True])
def test_dequantize_weight_matches_float64(asym):
    n, k, g = 5, 96, 3
    codes = torch.randint(0, 4, (n, k), dtype=torch.uint8)
    scale = (torch.rand(n, g) + 0.1).to(torch.float16)
    zp = (torch.rand(n, g) * 3).to(torch.float16) if asym else None
    got = R.dequantize_weight(codes, scale, zp, None if asym else 1.5)
    want = torch.empty(n, k, dtype=F64)
    for r in range(n):
        for j in range(k):
            zz = float(zp[r, j // 32]) if asym else 1.5
            want[r, j] = (int(codes[r, j]) - zz) * float(scale[r, j // 32])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.to(F64), want, rtol=1e-6, atol=1e-6)


def test_per_tensor_scale_broadcasts_over_rows():
    n, k = 6, 40
    codes = torch.randint(0, 3, (n, k), dtype=torch.uint8)
    s1 = torch.rand(1, 1) + 0.5
    torch.testing.assert_close(R.dequantize_weight(codes, s1, None, 1.0),
                               R.dequantize_weight(codes, s1.expand(n, 1).contiguous(), None, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(R.dequantize_weight(codes, s1, None, 1.0),
                               (codes.float() - 1.0) * s1.item(), rtol=1e-6, atol=1e-6)
    spec = WeightQuantConfig(method="uniform", granularity="tensor", learnable_scale=True, scale_dtype="float32")
    w = torch.randn(n, k)
    c_t, _, _ = R.quantize_weight(w, spec, s1)
    c_c, _, _ = R.quantize_weight(w, WeightQuantConfig(method="uniform", learnable_scale=True,
                                                       scale_dtype="float32"), s1.expand(n, 1))
    assert torch.equal(c_t, c_c)


def test_fake_quant_keeps_dtype_and_is_idempotent():
    spec = WeightQuantConfig(method="absmean", granularity="group", group_size=32, learnable_scale=True)
    w = torch.randn(3, 64, dtype=torch.bfloat16)
    s = torch.rand(3, 2) + 0.3
    fq = R.fake_quant_weight(w, spec, s)
    assert fq.dtype == torch.bfloat16
    # Values on the grid quantize to themselves (float32 weights, so bf16 rounding of the output does not enter)
    w32 = torch.randn(3, 64)
    fq32 = R.fake_quant_weight(w32, spec, s)
    torch.testing.assert_close(R.fake_quant_weight(fq32, spec, s), fq32, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(meth=st.sampled_from(METHOD_SPECS), gran=st.sampled_from(GRANS), rows=st.integers(1, 6),
       groups=st.integers(1, 3), sdt=st.sampled_from(list(SCALE_DTYPES)), clip=st.sampled_from([None, 0.9]),
       seed=st.integers(0, 2**31 - 1))
def test_learnable_fake_quant_properties(meth, gran, rows, groups, sdt, clip, seed):
    # Over random specs and shapes: codes lie in [0, levels-1]; every fake-quant value is (c - z) * s; inside the
    # quantizer's range the error is at most s/2; outside it the value is the nearest end of the range.
    g = torch.Generator().manual_seed(seed)
    spec = WeightQuantConfig(**meth, **gran, scale_dtype=sdt, clip=clip, learnable_scale=True)
    k = 32 * groups
    w = torch.randn(rows, k, generator=g)
    shp = scale_shape(spec, rows, k)
    scale = torch.rand(shp, generator=g) * 0.6 + 0.05
    zp = torch.rand(shp, generator=g) * 3 if not spec.symmetric else None
    codes, s, z = R.quantize_weight(w, spec, scale, zp)
    assert int(codes.max()) <= spec.max_code
    fq = R.fake_quant_weight(w, spec, scale, zp).to(F64)
    S = expand64(s.to(F64), rows, k)
    Z = expand64(z.to(F64), rows, k) if z is not None else spec.code_offset
    torch.testing.assert_close(fq, (codes.to(F64) - Z) * S, rtol=1e-6, atol=1e-7)
    wc = w.to(F64).clamp(-clip, clip) if clip is not None else w.to(F64)
    lo, hi = (0 - Z) * S, (spec.max_code - Z) * S
    inside = (wc >= lo) & (wc <= hi)
    err = (fq - wc).abs()
    assert (err[inside] <= (S / 2 * (1 + 1e-5))[inside]).all()
    torch.testing.assert_close(fq[~inside], torch.minimum(torch.maximum(wc, lo), hi)[~inside], rtol=1e-5, atol=1e-6)


def test_reference_quant_rejects_bad_input():
    spec = WeightQuantConfig(method="uniform", symmetric=False)
    with pytest.raises(TypeError, match="weight"):
        R.quantize_weight([[1.0]], spec)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        R.quantize_weight(torch.randn(4), spec)
    with pytest.raises(TypeError, match="floating"):
        R.quantize_weight(torch.randint(0, 3, (2, 4)), spec)
    with pytest.raises(ValueError, match=r"scale must have shape \(3, 1\)"):
        R.quantize_weight(torch.randn(3, 8), spec, torch.rand(3, 2), torch.rand(3, 2))
    with pytest.raises(ValueError, match="zero_point is required"):
        R.quantize_weight(torch.randn(3, 8), spec, torch.rand(3, 1))
    with pytest.raises(ValueError, match=r"zero_point must have shape"):
        R.quantize_weight(torch.randn(3, 8), spec, torch.rand(3, 1), torch.rand(1, 1))
    with pytest.raises(ValueError, match="code_offset"):
        R.dequantize_weight(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), None, None)
    with pytest.raises(TypeError, match="floating"):
        R.fake_quant_activation(torch.arange(4), ActivationQuantConfig())
    codes = torch.zeros(2, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scale must be 2-D"):
        R.dequantize_weight(codes, torch.ones(2, 4), None, 1.0)  # 4 groups do not divide K = 6
    with pytest.raises(ValueError, match="scale must be 2-D"):
        R.dequantize_weight(codes, torch.ones(3, 1), None, 1.0)
    with pytest.raises(ValueError, match="zero_point must be 2-D"):
        R.dequantize_weight(codes, torch.ones(2, 2), torch.ones(2, 4), None)
    with pytest.raises(ValueError, match="codes must be a 2-D"):
        R.dequantize_weight(codes[0], torch.ones(1, 1), None, 1.0)
    w = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"grad_out must have the weight's shape \(3, 8\)"):
        R.fake_quant_weight_backward(torch.randn(1, 8), w, WeightQuantConfig())


# ---------------------------------------------------------------------------------------------------------------
# fake-quant backward vs autograd of an independent float64 formulation
# ---------------------------------------------------------------------------------------------------------------
def fq_autograd64(w, spec, scale, zero_point, mode):
    """Float64 fake-quant whose autograd gives the STE / LSQ / PACT gradients (see the module docstring)."""
    n, k = w.shape
    wc = w.clamp(-spec.clip, spec.clip) if spec.clip is not None else w
    if mode == "ste":  # frozen (statistics) scale: plain straight-through estimator
        fq = R.fake_quant_weight(w.detach().float(), spec).to(F64)
        return wc + (fq - wc).detach()
    s = scale + (to_sdt(scale, spec) - scale).detach()  # value rounded through scale_dtype, gradient identity
    z = None if zero_point is None else zero_point + (to_sdt(zero_point, spec) - zero_point).detach()
    top = float(spec.max_code)
    if mode == "lsq":
        per = n * k if spec.granularity == "tensor" else (k if spec.granularity == "channel" else spec.group_size)
        g = 1.0 / math.sqrt(per * spec.qp)
        s = s * g + (s - s * g).detach()  # LSQ gradient scale: value s, gradient times g
        if z is not None:
            z = z * g + (z - z * g).detach()
        S = expand64(s, n, k)
        Z = expand64(z, n, k) if z is not None else spec.code_offset
        u = (wc / S + Z).clamp(0.0, top)
        c = u + (rhu(u) - u).detach()  # round with a straight-through gradient
        return (c - Z) * S
    # PACT: clip to the quantizer's range with learnable bounds, then straight-through quantization
    S = expand64(s, n, k)
    Z = expand64(z, n, k) if z is not None else spec.code_offset
    lo, hi = (0.0 - Z) * S, (top - Z) * S
    y = torch.minimum(torch.maximum(wc, lo), hi)
    q = (rhu(y / S.detach() + (Z.detach() if torch.is_tensor(Z) else Z)).clamp(0, top)
         - (Z.detach() if torch.is_tensor(Z) else Z)) * S.detach()
    return y + (q - y).detach()


BACKWARD_CASES = [(m, mode) for m in METHOD_SPECS for mode in ("ste", "lsq", "pact")]


@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("gran", GRANS, ids=_spec_id)
@pytest.mark.parametrize("meth,mode", BACKWARD_CASES, ids=[f"{_spec_id(m)}-{mode}" for m, mode in BACKWARD_CASES])
def test_fake_quant_weight_backward_matches_autograd(meth, mode, gran, clip):
    learn = mode != "ste"
    spec = WeightQuantConfig(**meth, **gran, clip=clip, learnable_scale=learn,
                             scale_grad="pact" if mode == "pact" else "lsq")
    n, k = _shape_for(spec)
    w = torch.randn(n, k)
    go = torch.randn(n, k)
    if learn:  # the method's init scale, perturbed so that many weights fall outside the quantizer's range
        s0, z0 = R.init_weight_scale(w, spec)
        scale = s0 * (0.6 + 0.6 * torch.rand(s0.shape))
        zp = None if z0 is None else z0 + 0.8 * (torch.rand(z0.shape) - 0.5)
    else:
        scale = zp = None
    gw, gs, gz = R.fake_quant_weight_backward(go, w, spec, scale, zp)

    w64 = w.to(F64).requires_grad_()
    s64 = scale.to(F64).requires_grad_() if learn else None
    z64 = zp.to(F64).requires_grad_() if zp is not None else None
    out = fq_autograd64(w64, spec, s64, z64, mode)
    # the formulation's forward value is the reference fake-quant (to float32 precision)
    fq = R.fake_quant_weight(w, spec, scale, zp)
    torch.testing.assert_close(out.detach().float(), fq, rtol=1e-5, atol=1e-5)
    (out * go.to(F64)).sum().backward()

    assert gw.dtype == w.dtype and gw.shape == w.shape
    torch.testing.assert_close(gw.to(F64), w64.grad, rtol=0, atol=0)
    if not learn:
        assert gs is None and gz is None
        return
    assert gs.shape == scale.shape and gs.dtype == scale.dtype
    tol = 1e-5 * float(go.abs().sum()) / gs.numel() + 1e-6
    torch.testing.assert_close(gs.to(F64), s64.grad, rtol=1e-4, atol=tol)
    if zp is None:
        assert gz is None
    else:
        assert gz.shape == zp.shape and gz.dtype == zp.dtype
        torch.testing.assert_close(gz.to(F64), z64.grad, rtol=1e-4, atol=tol)
    # the case must exercise both sides of the range (else it could not catch a swapped mask)
    v = R.quantize_weight(w, spec, scale, zp)[0]
    assert (v == 0).any() or (v == spec.max_code).any()


@pytest.mark.parametrize("scale_grad,want_gs", [("lsq", -2.5), ("pact", -5.0)])
def test_fake_quant_weight_backward_at_range_ends_by_hand(scale_grad, want_gs):
    # uniform symmetric, s = 0.5: the quantizer's range is [-Q_N s, Q_P s] = [-1, 0.5], ends included (LSQ clamps
    # before rounding).  w = -1 0.5 0.75 -1.25 -> v = w/s = -2 1 1.5 -2.5, inside = 1 1 0 0,
    # codes = clamp(floor(v + 2.5), 0, 3) = 0 3 3 0 -> q = c - 2 = -2 1 1 -2.
    # grad_w = grad_out * inside.  LSQ: ds = q - v * inside = 0 0 1 -2; with grad_out = 1 2 3 4 the sum is -5,
    # times g = 1 / sqrt(4 weights * Q_P=1) = 0.5 -> -2.5.  PACT: ds = q * (1 - inside) = 0 0 1 -2 -> -5 (no g).
    spec = WeightQuantConfig(method="uniform", granularity="tensor", learnable_scale=True, scale_grad=scale_grad,
                             scale_dtype="float32")
    w = torch.tensor([[-1.0, 0.5, 0.75, -1.25]])
    go = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    gw, gs, gz = R.fake_quant_weight_backward(go, w, spec, torch.tensor([[0.5]]))
    assert gw.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert gs.tolist() == [[want_gs]] and gz is None


# ---------------------------------------------------------------------------------------------------------------
# activation fake-quant
# ---------------------------------------------------------------------------------------------------------------
def test_activation_symmetric_per_token_by_hand():
    # row 0: max|x| = 63.5 -> s = 0.5; x/s = 127 -20.5 0.4 1.5 -> half up: 127 -20 0 2 -> 63.5 -10 0 1
    # row 1: max|x| = 127 -> s = 1;   x/s = -127 0.5 -0.5 3.25 -> -127 1 0 3
    x = torch.tensor([[63.5, -10.25, 0.2, 0.75], [-127.0, 0.5, -0.5, 3.25]])
    got = R.fake_quant_activation(x, ActivationQuantConfig(granularity="token"))
    assert got.tolist() == [[63.5, -10.0, 0.0, 1.0], [-127.0, 1.0, 0.0, 3.0]]


def test_activation_symmetric_per_tensor_by_hand():
    # one scale: max|x| = 127 -> s = 1; row 0: 63.5 -10.25 0.2 0.75 -> 64 -10 0 1
    x = torch.tensor([[63.5, -10.25, 0.2, 0.75], [-127.0, 0.5, -0.5, 3.25]])
    got = R.fake_quant_activation(x, ActivationQuantConfig(granularity="tensor"))
    assert got.tolist() == [[64.0, -10.0, 0.0, 1.0], [-127.0, 1.0, 0.0, 3.0]]


def test_activation_asymmetric_per_token_by_hand():
    # row 0: min -64, max 63.5 -> s = 127.5 / 255 = 0.5, z = round(64 / 0.5) = 128;
    #        x/s = -128 0 20.5 127 -> round 21 for 20.5 -> q = 0 128 149 255 -> (q - z) s = -64 0 10.5 63.5
    # row 1 (all positive): the range includes 0 -> [0, 127.5], s = 0.5, z = 0; x/s = 2 4.5 255 -> 2 5 255
    #        -> 1 2.5 127.5 (the max is NOT clipped)
    # row 2: min -64.25, max 63.25 -> s = 0.5, -min/s = 128.5 -> z = 129 (half up; banker's rounding gives 128)
    #        x/s = -128.5 0 126.5 20 -> half up -128 0 127 20 -> q = 1 129 255 (256 clamped) 149
    #        -> (q - z) s = -64 0 63 10
    x = torch.tensor([[-64.0, 0.0, 10.25, 63.5], [1.0, 2.25, 127.5, 127.5], [-64.25, 0.0, 63.25, 10.0]])
    got = R.fake_quant_activation(x, ActivationQuantConfig(symmetric=False))
    assert got.tolist() == [[-64.0, 0.0, 10.5, 63.5], [1.0, 2.5, 127.5, 127.5], [-64.0, 0.0, 63.0, 10.0]]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["token", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_matches_float64(symmetric, gran, dtype):
    x = (torch.randn(3, 5, 37) * 2 + 0.3).to(dtype)
    got = R.fake_quant_activation(x, ActivationQuantConfig(symmetric=symmetric, granularity=gran))
    assert got.dtype == dtype and got.shape == x.shape
    xf = x.to(F64)
    red = dict(dim=-1, keepdim=True) if gran == "token" else {}
    if symmetric:
        s = xf.abs().amax(**red) / 127
        want = rhu(xf / s).clamp(-127, 127) * s
    else:
        mn, mx = xf.amin(**red).clamp(max=0), xf.amax(**red).clamp(min=0)
        s = (mx - mn) / 255
        z = rhu(-mn / s)
        want = ((rhu(xf / s) + z).clamp(0, 255) - z) * s
    # float32 vs float64 may round a tie differently: at most one step (s) apart, rarely
    diff = (got.to(F64) - want).abs()
    step = s.expand_as(xf) if gran == "token" else s
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (diff <= step * 1.001 + tol * want.abs()).all()
    assert ((diff > tol * (want.abs() + step)).double().mean() < 0.01)
    # error of a dynamic 8-bit quantizer is at most half a step (no clipping)
    assert ((xf - got.to(F64)).abs() <= step * 0.5 * 1.01 + tol * xf.abs()).all()


# ---------------------------------------------------------------------------------------------------------------
# packed matmul
# ---------------------------------------------------------------------------------------------------------------
def _packed_case(n, k, gs, asym, sdt=torch.float16):
    codes = torch.randint(0, 4, (n, k), dtype=torch.uint8)
    scale = (torch.rand(n, k // gs) * 0.2 + 0.01).to(sdt)
    zp = (torch.rand(n, k // gs) * 3).to(sdt) if asym else None
    return codes, pack_codes(codes), scale, zp


@pytest.mark.parametrize("m,n,k,gs", [(1, 7, 64, 64), (3, 5, 100, 100), (5, 9, 96, 32), (2, 3, 130, 130)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matmul_matches_float64(m, n, k, gs, asym, bias):
    codes, q, scale, zp = _packed_case(n, k, gs, asym)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    off = None if asym else 1.5
    y = R.packed_matmul(x, q, scale, zp, b, k, off)
    zz = expand64(zp.to(F64), n, k) if asym else 1.5
    w64 = (codes.to(F64) - zz) * expand64(scale.to(F64), n, k)
    want = x.to(F64) @ w64.T + (b.to(F64) if bias else 0)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.to(F64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_matmul_low_precision_x(dtype):
    codes, q, scale, _ = _packed_case(6, 96, 32, False)
    x = torch.randn(4, 96).to(dtype)
    y = R.packed_matmul(x, q, scale, None, None, 96, 2.0)
    assert y.dtype == dtype
    want = x.to(F64) @ ((codes.to(F64) - 2.0) * expand64(scale.to(F64), 6, 96)).T
    torch.testing.assert_close(y.to(F64), want, rtol=1e-2, atol=1e-2)


def test_dequantize_packed_and_a8():
    codes, q, scale, zp = _packed_case(4, 64, 32, True)
    torch.testing.assert_close(R.dequantize_packed(q, scale, zp, 64, None),
                               R.dequantize_weight(codes, scale, zp, None), rtol=0, atol=0)
    x = torch.randn(3, 64)
    xq = R.fake_quant_activation(x, ActivationQuantConfig(symmetric=True, granularity="token"))
    assert not torch.equal(xq, x)
    torch.testing.assert_close(R.packed_matmul_a8(x, q, scale, zp, None, 64, None),
                               R.packed_matmul(xq, q, scale, zp, None, 64, None), rtol=0, atol=0)

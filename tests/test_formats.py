"""Formats: the specs (validation, derived values, dict/JSON round trip), hand-worked quantizer cases, and the packed
2-bit layout (pack/unpack round trip, bit positions, validation)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyquant import reference as R
from pyquant.formats import (
    GRANULARITIES,
    GROUP_SIZES,
    SCALE_DTYPES,
    WEIGHT_METHODS,
    ActivationQuantConfig,
    PackedWeight,
    WeightQuantConfig,
    group_size_of,
    pack_codes,
    packed_cols,
    unpack_codes,
    validate_packed,
)

W32 = dict(scale_dtype="float32")


def test_seed_fixture_is_per_test_and_reproducible(seed, request):
    from conftest import seed_of

    assert seed == seed_of(request.node.nodeid) == torch.initial_seed()
    assert seed != seed_of(request.node.nodeid + "x")
    assert not torch.cuda.is_initialized() or torch.cuda.is_available()  # hand cases: no scale rounding through a 16-bit dtype


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ================================================================================================================
# Hand-worked quantizer cases
# ================================================================================================================
def test_twn_per_channel_by_hand():
    # W (2 x 4), per channel (one scale per row):
    #   row 0: |W| = 0.9 0.1 1.5 0.3   mean|W| = 2.8 / 4 = 0.7     Delta = 0.7 * 0.7    = 0.49
    #          kept (|W| > Delta): 0.9, 1.5                         alpha = (0.9 + 1.5) / 2 = 1.2
    #          codes = 1 + sign(W) * [|W| > Delta] = 2 1 0 1        w_hat = (c - 1) * alpha = 1.2 0 -1.2 0
    #   row 1: |W| = 0.2 0.4 0.05 1.0  mean|W| = 1.65 / 4 = 0.4125  Delta = 0.7 * 0.4125 = 0.28875
    #          kept: 0.4, 1.0                                       alpha = (0.4 + 1.0) / 2 = 0.7
    #          codes = 1 0 1 2                                      w_hat = 0 -0.7 0 0.7
    w = _t([[0.9, -0.1, -1.5, 0.3], [0.2, -0.4, 0.05, 1.0]])
    spec = WeightQuantConfig(method="twn", granularity="channel", **W32)
    codes, s, z = R.quantize_weight(w, spec)
    assert z is None
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[2, 1, 0, 1], [1, 0, 1, 2]]
    torch.testing.assert_close(s, _t([[1.2], [0.7]]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(R.fake_quant_weight(w, spec), _t([[1.2, 0, -1.2, 0], [0, -0.7, 0, 0.7]]),
                               rtol=1e-6, atol=1e-7)


def test_twn_per_tensor_by_hand():
    # Same W, one scale for all 8 weights: mean|W| = (2.8 + 1.65) / 8 = 0.55625, Delta = 0.389375;
    # kept |W|: 0.9 1.5 0.4 1.0 -> alpha = 3.8 / 4 = 0.95; codes as per channel here.
    w = _t([[0.9, -0.1, -1.5, 0.3], [0.2, -0.4, 0.05, 1.0]])
    spec = WeightQuantConfig(method="twn", granularity="tensor", **W32)
    codes, s, _ = R.quantize_weight(w, spec)
    assert codes.tolist() == [[2, 1, 0, 1], [1, 0, 1, 2]]
    assert s.shape == (1, 1)
    torch.testing.assert_close(s, _t([[0.95]]), rtol=1e-6, atol=1e-7)


def test_absmean_by_hand():
    # s = mean|W| = (0.5 + 1 + 0.2 + 0.1) / 4 = 0.45; W/s = 1.11 -2.22 0.44 0.22 -> round, clamp to [-1, 1]:
    # 1 -1 0 0 -> codes 2 0 1 1, w_hat = 0.45 -0.45 0 0
    w = _t([[0.5, -1.0, 0.2, 0.1]])
    spec = WeightQuantConfig(method="absmean", **W32)
    codes, s, _ = R.quantize_weight(w, spec)
    assert codes.tolist() == [[2, 0, 1, 1]]
    torch.testing.assert_close(s, _t([[0.45]]))
    torch.testing.assert_close(R.fake_quant_weight(w, spec), _t([[0.45, -0.45, 0.0, 0.0]]))


def test_uniform_symmetric_by_hand_rounds_half_up():
    # s = max|W| / 1.5 = 1; v + 2 = 2.75 0.5 3.125 1.625 -> floor(. + 0.5) = 3 1 3 2 (0.5 rounds UP to 1, where
    # torch.round would give 0), clamp [0, 3] -> w_hat = (c - 2) * 1 = 1 -1 1 0
    w = _t([[0.75, -1.5, 1.125, -0.375]])
    spec = WeightQuantConfig(method="uniform", **W32)
    codes, s, _ = R.quantize_weight(w, spec)
    assert s.item() == 1.0
    assert codes.tolist() == [[3, 1, 3, 2]]
    assert R.fake_quant_weight(w, spec).tolist() == [[1.0, -1.0, 1.0, 0.0]]


def test_uniform_asymmetric_by_hand():
    # min = -0.5, max = 1 -> s = 1.5 / 3 = 0.5, z = 0.5 / 0.5 = 1; v + z = 0 3 1.5 1 -> codes 0 3 2 1 (1.5 -> 2)
    # w_hat = (c - 1) * 0.5 = -0.5 1 0.5 0
    w = _t([[-0.5, 1.0, 0.25, 0.0]])
    spec = WeightQuantConfig(method="uniform", symmetric=False, **W32)
    codes, s, z = R.quantize_weight(w, spec)
    assert (s.item(), z.item()) == (0.5, 1.0)
    assert codes.tolist() == [[0, 3, 2, 1]]
    assert R.fake_quant_weight(w, spec).tolist() == [[-0.5, 1.0, 0.5, 0.0]]


def test_uniform_asymmetric_range_includes_zero():
    # All-positive row: the range is [0, 3] (not [0.5, 3]) -> s = 1, z = 0; codes = round(W) = 1 2 3 1.
    # Constant rows (+2 and -1.5) must stay finite in float16 (min-max without 0 gave s = tiny, z = -inf).
    w = _t([[0.5, 1.5, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0], [-1.5, -1.5, -1.5, -1.5]])
    spec = WeightQuantConfig(method="uniform", symmetric=False, scale_dtype="float16")
    codes, s, z = R.quantize_weight(w, spec)
    assert torch.isfinite(s).all() and torch.isfinite(z).all()
    assert ((z >= 0) & (z <= 3)).all()
    assert codes[0].tolist() == [1, 2, 3, 1]
    torch.testing.assert_close(R.fake_quant_weight(w, spec)[1:], w[1:], rtol=1e-3, atol=0)


def test_seq_four_levels_by_hand():
    # alpha = max|W| = 1, s = alpha / 2 = 0.5; v = 2 -0.5 1.25 -2; v + 1.5 = 3.5 1 2.75 -0.5
    # -> floor(. + 0.5) = 4 1 3 0 -> clamp [0, 3] = 3 1 3 0; w_hat = (c - 1.5) * 0.5 = 0.75 -0.25 0.75 -0.75
    # i.e. alpha * {+-1/4, +-3/4}
    w = _t([[1.0, -0.25, 0.625, -1.0]])
    spec = WeightQuantConfig(method="seq", levels=4, **W32)
    codes, s, _ = R.quantize_weight(w, spec)
    assert s.item() == 0.5
    assert codes.tolist() == [[3, 1, 3, 0]]
    assert R.fake_quant_weight(w, spec).tolist() == [[0.75, -0.25, 0.75, -0.75]]


def test_seq_three_levels_by_hand():
    # alpha = 1.5, s = 2/3 alpha = 1 (levels alpha * {-2/3, 0, 2/3}); threshold s/2 = 0.5:
    # W = 1.5 -0.3 0.6 -1.5 -> codes 2 1 2 0 -> w_hat = 1 0 1 -1
    w = _t([[1.5, -0.3, 0.6, -1.5]])
    spec = WeightQuantConfig(method="seq", levels=3, **W32)
    codes, s, _ = R.quantize_weight(w, spec)
    torch.testing.assert_close(s, _t([[1.0]]))
    assert codes.tolist() == [[2, 1, 2, 0]]
    torch.testing.assert_close(R.fake_quant_weight(w, spec), _t([[1.0, 0.0, 1.0, -1.0]]))


def test_learnable_scale_quantizes_by_rounding():
    # Given s = 0.5 (TWN, learnable): c = clamp(floor(W/s + 1 + 0.5), 0, 2); W/s + 1 = 1.75 0.75 -1 1.5
    # -> 2 1 0 2 (the threshold becomes s/2; 1.5 rounds up)
    w = _t([[0.375, -0.125, -1.0, 0.25]])
    spec = WeightQuantConfig(method="twn", learnable_scale=True, **W32)
    codes, s, _ = R.quantize_weight(w, spec, scale=_t([[0.5]]))
    assert codes.tolist() == [[2, 1, 0, 2]]
    assert R.fake_quant_weight(w, spec, _t([[0.5]])).tolist() == [[0.5, 0.0, -0.5, 0.5]]


def test_clip_before_quantization_by_hand():
    # clip = 1: W -> 1 -0.5 0.25 -1; s = mean = 2.75 / 4 = 0.6875; W/s = 1.45 -0.73 0.36 -1.45 -> 1 -1 0 -1
    w = _t([[3.0, -0.5, 0.25, -2.0]])
    spec = WeightQuantConfig(method="absmean", clip=1.0, **W32)
    codes, s, _ = R.quantize_weight(w, spec)
    torch.testing.assert_close(s, _t([[0.6875]]))
    assert codes.tolist() == [[2, 0, 1, 0]]


@pytest.mark.parametrize("sdt", list(SCALE_DTYPES))
def test_scales_are_rounded_through_scale_dtype(sdt):
    w = torch.randn(5, 96)
    spec = WeightQuantConfig(method="absmean", scale_dtype=sdt)
    _, s, _ = R.quantize_weight(w, spec)
    assert s.dtype == torch.float32
    assert torch.equal(s, s.to(SCALE_DTYPES[sdt]).float())
    torch.testing.assert_close(s, w.abs().mean(1, keepdim=True), rtol=1e-2 if sdt != "float32" else 1e-6, atol=0)


# ================================================================================================================
# Spec validation: bad input raises ValueError naming the field
# ================================================================================================================
BAD_WEIGHT_SPECS = [
    (dict(method="twn", bits=3), "bits"),
    (dict(method="absmean", bits=1), "bits"),
    (dict(method="uniform", bits=4), "bits"),
    (dict(bits=True), "bits"),
    (dict(bits=2.0), "bits"),
    (dict(method="ternary"), "method"),
    (dict(method=None), "method"),
    (dict(method=["twn"]), "method"),
    (dict(granularity="row"), "granularity"),
    (dict(granularity="group", group_size=48), "group_size"),
    (dict(granularity="group", group_size=64.0), "group_size"),
    (dict(granularity="channel", group_size=64), "group_size"),
    (dict(method="twn", symmetric=False), "symmetric"),
    (dict(method="absmean", symmetric=False), "symmetric"),
    (dict(method="seq", symmetric=False), "symmetric"),
    (dict(method="uniform", symmetric=1), "symmetric"),
    (dict(method="twn", levels=4), "levels"),
    (dict(method="absmean", levels=2), "levels"),
    (dict(method="uniform", levels=3), "levels"),
    (dict(method="seq", levels=5), "levels"),
    (dict(method="seq", levels=3.0), "levels"),
    (dict(clip=0), "clip"),
    (dict(clip=-1.0), "clip"),
    (dict(clip=float("nan")), "clip"),
    (dict(clip=float("inf")), "clip"),
    (dict(clip=True), "clip"),
    (dict(clip="2.5"), "clip"),
    (dict(scale_dtype="fp16"), "scale_dtype"),
    (dict(scale_dtype="float64"), "scale_dtype"),
    (dict(scale_dtype=torch.float16), "scale_dtype"),
    (dict(scale_dtype=["float16"]), "scale_dtype"),
    (dict(scale_grad="ste"), "scale_grad"),
    (dict(learnable_scale="yes"), "learnable_scale"),
]


@pytest.mark.parametrize("kwargs,field", BAD_WEIGHT_SPECS, ids=[f"{f}-{i}" for i, (_, f) in
                                                                 enumerate(BAD_WEIGHT_SPECS)])
def test_invalid_weight_spec_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"WeightQuantConfig\.{field}="):
        WeightQuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=4), "bits"), (dict(bits=8.0), "bits"), (dict(bits=True), "bits"),
    (dict(granularity="channel"), "granularity"), (dict(granularity=None), "granularity"),
    (dict(symmetric="no"), "symmetric"),
])
def test_invalid_activation_spec_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ActivationQuantConfig\.{field}="):
        ActivationQuantConfig(**kwargs)


def test_group_size_must_divide_in_features():
    spec = WeightQuantConfig(granularity="group", group_size=64)
    assert spec.resolve_group_size(192) == 64
    with pytest.raises(ValueError, match=r"in_features=100 is not divisible by WeightQuantConfig\.group_size=64"):
        spec.resolve_group_size(100)
    with pytest.raises(ValueError, match="group_size=64"):
        R.quantize_weight(torch.randn(3, 100), spec)
    with pytest.raises(ValueError, match="in_features"):
        spec.resolve_group_size(0)
    assert WeightQuantConfig(granularity="channel").resolve_group_size(100) == 100


def test_specs_are_frozen_and_hashable():
    spec = WeightQuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.method = "uniform"
    assert hash(spec) == hash(WeightQuantConfig())
    assert {spec, WeightQuantConfig()} == {spec}


# ================================================================================================================
# Derived values and dict/JSON round trip
# ================================================================================================================
@pytest.mark.parametrize("kwargs,levels,values", [
    (dict(method="twn"), 3, [-1, 0, 1]),
    (dict(method="absmean"), 3, [-1, 0, 1]),
    (dict(method="seq", levels=3), 3, [-1, 0, 1]),
    (dict(method="seq"), 4, [-1.5, -0.5, 0.5, 1.5]),
    (dict(method="uniform"), 4, [-2, -1, 0, 1]),
])
def test_code_offset_table(kwargs, levels, values):
    spec = WeightQuantConfig(**kwargs)
    assert spec.levels == levels and spec.max_code == levels - 1 and spec.ternary == (levels == 3)
    assert [c - spec.code_offset for c in range(levels)] == values
    assert spec.qn == -values[0] and spec.qp == values[-1]


def test_asymmetric_derived_values():
    spec = WeightQuantConfig(method="uniform", symmetric=False)
    assert spec.code_offset is None and spec.qn == 0.0 and spec.qp == 3.0
    assert "asym" in spec.describe()


def test_defaults_are_resolved():
    assert WeightQuantConfig(granularity="group").group_size == 128
    assert WeightQuantConfig(method="seq").levels == 4
    assert WeightQuantConfig(clip=2).clip == 2.0 and isinstance(WeightQuantConfig(clip=2).clip, float)


@st.composite
def weight_specs(draw):
    method = draw(st.sampled_from(WEIGHT_METHODS))
    gran = draw(st.sampled_from(GRANULARITIES))
    kw = dict(method=method, granularity=gran,
              symmetric=draw(st.booleans()) if method == "uniform" else True,
              learnable_scale=draw(st.booleans()), scale_grad=draw(st.sampled_from(["lsq", "pact"])),
              scale_dtype=draw(st.sampled_from(list(SCALE_DTYPES))),
              clip=draw(st.none() | st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)))
    if method == "seq":
        kw["levels"] = draw(st.sampled_from([None, 3, 4]))
    if gran == "group":
        kw["group_size"] = draw(st.sampled_from([None, *GROUP_SIZES]))
    return WeightQuantConfig(**kw)


@settings(max_examples=60, deadline=None)
@given(weight_specs())
def test_weight_spec_dict_and_json_round_trip(spec):
    d = spec.to_dict()
    assert WeightQuantConfig.from_dict(d) == spec
    j = spec.to_json()
    assert json.loads(j) == d
    back = WeightQuantConfig.from_json(j)
    assert back == spec and back.describe() == spec.describe()


@settings(max_examples=10, deadline=None)
@given(st.builds(ActivationQuantConfig, symmetric=st.booleans(), granularity=st.sampled_from(["tensor", "token"])))
def test_activation_spec_dict_and_json_round_trip(spec):
    assert ActivationQuantConfig.from_dict(spec.to_dict()) == spec
    assert ActivationQuantConfig.from_json(spec.to_json()) == spec


def test_from_dict_rejects_bad_input():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        WeightQuantConfig.from_dict({"method": "twn", "bogus": 1})
    with pytest.raises(TypeError, match="expects a dict"):
        WeightQuantConfig.from_dict([("method", "twn")])
    with pytest.raises(ValueError, match=r"WeightQuantConfig\.method="):
        WeightQuantConfig.from_json('{"method": "nope"}')
    with pytest.raises(ValueError, match=r"ActivationQuantConfig\.bits="):
        ActivationQuantConfig.from_dict({"bits": 4})


# ================================================================================================================
# Packed layout
# ================================================================================================================
def _pack_by_loops(codes: torch.Tensor) -> torch.Tensor:
    """Independent packer: W[n, k] at byte k // 4, bits 2*(k % 4) .. +1, rows padded to ceil(K/64)*16 bytes."""
    n, k = codes.shape
    out = [[0] * (math.ceil(k / 64) * 16) for _ in range(n)]
    for i in range(n):
        for j in range(k):
            out[i][j // 4] |= int(codes[i, j]) << (2 * (j % 4))
    return torch.tensor(out, dtype=torch.uint8).reshape(n, -1)


def test_packed_cols():
    assert [packed_cols(k) for k in (1, 63, 64, 65, 128, 129, 4096)] == [16, 16, 16, 32, 32, 48, 1024]


def test_pack_layout_by_hand():
    # codes 1 2 3 0 | 3 -> byte0 = 1 + (2 << 2) + (3 << 4) + (0 << 6) = 1 + 8 + 48 = 57, byte1 = 3, rest 0
    p = pack_codes(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.int64))
    assert p.dtype == torch.uint8 and p.shape == (1, 16)
    assert p[0, :2].tolist() == [57, 3] and p[0, 2:].sum().item() == 0


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 63), (2, 64), (5, 65), (4, 130), (1, 257), (9, 3)])
def test_pack_unpack_round_trip_odd_shapes(shape):
    codes = torch.randint(0, 4, shape, dtype=torch.uint8)
    p = pack_codes(codes)
    assert p.shape == (shape[0], packed_cols(shape[1]))
    assert torch.equal(p, _pack_by_loops(codes))
    # bytes past K are zero
    tail = unpack_codes(p, p.shape[1] * 4)[:, shape[1]:]
    assert tail.numel() == 0 or tail.max().item() == 0
    back = unpack_codes(p, shape[1])
    assert back.dtype == torch.uint8 and back.is_contiguous()
    assert torch.equal(back, codes)


def test_pack_accepts_integer_dtypes():
    codes = torch.randint(0, 4, (3, 70))
    for dt in (torch.int32, torch.int64, torch.uint8, torch.int16):
        assert torch.equal(unpack_codes(pack_codes(codes.to(dt)), 70), codes.to(torch.uint8))


def test_pack_codes_rejects_bad_input():
    with pytest.raises(TypeError, match="codes must be a torch.Tensor"):
        pack_codes([[1, 2]])
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.rand(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.randint(0, 4, (8,)))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([[-1, 2]]))


def test_unpack_codes_rejects_bad_input():
    p = pack_codes(torch.randint(0, 4, (2, 70)))
    with pytest.raises(TypeError, match="packed"):
        unpack_codes(p.to(torch.int32), 70)
    with pytest.raises(TypeError, match="packed"):
        unpack_codes(p[0], 70)
    with pytest.raises(ValueError, match="in_features=200"):
        unpack_codes(p, 200)
    with pytest.raises(ValueError, match="in_features"):
        unpack_codes(p, 0)


def _packed(n=6, k=128, gs=64, sdt=torch.float16, asym=False):
    q = pack_codes(torch.randint(0, 4, (n, k)))
    s = torch.rand(n, k // gs, dtype=sdt) + 0.1
    z = torch.rand(n, k // gs, dtype=sdt) * 3 if asym else None
    return q, s, z


def test_validate_packed_accepts_good_and_names_bad_arguments():
    q, s, z = _packed(asym=True)
    validate_packed(q, s, z, 128, 64)
    validate_packed(q, s, None, 128, 64)
    with pytest.raises(TypeError, match="qweight"):
        validate_packed(q.to(torch.int8), s, z, 128, 64)
    with pytest.raises(ValueError, match="in_features=0"):
        validate_packed(q, s, z, 0, 64)
    with pytest.raises(ValueError, match="in_features=256"):
        validate_packed(q, s, z, 256, 64)
    with pytest.raises(ValueError, match="group_size=48"):
        validate_packed(q, s, z, 128, 48)
    with pytest.raises(ValueError, match="scale"):
        validate_packed(q, s.double(), None, 128, 64)
    with pytest.raises(ValueError, match="scale"):
        validate_packed(q, s[:, :1], None, 128, 64)
    with pytest.raises(ValueError, match="zero_point"):
        validate_packed(q, s, z.float(), 128, 64)
    with pytest.raises(ValueError, match="zero_point"):
        validate_packed(q, s, z[:3], 128, 64)


def test_group_size_of():
    assert group_size_of(torch.ones(4, 3), 96) == 32
    assert group_size_of(torch.ones(4, 1), 100) == 100
    with pytest.raises(ValueError, match="scale"):
        group_size_of(torch.ones(4, 3), 100)
    with pytest.raises(ValueError, match="scale"):
        group_size_of(torch.ones(4), 100)


def test_packed_weight_container():
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=64)
    q, s, z = _packed(asym=True)
    pw = PackedWeight(q, s, z, 128, 64, spec)
    assert pw.out_features == 6 and pw.code_offset is None
    assert pw.nbytes() == 6 * 32 + 2 * (6 * 2 * 2)
    with pytest.raises(ValueError, match="scale"):
        PackedWeight(q, s[:, :1], None, 128, 64, spec)

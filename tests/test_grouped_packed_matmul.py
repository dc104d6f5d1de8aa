"""grouped_packed_matmul (MoE experts): Triton kernel vs the reference loop, uneven expert loads (incl. experts with
no token), decode and prefill paths, all formats; gradients; opcheck; bad input."""
from __future__ import annotations

import os

import pytest
import torch

from pyquant import reference
from pyquant.formats import WeightQuantConfig, pack_codes
from pyquant.ops import grouped_packed_matmul, use_backend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                  reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
TOL = {torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3), torch.float32: (1e-5, 1e-5)}
SPECS = {
    "twn": WeightQuantConfig(method="twn"),
    "absmean": WeightQuantConfig(method="absmean"),
    "int2-asym": WeightQuantConfig(method="uniform", symmetric=False),
    "seq4": WeightQuantConfig(method="seq", levels=4),
}


def make_experts(E, N, K, fmt, group_size=None, device=DEV):
    base = SPECS[fmt]
    gran = dict(granularity="group", group_size=group_size) if group_size else dict(granularity="channel")
    spec = WeightQuantConfig(**{**base.to_dict(), **gran, "scale_dtype": "float16"})
    qs, ss, zs = [], [], []
    for _ in range(E):
        w = torch.randn(N, K) * (0.5 + torch.rand(N, 1))
        c, s, z = reference.quantize_weight(w, spec)
        qs.append(pack_codes(c))
        ss.append(s.to(torch.float16).expand(N, -1))
        zs.append(None if z is None else z.to(torch.float16))
    z = None if zs[0] is None else torch.stack(zs).to(device)
    return torch.stack(qs).to(device), torch.stack(ss).contiguous().to(device), z, spec.code_offset


def _offsets(counts, device=DEV):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device)


CASES = [
    # counts per expert (uneven, with idle experts),   N,  K, group, fmt,        dtype,          bias
    ([1, 0, 2, 0, 1], 40, 96, None, "twn", torch.bfloat16, False),            # decode: FMA path
    ([3, 0, 0, 5], 33, 64, 32, "int2-asym", torch.float16, True),             # decode, asymmetric, groups
    ([17, 0, 2, 30], 48, 128, 64, "absmean", torch.float16, False),          # prefill: tl.dot path
    ([0, 20, 0], 24, 80, None, "seq4", torch.float32, True),                  # fp32 x, K not a tile multiple
]


@needs_triton
@pytest.mark.parametrize("counts,N,K,group,fmt,dtype,has_bias", CASES)
def test_triton_matches_reference(counts, N, K, group, fmt, dtype, has_bias):
    E = len(counts)
    qw, s, z, co = make_experts(E, N, K, fmt, group)
    x = torch.randn(sum(counts), K, dtype=dtype, device=DEV)
    b = torch.randn(E, N, dtype=dtype, device=DEV) if has_bias else None
    off = _offsets(counts)
    ref = reference.grouped_packed_matmul(x, qw, s, z, b, off, K, co)
    with use_backend("triton"):
        y = grouped_packed_matmul(x, qw, s, z, b, off, in_features=K, code_offset=co)
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=atol * ref.float().abs().max().item())


def test_reference_is_the_per_expert_packed_matmul():
    counts = [2, 0, 3]
    qw, s, z, co = make_experts(3, 16, 64, "twn", device="cpu")
    x = torch.randn(5, 64)
    y = reference.grouped_packed_matmul(x, qw, s, z, None, _offsets(counts, "cpu"), 64, co)
    torch.testing.assert_close(y[:2], reference.packed_matmul(x[:2], qw[0], s[0], None, None, 64, co))
    torch.testing.assert_close(y[2:], reference.packed_matmul(x[2:], qw[2], s[2], None, None, 64, co))


def test_gradients_match_autograd_on_dequantized_weights():
    counts = [3, 0, 2]
    qw, s, z, co = make_experts(3, 12, 64, "int2-asym", 32, device="cpu")
    x = torch.randn(5, 64, requires_grad=True)
    b = torch.randn(3, 12, requires_grad=True)
    off = _offsets(counts, "cpu")
    y = grouped_packed_matmul(x, qw, s, z, b, off, in_features=64, code_offset=co)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    ws = [reference.dequantize_packed(qw[e], s[e], z[e], 64, co) for e in range(3)]
    y2 = torch.cat([x2[:3] @ ws[0].t() + b2[0], x2[3:] @ ws[2].t() + b2[2]])
    (y2 * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    assert b.grad[1].abs().sum() == 0  # the idle expert gets no bias gradient


def test_opcheck():
    qw, s, z, co = make_experts(2, 8, 64, "twn", device="cpu")
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.pyquant.grouped_packed_matmul.default,
                          (x, qw, s, None, None, _offsets([1, 2], "cpu"), 64, co))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(offsets=torch.tensor([2, 1, 5])), "non-decreasing"),
    (lambda a: a.update(offsets=torch.tensor([1, 2, 4])), "ending at the number of rows"),
    (lambda a: a.update(offsets=torch.tensor([1, 5])), "offsets must be"),
    (lambda a: a.update(x=torch.randn(5, 32)), "in_features"),
    (lambda a: a.update(scale=torch.ones(3, 8, 3)), "scale must be"),
    (lambda a: a.update(bias=torch.ones(8)), "bias must be"),
    (lambda a: a.update(x=torch.randint(0, 3, (5, 64))), "x must be float"),
])
def test_bad_input(mutate, match):
    qw, s, z, co = make_experts(3, 8, 64, "twn", device="cpu")
    a = dict(x=torch.randn(5, 64), qweight=qw, scale=s, zero_point=None, bias=None, offsets=_offsets([2, 0, 3], "cpu"))
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        grouped_packed_matmul(**a, in_features=64, code_offset=co)

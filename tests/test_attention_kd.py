"""Attention-map KL distillation: the streaming Triton kernel (through the interpreter on CPU) against the
materialized reference, the reference against an independent fp64 / torch.nn.functional computation, reductions,
masks, GQA, gradients, and bad input.

Run: TRITON_INTERPRET=1 python -m pytest tests/test_attention_kd.py -q
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyquant import reference
from pyquant.distill.attention import attention_map_loss, attention_output_loss, attention_score_mse
from pyquant.ops import last_backend, use_backend
from pyquant.ops._dispatch import triton_interpret
from pyquant.ops.attention_kd import attention_map_kl

needs_triton = pytest.mark.skipif(
    not (triton_interpret() or torch.cuda.is_available()),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() and not triton_interpret() else "cpu"
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-2, 1e-2), torch.bfloat16: (3e-2, 2e-2)}  # (rtol, atol)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty/empty_like allocation during the test is filled with NaN: an output element the kernel
    fails to write shows up as NaN instead of a lucky zero."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def _inputs(b, h, hk_s, hk_t, lq, lk, d_s, d_t, dtype, pad, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype).to(DEV)

    q_s, k_s = r(b, h, lq, d_s, s=sharp), r(b, hk_s, lk, d_s)
    q_t, k_t = r(b, h, lq, d_t, s=sharp), r(b, hk_t, lk, d_t)
    kpm = None
    if pad:
        lens = torch.randint(1, lk + 1, (b,), generator=g)
        lens[0] = lk  # one full row and (when b > 2) an all-padding sequence
        if b > 2:
            lens[-1] = 0
        kpm = (torch.arange(lk)[None, :] < lens[:, None]).to(DEV)
    return q_s, k_s, q_t, k_t, kpm


# (b, h, hk_s, hk_t, lq, lk, d_s, d_t, causal, pad, dtype)
KERNEL_CASES = [
    pytest.param(2, 2, 2, 2, 1, 1, 32, 32, False, False, torch.float32, id="L1"),
    pytest.param(2, 2, 2, 2, 1, 1, 32, 32, True, True, torch.float32, id="L1-causal-pad"),
    pytest.param(3, 4, 4, 4, 37, 37, 32, 32, False, True, torch.float32, id="L37-pad"),
    pytest.param(3, 4, 2, 1, 37, 37, 64, 32, True, True, torch.float32, id="L37-causal-pad-gqa-mqa-dims"),
    pytest.param(2, 4, 1, 4, 37, 37, 64, 64, True, False, torch.float16, id="L37-causal-mqa-fp16"),
    pytest.param(2, 2, 1, 2, 37, 37, 128, 128, False, True, torch.bfloat16, id="L37-pad-gqa-d128-bf16"),
    pytest.param(1, 2, 1, 1, 129, 129, 32, 32, True, True, torch.float32, id="L129-causal-pad-gqa"),
    pytest.param(2, 2, 2, 2, 129, 129, 64, 64, False, True, torch.bfloat16, id="L129-pad-bf16"),
    pytest.param(2, 2, 1, 1, 20, 100, 32, 32, True, True, torch.float32, id="Lq20-Lk100-causal-bottom-right"),
    pytest.param(3, 2, 2, 1, 7, 50, 80, 48, False, True, torch.float32, id="Lq7-Lk50-pad-d80-d48"),
    # 16-bit dK rounded in the kernel by the last of 3 query blocks x 2 query heads per key head (the ticket)
    pytest.param(2, 4, 2, 2, 150, 70, 32, 32, False, True, torch.bfloat16, id="Lq150-Lk70-pad-gqa-bf16-3blocks"),
]


@needs_triton
@pytest.mark.parametrize("b,h,hk_s,hk_t,lq,lk,d_s,d_t,causal,pad,dtype", KERNEL_CASES)
def test_kernel_loss_and_grads_match_reference(b, h, hk_s, hk_t, lq, lk, d_s, d_t, causal, pad, dtype,
                                               poisoned_empty):
    q_s, k_s, q_t, k_t, kpm = _inputs(b, h, hk_s, hk_t, lq, lk, d_s, d_t, dtype, pad, seed=lq * 7 + d_s)
    rtol, atol = TOL[dtype]
    for reduction in ("paper", "mean_rows"):
        qa, ka = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
        with use_backend("triton"):
            loss = attention_map_loss(qa, ka, q_t, k_t, kpm, causal=causal, reduction=reduction)
            assert last_backend() == ("attention_map_kl", "triton")
            loss.backward()
            assert last_backend() == ("attention_map_kl_backward", "triton")
        qr, kr = q_s.float().clone().requires_grad_(), k_s.float().clone().requires_grad_()
        ref = reference.attention_map_loss(qr, kr, q_t.float(), k_t.float(), kpm, causal=causal,
                                           scale=1 / math.sqrt(d_s), teacher_scale=1 / math.sqrt(d_t),
                                           reduction=reduction)
        ref.backward()
        assert torch.isfinite(loss) and (ref.item() > 1e-3 or lk == 1)  # one key: both maps are 1, KL = 0
        torch.testing.assert_close(loss, ref, rtol=rtol, atol=atol)
        assert qa.grad.dtype == dtype and ka.grad.dtype == dtype
        assert qa.grad.shape == q_s.shape and ka.grad.shape == k_s.shape
        gscale = max(qr.grad.abs().max().item(), kr.grad.abs().max().item())
        torch.testing.assert_close(qa.grad.float(), qr.grad, rtol=rtol, atol=atol * gscale)
        torch.testing.assert_close(ka.grad.float(), kr.grad, rtol=rtol, atol=atol * gscale)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_rows_match_reference_rows_with_masked_rows_zero(causal, poisoned_empty):
    # b=4: the last sequence is all padding -> every row has no kept key -> exactly 0, never NaN
    q_s, k_s, q_t, k_t, kpm = _inputs(4, 2, 1, 2, 19, 19, 32, 32, torch.float32, True, seed=3)
    with use_backend("triton"):
        rows = attention_map_kl(q_s, k_s, q_t, k_t, kpm, causal=causal, scale_s=0.3, scale_t=0.25)
    ref, _, _ = reference.attention_map_kl_rows(q_s, k_s, q_t, k_t, kpm, causal, 0.3, 0.25)
    assert not torch.isnan(rows).any()
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)
    assert (rows[3] == 0).all()
    assert (rows >= -1e-5).all()


def _kl_rows_fp64(q_s, k_s, q_t, k_t, kpm, causal, sc_s, sc_t):
    """Independent oracle: fp64 log_softmax + F.kl_div, GQA by repeat_interleave, masked rows dropped."""
    h = q_s.shape[1]
    ks = k_s.double().repeat_interleave(h // k_s.shape[1], 1)
    kt = k_t.double().repeat_interleave(h // k_t.shape[1], 1)
    s_s = q_s.double() @ ks.transpose(-1, -2) * sc_s
    s_t = q_t.double() @ kt.transpose(-1, -2) * sc_t
    lq, lk = s_s.shape[-2:]
    keep = torch.ones_like(s_s, dtype=torch.bool)
    if kpm is not None:
        keep &= kpm.bool()[:, None, None, :]
    if causal:
        keep &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    out = torch.zeros(s_s.shape[:3], dtype=torch.float64)
    for idx in torch.nonzero(keep.any(-1)):
        b_, h_, i = idx.tolist()
        m = keep[b_, h_, i]
        ls = torch.log_softmax(s_s[b_, h_, i][m], -1)
        lt = torch.log_softmax(s_t[b_, h_, i][m], -1)
        out[b_, h_, i] = F.kl_div(ls, lt, log_target=True, reduction="sum")
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_reference_rows_match_independent_fp64_oracle(causal):
    q_s, k_s, q_t, k_t, kpm = _inputs(3, 4, 2, 1, 11, 11, 16, 8, torch.float32, True, seed=11)
    ref, _, _ = reference.attention_map_kl_rows(q_s, k_s, q_t, k_t, kpm, causal, 0.4, 0.3)
    torch.testing.assert_close(ref.double(), _kl_rows_fp64(q_s, k_s, q_t, k_t, kpm, causal, 0.4, 0.3),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_near_zero_kl_is_accurate(backend):
    # student = teacher + 1e-3 noise: KL ~ 1e-7; the two-pass form must not lose it to cancellation
    q_t, k_t, _, _, kpm = _inputs(2, 2, 2, 2, 33, 33, 32, 32, torch.float32, True, seed=5, sharp=2.0)
    g = torch.Generator().manual_seed(6)
    q_s = q_t + 1e-3 * torch.randn(q_t.shape, generator=g)
    k_s = k_t + 1e-3 * torch.randn(k_t.shape, generator=g)
    with use_backend(backend):
        rows = attention_map_kl(q_s, k_s, q_t, k_t, kpm, causal=True, scale_s=0.2, scale_t=0.2)
    exact = _kl_rows_fp64(q_s, k_s, q_t, k_t, kpm, True, 0.2, 0.2)
    assert 0 < exact.max().item() < 1e-4
    assert (rows.double() - exact).abs().max().item() < 2e-6


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("causal", [False, True])
def test_teacher_equals_student_gives_zero_loss_and_grad(backend, causal):
    q, k, _, _, kpm = _inputs(3, 4, 2, 2, 23, 23, 32, 32, torch.float32, True, seed=9, sharp=3.0)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    with use_backend(backend):
        rows = attention_map_kl(q, k, q, k, kpm, causal=causal, scale_s=0.3, scale_t=0.3)
        loss = attention_map_loss(qa, ka, q, k, kpm, causal=causal, reduction="mean_rows")
        loss.backward()
    # exactly zero, not a rounding residue: the (t - s) factor is 0 identically and the log-sum-exp terms cancel
    assert (rows == 0).all() and loss.item() == 0.0
    if backend == "triton":  # dS = g (P_S - P_T) with bit-identical maps
        assert (qa.grad == 0).all() and (ka.grad == 0).all()
    assert qa.grad.abs().max().item() < 1e-6 and ka.grad.abs().max().item() < 1e-6


def test_reductions_and_temperature_follow_the_documented_formulas():
    b, h, lq = 3, 4, 9
    q_s, k_s, q_t, k_t, kpm = _inputs(b, h, 4, 2, lq, lq, 8, 16, torch.float32, True, seed=21)
    tau = 2.5
    rows = _kl_rows_fp64(q_s, k_s, q_t, k_t, kpm, False, 1 / math.sqrt(8) / tau, 1 / math.sqrt(16) / tau)
    valid = kpm.bool()[:, None, :].expand(b, h, lq)  # padding query rows excluded (L_q == L_k)
    total = rows[valid].sum()
    lens = kpm.sum(1).double()  # each example's own valid length (0 for the all-padding one: it adds 0)
    want_paper = tau ** 2 * (torch.where(valid, rows, 0).sum(-1) / lens.clamp_min(1)[:, None]).mean()
    want_rows = tau ** 2 * total / valid.sum()
    for reduction, want in (("paper", want_paper), ("mean_rows", want_rows)):
        got = attention_map_loss(q_s, k_s, q_t, k_t, kpm, temperature=tau, reduction=reduction)
        ref = reference.attention_map_loss(q_s, k_s, q_t, k_t, kpm, temperature=tau, reduction=reduction)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-7)


def _paper_code_attnmap_loss(q_s, k_s, q_t, k_t, seq_lengths):
    """kd-qat-large-enc main.py (d037e2d) l. 719-752, rewritten: the model's softmax with BERT's -10000 additive
    mask, the [:s, :s] mask of each example, probabilities clamped at 1e-8, sums over keys and query rows divided by
    seq_lengths.view(-1, 1), the mean over batch x heads."""
    b, h, L, d = q_s.shape
    add = (torch.arange(L)[None, :] >= seq_lengths[:, None]).double()[:, None, None, :] * -10000.0
    p_s = torch.softmax(q_s.double() @ k_s.double().transpose(-1, -2) / math.sqrt(d) + add, -1)
    p_t = torch.softmax(q_t.double() @ k_t.double().transpose(-1, -2) / math.sqrt(d) + add, -1)
    mask = torch.zeros(b, h, L, L, dtype=torch.float64)
    for sent in range(b):
        s = seq_lengths[sent]
        mask[sent, :, :s, :s] = 1.0
    student = torch.clamp_min(p_s, 1e-8)
    teacher = torch.clamp_min(p_t, 1e-8)
    neg_cross_entropy = (teacher * torch.log(student) * mask).sum(-1).sum(-1) / seq_lengths.view(-1, 1)
    neg_entropy = (teacher * torch.log(teacher) * mask).sum(-1).sum(-1) / seq_lengths.view(-1, 1)
    return torch.mean(neg_entropy - neg_cross_entropy)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_paper_reduction_matches_kd_qat_large_enc_code_on_unequal_lengths(backend):
    # lengths 13 / 7 / 4 padded to 13 (the example): each example is divided by its own length
    g = torch.Generator().manual_seed(31)
    b, h, L, d = 3, 2, 13, 16
    q_s, k_s, q_t, k_t = (torch.randn(b, h, L, d, generator=g) for _ in range(4))
    seq_lengths = torch.tensor([13, 7, 4])
    kpm = torch.arange(L)[None, :] < seq_lengths[:, None]
    want = _paper_code_attnmap_loss(q_s, k_s, q_t, k_t, seq_lengths)
    with use_backend(backend):
        got = attention_map_loss(q_s, k_s, q_t, k_t, kpm, reduction="paper")
        rows = attention_map_kl(q_s, k_s, q_t, k_t, kpm, scale_s=0.25, scale_t=0.25)
    # the paper's 1e-8 clamp changes nothing measurable here (no probability of a kept key is that small)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # the former normalization by the padded length B * H * L_q is far off on such a batch
    padded = rows[kpm[:, None, :].expand(b, h, L)].sum().item() / (b * h * L)
    assert padded < 0.8 * want.item()
    # mean_rows: every valid token weighs the same
    with use_backend(backend):
        mr = attention_map_loss(q_s, k_s, q_t, k_t, kpm, reduction="mean_rows")
    torch.testing.assert_close(mr.item(), rows[kpm[:, None, :].expand(b, h, L)].mean().item(), rtol=1e-5, atol=1e-7)


def _padded_pair(lengths, L, h=2, d=32):
    """q_s, k_s, q_t, k_t [B, H, L, d] whose valid positions (example i: the first lengths[i]) hold the same values
    whatever L is, and whose padding positions hold large random garbage (a mask that leaks shows up)."""
    gv, gp = torch.Generator().manual_seed(5), torch.Generator().manual_seed(L)
    b = len(lengths)
    ts = [torch.randn(b, h, L, d, generator=gp) * 5 for _ in range(4)]
    for i, n in enumerate(lengths):
        for t in ts:
            t[i, :, :n] = torch.randn(h, n, d, generator=gv)
    kpm = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return (*(x.to(DEV) for x in ts), kpm.to(DEV))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("causal", [False, True])
def test_map_loss_and_grads_do_not_depend_on_padding_length(backend, causal):
    # issue 13: a batch padded to its own longest example (13) or to a fixed max length (40) gives the same loss
    # under both reductions ("paper": per-example valid length; "mean_rows"), and the same gradients at the valid
    # positions, zero at the padding ones -- for the streaming kernel (interpreter) and the reference
    lengths = [13, 7, 4]
    for reduction in ("paper", "mean_rows"):
        got = []
        for L in (max(lengths), 40):
            q_s, k_s, q_t, k_t, kpm = _padded_pair(lengths, L)
            q_s.requires_grad_(), k_s.requires_grad_()
            with use_backend(backend):
                loss = attention_map_loss(q_s, k_s, q_t, k_t, kpm, causal=causal, reduction=reduction)
                assert last_backend() == ("attention_map_kl", backend)
                loss.backward()
            pad = ~kpm[:, None, :, None].expand_as(q_s)
            assert q_s.grad[pad].abs().max() == 0 and k_s.grad[pad].abs().max() == 0, (reduction, L)
            got.append((loss.detach(), [g[:, :, :max(lengths)][~pad[:, :, :max(lengths)]] for g in
                                        (q_s.grad, k_s.grad)]))
        (l0, g0), (l1, g1) = got
        assert l0.item() > 1e-2
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
        for a, b_ in zip(g1, g0):
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6 * b_.abs().max().item())


def test_paper_clamp_only_matters_below_1e_minus_8():
    # sharp maps: some kept probabilities fall below 1e-8; the paper's clamped value differs from the exact KL only by
    # the clamped entries' terms, which this recomputes in closed form
    g = torch.Generator().manual_seed(5)
    b, h, L, d = 2, 2, 9, 16
    q_s, k_s, q_t, k_t = (torch.randn(b, h, L, d, generator=g) * 2.5 for _ in range(4))
    seq_lengths = torch.tensor([9, 6])
    kpm = torch.arange(L)[None, :] < seq_lengths[:, None]
    exact = reference.attention_map_loss(q_s.double().float(), k_s, q_t, k_t, kpm, reduction="paper").double()
    paper = _paper_code_attnmap_loss(q_s, k_s, q_t, k_t, seq_lengths)
    add = (~kpm).double()[:, None, None, :] * -10000.0
    p_s = torch.softmax(q_s.double() @ k_s.double().transpose(-1, -2) / 4 + add, -1)
    p_t = torch.softmax(q_t.double() @ k_t.double().transpose(-1, -2) / 4 + add, -1)
    m = (kpm[:, None, :, None] & kpm[:, None, None, :]).double()
    assert ((p_s < 1e-8) & (m > 0)).any()  # the clamp is active in this case
    c_s, c_t = p_s.clamp_min(1e-8), p_t.clamp_min(1e-8)
    per_entry = (c_t * (c_t.log() - c_s.log()) - p_t * (p_t.clamp_min(1e-300).log() - p_s.clamp_min(1e-300).log()))
    correction = ((per_entry * m).sum((-1, -2)) / seq_lengths.view(-1, 1)).mean()
    torch.testing.assert_close(paper - correction, exact, rtol=1e-4, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("kind", ["holes", "left-padding", "both-sides", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_masked_and_unmasked_tiles_match_reference(kind, causal, poisoned_empty):
    # L = 70 > one 64-key tile: interior tiles run unmasked, boundary tiles masked; non-contiguous masks mask all
    g = torch.Generator().manual_seed(3)
    b, h, lq, lk, d = 3, 2, 70, 70, 16
    q_s, q_t = (torch.randn(b, h, lq, d, generator=g) for _ in range(2))
    k_s, k_t = torch.randn(b, 1, lk, d, generator=g), torch.randn(b, 2, lk, d, generator=g)
    j = torch.arange(lk)[None, :]
    kpm = {"holes": torch.rand(b, lk, generator=g) > 0.3,
           "left-padding": j >= torch.tensor([0, 17, 65])[:, None],
           "both-sides": (j >= torch.tensor([3, 0, 66])[:, None]) & (j < torch.tensor([70, 67, 69])[:, None]),
           "none": None}[kind]
    w = torch.linspace(0.5, 1.5, lq)
    qa, ka = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    with use_backend("triton"):
        rows = attention_map_kl(qa, ka, q_t, k_t, kpm, causal=causal, scale_s=0.3, scale_t=0.2)
        (rows * w).sum().backward()
    qr, kr = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    ref, _, _ = reference.attention_map_kl_rows(qr, kr, q_t, k_t, kpm, causal, 0.3, 0.2)
    (ref * w).sum().backward()
    torch.testing.assert_close(rows, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qa.grad, qr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ka.grad, kr.grad, rtol=1e-5, atol=1e-5)


@needs_triton
def test_kernel_unaligned_and_strided_inputs(poisoned_empty):
    # d = 18 fp32: row strides of 72 bytes (no 16-byte alignment hint); q_s / k_t with a non-unit head-dim stride
    g = torch.Generator().manual_seed(4)
    b, h, L, d = 2, 2, 21, 18
    q_s = torch.randn(b, h, d, L, generator=g).transpose(-1, -2)
    k_s = torch.randn(b, 1, L, d, generator=g)
    q_t = torch.randn(b, h, L, d, generator=g)
    k_t = torch.randn(b, h, d, L, generator=g).transpose(-1, -2)
    kpm = torch.arange(L)[None, :] < torch.tensor([L, 9])[:, None]
    with use_backend("triton"):
        rows = attention_map_kl(q_s, k_s, q_t, k_t, kpm, causal=True, scale_s=0.3, scale_t=0.2)
    ref, _, _ = reference.attention_map_kl_rows(q_s, k_s, q_t, k_t, kpm, True, 0.3, 0.2)
    torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)


def test_static_launches_describe_fwd_and_bwd():
    from pyquant.ops._dispatch import kernel_module

    K = kernel_module("attention_kd")
    calls = K.static_launches(8, 32, 2048, 128, "bf16")
    assert len(calls) == 1 and calls[0]["kernel"] == "attention_kd" and calls[0]["backend"] == "triton"
    la = {x["name"]: x for x in calls[0]["launches"]}
    assert set(la) == {"fwd", "dk_zero", "bwd"}  # dK is rounded in the backward kernel: no cast kernel
    assert "builtin" in la["dk_zero"]  # zeroing the fp32 dK workspace and its tickets: a torch kernel
    assert la["dk_zero"]["bytes"] == 4 * 8 * 32 * (2048 * 128 + 1)
    for x in (la["fwd"], la["bwd"]):
        t = x["triton"]
        assert set(t["signature"]) == set(t["fn"].arg_names)
        assert all(t["signature"][k] == "constexpr" for k in t["constexprs"])
        assert x["threads_per_cta"] == 32 * t["num_warps"] and x["weights"] == 8 * 32 * 2048 * 2048
    assert la["bwd"]["triton"]["signature"]["dkw_ptr"] == "*fp32"  # fp32 atomics (a bf16 one is a CAS loop)
    bm, bn = (la["fwd"]["triton"]["constexprs"][k] for k in ("BLOCK_M", "BLOCK_N"))
    # every key kept: all tiles run in the unmasked main loop, none in the masked boundary loop
    assert la["fwd"]["grid"] == [2048 // bm, 8 * 32, 1] and la["fwd"]["loop_trips"] == [2048 / bn, 0.0]
    # the backward's third main loop: the dK conversion (one program per key head, L rows in BLOCK_N steps),
    # averaged over the programs
    bbm, bbn = (la["bwd"]["triton"]["constexprs"][k] for k in ("BLOCK_M", "BLOCK_N"))
    assert la["bwd"]["loop_trips"] == [2048 / bbn, 0.0, (2048 / bbn) / (2048 / bbm)]
    # one pass: 2 QK dots (2 * 2 * d flops) per score element; the fused backward 4 (2 QK, dS @ K, dS^T @ Q)
    assert la["fwd"]["mma_flops"] == 2 * 2 * 128 * 8 * 32 * 2048 * 2048
    assert la["bwd"]["mma_flops"] == 4 * 2 * 128 * 8 * 32 * 2048 * 2048
    causal = {x["name"]: x for x in K.static_launches(8, 32, 2048, 128, causal=True)[0]["launches"]}
    assert sum(causal["fwd"]["loop_trips"]) < 0.6 * sum(la["fwd"]["loop_trips"])
    assert causal["fwd"]["loop_trips"][1] == causal["fwd"]["boundary_trips"] > 0
    fp32 = {x["name"] for x in K.static_launches(2, 4, 256, 128, "fp32")[0]["launches"]}
    assert fp32 == {"fwd", "dk_zero", "bwd"}
    fp32_bwd = [x for x in K.static_launches(2, 4, 256, 128, "fp32")[0]["launches"] if x["name"] == "bwd"][0]
    assert fp32_bwd["loop_trips"] == [256 / 64, 0.0]  # an fp32 dK is the workspace itself: no conversion loop
    with pytest.raises(ValueError, match="dtype"):
        K.static_launches(8, 32, 2048, 128, "int8")


_AOT_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("no AOT compiler:", e); sys.exit(3)
from pyquant.ops._dispatch import kernel_module
calls = [c for dt in ("bf16", "fp32") for c in kernel_module("attention_kd").static_launches(2, 4, 256, 128, dt,
                                                                                             causal=True)]
for call in calls:
    for ln in call["launches"]:
        if "triton" not in ln:  # torch side kernels (the dK workspace's zeroing)
            continue
        t = ln["triton"]
        try:
            src = ASTSource(fn=t["fn"], signature=t["signature"], constexprs=t["constexprs"])
        except TypeError as e:
            print("unsupported ASTSource API:", e); sys.exit(3)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=t["num_warps"], num_stages=t["num_stages"]))
        except FileNotFoundError as e:
            print("no ptxas:", e); sys.exit(3)
        assert k.metadata.shared <= 227 * 1024, (ln["name"], k.metadata.shared)
print("ok")
"""


def test_kernels_compile_for_sm90_from_their_descriptors():
    """The compiled (non-interpreter) path: the launches static_launches describes lower to sm_90 cubins."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_general_additive_mask_goes_through_the_reference():
    q_s, k_s, q_t, k_t, kpm = _inputs(2, 2, 2, 2, 13, 13, 16, 16, torch.float32, True, seed=4)
    additive = torch.zeros(2, 1, 13, 13).masked_fill(~kpm.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    got = attention_map_loss(q_s, k_s, q_t, k_t, kpm, attn_mask=additive)
    want = attention_map_loss(q_s, k_s, q_t, k_t, kpm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    boolmask = torch.ones(13, 13, dtype=torch.bool).tril()[None, None]
    got_c = attention_map_loss(q_s, k_s, q_t, k_t, kpm, attn_mask=boolmask)
    want_c = attention_map_loss(q_s, k_s, q_t, k_t, kpm, causal=True)
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-7)


def test_unsupported_head_dim_falls_back_to_reference():
    q_s, k_s, q_t, k_t, kpm = _inputs(1, 2, 2, 2, 5, 5, 272, 16, torch.float32, True, seed=8)
    with use_backend("triton", "reference"):
        got = attention_map_loss(q_s, k_s, q_t, k_t, kpm)
        assert last_backend() == ("attention_map_kl", "reference")
    torch.testing.assert_close(got, reference.attention_map_loss(q_s, k_s, q_t, k_t, kpm), rtol=1e-5, atol=1e-7)


def test_extreme_scale_falls_back_to_reference():
    # an effective scale beyond the kernel's masking-sentinel range (1/4 over temperature 1e-9) goes to the reference
    q_s, k_s, q_t, k_t, kpm = _inputs(1, 2, 2, 2, 5, 5, 16, 16, torch.float32, True, seed=8)
    with use_backend("triton", "reference"):
        got = attention_map_loss(q_s * 1e-9, k_s, q_t * 1e-9, k_t, kpm, temperature=1e-9)
        assert last_backend() == ("attention_map_kl", "reference")
    want = reference.attention_map_loss(q_s * 1e-9, k_s, q_t * 1e-9, k_t, kpm, temperature=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_attention_output_loss():
    g = torch.Generator().manual_seed(2)
    out_s = torch.randn(3, 7, 12, generator=g, requires_grad=True)
    out_t = torch.randn(3, 7, 12, generator=g)
    torch.testing.assert_close(attention_output_loss(out_s, out_t), F.mse_loss(out_s, out_t))
    kpm = torch.arange(7)[None, :] < torch.tensor([7, 3, 1])[:, None]
    loss = attention_output_loss(out_s, out_t, kpm)
    want = F.mse_loss(out_s[kpm], out_t[kpm])
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert out_s.grad[~kpm].abs().max() == 0 and out_s.grad[kpm].abs().max() > 0
    with pytest.raises(ValueError, match="out_t"):
        attention_output_loss(out_s, out_t[:, :5])
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_output_loss(out_s, out_t, kpm[:, :4])


def test_attention_score_mse_matches_ternarybert_formula():
    q_s, k_s, q_t, k_t, kpm = _inputs(2, 4, 2, 4, 10, 10, 16, 16, torch.float32, True, seed=12)
    got = attention_score_mse(q_s, k_s, q_t, k_t, kpm)
    # TernaryBERT: scores with the -10000 additive mask, entries <= -1e2 replaced by 0, then MSELoss
    add = (1.0 - kpm.float())[:, None, None, :] * -10000.0
    s_s = q_s @ k_s.repeat_interleave(2, 1).transpose(-1, -2) / 4 + add
    s_t = q_t @ k_t.transpose(-1, -2) / 4 + add
    s_s = torch.where(s_s <= -1e2, torch.zeros_like(s_s), s_s)
    s_t = torch.where(s_t <= -1e2, torch.zeros_like(s_t), s_t)
    torch.testing.assert_close(got, F.mse_loss(s_s, s_t), rtol=1e-5, atol=1e-6)


def test_bad_input_raises_clear_errors():
    q_s, k_s, q_t, k_t, kpm = _inputs(2, 4, 2, 2, 9, 9, 16, 16, torch.float32, True, seed=1)
    with pytest.raises(ValueError, match="q_t has 2 query heads"):
        attention_map_loss(q_s, k_s, q_t[:, :2], k_t[:, :1], kpm)
    with pytest.raises(ValueError, match="q_t has shape"):
        attention_map_loss(q_s, k_s, q_t[:, :, :5], k_t, kpm)
    with pytest.raises(ValueError, match="k_s has shape"):
        attention_map_loss(q_s, k_s[:, :, :, :8], q_t, k_t, kpm)
    with pytest.raises(ValueError, match="k_s has shape"):
        attention_map_loss(q_s, torch.randn(2, 3, 9, 16), q_t, k_t, kpm)  # 3 key heads do not divide 4
    with pytest.raises(ValueError, match="k_t has shape"):
        attention_map_loss(q_s, k_s, q_t, k_t[:, :, :7], kpm)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm[:, :8])
    with pytest.raises(TypeError, match="key_padding_mask must be bool or integer"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm.float())
    with pytest.raises(TypeError, match="q_s must be float16, bfloat16 or float32"):
        attention_map_loss(q_s.double(), k_s, q_t, k_t, kpm)
    with pytest.raises(ValueError, match="q_s must be 4-D"):
        attention_map_loss(q_s[0], k_s, q_t, k_t, kpm)
    with pytest.raises(ValueError, match="reduction"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm, reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm, temperature=0.0)
    with pytest.raises(ValueError, match="scale"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm, scale=float("nan"))
    with pytest.raises(TypeError, match="causal"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm, causal=1)
    with pytest.raises(ValueError, match="attn_mask has shape"):
        attention_map_loss(q_s, k_s, q_t, k_t, kpm, attn_mask=torch.zeros(2, 1, 9, 8))


def test_opcheck_reference_backend():
    q_s, k_s, q_t, k_t, kpm = _inputs(2, 2, 1, 2, 6, 6, 8, 8, torch.float32, True, seed=2)
    op = torch.ops.pyquant.attention_map_kl.default
    with use_backend("reference"):
        torch.library.opcheck(op, (q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t, kpm.bool(), True, 0.3, 0.4),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_import_does_not_load_triton_or_cuda():
    code = ("import sys, pyquant.distill.attention, pyquant.ops, torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialized'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton_interpret(), reason="needs a CUDA GPU")
def test_gpu_bf16_long_sequence_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, hk, lq, d = 2, 8, 2, 1031, 128
    q_s, q_t = (torch.randn(b, h, lq, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    k_s, k_t = (torch.randn(b, hk, lq, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    kpm = torch.arange(lq, device="cuda")[None, :] < torch.tensor([lq, 700], device="cuda")[:, None]
    qa, ka = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    with use_backend("triton"):
        loss = attention_map_loss(qa, ka, q_t, k_t, kpm, causal=True)
        loss.backward()
    qr, kr = q_s.float().clone().requires_grad_(), k_s.float().clone().requires_grad_()
    ref = reference.attention_map_loss(qr, kr, q_t.float(), k_t.float(), kpm, causal=True)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-3)
    scale = qr.grad.abs().max().item()
    torch.testing.assert_close(qa.grad.float(), qr.grad, rtol=3e-2, atol=3e-2 * scale)
    torch.testing.assert_close(ka.grad.float(), kr.grad, rtol=3e-2, atol=3e-2 * scale)


@needs_triton
def test_mixed_dtypes_and_teacher_gets_no_gradient(poisoned_empty):
    # bf16 student, fp32 teacher that requires grad (e.g. not run under no_grad): computed at fp32, no teacher grad
    q_s, k_s, q_t, k_t, kpm = _inputs(2, 4, 2, 4, 21, 21, 32, 64, torch.float32, True, seed=17)
    qa, ka = q_s.to(torch.bfloat16).requires_grad_(), k_s.to(torch.bfloat16).requires_grad_()
    qt, kt = q_t.clone().requires_grad_(), k_t.clone().requires_grad_()
    with use_backend("triton"):
        loss = attention_map_loss(qa, ka, qt, kt, kpm, causal=True, temperature=2.0)
        loss.backward()
    assert qt.grad is None and kt.grad is None
    assert qa.grad.dtype == torch.bfloat16 and ka.grad.dtype == torch.bfloat16
    qr, kr = qa.detach().float().requires_grad_(), ka.detach().float().requires_grad_()
    ref = reference.attention_map_loss(qr, kr, q_t, k_t, kpm, causal=True, temperature=2.0)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    gs = qr.grad.abs().max().item()
    torch.testing.assert_close(qa.grad.float(), qr.grad, rtol=2e-2, atol=1e-2 * gs)
    torch.testing.assert_close(ka.grad.float(), kr.grad, rtol=2e-2, atol=1e-2 * gs)


def test_traces_under_torch_compile_fullgraph():
    # the op has a fake implementation: the whole loss (op + reduction + autograd) traces without graph breaks
    q_s, k_s, q_t, k_t, kpm = _inputs(2, 4, 2, 4, 9, 9, 16, 16, torch.float32, True, seed=23)
    qa, ka = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    fn = torch.compile(lambda *a: attention_map_loss(*a, causal=True), fullgraph=True, backend="aot_eager")
    with use_backend("reference"):
        loss = fn(qa, ka, q_t, k_t, kpm)
        loss.backward()
    qr, kr = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    ref = reference.attention_map_loss(qr, kr, q_t, k_t, kpm, causal=True)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(qa.grad, qr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ka.grad, kr.grad, rtol=1e-5, atol=1e-6)


@needs_triton
def test_benchmark_smoke_mode_runs_and_writes_nothing(tmp_path, capsys):
    from pyquant.bench import attention_kd as bench
    from pyquant.bench.common import RESULTS_DIR

    before = set(RESULTS_DIR.glob("attention_kd-*")) if RESULTS_DIR.exists() else set()
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "not measured" in out and " ms " not in out  # no timing printed
    after = set(RESULTS_DIR.glob("attention_kd-*")) if RESULTS_DIR.exists() else set()
    assert after == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_benchmark_without_gpu_exits_with_clear_message():
    from pyquant.bench import attention_kd as bench

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--seq-lens", "64"])


def test_benchmark_plot_draws_ok_and_oom_rows(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pyquant.bench import attention_kd as bench

    rows = [dict(seq_len=512, impl="fused_triton", status="ok", fwd_bwd_ms=1.5, peak_extra_bytes=2**20),
            dict(seq_len=512, impl="eager_materialized", status="ok", fwd_bwd_ms=9.0, peak_extra_bytes=2**30),
            dict(seq_len=8192, impl="fused_triton", status="ok", fwd_bwd_ms=40.0, peak_extra_bytes=2**24),
            dict(seq_len=8192, impl="eager_materialized", status="oom", fwd_bwd_ms=None, peak_extra_bytes=None)]
    png = tmp_path / "plot.png"
    bench._plot(rows, png)
    assert png.stat().st_size > 1000

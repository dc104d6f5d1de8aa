"""Logit KD / TSLD / hidden MSE: hand-computed cases for the reference, and the chunked implementation against
autograd on the reference (values and gradients), including that no full fp32 [tokens, V] tensor is created."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyquant.distill.losses import LogitLossWeights, chunked_logit_losses
from pyquant.reference import distill as R

LOG3 = math.log(3.0)


# ---- hand-computed cases -------------------------------------------------------------------------------------------
def test_soft_cross_entropy_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[LOG3, 0.0]])  # p_t = (3/4, 1/4); p_s = (1/2, 1/2)
    assert R.soft_cross_entropy(s, t).item() == pytest.approx(math.log(2), rel=1e-6)
    # T = 2: student probabilities stay uniform, loss scaled by T^2 = 4
    assert R.soft_cross_entropy(s, t, temperature=2.0).item() == pytest.approx(4 * math.log(2), rel=1e-6)


def test_kl_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[LOG3, 0.0]])
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert R.kl_divergence(s, t).item() == pytest.approx(want, rel=1e-6)
    assert R.logit_kd_loss(s, t, kind="kl").item() == pytest.approx(want, rel=1e-6)
    # T = 2: p_t = (sqrt3, 1)/(sqrt3+1)
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    want2 = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert R.kl_divergence(s, t, temperature=2.0).item() == pytest.approx(want2, rel=1e-6)


def test_kl_equals_soft_ce_minus_teacher_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    pt = torch.softmax(t / 1.5, -1)
    ent = -(pt * pt.log()).sum(-1).mean() * 1.5 ** 2
    assert torch.allclose(R.kl_divergence(s, t, 1.5), R.soft_cross_entropy(s, t, 1.5) - ent, rtol=1e-5)


def test_mean_skips_ignored_tokens():
    s = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    t = torch.tensor([[[LOG3, 0.0], [-9.0, 9.0]]])
    lab = torch.tensor([[0, -100]])
    assert R.soft_cross_entropy(s, t, labels=lab).item() == pytest.approx(math.log(2), rel=1e-6)
    assert R.cross_entropy(s, lab).item() == pytest.approx(math.log(2), rel=1e-6)


def test_tsld_weights_hand():
    # vocab 2; teacher CE of each token: [log 2, log(4/3), log 4, ignored]
    t = torch.tensor([[[0.0, 0.0], [LOG3, 0.0], [LOG3, 0.0], [1.0, 2.0]]])
    lab = torch.tensor([[1, 0, 1, -100]])
    ce = R.teacher_token_ce(t, lab)
    assert ce[0, :3].tolist() == pytest.approx([math.log(2), math.log(4 / 3), math.log(4)], rel=1e-6)
    assert ce[0, 3].item() == 0.0
    w = R.tsld_token_weights(ce, lab, tau=10.0)
    e = [math.exp(math.log(2) / 10), math.exp(math.log(4 / 3) / 10), math.exp(math.log(4) / 10)]
    want = [x / sum(e) for x in e] + [0.0]
    assert w[0].tolist() == pytest.approx(want, rel=1e-6)
    assert not w.requires_grad
    # TSLD loss = sum_i w_i * softCE_i for one sequence
    s = torch.zeros(1, 4, 2)
    per = [math.log(2)] * 3  # uniform student: soft CE is log 2 whatever the teacher
    assert R.tsld_loss(s, t, lab, tau=10.0).item() == pytest.approx(sum(a * b for a, b in zip(want, per)), rel=1e-6)


def test_tsld_weights_softmax_per_sequence_and_empty_sequence():
    ce = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    lab = torch.tensor([[1, 1, 1], [-100, -100, -100]])
    w = R.tsld_token_weights(ce, lab, tau=1.0)
    assert torch.allclose(w[0], torch.softmax(ce[0], 0))
    assert w[1].abs().sum().item() == 0.0 and torch.isfinite(w).all()


def test_hidden_mse_hand_and_mask():
    hs = [torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0), torch.zeros(2, 3, 4)]
    ht = [torch.zeros(2, 3, 4)] * 3
    assert R.hidden_mse(hs, ht).item() == pytest.approx(1 + 4 + 0)
    hs2 = [torch.ones(1, 2, 4)]
    hs2[0][0, 1] = 10.0  # masked-out token
    m = torch.tensor([[1, 0]])
    assert R.hidden_mse(hs2, [torch.zeros(1, 2, 4)], attention_mask=m).item() == pytest.approx(1.0)


def test_hidden_mse_layer_map():
    hs = [torch.ones(1, 2, 3), torch.full((1, 2, 3), 3.0)]
    ht = [torch.zeros(1, 2, 3), torch.full((1, 2, 3), 9.0), torch.full((1, 2, 3), 3.0)]
    assert R.hidden_mse(hs, ht, layer_map=[0, 2]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="layer_map"):
        R.hidden_mse(hs, ht)
    with pytest.raises(ValueError, match="layer_map"):
        R.hidden_mse(hs, ht, layer_map=[0, 3])


@pytest.mark.parametrize("bad", [0.0, -1.0, True])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        R.soft_cross_entropy(torch.randn(2, 3), torch.randn(2, 3), temperature=bad)


def test_vocab_mismatch_and_kind():
    with pytest.raises(ValueError, match="same tokens and same vocabulary"):
        R.kl_divergence(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="kind"):
        R.logit_kd_loss(torch.randn(2, 5), torch.randn(2, 5), kind="mse")


# ---- chunked implementation --------------------------------------------------------------------------------------
def _ref_total(s_logits, t_logits, lab, w: LogitLossWeights):
    tot = s_logits.new_zeros((), dtype=torch.float32)
    if w.ce:
        tot = tot + w.ce * R.cross_entropy(s_logits, lab)
    if w.kd:
        tot = tot + w.kd * R.logit_kd_loss(s_logits, t_logits, w.temperature, w.kd_kind, labels=lab)
    if w.tsld:
        tot = tot + w.tsld * R.tsld_loss(s_logits, t_logits, lab, w.tsld_tau, w.temperature)
    return tot


@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["soft_ce", "kl"])
def test_chunked_matches_reference_fp32(chunk, fused, kind):
    g = torch.Generator().manual_seed(7 + chunk)
    B, L, V, D = 3, 7, 13, 5
    lab = torch.randint(0, V, (B, L), generator=g)
    lab[0, :3] = -100
    lab[2, 4] = -100
    w = LogitLossWeights(ce=0.7, kd=1.3, tsld=2.0, temperature=1.7, kd_kind=kind, tsld_tau=10.0)
    t_logits = torch.randn(B, L, V, generator=g) * 2
    if fused:
        h = torch.randn(B, L, D, generator=g).requires_grad_()
        W = torch.randn(V, D, generator=g).requires_grad_()
        b = torch.randn(V, generator=g).requires_grad_()
        tot, parts = chunked_logit_losses(h, lab, teacher=t_logits, weight=W, bias=b, loss_weights=w,
                                          chunk_size=chunk)
        gy = torch.rand(())
        (tot * gy).backward()
        got = [x.grad.clone() for x in (h, W, b)]
        for x in (h, W, b):
            x.grad = None
        ref = _ref_total(h @ W.t() + b, t_logits, lab, w)
        (ref * gy).backward()
        want = [x.grad for x in (h, W, b)]
    else:
        s = (torch.randn(B, L, V, generator=g) * 2).requires_grad_()
        tot, parts = chunked_logit_losses(s, lab, teacher=t_logits, loss_weights=w, chunk_size=chunk)
        gy = torch.rand(())
        (tot * gy).backward()
        got = [s.grad.clone()]
        s.grad = None
        ref = _ref_total(s, t_logits, lab, w)
        (ref * gy).backward()
        want = [s.grad]
    assert torch.allclose(tot, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-6), (a - e).abs().max()
    logits = (h @ W.t() + b) if fused else s
    assert parts["ce"].item() == pytest.approx(R.cross_entropy(logits, lab).item(), rel=1e-5)
    assert parts["kd"].item() == pytest.approx(R.logit_kd_loss(logits, t_logits, 1.7, kind, labels=lab).item(),
                                               rel=1e-5)
    assert parts["tsld"].item() == pytest.approx(R.tsld_loss(logits, t_logits, lab, 10.0, 1.7).item(), rel=1e-5)


def test_chunked_teacher_as_hidden_and_weight():
    g = torch.Generator().manual_seed(3)
    B, L, V, D, Dt = 2, 5, 11, 4, 6
    lab = torch.randint(0, V, (B, L), generator=g)
    th, tw = torch.randn(B, L, Dt, generator=g), torch.randn(V, Dt, generator=g)
    s = torch.randn(B, L, V, generator=g).requires_grad_()
    w = LogitLossWeights(ce=0.0, kd=1.0, tsld=1.0)
    tot, _ = chunked_logit_losses(s, lab, teacher=th, teacher_weight=tw, loss_weights=w, chunk_size=3)
    ref = _ref_total(s, th @ tw.t(), lab, w)
    assert torch.allclose(tot, ref, rtol=1e-5)


def test_chunked_bf16_logits():
    g = torch.Generator().manual_seed(11)
    B, L, V = 2, 9, 17
    lab = torch.randint(0, V, (B, L), generator=g)
    s = (torch.randn(B, L, V, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(B, L, V, generator=g) * 3).to(torch.bfloat16)
    w = LogitLossWeights(ce=1.0, kd=1.0, tsld=1.0)
    tot, _ = chunked_logit_losses(s, lab, teacher=t, loss_weights=w, chunk_size=4)
    tot.backward()
    assert s.grad.dtype == torch.bfloat16
    s32 = s.detach().float().requires_grad_()
    ref = _ref_total(s32, t.float(), lab, w)
    ref.backward()
    assert torch.allclose(tot, ref, rtol=1e-5)  # fp32 math on the same bf16 inputs
    assert torch.allclose(s.grad.float(), s32.grad, rtol=1e-2, atol=1e-3)


class _Fp32Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_fp32 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32:
                self.max_fp32 = max(self.max_fp32, o.numel())
        return out


def test_no_full_fp32_logits_tensor():
    g = torch.Generator().manual_seed(5)
    B, L, V, D, chunk = 2, 16, 61, 8, 4
    h = torch.randn(B, L, D, generator=g).to(torch.bfloat16).requires_grad_()
    W = torch.randn(V, D, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randn(B, L, V, generator=g).to(torch.bfloat16)
    lab = torch.randint(0, V, (B, L), generator=g)
    mode = _Fp32Sizes()
    with mode:
        tot, _ = chunked_logit_losses(h, lab, teacher=t, weight=W, loss_weights=LogitLossWeights(1, 1, 1),
                                      chunk_size=chunk)
        tot.backward()
    # the biggest fp32 tensors are one chunk of logits [chunk, V] and the fp32 lm_head weight / its gradient [V, D];
    # never the [B*L, V] logits
    bound = max(chunk * V, V * D)
    assert mode.max_fp32 <= bound
    assert B * L * V >= 4 * bound


def test_chunked_bad_input():
    s, lab = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="teacher is required"):
        chunked_logit_losses(s, lab, loss_weights=LogitLossWeights(kd=1.0))
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_logit_losses(s, lab, teacher=torch.randn(2, 3, 6), loss_weights=LogitLossWeights(kd=1.0))
    with pytest.raises(ValueError, match="labels"):
        chunked_logit_losses(s, lab[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logit_losses(s, lab, chunk_size=0)
    with pytest.raises(ValueError, match="weight must be"):
        chunked_logit_losses(s, lab, weight=torch.randn(5, 4))
    with pytest.raises(ValueError, match="LogitLossWeights.kd"):
        LogitLossWeights(kd=-1.0)
    with pytest.raises(ValueError, match="kd_kind"):
        LogitLossWeights(kd_kind="mse")

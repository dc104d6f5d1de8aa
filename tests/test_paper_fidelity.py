"""The seed papers' reductions, written out from their code (formulas below cite the lines), against pyquant's
reference and chunked/fused implementations, on padded batches of unequal lengths."""
import pytest
import torch
import torch.nn.functional as F

from pyquant.distill.losses import LogitLossWeights, chunked_logit_losses
from pyquant.reference import distill as R


def _paper_tsld_one(s, t, lab, tau=10.0):
    """aiha-lab/TSLD utils/utils_quant.py:88-100 on one unpadded sequence [L, V] (already shifted)."""
    tc = F.cross_entropy(t, lab, reduction="none")  # :89
    scale = torch.softmax(tc / tau, dim=-1)  # :95
    return (torch.sum(-torch.softmax(t, -1) * torch.log_softmax(s, -1), dim=-1) * scale).sum()  # :98-100


def _padded_lm(seed, lengths, V=11):
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    lab = torch.randint(0, V, (B, L), generator=g)
    for i, n in enumerate(lengths):
        lab[i, n:] = -100
    return s, t, lab


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fused", [False, True])
def test_tsld_reductions_match_paper_formula(reduction, fused):
    lengths = [7, 4, 2, 5]
    s, t, lab = _padded_lm(0, lengths)
    per_seq = torch.stack([_paper_tsld_one(s[i, :n], t[i, :n], lab[i, :n]) for i, n in enumerate(lengths)])
    want = per_seq.sum() if reduction == "sum" else per_seq.mean()
    assert R.tsld_loss(s, t, lab, reduction=reduction).item() == pytest.approx(want.item(), rel=1e-5)
    w = LogitLossWeights(ce=0.0, tsld=1.0, tsld_reduction=reduction)
    if fused:  # student logits never materialized: hidden [B, L, D] + head weight
        g = torch.Generator().manual_seed(1)
        h = torch.randn(*s.shape[:2], 6, generator=g).requires_grad_()
        W = torch.randn(s.shape[-1], 6, generator=g).requires_grad_()
        tot, parts = chunked_logit_losses(h, lab, teacher=t, weight=W, loss_weights=w, chunk_size=3)
        sl = h @ W.t()
        ref = torch.stack([_paper_tsld_one(sl[i, :n], t[i, :n], lab[i, :n]) for i, n in enumerate(lengths)])
        ref = ref.sum() if reduction == "sum" else ref.mean()
        ref.backward()
        gh, gW = h.grad.clone(), W.grad.clone()
        h.grad = W.grad = None
        tot.backward()
        assert torch.allclose(h.grad, gh, rtol=1e-4, atol=1e-6) and torch.allclose(W.grad, gW, rtol=1e-4, atol=1e-6)
        want = ref.detach()
    else:
        tot, parts = chunked_logit_losses(s, lab, teacher=t, loss_weights=w, chunk_size=5)
    assert tot.item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["tsld"].item() == pytest.approx(want.item(), rel=1e-5)


def test_tsld_sum_is_default_and_batch_times_mean():
    s, t, lab = _padded_lm(2, [5, 5, 5, 5])
    assert LogitLossWeights().tsld_reduction == "sum"
    assert R.tsld_loss(s, t, lab).item() == pytest.approx(4 * R.tsld_loss(s, t, lab, reduction="mean").item(),
                                                          rel=1e-5)
    # no padding at all: exactly the paper's batched expression (utils_quant.py:95-100 on [B, L, V])
    tc = F.cross_entropy(t.reshape(-1, t.shape[-1]), lab.reshape(-1), reduction="none").reshape(4, -1)
    scale = torch.softmax(tc / 10, dim=-1)
    paper = (torch.sum(-torch.softmax(t, -1) * torch.log_softmax(s, -1), dim=-1) * scale).sum()
    assert R.tsld_loss(s, t, lab).item() == pytest.approx(paper.item(), rel=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_tsld_does_not_depend_on_padding_length(reduction):
    # the same sequences padded to their own longest (7) or to 12, padding logits random garbage: equal losses
    # (padding tokens carry label -100 and are left out of the per-sequence token-weight softmax); the paper's code
    # never pads (fixed-length WikiText/PTB blocks), so this is its per-sequence formula on each unpadded sequence
    lengths = [7, 4, 2, 5]
    s, t, lab = _padded_lm(0, lengths)
    g = torch.Generator().manual_seed(9)
    B, L, V = s.shape
    pad = lambda x: torch.cat([x, torch.randn(B, 12 - L, V, generator=g) * 4], 1)  # noqa: E731
    s2, t2 = pad(s), pad(t)
    lab2 = torch.cat([lab, torch.full((B, 12 - L), -100)], 1)
    w = LogitLossWeights(ce=1.0, tsld=1.0, tsld_reduction=reduction)
    a = R.tsld_loss(s, t, lab, reduction=reduction).item()
    assert a == pytest.approx(R.tsld_loss(s2, t2, lab2, reduction=reduction).item(), rel=1e-5)
    tot, parts = chunked_logit_losses(s, lab, teacher=t, loss_weights=w, chunk_size=5)
    tot2, parts2 = chunked_logit_losses(s2, lab2, teacher=t2, loss_weights=w, chunk_size=5)
    assert parts["tsld"].item() == pytest.approx(a, rel=1e-5)
    assert parts2["tsld"].item() == pytest.approx(a, rel=1e-5)
    assert tot2.item() == pytest.approx(tot.item(), rel=1e-5)

    def literal(s, t, lab):  # utils_quant.py:89-100 applied as written to a padded batch: padding tokens get CE 0,
        tc = F.cross_entropy(t.transpose(1, 2), lab, reduction="none")  # still take softmax weight, and their
        scale = torch.softmax(tc / 10, dim=-1)  # soft CE is summed: the literal code is not padding invariant
        per = (torch.sum(-torch.softmax(t, -1) * torch.log_softmax(s, -1), dim=-1) * scale).sum(-1)
        return (per.sum() if reduction == "sum" else per.mean()).item()

    assert abs(literal(s, t, lab) - literal(s2, t2, lab2)) > 1e-2 * abs(a)


def test_tsld_bad_reduction():
    s, t, lab = _padded_lm(0, [3, 2])
    with pytest.raises(ValueError, match="reduction"):
        R.tsld_loss(s, t, lab, reduction="avg")
    with pytest.raises(ValueError, match="tsld_reduction"):
        LogitLossWeights(tsld=1.0, tsld_reduction="none")
    from pyquant.distill import DistillConfig
    with pytest.raises(ValueError, match="tsld_reduction"):
        DistillConfig(tsld=1.0, tsld_reduction="batchmean")


# ---- kd-qat-large-enc (EMNLP'22) losses on a tiny BERT --------------------------------------------------------------
def _bert(seed, num_labels=3, layers=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                     vocab_size=97, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def _glue_batch(seed, lengths, pad_to=None, V=97):
    g = torch.Generator().manual_seed(seed)
    L = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, V, (n,), generator=g)
        am[i, :n] = 1
    return {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 2, 1][: len(lengths)])}


def _sub_layer_outputs(model, inp):
    """The attention sub-layer outputs LayerNorm(dropout(W_O ctx) + x) (modeling_quant.py:218-223), via hooks."""
    outs, hs = [], []
    for layer in model.bert.encoder.layer:
        hs.append(layer.attention.output.register_forward_hook(lambda m, a, o: outs.append(o)))
    try:
        res = model(**inp, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return res, outs


def test_emnlp22_losses_match_paper_formulas():
    from pyquant.distill import DistillConfig, Distiller

    s, t = _bert(0), _bert(1)
    batch = _glue_batch(3, [9, 5, 3])
    cfg = DistillConfig(task="classification", ce=1.0, ce_reduction="sum", kd=1.0, hidden=1.0, attn_output=1.0)
    assert (cfg.hidden_reduction, cfg.attn_output_reduction) == ("paper", "paper")  # the paper's are the defaults
    out = Distiller(s, t, cfg)(batch)
    inp = {k: batch[k] for k in ("input_ids", "attention_mask")}
    so, os_ = _sub_layer_outputs(s, inp)
    with torch.no_grad():
        to, ot = _sub_layer_outputs(t, inp)
    mse = torch.nn.MSELoss()
    # main.py:665-666: nll_loss(log_softmax(student), labels, reduction='sum')
    gt = F.nll_loss(torch.log_softmax(so.logits, -1), batch["labels"], reduction="sum")
    # main.py:144-147 soft_cross_entropy, used at :674: sum(-softmax(t) * log_softmax(s), -1).mean()
    cls = torch.sum(-torch.softmax(to.logits, -1) * torch.log_softmax(so.logits, -1), -1).mean()
    # main.py:763-766: MSELoss()(student_rep, teacher_rep) summed over embedding output + every layer
    rep = sum(mse(a, b) for a, b in zip(so.hidden_states, to.hidden_states))
    # main.py:689-692: MSELoss()(student_attn_block[1], teacher_attn_block[1]) summed over layers
    ao = sum(mse(a, b) for a, b in zip(os_, ot))
    for k, v in (("ce", gt), ("kd", cls), ("hidden", rep), ("attn_output", ao)):
        assert out.losses[k].item() == pytest.approx(v.item(), rel=1e-5), k
    assert out.loss.item() == pytest.approx((gt + cls + rep + ao).item(), rel=1e-5)


def test_padding_further_invariance():
    """Per-example normalized losses do not depend on how far a batch is padded; the paper's unmasked MSEs do."""
    from pyquant.distill import DistillConfig, Distiller
    from pyquant.distill.attention import attention_map_loss
    from pyquant.distill.capture import capture_attention

    s, t = _bert(0), _bert(1)
    lengths = [9, 5, 3]
    short, long = _glue_batch(4, lengths), _glue_batch(4, lengths, pad_to=16)

    def losses(batch, red):
        cfg = DistillConfig(task="classification", ce=1.0, kd=1.0, hidden=1.0, attn_output=1.0,
                            hidden_reduction=red, attn_output_reduction=red)
        return Distiller(s, t, cfg)(batch).losses

    a, b = losses(short, "masked"), losses(long, "masked")
    for k in ("ce", "kd", "hidden", "attn_output"):  # masked MSE + logit losses: invariant
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-4, abs=1e-6), k
    a, b = losses(short, "paper"), losses(long, "paper")
    for k in ("hidden", "attn_output"):  # the paper's unmasked MSE (the default): padding positions count
        assert abs(a[k].item() - b[k].item()) > 1e-3 * abs(a[k].item()), k

    def map_loss(batch, reduction):
        inp = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with capture_attention(s) as rs:
            s(**inp)
        with capture_attention(t) as rt, torch.no_grad():
            t(**inp)
        return sum(attention_map_loss(e.q, e.k, f.q, f.k, e.key_padding_mask, reduction=reduction)
                   for e, f in zip(rs, rt)).item()

    for reduction in ("mean_rows", "paper"):  # both per-valid-row normalizations: invariant
        assert map_loss(short, reduction) == pytest.approx(map_loss(long, reduction), rel=1e-4), reduction
    # through the Distiller (capture, the paper reduction, summed over layers) likewise
    cfg = DistillConfig(task="classification", ce=0.0, attn_map=1.0)
    a, b = (Distiller(s, t, cfg)(x).losses["attn_map"].item() for x in (short, long))
    assert a > 1e-5 and a == pytest.approx(b, rel=1e-4)


# ---- activation clip (kd-qat-large-enc transformer/utils_quant.py SymQuantizer, layerwise=True) ---------------------
def _paper_sym_quant(x, clip, bits=8):
    """utils_quant.py:28-29 clip, :32 max|x| over the tensor, :43-44 s = (2^(b-1)-1)/max, round(x*s)/s."""
    x = torch.where(x < clip, x, torch.tensor(clip))
    x = torch.where(x > -clip, x, torch.tensor(-clip))
    s = (2 ** (bits - 1) - 1) / torch.max(torch.abs(x))
    return torch.round(x * s).div(s)


def _act_input(seed, shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2.0
    x.view(-1)[:3] = torch.tensor([2.5, -2.5, 7.0])  # exactly at the clip, and far outside
    return x.to(dtype)


def test_activation_clip_reference_matches_paper_and_backward():
    from pyquant import reference
    from pyquant.formats import ActivationQuantConfig
    from pyquant.ops import fake_quant_activation, use_backend

    spec = ActivationQuantConfig(clip=2.5, granularity="tensor")
    x = _act_input(0, (3, 5, 17))
    ref = reference.fake_quant_activation(x, spec)
    paper = _paper_sym_quant(x, 2.5)
    step = 2.5 / 127
    # same grid point everywhere (ties are measure zero for random inputs); q * s vs q / (1/s) may differ in an ulp
    assert torch.equal(torch.round(ref / step), torch.round(paper / step))
    assert torch.allclose(ref, paper, rtol=1e-6, atol=1e-7)
    assert ref.abs().max() <= 2.5 + 1e-6
    # gradient: the op's straight-through backward vs autograd on a reference STE graph: identity where
    # |x| < clip, zero at and beyond +-clip (utils_quant.py:57-58 use ge / le)
    xg = x.clone().requires_grad_()
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with use_backend("reference"):
        (g_op,) = torch.autograd.grad(fake_quant_activation(xg, spec), xg, go)
    xr = x.clone().requires_grad_()
    inside = torch.where(xr.abs() < 2.5, xr, xr.detach().clamp(-2.5, 2.5))
    ste = inside + (reference.fake_quant_activation(xr.detach(), spec) - inside).detach()
    (g_ref,) = torch.autograd.grad(ste, xr, go)
    assert torch.equal(g_op, g_ref)
    assert g_op.view(-1)[:3].eq(0).all() and g_op.ne(0).sum() > 0
    assert torch.equal(reference.fake_quant_activation_backward(go, x, spec), g_ref)
    # no clip: unchanged behaviour (plain STE)
    (g0,) = torch.autograd.grad(fake_quant_activation(xg, ActivationQuantConfig()), xg, go)
    assert torch.equal(g0, go)


@pytest.mark.parametrize("gran", ["tensor", "token"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_clip_triton_matches_reference(monkeypatch, gran, sym, dtype):
    from pyquant import reference
    from pyquant.formats import ActivationQuantConfig
    from pyquant.ops import fake_quant_activation, last_backend, use_backend
    from pyquant.ops._dispatch import backend_status
    from pyquant.ops.fake_quant import _kernels

    if not backend_status("triton", torch.device("cpu"), explicit=True)[0]:
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU")
    km = _kernels()
    real = km._empty
    monkeypatch.setattr(km, "_empty", lambda shape, dt, dev: real(shape, dt, dev).fill_(float("nan")))  # poisoned
    spec = ActivationQuantConfig(clip=2.5, granularity=gran, symmetric=sym)
    x = _act_input(1, (3, 4, 37), dtype)
    x[1, 2] *= 40  # one token far beyond the clip
    with use_backend("triton"):
        out = fake_quant_activation(x, spec)
        assert last_backend() == ("fake_quant_activation", "triton")
    assert out.dtype == dtype and not out.isnan().any()
    assert torch.equal(out, reference.fake_quant_activation(x, spec))


def test_activation_clip_bad_input():
    from pyquant.formats import ActivationQuantConfig

    for bad in (0, -1.0, float("inf"), True, "2.5"):
        with pytest.raises(ValueError, match="clip"):
            ActivationQuantConfig(clip=bad)
    assert ActivationQuantConfig.from_dict(ActivationQuantConfig(clip=2.5).to_dict()).clip == 2.5


def test_activation_clip_opcheck():
    import pyquant.ops  # noqa: F401  (registers the torch.library ops)

    x = _act_input(3, (2, 3, 40)).requires_grad_()
    torch.library.opcheck(torch.ops.pyquant.fake_quant_activation.default, (x, True, False, 2.5))


# ---- the "kdqat-emnlp22" preset --------------------------------------------------------------------------------------
def _paper_twn(w, clip=2.5, layerwise=True):
    """kd-qat-large-enc transformer/utils_quant.py:129-152 (TwnQuantizer.forward)."""
    w = torch.where(w < clip, w, torch.tensor(clip))
    w = torch.where(w > -clip, w, torch.tensor(-clip))
    if layerwise:
        m = w.norm(p=1).div(w.nelement())
        thres = 0.7 * m
        pos, neg = (w > thres).float(), (w < -thres).float()
        mask = (w.abs() > thres).float()
        alpha = (mask * w).abs().sum() / mask.sum()
        return alpha * pos - alpha * neg
    n = w[0].nelement()
    m = w.norm(p=1, dim=1).div(n)
    thres = (0.7 * m).view(-1, 1).expand_as(w)
    pos, neg = (w > thres).float(), (w < -thres).float()
    mask = (w.abs() > thres).float()
    alpha = ((mask * w).abs().sum(dim=1) / mask.sum(dim=1)).view(-1, 1)
    return alpha * pos - alpha * neg


def _paper_bert_logits(model, ids, am, tt):
    """The paper's quantized BERT forward (modeling_quant.py:53-473, eval mode) written with the HF model's weights."""
    bert = model.bert
    q8 = lambda x: _paper_sym_quant(x, 2.5)  # noqa: E731
    lin = lambda mod, x: F.linear(q8(x), _paper_twn(mod.weight), mod.bias)  # utils_quant.py:265-283  # noqa: E731
    e = bert.embeddings
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    h = F.embedding(ids, _paper_twn(e.word_embeddings.weight, layerwise=False)) + e.position_embeddings(pos) \
        + e.token_type_embeddings(tt)
    h = e.LayerNorm(h)
    ext = (1.0 - am[:, None, None, :].float()) * -10000.0  # modeling_quant.py:441-443
    nh = model.config.num_attention_heads
    for layer in bert.encoder.layer:
        a = layer.attention.self
        heads = lambda x: x.view(*x.shape[:2], nh, -1).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(lin(a.query, h)), heads(lin(a.key, h)), heads(lin(a.value, h))
        q, k = q8(q), q8(k)  # :141-142
        p = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + ext, -1)
        ctx = (q8(p) @ q8(v)).permute(0, 2, 1, 3).reshape(h.shape)  # :153-156
        att = layer.attention.output.LayerNorm(lin(layer.attention.output.dense, ctx) + h)
        inter = F.gelu(lin(layer.intermediate.dense, att))
        h = layer.output.LayerNorm(lin(layer.output.dense, inter) + att)
    pooled = torch.tanh(lin(bert.pooler.dense, h[:, 0]))  # modeling_quant.py:318-323 (input quantized too)
    return model.classifier(pooled)


def test_twn_per_tensor_and_per_row_match_paper():
    from pyquant.formats import WeightQuantConfig
    from pyquant.ops import fake_quant_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(13, 40, generator=g) * 1.5  # some |w| > 2.5
    for gran, lw in (("tensor", True), ("channel", False)):
        spec = WeightQuantConfig(method="twn", granularity=gran, clip=2.5, scale_dtype="float32")
        assert torch.allclose(fake_quant_weight(w, spec), _paper_twn(w, layerwise=lw), rtol=1e-6, atol=1e-7), gran


def test_preset_model_matches_paper_forward_and_capture_keeps_quantization():
    from pyquant import QATConfig, prepare_qat
    from pyquant.distill.capture import capture_attention
    from pyquant.nn import QATEmbedding, QATLinear

    model = _bert(5)
    fp = _bert(5)
    rep = prepare_qat(model, QATConfig(preset="kdqat-emnlp22"))
    b = model.bert
    assert isinstance(b.embeddings.word_embeddings, QATEmbedding) and "bert.embeddings.word_embeddings" in rep.swapped
    assert type(b.embeddings.position_embeddings) is torch.nn.Embedding
    assert type(b.embeddings.token_type_embeddings) is torch.nn.Embedding
    assert type(model.classifier) is torch.nn.Linear and isinstance(b.pooler.dense, QATLinear)
    assert model.config._attn_implementation == "pyquant_qat"
    batch = _glue_batch(6, [9, 5, 3])
    ids, am = batch["input_ids"], batch["attention_mask"]
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
        want = _paper_bert_logits(model, ids, am, tt)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
        assert not torch.allclose(got, fp(input_ids=ids, attention_mask=am, token_type_ids=tt).logits, atol=1e-3)
        with capture_attention(model) as rec:  # the distillation path keeps the Q/K/V/P fake-quant
            cap = model(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
        assert torch.allclose(cap, got, rtol=1e-5, atol=1e-6) and len(rec) == 2
        q0 = rec[0].q  # recorded Q is the quantized one: on a 127-level grid
        step = q0.abs().max() / 127
        assert torch.allclose(q0 / step, torch.round(q0 / step), atol=1e-3)
    assert model.config._attn_implementation == "pyquant_qat"  # restored after capture


def test_preset_convert_packs_embedding_and_keeps_outputs():
    from pyquant import QATConfig, convert, prepare_qat
    from pyquant.nn import PackedEmbedding

    model = _bert(7)
    prepare_qat(model, QATConfig(preset="kdqat-emnlp22"))
    model.eval()
    batch = _glue_batch(8, [9, 5, 3])
    inp = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = model(**inp).logits
        emb_before = model.bert.embeddings.word_embeddings(inp["input_ids"])
    rep = convert(model)
    pe = model.bert.embeddings.word_embeddings
    assert isinstance(pe, PackedEmbedding) and "bert.embeddings.word_embeddings" in rep.swapped
    V, D = pe.num_embeddings, pe.embedding_dim
    assert pe.nbytes() == V * (-(-D // 64) * 16) + V * 4  # 2-bit codes (16-byte rows) + an fp32 scale per row
    with torch.no_grad():
        assert torch.equal(pe(inp["input_ids"]), emb_before)
        after = model(**inp).logits
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


def test_qat_embedding_gradient_zero_outside_clip():
    from pyquant.formats import WeightQuantConfig
    from pyquant.nn import QATEmbedding

    emb = torch.nn.Embedding(11, 8)
    with torch.no_grad():
        emb.weight[3, 0] = 4.0
    q = QATEmbedding(emb, WeightQuantConfig(method="twn", granularity="channel", clip=2.5, scale_dtype="float32"))
    q(torch.tensor([[3, 4]])).sum().backward()
    assert emb.weight.grad[3, 0] == 0 and emb.weight.grad[3, 1] == 1 and emb.weight.grad[5].abs().sum() == 0


def test_preset_bad_input():
    from pyquant import QATConfig, prepare_qat
    from pyquant.formats import ActivationQuantConfig, WeightQuantConfig

    with pytest.raises(ValueError, match=r"preset='nope' is invalid: expected one of \['kdqat-emnlp22'\]"):
        QATConfig(preset="nope")
    with pytest.raises(ValueError, match="contradicts"):
        QATConfig(preset="kdqat-emnlp22", weight=WeightQuantConfig())
    with pytest.raises(ValueError, match="contradicts"):
        QATConfig(preset="kdqat-emnlp22", activation=ActivationQuantConfig())
    with pytest.raises(ValueError, match="include"):
        QATConfig(preset="kdqat-emnlp22", include=("query",))
    c = QATConfig(preset="kdqat-emnlp22")
    assert QATConfig.from_dict(c.to_dict()) == c  # round trip: the resolved fields equal the preset's
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=50, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tied"):
        prepare_qat(tied, QATConfig(preset="kdqat-emnlp22"))
    assert not any("QAT" in type(m).__name__ for m in tied.modules())  # refused before anything was swapped


def test_preset_student_trains_under_distiller():
    from pyquant import QATConfig, prepare_qat
    from pyquant.distill import DistillConfig, Distiller

    s, t = _bert(0), _bert(1)
    prepare_qat(s, QATConfig(preset="kdqat-emnlp22"))
    cfg = DistillConfig(task="classification", ce=0.0, kd=1.0, hidden=1.0, attn_map=1.0, attn_output=1.0,
                        hidden_reduction="paper", attn_output_reduction="paper")
    out = Distiller(s, t, cfg)(_glue_batch(9, [9, 5, 3]))
    assert all(torch.isfinite(v) for v in out.losses.values()) and out.losses["attn_map"] > 0
    out.loss.backward()
    assert s.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert s.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


# ---- qat-glue: the paper's defaults, preset, periodic evaluation -----------------------------------------------------
def test_qat_glue_cli_preset_eval_every_best_and_last(tmp_path, capsys):
    import json

    from test_train import _glue_dir, _parse, _tiny_bert_dir

    from pyquant.train import cli

    model = _tiny_bert_dir(tmp_path)
    data = _glue_dir(tmp_path)
    out = tmp_path / "out"
    args = _parse("qat_glue", ["--task", "sst2", "--teacher", str(model), "--data-dir", str(data),
                               "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
                               "--preset", "kdqat-emnlp22", "--attention-kd", "both", "--no-progress"])
    assert cli.run_qat_glue(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in m["evals"]] == [2, 4]
    assert m["student_last"]["step"] == 4 and m["student_best"]["step"] in (2, 4)
    assert m["student_best"]["score"] >= m["student_last"]["score"] or m["student_best"]["step"] == 4
    d = m["run"]["distill"]
    assert d["ce"] == 0.0 and d["kd"] == 1.0 and d["hidden"] == 1.0 and d["attn_map"] == 1.0
    assert d["hidden_reduction"] == "paper" and d["attn_output_reduction"] == "paper" and m["run"]["preset"]
    # a preset with a contradicting option: refused before training (exit 2, nothing written)
    bad = _parse("qat_glue", ["--task", "sst2", "--teacher", str(model), "--data-dir", str(data),
                              "--output-dir", str(tmp_path / "o2"), "--preset", "kdqat-emnlp22", "--granularity",
                              "channel", "--no-progress"])
    capsys.readouterr()
    assert cli.run_qat_glue(bad) == 2
    assert "--granularity contradicts it" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_qat_glue_paper_defaults():
    from pyquant.train import recipes
    from pyquant.train.data import glue_task, paper_score

    want = {"cola": (16, 64, 50), "sst2": (32, 64, 100), "mrpc": (32, 128, 50), "stsb": (32, 128, 100),
            "rte": (32, 128, 20)}  # kd-qat-large-enc main.py:392-400
    for task, (bs, ml, ev) in want.items():
        t = glue_task(task)
        assert (t.batch_size, t.max_length, t.eval_every) == (bs, ml, ev), task
    dc = recipes.glue_distill_config("mrpc", kd=True)  # run_kd_qat_map.sh: gt 0, pred 1, rep 1, map 1
    assert (dc.ce, dc.kd, dc.hidden, dc.attn_map, dc.attn_output, dc.temperature) == (0, 1, 1, 1, 0, 1)
    gt = recipes.glue_distill_config("mrpc", kd=True, gt_loss=True)
    assert gt.ce == 1.0 and gt.ce_reduction == "sum"
    assert paper_score("mrpc", {"accuracy": 0.8, "f1": 0.9}) == (0.8, pytest.approx(0.85))
    assert paper_score("stsb", {"pearson": 0.8, "spearman": 0.6}) == (pytest.approx(0.7), pytest.approx(0.7))
    hist = [{"step": 1, "eval": {"accuracy": 0.5, "f1": 0.9}}, {"step": 2, "eval": {"accuracy": 0.7, "f1": 0.1}},
            {"step": 3, "eval": {"accuracy": 0.6, "f1": 0.6}}]
    bl = recipes.best_and_last("mrpc", hist)  # best by accuracy (main.py:856), reported as (f1 + acc) / 2
    assert bl["best"]["step"] == 2 and bl["best"]["score"] == pytest.approx(0.4) and bl["last"]["step"] == 3


def test_preset_ptq_quantize_and_packed_embedding_bad_input():
    from pyquant import QATConfig, quantize
    from pyquant.formats import WeightQuantConfig
    from pyquant.nn import PackedEmbedding, PackedLinear

    model = _bert(11)
    rep = quantize(model, QATConfig(preset="kdqat-emnlp22"))
    assert isinstance(model.bert.embeddings.word_embeddings, PackedEmbedding)
    assert isinstance(model.bert.pooler.dense, PackedLinear) and type(model.classifier) is torch.nn.Linear
    assert "bert.embeddings.word_embeddings" in rep.swapped and model.config._attn_implementation == "pyquant_qat"
    pe = model.bert.embeddings.word_embeddings
    with pytest.raises(TypeError, match="ids must be"):
        pe(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="embeddings are quantized per row"):
        QATConfig(embeddings=WeightQuantConfig(method="twn", granularity="tensor"))
    with pytest.raises(ValueError, match="qweight must be uint8"):
        PackedEmbedding(torch.zeros(3, 5, dtype=torch.uint8), torch.ones(3, 1), 8,
                        WeightQuantConfig(method="twn", granularity="channel"))


def test_distill_reduction_options_bad_input():
    from pyquant.distill import DistillConfig

    with pytest.raises(ValueError, match="ce_reduction"):
        DistillConfig(task="classification", ce_reduction="none")
    with pytest.raises(ValueError, match="ce_reduction='sum' is defined for task='classification' only"):
        DistillConfig(task="regression", ce_reduction="sum")
    for name in ("hidden_reduction", "attn_output_reduction"):
        with pytest.raises(ValueError, match=name):
            DistillConfig(task="classification", hidden=1.0, **{name: "mean"})
    d = DistillConfig(task="classification", kd=1.0, hidden=1.0, hidden_reduction="paper").to_dict()
    assert DistillConfig(**d).hidden_reduction == "paper"


def test_preset_on_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from pyquant import QATConfig, prepare_qat
    from pyquant.distill.capture import capture_attention
    from pyquant.nn import QATEmbedding, QATLinear

    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=97, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=40)
    model = RobertaForSequenceClassification(cfg).eval()
    batch = _glue_batch(12, [9, 5, 3])
    inp = {"input_ids": batch["input_ids"] + 2 * batch["attention_mask"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        fp = model(**inp).logits
    rep = prepare_qat(model, QATConfig(preset="kdqat-emnlp22"))
    assert isinstance(model.roberta.embeddings.word_embeddings, QATEmbedding)
    assert isinstance(model.classifier.dense, torch.nn.Linear) and not isinstance(model.classifier.dense, QATLinear)
    assert sum(n.endswith(".attention.self") for n in rep.swapped) == 0  # attention modules are marked, not swapped
    with torch.no_grad():
        got = model(**inp).logits
        with capture_attention(model) as rec:
            cap = model(**inp).logits
    assert len(rec) == 2 and torch.allclose(cap, got, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, fp, atol=1e-3)


def test_qat_glue_cli_bad_options_refused_before_loading(tmp_path, capsys):
    from test_train import _parse

    from pyquant.train import cli

    teacher = tmp_path / "teacher"  # a model directory (config.json), so the option checks are what refuses
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    base = ["--task", "rte", "--teacher", str(teacher), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    for extra, msg in ((["--eval-every", "-1"], "--eval-every=-1 is invalid"),
                       (["--no-kd", "--gt-loss"], "--gt-loss adds the ground-truth loss to KD"),
                       (["--preset", "kdqat-emnlp22", "--no-act-quant"], "--no-act-quant contradicts it"),
                       (["--preset", "kdqat-emnlp22", "--exclude", "pooler"], "--exclude contradicts it")):
        assert cli.run_qat_glue(_parse("qat_glue", base + extra)) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_qat_attention_quantizes_probabilities_after_dropout():
    """modeling_quant.py:141-156 in training mode: P = softmax(q8(Q) q8(K)^T / sqrt(d) + mask), dropout, then
    q8(dropout(P)) @ q8(V); the map the loss sees is P before dropout."""
    from pyquant.formats import ActivationQuantConfig
    from pyquant.nn.qat_attention import ATTR, qat_attention_forward

    g = torch.Generator().manual_seed(13)
    B, H, L, d = 2, 3, 7, 8
    q, k, v = (torch.randn(B, H, L, d, generator=g) * 1.5 for _ in range(3))
    keep = torch.ones(B, 1, L, L, dtype=torch.bool)
    keep[1, :, :, 5:] = False  # example 1 has 5 tokens
    mod = torch.nn.Module().train()
    setattr(mod, ATTR, ActivationQuantConfig(clip=2.5, granularity="tensor"))
    torch.manual_seed(0)
    out, probs = qat_attention_forward(mod, q, k, v, keep, scaling=d ** -0.5, dropout=0.3)
    q8 = lambda x: _paper_sym_quant(x, 2.5)  # noqa: E731
    ext = (~keep).float() * -10000.0
    p = torch.softmax(q8(q) @ q8(k).transpose(-1, -2) / d ** 0.5 + ext, -1)
    torch.manual_seed(0)
    pd = F.dropout(p, 0.3, training=True)
    want = (q8(pd) @ q8(v)).transpose(1, 2)
    assert torch.allclose(probs, p, atol=1e-6)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5), (out - want).abs().max()

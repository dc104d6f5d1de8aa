"""Distiller: each term equals the reference on the models' full outputs; the teacher stays frozen; bad pairs of
models are refused before any training."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from pyquant.distill import Distiller, DistillConfig
from pyquant.reference import distill as R


def _llama(seed, layers=2, vocab=53, hidden=32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _bert(seed, num_labels=2, layers=2):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _lm_batch(seed=0, B=3, L=9, V=53):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": ids.clone()}


def test_causal_lm_terms_match_reference():
    s, t = _llama(0), _llama(1)
    batch = _lm_batch()
    d = Distiller(s, t, DistillConfig(ce=0.5, kd=0.7, tsld=1.1, hidden=0.3, temperature=2.0, chunk_size=4))
    out = d(batch)
    out.loss.backward()
    g_fused = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
    s.zero_grad()
    so = s(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        to = t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    lab = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    sl, tl = so.logits[:, :-1], to.logits[:, :-1]
    ce = R.cross_entropy(sl, lab)
    kd = R.soft_cross_entropy(sl, tl, 2.0, labels=lab)
    ts = R.tsld_loss(sl, tl, lab, 10.0, 2.0)
    hm = R.hidden_mse(list(so.hidden_states), list(to.hidden_states))  # hidden_reduction="paper": no mask
    for k, v in (("ce", ce), ("kd", kd), ("tsld", ts), ("hidden", hm)):
        assert out.losses[k].item() == pytest.approx(v.item(), rel=1e-5), k
    ref = 0.5 * ce + 0.7 * kd + 1.1 * ts + 0.3 * hm
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ref.backward()
    for n, p in s.named_parameters():
        assert torch.allclose(g_fused[n], p.grad, rtol=1e-4, atol=1e-6), n
    assert all(p.grad is None for p in t.parameters())


def test_teacher_frozen_and_not_a_parameter():
    s, t = _llama(0), _llama(1)
    t.train()
    d = Distiller(s, t, DistillConfig(ce=1.0, kd=1.0))
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    d.train()
    assert s.training and not t.training
    assert {id(p) for p in d.parameters()} == {id(p) for p in s.parameters()}
    assert not any(k.startswith("_teacher") for k in d.state_dict())


def test_teacher_bf16():
    s, t = _llama(0), _llama(1)
    d = Distiller(s, t, DistillConfig(ce=1.0, tsld=1.0, teacher_dtype="bfloat16"))
    assert next(t.parameters()).dtype == torch.bfloat16
    out = d(_lm_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_classification_and_regression():
    s, t = _bert(0), _bert(1)
    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, 100, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    batch["attention_mask"][2, 5:] = 0
    out = Distiller(s, t, DistillConfig(task="classification", ce=1.0, kd=1.0, hidden=1.0, temperature=3.0))(batch)
    inp = {k: batch[k] for k in ("input_ids", "attention_mask")}
    so, to = s(**inp, output_hidden_states=True), t(**inp, output_hidden_states=True)
    assert out.losses["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(so.logits, batch["labels"]).item(),
                                                    rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(R.soft_cross_entropy(so.logits, to.logits, 3.0).item(), rel=1e-5)
    assert out.losses["hidden"].item() == pytest.approx(
        R.hidden_mse(list(so.hidden_states), list(to.hidden_states)).item(),  # hidden_reduction="paper": no mask
        rel=1e-5)
    sr, tr = _bert(3, num_labels=1), _bert(4, num_labels=1)
    batch["labels"] = torch.tensor([0.5, 3.0, 1.25, 4.0])
    out = Distiller(sr, tr, DistillConfig(task="regression", ce=1.0, kd=1.0))(batch)
    pr, pt = sr(**inp).logits.squeeze(-1), tr(**inp).logits.squeeze(-1)
    assert out.losses["ce"].item() == pytest.approx(((pr - batch["labels"]) ** 2).mean().item(), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(((pr - pt) ** 2).mean().item(), rel=1e-5)


def test_layer_map_for_different_depths():
    s, t = _bert(0, layers=2), _bert(1, layers=4)
    with pytest.raises(ValueError, match="layer_map"):
        Distiller(s, t, DistillConfig(task="classification", hidden=1.0))
    d = Distiller(s, t, DistillConfig(task="classification", ce=0.0, hidden=1.0, layer_map=(0, 2, 4)))
    batch = {"input_ids": torch.randint(0, 100, (2, 5)), "labels": torch.tensor([0, 1])}
    out = d(batch)
    so, to = s(input_ids=batch["input_ids"], output_hidden_states=True), t(input_ids=batch["input_ids"],
                                                                             output_hidden_states=True)
    hs, ht = so.hidden_states, to.hidden_states
    want = sum(((hs[j] - ht[i]) ** 2).mean() for j, i in enumerate([0, 2, 4]))
    assert out.losses["hidden"].item() == pytest.approx(want.item(), rel=1e-5)


def test_refuses_vocab_mismatch():
    with pytest.raises(ValueError, match="vocab_size"):
        Distiller(_llama(0, vocab=53), _llama(1, vocab=60), DistillConfig(ce=1.0, tsld=1.0))


def test_refuses_bad_config():
    with pytest.raises(ValueError, match="task"):
        DistillConfig(task="seq2seq")
    with pytest.raises(ValueError, match="tsld"):
        DistillConfig(task="classification", tsld=1.0)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        DistillConfig(ce=0.0)
    with pytest.raises(ValueError, match="attn_gamma"):
        DistillConfig(attn_map=1.0, attn_gamma=1.5)
    with pytest.raises(ValueError, match="teacher is None"):
        Distiller(_llama(0), None, DistillConfig(kd=1.0))
    with pytest.raises(TypeError, match="config"):
        Distiller(_llama(0), None, {"ce": 1.0})


def test_attention_kd_terms():
    pytest.importorskip("pyquant.distill.capture")
    s, t = _bert(0), _bert(1)
    batch = {"input_ids": torch.randint(0, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.tensor([1, 0])}
    batch["attention_mask"][0, 4:] = 0
    out = Distiller(s, t, DistillConfig(task="classification", ce=0.0, attn_map=1.0, attn_output=1.0))(batch)
    assert out.losses["attn_map"] > 0 and out.losses["attn_output"] > 0
    assert out.loss.item() == pytest.approx((out.losses["attn_map"] + out.losses["attn_output"]).item(), rel=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    mix = Distiller(s, t, DistillConfig(task="classification", ce=0.0, attn_map=1.0, attn_output=1.0,
                                        attn_gamma=0.25))(batch)
    want = 0.25 * mix.losses["attn_map"] + 0.75 * mix.losses["attn_output"]
    assert mix.losses["attn_kd"].item() == pytest.approx(want.item(), rel=1e-5)


def test_attention_score_term_matches_formula():
    """attn_score (the TernaryBERT baseline): sum over layers of the MSE of the scaled pre-softmax scores
    Q K^T / sqrt(d), key-padding entries zeroed in both maps, mean over all B*H*L*L entries -- computed here from the
    query/key projections' outputs, independently of the capture path."""
    pytest.importorskip("pyquant.distill.capture")
    s, t = _bert(0), _bert(1)
    batch = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "labels": torch.tensor([1, 0])}
    batch["attention_mask"][1, 5:] = 0

    def scores(model):
        qk = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: qk.__setitem__(n, o))
                 for n, m in model.named_modules() if n.endswith(("self.query", "self.key"))]
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for h in hooks:
            h.remove()
        out = []
        for n in sorted(k for k in qk if k.endswith("query")):
            q, k = qk[n], qk[n[:-len("query")] + "key"]
            B, L, D = q.shape
            q, k = (x.view(B, L, 4, D // 4).transpose(1, 2) for x in (q, k))
            out.append(q @ k.transpose(-1, -2) / (D // 4) ** 0.5)
        return out

    keep = batch["attention_mask"].bool()[:, None, None, :].expand(2, 4, 7, 7)
    want = sum(torch.where(keep, a - b, torch.zeros_like(a)).pow(2).mean() for a, b in zip(scores(s), scores(t)))
    d = Distiller(s, t, DistillConfig(task="classification", ce=0.0, attn_score=1.0))
    out = d(batch)
    assert out.losses["attn_score"].item() == pytest.approx(want.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-4)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    with pytest.raises(ValueError, match="attn_score"):
        DistillConfig(task="classification", attn_score=-1.0)

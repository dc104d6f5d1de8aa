"""The other seed methods as Distiller options, on tiny models: CR-ILD (last-layer Q/K/V relations, MixUp,
consistency), co-distillation (CTCD) and the weak-teacher KD weight schedule (DWT); bad options refused before
training."""
from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, DebertaV2Config, \
    DebertaV2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

from pyquant.distill import Distiller, DistillConfig
from pyquant.distill.crild import crild_stages, mixup_inputs, mixup_lambda, relation_loss
from pyquant.distill.progress import ProgressCallback
from pyquant.reference import distill as R


def _bert(seed, layers=2, hidden=32, heads=4):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64,
                     vocab_size=100, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.2)
    return BertForSequenceClassification(cfg)


def _batch(seed=0, B=4, L=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, L), generator=g)
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    am[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": torch.randint(0, 3, (B,), generator=g)}


def _tiny_llama_pair(vocab=53):
    torch.manual_seed(0)
    lcfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32)
    ids = torch.randint(0, vocab, (2, 7))
    return LlamaForCausalLM(lcfg), LlamaForCausalLM(lcfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                            "labels": ids}


def _paper_attention_kl(s_rel, t_rel, mask=None):
    """losses.py Attention_KL of jongwooko/CR-ILD for one layer: -mean(sum(softmax(T) * log_softmax(S)))."""
    L = s_rel.shape[-1]
    if mask is not None:
        ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
        s_rel, t_rel = s_rel + ext, t_rel + ext
    return -torch.mean(torch.sum(F.softmax(t_rel.reshape(-1, L), -1) * F.log_softmax(s_rel.reshape(-1, L), -1), -1))


def test_relation_loss_matches_released_formula():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 4, 6, 8, generator=g, requires_grad=True)
    xt = torch.randn(3, 4, 6, 16, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    rel = lambda x: x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])  # noqa: E731  (compute_relations)
    for m in (None, mask):
        got = relation_loss(xs, xt, m)
        torch.testing.assert_close(got, _paper_attention_kl(rel(xs), rel(xt), m), rtol=1e-5, atol=1e-6)
    got.backward()
    assert xs.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal B, H"):
        relation_loss(xs, xt[:, :2])


def test_mixup_inputs_and_lambda():
    model = _bert(0)
    b = _batch()
    lams = [mixup_lambda(torch.Generator().manual_seed(i)) for i in range(20)]
    assert all(0.5 <= x <= 1.0 for x in lams) and len(set(lams)) > 1
    inp = {k: b[k] for k in ("input_ids", "attention_mask")}
    out = mixup_inputs(model, inp, 0.7)
    e = model.get_input_embeddings()(b["input_ids"])
    torch.testing.assert_close(out["inputs_embeds"], 0.7 * e + 0.3 * e.flip(0))
    assert torch.equal(out["attention_mask"], ((b["attention_mask"] + b["attention_mask"].flip(0)) > 0).long())
    assert "input_ids" not in out


def _last_qkv(model, inputs):
    """Q, K, V [B, H, L, d] of the last BERT layer from hooks on its query/key/value Linears (the oracle)."""
    att = model.bert.encoder.layer[-1].attention.self
    got = {}
    hs = [getattr(att, n).register_forward_hook(lambda _m, _a, o, n=n: got.__setitem__(n, o))
          for n in ("query", "key", "value")]
    try:
        model(**inputs)
    finally:
        for h in hs:
            h.remove()
    h = model.config.num_attention_heads
    return [got[n].view(got[n].shape[0], got[n].shape[1], h, -1).transpose(1, 2) for n in ("query", "key", "value")]


def test_crild_relation_loss_on_captured_last_layer():
    student, teacher = _bert(1, layers=2), _bert(2, layers=3, hidden=48)
    b = _batch(3)
    inp = {k: b[k] for k in ("input_ids", "attention_mask")}
    d = Distiller(student, teacher, DistillConfig(task="classification", ce=0.0, crild=1.0, crild_mixup=False))
    out = d(b)
    with torch.no_grad():
        t_qkv = _last_qkv(teacher, inp)
    s_qkv = _last_qkv(student, inp)
    want = sum(relation_loss(s, t) for s, t in zip(s_qkv, t_qkv))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert set(out.losses) == {"crild", "total"}
    out.loss.backward()
    assert student.bert.encoder.layer[-1].attention.self.value.weight.grad.abs().sum() > 0  # V relation trains V
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_crild_mixup_consistency_follows_epoch():
    student, teacher = _bert(4), _bert(5, layers=3)
    b = _batch(6)
    d = Distiller(student, teacher, DistillConfig(task="classification", ce=0.0, crild=1.0,
                                                  crild_consistency=0.1, kd=0.5, temperature=2.0))
    d.set_progress(0, 10, epoch=0, num_epochs=2)
    torch.manual_seed(7)
    first = d(b)
    assert set(first.losses) == {"crild", "crild_consistency", "kd", "total"}
    assert first.losses["crild_consistency"] > 0
    torch.testing.assert_close(first.loss, first.losses["crild"] + 0.5 * first.losses["kd"])  # epoch 0: factor 0
    d.set_progress(5, 10, epoch=1, num_epochs=2)
    torch.manual_seed(7)  # same lambda
    second = d(b)
    torch.testing.assert_close(second.losses["crild"], first.losses["crild"])
    torch.testing.assert_close(second.loss, second.losses["crild"] + 0.5 * second.losses["kd"]
                               + 0.1 * 0.5 * second.losses["crild_consistency"])
    second.loss.backward()
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    s1, s2 = crild_stages()
    assert s1.crild == 1.0 and s1.ce == 0 and s2.kd == 1.0 and s2.temperature == 2.0 and not s2.crild


def test_crild_refuses_uncapturable_and_bad_options():
    torch.manual_seed(0)
    deb = DebertaV2ForSequenceClassification(DebertaV2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        num_labels=3))
    cfg = DistillConfig(task="classification", ce=0.0, crild=1.0)
    with pytest.raises(ValueError, match="AttentionInterface"):
        Distiller(deb, _bert(1), cfg)
    with pytest.raises(ValueError, match=r"crild: the teacher \(DebertaV2ForSequenceClassification\) computes"):
        Distiller(_bert(1), deb, cfg)
    with pytest.raises(ValueError, match="crild: the student must be a transformers model"):
        Distiller(torch.nn.Linear(4, 3), _bert(1), cfg)
    with pytest.raises(ValueError, match="num_attention_heads"):
        Distiller(_bert(1), _bert(2, hidden=48, heads=6), cfg)
    with pytest.raises(ValueError, match="MixUp"):
        DistillConfig(task="classification", ce=1.0, crild=1.0)
    with pytest.raises(ValueError, match="causal_lm"):
        DistillConfig(ce=0.0, crild=1.0)
    with pytest.raises(ValueError, match="crild cannot be combined"):
        DistillConfig(task="classification", ce=0.0, crild=1.0, hidden=1.0)
    with pytest.raises(TypeError):
        DistillConfig(task="classification", crild_w_ic=0.1)  # unknown option


def test_codistill_losses_gradients_and_one_optimizer():
    student, teacher = _bert(10), _bert(11, layers=3, hidden=48)
    teacher.requires_grad_(True)
    b = _batch(12)
    d = Distiller(student, teacher, DistillConfig(task="classification", ce=1.0, kd=1.0, temperature=2.0,
                                                  codistill=True))
    assert d.trainable_module() is d
    n_s, n_t = sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in d.parameters()) == n_s + n_t
    d.train()
    assert teacher.training  # not forced to eval
    out = d(b)
    inp = {k: b[k] for k in ("input_ids", "attention_mask")}
    zs, zt = student(**inp).logits, teacher(**inp).logits
    want = (F.cross_entropy(zs, b["labels"]) + F.cross_entropy(zt, b["labels"])
            + R.kl_divergence(zs, zt.detach(), 2.0) + R.kl_divergence(zt, zs.detach(), 2.0))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in (student.classifier.weight, teacher.classifier.weight)]
    out.loss.backward()
    # the student's KD gradient comes only from its own term: the teacher's logits are detached there
    g_t = teacher.classifier.weight.grad.clone()
    teacher.zero_grad()
    (F.cross_entropy(zt, b["labels"]) + R.kl_divergence(zt, zs.detach(), 2.0)).backward()
    torch.testing.assert_close(g_t, teacher.classifier.weight.grad, rtol=1e-5, atol=1e-7)
    opt.step()
    for p0, p in zip(before, (student.classifier.weight, teacher.classifier.weight)):
        assert not torch.equal(p0, p)


def test_codistill_refuses_frozen_teacher():
    teacher = _bert(13)
    teacher.requires_grad_(False)
    with pytest.raises(ValueError, match="teacher is frozen"):
        Distiller(_bert(14), teacher, DistillConfig(task="classification", ce=1.0, kd=1.0, codistill=True))
    with pytest.raises(ValueError, match="teacher is None"):
        Distiller(_bert(14), None, DistillConfig(task="classification", ce=1.0, kd=1.0, codistill=True))
    with pytest.raises(ValueError, match="ce > 0 and kd > 0"):
        DistillConfig(task="classification", ce=1.0, codistill=True)


@pytest.mark.slow
def test_codistill_cost_measured(capsys):
    """CPU, tiny BERT pair: step time and optimizer-state size of co-distillation vs one-way KD (printed)."""
    b = _batch(15, B=8, L=16)

    def run(codistill):
        student, teacher = _bert(16), _bert(17, layers=4, hidden=64)
        teacher.requires_grad_(True)
        d = Distiller(student, teacher, DistillConfig(task="classification", ce=1.0, kd=1.0, temperature=2.0,
                                                      codistill=codistill))
        params = list(d.trainable_module().parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for i in range(4):
            t0 = time.perf_counter()
            d(b).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
        return min(times[1:]), state, sum(p.numel() for p in teacher.parameters())

    t_kd, s_kd, _ = run(False)
    t_co, s_co, n_t = run(True)
    assert s_co - s_kd == 2 * 4 * n_t  # AdamW exp_avg + exp_avg_sq of the teacher, fp32
    with capsys.disabled():
        print(f"\n[codistill cost, CPU tiny BERT] step {t_kd * 1e3:.1f} ms (one-way KD) -> {t_co * 1e3:.1f} ms "
              f"(co-distillation), optimizer state +{(s_co - s_kd) / 1e6:.2f} MB (= 8 bytes x {n_t} teacher params)")


def test_dwt_schedule_and_progress():
    student, teacher = _bert(20), _bert(21, layers=3)
    b = _batch(22)
    cfg = DistillConfig(task="classification", ce=1.0, kd=1.0, kd_kind="kl", temperature=2.0, kd_schedule="linear")
    d = Distiller(student, teacher, cfg)
    assert d.kd_weight() == 4.0  # before any progress: the start value
    for step, w in ((0, 4.0), (5, 2.5), (10, 1.0)):
        d.set_progress(step, 10)
        assert abs(d.kd_weight() - w) < 1e-12
        out = d(b)
        torch.testing.assert_close(out.loss, out.losses["ce"] + w * out.losses["kd"])
    const = Distiller(student, teacher, DistillConfig(task="classification", ce=1.0, kd=1.5, kd_kind="kl"))
    const.set_progress(3, 10)
    assert const.kd_weight() == 1.5
    # causal LM: the chunked logit path takes the scheduled weight
    s_lm, t_lm, lb = _tiny_llama_pair()
    sched = Distiller(s_lm, t_lm, DistillConfig(ce=1.0, kd=1.0, kd_schedule="linear"))
    sched.set_progress(5, 10)
    fixed = Distiller(s_lm, t_lm, DistillConfig(ce=1.0, kd=2.5))
    torch.testing.assert_close(sched(lb).loss, fixed(lb).loss)
    # HF Trainer callback drives the same progress
    cb = ProgressCallback(d)
    cb.on_step_begin(SimpleNamespace(num_train_epochs=2), SimpleNamespace(global_step=5, max_steps=10, epoch=1.0),
                     None)
    assert d._progress == (0.5, 0.5) and abs(d.kd_weight() - 2.5) < 1e-12
    with pytest.raises(ValueError, match="kd_schedule"):
        DistillConfig(task="classification", kd=1.0, kd_schedule="cosine")
    with pytest.raises(ValueError, match="kd=0"):
        DistillConfig(task="classification", kd_schedule="linear")
    with pytest.raises(ValueError, match="total_steps"):
        d.set_progress(1, 0)
    with pytest.raises(TypeError, match="set_progress"):
        ProgressCallback(object())


def test_dwt_objective_is_the_papers_eq3():
    """Lee et al., Findings of ACL 2023 (DWT), Sec. 2: Eq. 1 H(q, p_theta) = -sum_c q(c) log p_theta(c); Eq. 2
    S = sum_c p_omega^tau(c) log(p_omega^tau(c) / p_theta^tau(c)); Eq. 3 L = alpha_h * H + alpha_s * S (no tau^2);
    Sec. 3 "Training setting": alpha_h : alpha_s = 1 : 1; Sec. 3.2: "Strong" alpha_s = 4, decay 4 -> 1 suggested."""
    student, teacher = _bert(40, layers=3), _bert(41, layers=1)  # the weak teacher is the smaller model
    b = _batch(42)
    inp = {k: b[k] for k in ("input_ids", "attention_mask")}
    tau = 2.0
    cfg = DistillConfig(task="classification", ce=1.0, kd=1.0, kd_kind="kl", temperature=tau, kd_t_squared=False)
    d = Distiller(student, teacher, cfg)
    out = d(b)
    zs = student(**inp).logits
    with torch.no_grad():
        zt = teacher(**inp).logits
    log_pt, log_ps = F.log_softmax(zt / tau, -1), F.log_softmax(zs / tau, -1)
    S = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()  # Eq. 2, mean over the batch
    H = F.cross_entropy(zs, b["labels"])  # Eq. 1 at tau = 1
    torch.testing.assert_close(out.losses["kd"], S.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, H + S, rtol=1e-5, atol=1e-7)
    # the default keeps Hinton's tau^2 factor: tau^2 times Eq. 2's term
    d2 = Distiller(student, teacher, DistillConfig(task="classification", ce=1.0, kd=1.0, kd_kind="kl",
                                                   temperature=tau))
    torch.testing.assert_close(d2(b).losses["kd"], tau ** 2 * S.detach(), rtol=1e-5, atol=1e-6)
    # "Strong" at the start of the suggested decay: alpha_s = 4
    lin = Distiller(student, teacher, dataclasses.replace(cfg, kd_schedule="linear"))
    lin.set_progress(0, 10)
    torch.testing.assert_close(lin(b).loss, H + 4 * S, rtol=1e-5, atol=1e-6)
    # causal LM (chunked logit path) and co-distillation take the same option
    s_lm, t_lm, lb = _tiny_llama_pair()
    a = Distiller(s_lm, t_lm, DistillConfig(ce=1.0, kd=1.0, kd_kind="kl", temperature=tau, kd_t_squared=False))(lb)
    w = Distiller(s_lm, t_lm, DistillConfig(ce=1.0, kd=1.0 / tau ** 2, kd_kind="kl", temperature=tau))(lb)
    torch.testing.assert_close(a.loss, w.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.losses["kd"], w.losses["kd"] / tau ** 2, rtol=1e-5, atol=1e-7)
    teacher.requires_grad_(True)
    co = Distiller(student, teacher, dataclasses.replace(cfg, codistill=True))(b)
    zt = teacher(**inp).logits
    want = H + F.cross_entropy(zt, b["labels"]) + (R.kl_divergence(zs, zt.detach(), tau)
                                                   + R.kl_divergence(zt, zs.detach(), tau)) / tau ** 2
    torch.testing.assert_close(co.loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kd_t_squared"):
        DistillConfig(task="classification", kd=1.0, kd_t_squared="no")


def test_train_loop_drives_progress_and_trains_both_in_codistill(tmp_path):
    from pyquant.train.loop import TrainConfig, train

    torch.manual_seed(0)
    lcfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=37, max_position_embeddings=32)
    s_lm, t_lm = LlamaForCausalLM(lcfg), LlamaForCausalLM(lcfg)
    d = Distiller(s_lm, t_lm, DistillConfig(ce=1.0, kd=1.0, kd_schedule="linear"))
    seen = []
    orig = d.set_progress
    d.set_progress = lambda *a, **k: (seen.append((a, k)), orig(*a, **k))[1]
    data = [{"input_ids": torch.randint(0, 37, (8,))} for _ in range(8)]
    from pyquant.train import data as D

    train(d, data, D.CausalCollator(), TrainConfig(output_dir=str(tmp_path / "a"), max_steps=3, batch_size=4,
                                                   progress=False))
    assert [a for a, _ in seen] == [(0, 3), (1, 3), (2, 3)] and seen[-1][1] == {"epoch": 1, "num_epochs": 2}
    # co-distillation: the loop's optimizer covers the teacher (trainable_module() is the Distiller)
    s, t = _bert(30), _bert(31)
    t.requires_grad_(True)
    co = Distiller(s, t, DistillConfig(task="classification", ce=1.0, kd=1.0, temperature=2.0, codistill=True))
    before = t.classifier.weight.detach().clone()
    b = _batch(32, B=8)
    rows = [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": b["labels"][i]}
            for i in range(8)]
    collate = lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}  # noqa: E731
    train(co, rows, collate, TrainConfig(output_dir=str(tmp_path / "b"), max_steps=2, batch_size=4, lr=1e-2,
                                         progress=False))
    assert not torch.equal(before, t.classifier.weight)


def test_qat_glue_recipe_co_distills_and_evaluates_the_student(tmp_path, monkeypatch):
    # the recipe behind benchmarks/reproduce_glue.py's codistill row: the teacher trains in place with the student
    # (one optimizer), and the periodic dev evaluations score the student, not the Distiller
    from pyquant.train import recipes
    from pyquant.train.loop import TrainConfig

    s, t = _bert(50), _bert(51, layers=3)
    t.requires_grad_(True)
    g = torch.Generator().manual_seed(52)
    ex = [{"input_ids": torch.randint(1, 100, (int(n),), generator=g).tolist(), "labels": i % 2}
          for i, n in enumerate(torch.randint(3, 9, (8,), generator=g))]
    seen = []
    real = recipes.evaluate_glue
    monkeypatch.setattr(recipes, "evaluate_glue", lambda m, *a, **k: (seen.append(m), real(m, *a, **k))[1])
    before = t.classifier.weight.detach().clone()
    dc = DistillConfig(task="classification", ce=1.0, kd=1.0, temperature=2.0, codistill=True)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, lr=1e-2, eval_every=1, progress=False)
    res = recipes.qat_glue(t, s, "rte", ex, 0, cfg, dc, None, None, dev_examples=ex[:4], preset="kdqat-emnlp22")
    assert len([h for h in res.history if h.get("eval")]) >= 2 and seen and all(m is s for m in seen)
    assert not torch.equal(before, t.classifier.weight)

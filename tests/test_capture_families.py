"""Attention capture on every family (tiny configs, no download): under capture the model's output equals its eager
output, and the recorded entries reproduce the eager ``output_attentions=True`` probabilities -- via the
AttentionInterface path (SDPA, or the eager math for Gemma-2's soft-cap; sliding-window, T5 position-bias and
cross-attention masks recorded) or the probability path (DeBERTa-v2, Falcon: attention inside their own modules).
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from pyquant.distill.capture import _log_probs, attention_kd_losses, capture_attention

L, V = 9, 97


def _cfg(cls, **kw):
    return cls(vocab_size=V, initializer_range=0.3, attn_implementation="eager", **kw)


DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=64)
BUILDERS = {
    # family: (model class, config) -- encoder-decoder families get decoder_input_ids
    "bert": (tf.BertModel, lambda: _cfg(tf.BertConfig, **DEC)),
    "roberta": (tf.RobertaModel, lambda: _cfg(tf.RobertaConfig, pad_token_id=1, **DEC)),
    "deberta-v2": (tf.DebertaV2Model, lambda: _cfg(tf.DebertaV2Config, relative_attention=True,
                                                   pos_att_type=["c2p", "p2c"], position_buckets=8, **DEC)),
    "llama": (tf.LlamaModel, lambda: _cfg(tf.LlamaConfig, num_key_value_heads=2, **DEC)),
    "qwen3": (tf.Qwen3Model, lambda: _cfg(tf.Qwen3Config, num_key_value_heads=2, head_dim=8, **DEC)),
    "mistral": (tf.MistralModel, lambda: _cfg(tf.MistralConfig, num_key_value_heads=2, sliding_window=4, **DEC)),
    "gemma2": (tf.Gemma2Model, lambda: _cfg(tf.Gemma2Config, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                            attn_logit_softcapping=1.5, **DEC)),
    "gpt-neox": (tf.GPTNeoXModel, lambda: _cfg(tf.GPTNeoXConfig, rotary_pct=0.5, **DEC)),
    "falcon": (tf.FalconModel, lambda: _cfg(tf.FalconConfig, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, alibi=True, bias=True)),
    "falcon-rope": (tf.FalconModel, lambda: _cfg(tf.FalconConfig, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, alibi=False,
                                                 new_decoder_architecture=True, num_kv_heads=2)),
    "t5": (tf.T5Model, lambda: _cfg(tf.T5Config, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)),
    "bart": (tf.BartModel, lambda: _cfg(tf.BartConfig, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=64)),
}
PATH = {"deberta-v2": "probabilities", "falcon": "probabilities", "falcon-rope": "probabilities"}


def _build(family, seed):
    cls, cfg = BUILDERS[family]
    torch.manual_seed(seed)
    return cls(cfg()).eval()


def _inputs(model, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, L), generator=g)
    am = torch.ones(3, L, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 3:] = 0
    inp = dict(input_ids=ids, attention_mask=am)
    if model.config.is_encoder_decoder:
        inp["decoder_input_ids"] = torch.randint(3, V, (3, 5), generator=g)
    return inp


def _eager_maps(out):
    """(name, probability map) in call order: encoder layers, then per decoder layer self and cross."""
    if getattr(out, "encoder_attentions", None) is not None:
        maps = [("enc", p) for p in out.encoder_attentions]
        for d, c in zip(out.decoder_attentions, out.cross_attentions):
            maps += [("dec", d), ("cross", c)]
        return maps
    return [("self", p) for p in out.attentions]


def _entry_probs(e):
    lp, _ = _log_probs(e, 1.0, detach=True)
    return lp.exp()


def _hidden(out):
    return out.last_hidden_state


@pytest.mark.parametrize("family", list(BUILDERS))
def test_capture_output_and_maps_equal_eager(family):
    model = _build(family, 0)
    inp = _inputs(model, 1)
    am = inp["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inp, output_attentions=True)
    maps = _eager_maps(ref)
    with torch.no_grad(), capture_attention(model) as rec:
        out = model(**inp)
    assert rec.path == PATH.get(family, "interface")
    assert model.config._attn_implementation == "eager"  # restored
    assert getattr(out, "attentions", None) is None  # the probability path strips the maps it forced
    if model.config.is_encoder_decoder:
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.encoder_last_hidden_state[am], ref.encoder_last_hidden_state[am],
                                   rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.last_hidden_state[am], ref.last_hidden_state[am], rtol=1e-5, atol=1e-5)
    assert len(rec) == len(maps) > 0
    for e, (kind, p) in zip(rec, maps):
        got = _entry_probs(e)
        assert got.shape == p.shape, (e.name, kind)
        rows = am if kind in ("self", "enc") else torch.ones(p.shape[0], p.shape[2], dtype=torch.bool)
        torch.testing.assert_close(got.transpose(1, 2)[rows], p.float().transpose(1, 2)[rows], rtol=1e-5,
                                   atol=1e-6, msg=f"{family} {e.name}")
        if rec.path == "interface":
            assert e.v is not None and e.v.shape[2] == e.k.shape[2]
    if family == "gemma2":
        assert all(e.softcap == 1.5 for e in rec)
    if family in ("mistral", "gemma2"):  # the sliding window reaches the recorded mask
        assert any(e.attn_mask is not None for e in rec)


def _oracle_paper(p_s, p_t, rows):
    term = torch.where(p_t > 0, p_t * (torch.log(p_t) - torch.log(p_s.clamp_min(1e-38))), torch.zeros_like(p_t))
    # reduction "paper" (kd-qat-large-enc main.py l. 743/748/752): per (example, head) the sum over its valid query
    # rows divided by that example's own number of valid rows, then the mean over B x H
    n = rows.sum(-1).clamp_min(1)[:, None]
    return ((term.sum(-1) * rows[:, None, :]).sum(-1) / n).mean()


@pytest.mark.parametrize("family", ["deberta-v2", "gemma2", "t5"])
def test_explicit_map_loss_matches_eager_maps_and_trains(family):
    student, teacher = _build(family, 2), _build(family, 3)
    inp = _inputs(student, 4)
    am = inp["attention_mask"].bool()
    with torch.no_grad():
        p_t = _eager_maps(teacher(**inp, output_attentions=True))
    p_s = _eager_maps(student(**inp, output_attentions=True))
    want = 0.0
    for (kind, ps), (_, pt) in zip(p_s, p_t):
        rows = am if kind in ("self", "enc") else torch.ones(ps.shape[0], ps.shape[2], dtype=torch.bool)
        want = want + _oracle_paper(ps.float(), pt.float(), rows)
    with torch.no_grad(), capture_attention(teacher) as t_rec:
        teacher(**inp)
    with capture_attention(student) as s_rec:
        student(**inp)
    got = attention_kd_losses(s_rec, t_rec, output_weight=0.0)["attn_map"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert got.item() > 1e-4
    got.backward()
    g = [p.grad for n, p in student.named_parameters() if p.grad is not None]
    assert g and any(x.abs().sum() > 0 for x in g)


def _captured_pair(family, seed):
    student, teacher = _build(family, seed), _build(family, seed + 1)
    inp = _inputs(student, seed + 2)
    with torch.no_grad(), capture_attention(teacher) as t_rec:
        teacher(**inp)
    with capture_attention(student) as s_rec:
        student(**inp)
    return s_rec, t_rec


def test_deberta_records_attention_output():
    s_rec, t_rec = _captured_pair("deberta-v2", 5)
    assert all(e.output is not None and e.output.shape == (3, L, 32) for e in s_rec)
    got = attention_kd_losses(s_rec, t_rec)
    assert got["attn_output"].item() > 0


def test_probability_path_refuses_temperature():
    s_rec, t_rec = _captured_pair("falcon", 8)
    with pytest.raises(ValueError, match="temperature"):
        attention_kd_losses(s_rec, t_rec, temperature=2.0, output_weight=0.0)


@pytest.mark.parametrize("family", ["deberta-v2", "falcon"])
def test_distiller_attention_kd_runs_on_non_sdpa_families(family):
    """Through the Distiller (causal LMs take the fused base-model path): the loss matches a direct capture and
    trains the student."""
    from pyquant.distill import Distiller, DistillConfig

    cls = {"deberta-v2": tf.DebertaV2ForSequenceClassification, "falcon": tf.FalconForCausalLM}[family]
    torch.manual_seed(0)
    student = cls(BUILDERS[family][1]())
    torch.manual_seed(1)
    teacher = cls(BUILDERS[family][1]())
    inp = _inputs(student, 2)
    task = "classification" if family == "deberta-v2" else "causal_lm"
    labels = torch.tensor([0, 1, 0]) if task == "classification" else inp["input_ids"]
    d = Distiller(student, teacher, DistillConfig(task=task, ce=0.0, attn_map=1.0))
    student.eval()
    out = d({**inp, "labels": labels})
    with torch.no_grad(), capture_attention(teacher) as t_rec:
        teacher(**inp)
    with torch.no_grad(), capture_attention(student) as s_rec:
        student(**inp)
    torch.testing.assert_close(out.losses["attn_map"], attention_kd_losses(s_rec, t_rec, output_weight=0.0)["attn_map"],
                               rtol=1e-5, atol=1e-7)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

"""Attention capture through transformers' AttentionInterface: the model output is unchanged, and the losses from the
captured Q/K/outputs equal the ones computed from eager ``output_attentions=True`` maps (loss and student gradients),
on tiny BERT and tiny Llama (GQA) configs with padding in the batch.
"""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from pyquant.distill.capture import AttentionRecord, _decode_mask, attention_kd_losses, capture_attention
from pyquant.ops import use_backend
from pyquant.ops._dispatch import triton_interpret

L = 13


def _bert(seed, hidden=64):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=64, initializer_range=0.2,
                     attn_implementation="sdpa")
    return BertModel(cfg, add_pooling_layer=False).eval()


def _llama(seed, hidden=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=64, initializer_range=0.2,
                      attn_implementation="sdpa")
    return LlamaModel(cfg).eval()


def _gpt2(seed, hidden=64):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return GPT2Model(cfg).eval()


FAMILIES = {
    # family: (builder, output-module selector for the eager oracle's hooks, causal)
    "bert": (_bert, lambda m: [layer.attention.output for layer in m.encoder.layer], False),
    "llama": (_llama, lambda m: [layer.self_attn for layer in m.layers], True),
    "gpt2": (_gpt2, lambda m: [block.attn for block in m.h], True),
}


def _batch(seed, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (3, L), generator=g)
    am = torch.ones(3, L, dtype=torch.long)
    am[1, 9:] = 0  # right padding
    am[2, 4:] = 0
    if left:  # left padding (decoder batches): padding query rows see no key under the causal mask
        am = am.flip(1)
    return ids, am


def _eager_oracle(model, outputs_of, ids, am):
    """Eager run with output_attentions=True: (per-layer probability maps, per-layer attention sub-layer outputs)."""
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for m in outputs_of(model)]
    model.set_attn_implementation("eager")
    try:
        res = model(input_ids=ids, attention_mask=am, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    return list(res.attentions), outs, res.last_hidden_state


def _oracle_losses(p_s_layers, p_t_layers, o_s, o_t, am):
    """The documented losses from materialized maps: KL over keys (P_T > 0), padding query rows excluded, each
    example's sum / its own number of tokens, mean over B x H ("paper"), summed over layers; output MSE over
    non-padding tokens."""
    total_map = 0.0
    for p_s, p_t in zip(p_s_layers, p_t_layers):
        term = torch.where(p_t > 0, p_t * (torch.log(p_t) - torch.log(p_s.clamp_min(1e-38))), torch.zeros_like(p_t))
        rows = term.sum(-1) * am.bool()[:, None, :]
        total_map = total_map + (rows.sum(-1) / am.sum(1)[:, None]).mean()
    total_out = 0.0
    m = am.bool()
    for a, b_ in zip(o_s, o_t):
        total_out = total_out + ((a - b_.detach()) ** 2)[m].mean()
    return total_map, total_out


BACKENDS = ["reference"] + (["triton"] if triton_interpret() or torch.cuda.is_available() else [])


@pytest.mark.parametrize("family,backend,left", [(f, b, False) for f in ("bert", "llama") for b in BACKENDS]
                         + [("llama", "reference", True), ("gpt2", "reference", False)])
def test_capture_matches_eager_output_attentions(family, backend, left):
    build, outputs_of, causal = FAMILIES[family]
    student, teacher = build(1), build(2)
    ids, am = _batch(3, left)

    # oracle: eager maps (differentiable) for the student, eager maps for the teacher
    p_s, o_s, _ = _eager_oracle(student, outputs_of, ids, am)
    with torch.no_grad():
        p_t, o_t, _ = _eager_oracle(teacher, outputs_of, ids, am)
    want_map, want_out = _oracle_losses(p_s, p_t, o_s, o_t, am)
    want_map.backward(retain_graph=True)
    g_map = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    want_out.backward()
    g_out = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    # capture path (SDPA inside), model output unchanged
    with torch.no_grad():
        ref_out = student(input_ids=ids, attention_mask=am).last_hidden_state
    with torch.no_grad(), capture_attention(teacher) as t_rec:
        teacher(input_ids=ids, attention_mask=am)
    with capture_attention(student) as s_rec:
        out = student(input_ids=ids, attention_mask=am).last_hidden_state
    assert student.config._attn_implementation == "sdpa" and teacher.config._attn_implementation == "sdpa"
    valid = am.bool()
    torch.testing.assert_close(out[valid], ref_out[valid], rtol=1e-5, atol=1e-5)
    assert len(s_rec) == len(t_rec) == 2
    for e in s_rec:
        assert e.causal is causal
        assert torch.equal(e.key_padding_mask, am.bool())
        assert e.output is not None and e.output.shape == (3, L, 64)
        assert e.q.shape == (3, 4, L, 16) and e.k.shape == (3, 2 if family == "llama" else 4, L, 16)

    with use_backend(backend):
        got = attention_kd_losses(s_rec, t_rec)
        torch.testing.assert_close(got["attn_map"], want_map, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["attn_output"], want_out, rtol=1e-4, atol=1e-6)
        assert got["attn_map"].item() > 1e-3 and got["attn_output"].item() > 1e-3
        assert len(s_rec) == 0 and len(t_rec) == 0  # recorded tensors freed
        got["attn_map"].backward(retain_graph=True)
    for n, g in g_map.items():
        p = dict(student.named_parameters())[n]
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-6 + 1e-3 * g.abs().max().item(), msg=n)
    student.zero_grad()
    got["attn_output"].backward()
    for n, g in g_out.items():
        p = dict(student.named_parameters())[n]
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-6 + 1e-3 * g.abs().max().item(), msg=n)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_teacher_equals_student_gives_zero(family):
    build, _, _ = FAMILIES[family]
    model = build(5)
    ids, am = _batch(6)
    with torch.no_grad(), capture_attention(model) as t_rec:
        model(input_ids=ids, attention_mask=am)
    with capture_attention(model) as s_rec:
        model(input_ids=ids, attention_mask=am)
    got = attention_kd_losses(s_rec, t_rec, gamma=0.3)
    assert abs(got["attn_map"].item()) < 1e-6 and abs(got["attn_output"].item()) < 1e-10
    assert abs(got["attn_kd"].item()) < 1e-6


def test_unified_mix_weights_layer_map_and_no_padding():
    teacher, student = _llama(7), _llama(8)
    ids = torch.randint(0, 100, (2, L))

    def run():
        with torch.no_grad(), capture_attention(teacher) as t:
            teacher(input_ids=ids)
        with capture_attention(student) as s:
            student(input_ids=ids)
        return s, t

    s, t = run()
    assert s[0].key_padding_mask is None and s[0].causal  # no padding: SDPA's is_causal path, mask None
    base = attention_kd_losses(s, t)
    s, t = run()
    mix = attention_kd_losses(s, t, gamma=0.25)
    torch.testing.assert_close(mix["attn_kd"], 0.25 * base["attn_map"] + 0.75 * base["attn_output"])
    s, t = run()
    w = attention_kd_losses(s, t, map_weight=2.0, output_weight=0.5)
    torch.testing.assert_close(w["attn_kd"], 2.0 * base["attn_map"] + 0.5 * base["attn_output"])
    s, t = run()
    swapped = attention_kd_losses(s, t, layer_map=[1, 0])
    assert not torch.allclose(swapped["attn_map"], base["attn_map"])
    s, t = run()
    with pytest.raises(ValueError, match="layer_map"):
        attention_kd_losses(s, t, layer_map=[0, 2])
    s, t = run()
    with pytest.raises(ValueError, match="gamma"):
        attention_kd_losses(s, t, gamma=1.5)
    with pytest.raises(TypeError, match="student_record"):
        attention_kd_losses([], t)


def test_mismatched_padding_between_student_and_teacher_raises():
    teacher, student = _bert(9), _bert(10)
    ids, am = _batch(11)
    am2 = am.clone()
    am2[0, -1] = 0
    with torch.no_grad(), capture_attention(teacher) as t_rec:
        teacher(input_ids=ids, attention_mask=am2)
    with capture_attention(student) as s_rec:
        student(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match="different padding"):
        attention_kd_losses(s_rec, t_rec)
    assert isinstance(s_rec, AttentionRecord) and len(s_rec) == 0


def test_decode_mask_forms():
    b, n = 2, 6
    kpm = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    tri = torch.ones(n, n, dtype=torch.bool).tril()
    bidir = kpm[:, None, None, :].expand(b, 1, n, n)
    assert _decode_mask(None, b, n, n, True, "cpu") == (None, True, None)
    assert _decode_mask(None, b, 1, n, True, "cpu") == (None, False, None)  # one query: SDPA drops is_causal
    got = _decode_mask(bidir, b, n, n, False, "cpu")
    assert torch.equal(got[0], kpm) and got[1] is False and got[2] is None
    # additive float causal mask (eager style), left padding: fully masked padding rows are ignored
    add = torch.zeros(b, 1, n, n).masked_fill(~(bidir & tri), torch.finfo(torch.float32).min)
    got = _decode_mask(add, b, n, n, True, "cpu")
    assert torch.equal(got[0], kpm) and got[1] is True and got[2] is None
    # a bias (ALiBi-like) or a per-head mask is not key padding + causal: kept as a general mask
    bias = add + torch.randn(b, 1, n, n)
    assert _decode_mask(bias, b, n, n, True, "cpu")[2] is bias
    per_head = torch.rand(b, 2, n, n) > 0.5
    assert _decode_mask(per_head, b, n, n, False, "cpu")[2] is per_head
    odd = bidir.clone()
    odd[0, 0, 1, 2] = False  # a hole in a valid row
    assert _decode_mask(odd, b, n, n, False, "cpu")[2] is odd
    with pytest.raises(ValueError, match="unexpected attention mask"):
        _decode_mask(kpm, b, n, n, False, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton_interpret(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gpu_capture_triton_matches_reference(family):
    build, _, _ = FAMILIES[family]
    student, teacher = build(12).cuda(), build(13).cuda()
    ids, am = _batch(14)
    ids, am = ids.cuda(), am.cuda()
    results = {}
    for backend in ("triton", "reference"):
        with torch.no_grad(), capture_attention(teacher) as t_rec:
            teacher(input_ids=ids, attention_mask=am)
        with capture_attention(student) as s_rec:
            student(input_ids=ids, attention_mask=am)
        with use_backend(backend):
            loss = attention_kd_losses(s_rec, t_rec)["attn_map"]
            loss.backward()
        grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        student.zero_grad()
        results[backend] = (loss.detach(), grads)
    (lt, gt), (lr, gr) = results["triton"], results["reference"]
    # fp32 on the GPU: the kernel runs IEEE fp32 dots, so it matches the reference closely
    torch.testing.assert_close(lt, lr, rtol=1e-4, atol=1e-6)
    for a, b in zip(gt, gr):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6 + 1e-3 * b.abs().max().item())

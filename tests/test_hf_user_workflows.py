"""What HF users do with a pyquant model beyond save -> reload, each a bug found by trying it:

* ``model.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` on a packed model must not re-round the packed scales
  and zero points (their dtype is part of the format): PackedLinear, PackedEmbedding and packed MoE experts keep
  them bit-exact, the FP tensors convert, and the model still saves and reloads;
* a tied LM head (``tie_word_embeddings``) stays full precision even when the user's ``exclude`` replaces the
  default one (else the reload breaks), and ``include`` naming it is refused;
* quantization at load time refuses the checkpoint-only fields of ``PyquantConfig`` it would silently ignore, and
  leaves the user's config object reusable;
* quantization at load time of a checkpoint with a tied head: transformers builds the model on the meta device
  *without* its ties (it ties after the load), so the head looked like any other Linear and a user
  ``modules_to_not_convert`` replacing the default one quantized it (the load then failed);
* ``.half()`` / ``.float()`` of a model *loaded* from a pyquant checkpoint: transformers refuses both for every
  quantized model although pyquant's casts keep the packed scales exact (and ``.to(dtype)`` was allowed);
* ``torch.save(model)`` (whole-model pickle) of a packed model after a forward failed ("Can't pickle local
  object"), and any pyquant model's pickle did not load back (its atomic ``save_pretrained`` was a bound method);
* ``python -m pyquant`` runs the CLI.
(NaN/Inf in a packed checkpoint's scales: ``tests/test_hf_checkpoint.py``.)
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyquant  # noqa: E402
from pyquant import QATConfig, WeightQuantConfig as W  # noqa: E402
from pyquant.convert import quantize  # noqa: E402
from pyquant.integrations.hf import PyquantConfig  # noqa: E402
from pyquant.nn import PackedLinear, QATLinear  # noqa: E402
from pyquant.nn.embedding import PackedEmbedding  # noqa: E402
from pyquant.nn.experts import is_packed_experts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_experts import _model as _moe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 96
ASYM = W(method="uniform", symmetric=False, granularity="group", group_size=32)


def _llama(tie=False, bias=False, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=32, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)).eval()


def _quant_state(model):
    """{name: tensor clone} of every packed scale / zero point in the model."""
    return {n: t.clone() for n, t in model.named_buffers() if n.endswith(("scale", "zero_point"))}


def _assert_state_kept(model, before):
    after = _quant_state(model)
    assert after.keys() == before.keys() and before
    for n, t in before.items():
        assert after[n].dtype == t.dtype, n
        assert torch.equal(after[n], t), n


@pytest.mark.parametrize("cast", ["bfloat16", "half", "to_bf16_then_float"])
def test_dtype_casts_keep_packed_linear_scales_bit_exact(cast):
    model = _llama(bias=True)
    quantize(model, ASYM)
    before = _quant_state(model)
    assert any(n.endswith("zero_point") for n in before)
    if cast == "bfloat16":
        model.to(torch.bfloat16)
        want = torch.bfloat16
    elif cast == "half":
        model.half()
        want = torch.float16
    else:
        model.to(torch.bfloat16).float()
        want = torch.float32
    _assert_state_kept(model, before)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLinear) and q.bias.dtype == want and q.qweight.dtype == torch.uint8
    assert model.model.norm.weight.dtype == want
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        assert model(ids).logits.dtype == want


def test_bf16_cast_model_saves_and_reloads_identically(tmp_path):
    model = _llama(bias=True)
    quantize(model, ASYM)
    model.to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    _assert_state_kept(again, _quant_state(model))
    # .to(bf16) also cast the rotary inv_freq buffer, which a load recomputes in fp32 (transformers' behaviour for
    # any model): cast the reloaded one the same way to compare logits
    again.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


def test_dtype_casts_keep_packed_embedding_scales_and_follow_the_output_dtype():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_labels=3)).eval()
    pyquant.prepare_qat(model, QATConfig(preset="kdqat-emnlp22"))
    pyquant.convert(model)
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, PackedEmbedding)
    s0 = emb.scale.clone()
    ids = torch.randint(0, 120, (2, 9))
    ref = emb(ids)
    model.to(torch.bfloat16)
    assert emb.scale.dtype == s0.dtype and torch.equal(emb.scale, s0)
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    model.float()
    assert emb(ids).dtype == torch.float32 and torch.equal(emb(ids), ref)


def test_dtype_casts_keep_packed_expert_scales_bit_exact():
    model = _moe("mixtral")
    pyquant.prepare_qat(model, QATConfig(weight=ASYM))
    pyquant.convert(model)
    experts = [m for m in model.modules() if is_packed_experts(m)]
    assert experts
    before = _quant_state(model)
    assert any("experts." in n for n in before)
    model.to(torch.bfloat16)  # the scales are fp16: a cast would re-round them
    _assert_state_kept(model, before)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


# ---- tied LM heads -----------------------------------------------------------------------------------------------
def test_a_tied_lm_head_stays_fp_when_exclude_replaces_the_default(tmp_path):
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = pyquant.prepare_qat(model, QATConfig(exclude=("mlp.down_proj",)))
    assert type(model.lm_head) is torch.nn.Linear and "lm_head" in report.kept
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pyquant.convert(model)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(again.model.layers[0].self_attn.q_proj, PackedLinear)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


@pytest.mark.parametrize("action", ["prepare_qat", "quantize"])
def test_include_naming_a_tied_head_is_refused(action):
    model = _llama(tie=True)
    fn = pyquant.prepare_qat if action == "prepare_qat" else quantize
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to the input embedding"):
        fn(model, QATConfig(include=("lm_head", "q_proj"), exclude=()))
    assert type(model.lm_head) is torch.nn.Linear  # nothing was swapped
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_an_untied_head_can_still_be_quantized_on_request():
    model = _llama(tie=False)
    pyquant.prepare_qat(model, QATConfig(include=("lm_head",), exclude=()))
    assert type(model.lm_head).__name__ == "QATLinear"


# ---- quantization at load time -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("modules", ["model.layers.0.self_attn.q_proj"]),
    ("module_overrides", {"model.layers.0.self_attn.q_proj": {"weight": {"method": "absmean"}}}),
])
def test_ptq_at_load_refuses_checkpoint_only_fields(tmp_path, field, value):
    _llama().save_pretrained(tmp_path / "fp")
    kw = {field: value}
    if field == "module_overrides":
        kw["modules"] = list(value)
    with pytest.raises(ValueError, match=r"PyquantConfig\.modules describes a saved pyquant checkpoint"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=PyquantConfig(**kw))


def test_ptq_at_load_leaves_the_users_config_reusable(tmp_path):
    _llama().save_pretrained(tmp_path / "fp")
    cfg = PyquantConfig(weight=ASYM)
    snapshot = copy.deepcopy(cfg.to_dict())
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert cfg.to_dict() == snapshot and cfg.modules is None
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.config.quantization_config.modules  # the loaded model's own config records what was swapped


def _ids(seed):
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---- PTQ at load time with a tied head ---------------------------------------------------------------------------
def test_ptq_at_load_keeps_a_tied_head_fp_when_modules_to_not_convert_replaces_the_default(tmp_path):
    fp = _llama(tie=True, seed=3)
    fp.save_pretrained(tmp_path / "fp")
    ref = copy.deepcopy(fp)
    quantize(ref, QATConfig(weight=ASYM, exclude=("mlp.down_proj",)))  # in process: the tied head stays FP
    assert type(ref.lm_head) is torch.nn.Linear
    cfg = PyquantConfig(weight=ASYM, modules_to_not_convert=["mlp.down_proj"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg).eval()
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie transformers makes after the load
    assert isinstance(model.model.layers[1].self_attn.q_proj, PackedLinear)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    ids = _ids(11)
    got = _logits(model, ids)
    assert torch.equal(got, _logits(ref, ids))
    model.save_pretrained(tmp_path / "q")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(_logits(again, ids), got)


def test_ptq_at_load_refuses_include_naming_a_tied_head(tmp_path):
    _llama(tie=True).save_pretrained(tmp_path / "fp")
    cfg = PyquantConfig(include=["lm_head", "q_proj"], modules_to_not_convert=[])
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to the input embedding"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)


def test_ptq_at_load_of_an_untied_head_still_quantizes_it_on_request(tmp_path):
    _llama(tie=False).save_pretrained(tmp_path / "fp")
    cfg = PyquantConfig(include=["lm_head"], modules_to_not_convert=[])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert isinstance(model.lm_head, PackedLinear)


# ---- casts of a reloaded model -----------------------------------------------------------------------------------
def test_a_reloaded_packed_model_takes_half_and_float(tmp_path):
    model = _llama(seed=4)
    quantize(model, ASYM)
    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.is_quantized
    before = _quant_state(again)
    assert again.half() is again
    assert again.model.norm.weight.dtype == torch.float16
    assert {n: (t.dtype, t) for n, t in _quant_state(again).items()}.keys() == before.keys()
    for n, t in _quant_state(again).items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n  # never re-rounded
    model.half()  # the in-process model cast the same way gives the same logits
    ids = _ids(5)
    got = _logits(again, ids)
    assert got.dtype == torch.float16 and torch.equal(got, _logits(model, ids))
    again.float()
    model.float()
    assert again.model.norm.weight.dtype == torch.float32
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_a_reloaded_qat_model_takes_float(tmp_path):
    model = _llama(seed=6).to(torch.bfloat16)
    pyquant.prepare_qat(model, QATConfig(weight=W(method="twn", learnable_scale=True)))
    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    again.float()
    q = again.model.layers[0].self_attn.q_proj
    assert isinstance(q, QATLinear) and q.weight.dtype == torch.float32 and q.weight_scale.dtype == torch.float32
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)  # loaded in fp32
    assert ref.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    ids = _ids(8)
    assert torch.equal(_logits(again.eval(), ids), _logits(ref.eval(), ids))


# ---- whole-model pickle ------------------------------------------------------------------------------------------
def _pickled(model, path):
    torch.save(model, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("state", ["packed", "qat", "reloaded"])
def test_torch_save_of_the_whole_model_round_trips(tmp_path, state):
    model = _llama(seed=9)
    if state == "qat":
        pyquant.prepare_qat(model, QATConfig(weight=ASYM))
    else:
        quantize(model, ASYM)
    if state == "reloaded":
        model.save_pretrained(tmp_path / "ckpt")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = _ids(10)
    want = _logits(model, ids)  # the forward caches a launch plan in every PackedLinear
    loaded = _pickled(model, tmp_path / "whole.pt")
    assert torch.equal(_logits(loaded, ids), want)
    # the loaded model's save_pretrained is its own (atomic, pyquant's) and writes a checkpoint that reloads
    loaded.save_pretrained(tmp_path / "again")
    assert not [f for f in os.listdir(tmp_path) if "pyquant-tmp" in f]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(_logits(again, ids), want)
    # a deep copy binds its save_pretrained to the copy, not to the original
    dup = copy.deepcopy(loaded)
    with torch.no_grad():
        dup.model.embed_tokens.weight.mul_(2)
    dup.save_pretrained(tmp_path / "dup")
    from_dup = _logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dup").eval(), ids)
    assert torch.equal(from_dup, _logits(dup, ids)) and not torch.equal(from_dup, want)


# ---- dequantize -----------------------------------------------------------------------------------------------------
def _gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).eval()


def _no_pyquant_layers(model):
    names = {type(m).__name__ for m in model.modules()}
    return not names & {"QATLinear", "PackedLinear", "QATEmbedding", "PackedEmbedding"}


@pytest.mark.parametrize("case", ["llama-packed", "llama-qat", "gpt2-packed", "gpt2-qat"])
def test_dequantize_in_process_gives_a_plain_model_with_the_effective_weights(tmp_path, case):
    arch, state = case.split("-")
    model = _llama(seed=12, bias=True) if arch == "llama" else _gpt2(seed=12)
    pyquant.prepare_qat(model, QATConfig(weight=ASYM))
    if state == "packed":
        pyquant.convert(model)
    ids = _ids(13)
    want = _logits(model, ids)
    assert pyquant.dequantize(model) is model
    assert _no_pyquant_layers(model)
    assert getattr(model.config, "quantization_config", None) is None
    if arch == "gpt2":  # Conv1D layers come back as Conv1D (their [in, out] state-dict layout)
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (64, 192)
    else:
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    model.save_pretrained(tmp_path / "dense")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert _no_pyquant_layers(again) and not getattr(again, "is_quantized", False)
    assert torch.equal(_logits(again, ids), got)


def test_model_dequantize_of_a_reloaded_checkpoint(tmp_path):
    model = _llama(seed=14, bias=True)
    quantize(model, ASYM)
    model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = _ids(15)
    want = _logits(again, ids)
    dense = again.dequantize()
    assert _no_pyquant_layers(dense) and not dense.is_quantized
    assert getattr(dense.config, "quantization_config", None) is None
    got = _logits(dense, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    dense.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in (tmp_path / "dense" / "config.json").read_text()


def test_dequantize_packed_embeddings():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_labels=3)).eval()
    pyquant.prepare_qat(model, QATConfig(embeddings=W(method="twn", granularity="channel", clip=2.5)))
    pyquant.convert(model)
    emb = model.bert.embeddings.word_embeddings
    ids = torch.randint(0, 120, (2, 9))
    rows = emb(ids)
    want = _logits(model, ids)
    pyquant.dequantize(model, dtype=torch.float32)
    assert type(model.bert.embeddings.word_embeddings) is torch.nn.Embedding
    assert torch.equal(model.bert.embeddings.word_embeddings(ids), rows)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-5)


def test_dequantize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="holds no pyquant layer"):
        pyquant.dequantize(_llama())
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        pyquant.dequantize(_llama(), dtype=torch.int8)
    moe = _moe("mixtral")
    pyquant.prepare_qat(moe, QATConfig(weight=ASYM))
    with pytest.raises(ValueError, match="MoE experts"):
        pyquant.dequantize(moe)


def test_python_dash_m_pyquant_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "pyquant", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: pyquant" in r.stdout and "finetune" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pyquant", "no-such-command"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "no-such-command" in (r.stderr + r.stdout)

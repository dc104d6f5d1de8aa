"""prepare_qat / convert / quantize on tiny HF models of every listed architecture (built from configs, no downloads)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from pyquant.convert import DEFAULT_EXCLUDE, QATConfig, SwapReport, convert, matches, prepare_qat, quantize  # noqa: E402
from pyquant.formats import ActivationQuantConfig, WeightQuantConfig  # noqa: E402
from pyquant.nn import PackedLinear, QATLinear  # noqa: E402

W = WeightQuantConfig
A = ActivationQuantConfig


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def _roberta():
    cfg = transformers.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=100, max_position_embeddings=70, pad_token_id=1, num_labels=2)
    return transformers.RobertaForSequenceClassification(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _opt():
    cfg = transformers.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                 vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=64,
                                 pad_token_id=1, bos_token_id=0, eos_token_id=0)
    return transformers.OPTForCausalLM(cfg)


def _decoder(name):
    def make():
        cfg = getattr(transformers, f"{name}Config")(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                                     max_position_embeddings=64)
        return getattr(transformers, f"{name}ForCausalLM")(cfg)
    return make


def _t5():
    cfg = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=100,
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


# (builder, QATConfig, FP layers expected to be kept): each architecture exercises another format
ARCHS = {
    "bert": (_bert, QATConfig(weight=W(method="twn"), activation=A()), {"bert.pooler.dense", "classifier"}),
    "roberta": (_roberta, QATConfig(weight=W(method="absmean", granularity="group", group_size=32)),
                {"classifier.dense", "classifier.out_proj"}),
    "gpt2": (_gpt2, QATConfig(weight=W(method="twn", learnable_scale=True), activation=A(symmetric=False)),
             {"lm_head"}),
    "opt": (_opt, QATConfig(weight=W(method="uniform", symmetric=False, granularity="group", group_size=32,
                                     learnable_scale=True)), {"lm_head"}),
    "llama": (_decoder("Llama"), QATConfig(weight=W(method="seq", levels=4), activation=A(granularity="tensor")),
              {"lm_head"}),
    "qwen2": (_decoder("Qwen2"), QATConfig(weight=W(method="absmean", learnable_scale=True, scale_grad="pact")),
              {"lm_head"}),
    "mistral": (_decoder("Mistral"), QATConfig(weight=W(method="twn", granularity="tensor")), {"lm_head"}),
    "t5": (_t5, QATConfig(weight=W(method="uniform", granularity="group", group_size=32), activation=A()),
           {"lm_head"}),
}


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in the second sequence
    if name == "t5":
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
    return dict(input_ids=ids, attention_mask=mask)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prepare_convert_architecture(arch, tmp_path):
    build, cfg, kept = ARCHS[arch]
    torch.manual_seed(0)
    model = build().eval()
    inputs = _inputs(arch)
    fp_out = model(**inputs)
    fp_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]

    report = prepare_qat(model, cfg)
    assert isinstance(report, SwapReport) and report.action == "prepare_qat"
    assert set(report.kept) == kept
    assert set(report.swapped) == set(candidates) - kept and report.count == len(report.swapped) > 0
    qat = {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}
    assert set(qat) == set(report.swapped)
    assert report.params_quantized == sum(m.weight.numel() for m in qat.values())
    assert 0 < report.fraction_quantized < 1 and "layers swapped" in str(report)

    qat_out = model(**inputs)
    assert type(qat_out) is type(fp_out) and qat_out.logits.shape == fp_out.logits.shape
    assert not torch.allclose(qat_out.logits, fp_out.logits, atol=1e-4)  # fake-quant is on
    # state dict: same keys and shapes (+ learnable scales); save_pretrained round-trips into a fresh FP model
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = {k for k in keys if k.endswith(("weight_scale", "weight_zero_point"))}
    assert {k: s for k, s in keys.items() if k not in extra} == fp_keys
    assert bool(extra) == cfg.weight.learnable_scale
    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path)
    name = next(iter(qat))
    assert torch.equal(fresh.get_submodule(name).weight, qat[name].weight.detach())

    # convert: packed effective weights == fake-quant weights (bit for bit), logits equal within fp tolerance
    w_hat = {n: m.fake_quant_weight().detach().float() for n, m in qat.items()}
    qat_logits = _logits(model, inputs)
    creport = convert(model)
    assert set(creport.swapped) == set(report.swapped) and creport.action == "convert"
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert set(packed) == set(qat) and not any(isinstance(m, QATLinear) for m in model.modules())
    for n, m in packed.items():
        assert torch.equal(m.dequantize(), w_hat[n]), n
    out = model(**inputs)
    assert type(out) is type(fp_out) and out.logits.shape == fp_out.logits.shape
    torch.testing.assert_close(out.logits, qat_logits, rtol=1e-4, atol=1e-4)


def test_quantize_ptq_equals_prepare_without_training():
    torch.manual_seed(0)
    base = _decoder("Llama")().eval()
    inputs = _inputs("llama")
    spec = W(method="twn", granularity="group", group_size=32)
    ptq = copy.deepcopy(base)
    r = quantize(ptq, spec)
    assert r.action == "quantize" and r.kept == ["lm_head"] and r.count == 14
    qat = copy.deepcopy(base)
    prepare_qat(qat, QATConfig(weight=spec))
    torch.testing.assert_close(_logits(ptq, inputs), _logits(qat, inputs), rtol=1e-4, atol=1e-4)
    gpt = _gpt2().eval()  # Conv1D path + an asymmetric per-tensor activation spec through the pre-hook
    q = copy.deepcopy(gpt)
    quantize(q, QATConfig(weight=W(method="absmean"), activation=A(symmetric=False, granularity="tensor")))
    prepare_qat(gpt, QATConfig(weight=W(method="absmean"), activation=A(symmetric=False, granularity="tensor")))
    torch.testing.assert_close(_logits(q, _inputs("gpt2")), _logits(gpt, _inputs("gpt2")), rtol=1e-4, atol=1e-4)


def test_include_exclude_patterns():
    assert matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert matches("model.layers.0.self_attn.q_proj", "layers.0.*")
    assert matches("lm_head.dense", "lm_head") and not matches("my_lm_head", "lm_head")
    assert not matches("model.layers.10.mlp.up_proj", "layers.1")
    model = _decoder("Llama")()
    r = prepare_qat(model, QATConfig(include=("layers.1", "q_proj"), exclude=("v_proj",)))
    assert set(r.swapped) == {"model.layers.0.self_attn.q_proj"} | {
        f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj",
                                        "mlp.up_proj", "mlp.down_proj")}
    assert "model.layers.1.self_attn.v_proj" in r.kept and "lm_head" not in r.swapped
    assert "lm_head" in DEFAULT_EXCLUDE


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def test_bad_input_leaves_model_untouched():
    model = _bert()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="include pattern 'q_proj' matches no module"):
        prepare_qat(model, QATConfig(include=("q_proj",)))
    with pytest.raises(ValueError, match="exclude pattern 'nope' matches no module"):
        prepare_qat(model, QATConfig(exclude=("nope",)))
    with pytest.raises(ValueError, match="matches no nn.Linear/Conv1D layer"):
        prepare_qat(model, QATConfig(include=("embeddings",)))
    # group 128: the MLP down-projections (in 128) fit, the attention layers (in 64) do not -> nothing is swapped
    with pytest.raises(ValueError, match=r"nothing was swapped\): bert.encoder.layer.0.attention.self.query: "
                                         r"in_features=64 is not divisible by group_size=128"):
        prepare_qat(model, QATConfig(weight=W(granularity="group", group_size=128)))
    assert _snapshot(model) == before
    with pytest.raises(TypeError, match="config must be a QATConfig"):
        prepare_qat(model, W())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_qat("bert")
    with pytest.raises(ValueError, match="holds no QATLinear"):
        convert(model)
    assert _snapshot(model) == before
    prepare_qat(model)
    with pytest.raises(ValueError, match="already holds .* QATLinear .*already prepared"):
        prepare_qat(model)
    with pytest.raises(ValueError, match="already holds"):
        quantize(model, W())
    convert(model)
    with pytest.raises(ValueError, match="already holds .* PackedLinear"):
        prepare_qat(model)


def test_qat_config_validation_and_round_trip():
    cfg = QATConfig(weight=W(method="uniform", symmetric=False, granularity="group", group_size=64),
                    activation=A(granularity="tensor"), include=("layers.*",), exclude=("lm_head", "score"))
    d = cfg.to_dict()
    assert QATConfig.from_dict(d) == cfg and QATConfig.from_json(cfg.to_json()) == cfg
    assert QATConfig.from_dict(QATConfig().to_dict()) == QATConfig()
    assert QATConfig().resolved_exclude == DEFAULT_EXCLUDE and QATConfig(exclude=()).resolved_exclude == ()
    with pytest.raises(TypeError, match="QATConfig.weight must be a WeightQuantConfig"):
        QATConfig(weight="twn")
    with pytest.raises(TypeError, match="QATConfig.activation must be an ActivationQuantConfig"):
        QATConfig(activation=8)
    with pytest.raises(ValueError, match="QATConfig.include has an invalid pattern"):
        QATConfig(include=("",))
    with pytest.raises(TypeError, match="QATConfig.exclude must be a tuple"):
        QATConfig(exclude=3)
    with pytest.raises(ValueError, match="unknown field"):
        QATConfig.from_dict({"bits": 2})


def test_tiny_qat_run_loss_decreases():
    torch.manual_seed(0)
    model = _gpt2()
    prepare_qat(model, QATConfig(weight=W(method="twn", learnable_scale=True), activation=A()))
    model.train()
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    scales = [m.weight_scale for m in model.modules() if isinstance(m, QATLinear)]
    assert scales and all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)


def test_gradient_checkpointing_and_ddp():
    torch.manual_seed(0)
    base = _decoder("Llama")()
    prepare_qat(base, QATConfig(weight=W(method="absmean", learnable_scale=True), activation=A()))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(base).train()
        if ckpt:  # renamed activation_checkpointing_enable in newer transformers
            (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("weight_scale" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)

    import os
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized by another test")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        m = copy.deepcopy(base).train()
        ddp = DDP(m)
        ddp(input_ids=ids, labels=ids).loss.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, grads[0][n], rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_torch_compile_prepared_model():
    """The whole prepared HF model compiles (custom ops trace through their fake implementations) and matches eager."""
    torch.manual_seed(0)
    model = _decoder("Llama")()
    prepare_qat(model, QATConfig(weight=W(method="absmean", learnable_scale=True), activation=A()))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    eager = model(input_ids=ids, labels=ids).loss
    (g_eager,) = torch.autograd.grad(eager, [model.model.layers[0].self_attn.q_proj.weight_scale])
    compiled = torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss
    (g_comp,) = torch.autograd.grad(compiled, [model.model.layers[0].self_attn.q_proj.weight_scale])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_shared_module_is_swapped_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = self.a  # the same layer under two names
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.b(self.a(x)))

    m = Tied()
    r = prepare_qat(m, QATConfig(exclude=("head",)))
    assert r.swapped == ["a"] and isinstance(m.a, QATLinear) and m.b is m.a
    convert(m)
    assert isinstance(m.a, PackedLinear) and m.b is m.a and isinstance(m.head, nn.Linear)
    assert m(torch.randn(3, 32)).shape == (3, 4)

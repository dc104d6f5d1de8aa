"""MoE experts: QAT coverage across families, QAT steps, convert keeps logits (fake-quant vs packed), PTQ, the Triton
grouped kernel inside a packed model, state dicts, bad input (nothing half-swapped), SwapReport coverage lines."""
from __future__ import annotations

import os

import pytest
import torch
import transformers as T
from torch import nn

import pyquant
from pyquant import QATConfig, WeightQuantConfig as W
from pyquant.nn.experts import is_packed_experts, is_qat_experts
from pyquant.ops import use_backend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_COMMON = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
FAMILIES = {
    "mixtral": lambda: T.MixtralConfig(**_COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2, head_dim=16),
    "olmoe": lambda: T.OlmoeConfig(**_COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": lambda: T.DeepseekV3Config(**{**_COMMON, "num_hidden_layers": 2, "num_key_value_heads": 4},
                                              intermediate_size=64, moe_intermediate_size=32, first_k_dense_replace=1,
                                              n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                              n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "gpt_oss": lambda: T.GptOssConfig(**_COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                      head_dim=16),  # transposed experts with biases and a clamped interleaved gate
}


def _model(family, dtype=torch.float32):
    cfg = FAMILIES[family]()
    cfg.pad_token_id = cfg.eos_token_id = cfg.bos_token_id = None
    return T.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def _router_params(model):
    return sum(p.numel() for n, m in model.named_modules() if n.endswith(("mlp.gate", "mlp.router", "shared_expert_gate"))
               for p in m.parameters(recurse=False) if p.dim() >= 2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_qat_covers_every_block_weight_and_convert_keeps_logits(family):
    model = _model(family)
    ids = torch.randint(0, 96, (2, 7))
    report = pyquant.prepare_qat(model, QATConfig(weight=W(method="twn", granularity="channel")))
    experts = [m for _, m in model.named_modules() if is_qat_experts(m)]
    assert experts, "no experts module was prepared"
    assert report.uncovered == []
    assert report.block_params_quantized + _router_params(model) == report.block_params  # only routers stay FP
    assert "block weights quantized" in str(report) and "WARNING" not in str(report)
    with torch.no_grad():
        fq = model(ids).logits
    pyquant.convert(model)
    assert all(is_packed_experts(m) for m in experts)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in model.named_parameters())
    with torch.no_grad():
        packed = model(ids).logits
    torch.testing.assert_close(packed, fq, rtol=1e-4, atol=1e-4 * fq.abs().max().item())


def test_packed_experts_equal_fake_quant_weights_bit_for_bit():
    model = _model("gpt_oss")
    pyquant.prepare_qat(model, QATConfig(weight=W(method="uniform", symmetric=False, granularity="group",
                                                  group_size=32)))
    ex = next(m for _, m in model.named_modules() if is_qat_experts(m))
    with torch.no_grad():
        want = {n: ex.pq_fake_quant(n).float().clone() for n in ex.pq_weight_names}
    pyquant.convert(model)
    for n, w in want.items():
        assert torch.equal(ex.pq_dequantize(n), w), n


def test_per_tensor_scales_are_per_expert():
    model = _model("mixtral")
    pyquant.prepare_qat(model, QATConfig(weight=W(method="twn", granularity="tensor")))
    ex = next(m for _, m in model.named_modules() if is_qat_experts(m))
    codes, s, _ = ex.pq_quantized("down_proj")
    assert s.shape == (4, 64, 1) and len(set(s[:, 0, 0].tolist())) == 4  # one scale per expert, 4 different ones
    assert (s == s[:, :1]).all()


def test_qat_steps_lower_the_loss_with_learnable_scales():
    torch.manual_seed(0)
    model = _model("qwen3_moe").train()
    pyquant.prepare_qat(model, QATConfig(weight=W(method="twn", granularity="channel", learnable_scale=True)))
    ex = next(m for _, m in model.named_modules() if is_qat_experts(m))
    ids = torch.randint(0, 96, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert ex.gate_up_proj.grad is not None and ex.gate_up_proj.grad.abs().sum() > 0  # STE to the master
        assert ex.down_proj_weight_scale.grad is not None and ex.down_proj_weight_scale.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert isinstance(ex.gate_up_proj, nn.Parameter)  # the forward restored the master weight


def test_ptq_quantize_experts_and_state_dict_round_trip():
    model = _model("olmoe")
    report = pyquant.quantize(model, W(method="absmean", granularity="group", group_size=32))
    assert report.uncovered == [] and any(is_packed_experts(m) for _, m in model.named_modules())
    other = _model("olmoe")
    pyquant.quantize(other, W(method="absmean", granularity="group", group_size=32))
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)
    third = _model("olmoe")
    pyquant.quantize(third, W(method="twn", granularity="channel"))
    with pytest.raises(ValueError, match="packed experts"):
        third.model.layers[0].mlp.experts.load_state_dict(model.model.layers[0].mlp.experts.state_dict())


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton grouped kernel through TRITON_INTERPRET=1")
def test_packed_model_triton_grouped_kernel_matches_reference():
    model = _model("mixtral")
    pyquant.quantize(model, W(method="twn", granularity="channel"))
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        with use_backend("triton", "reference"):
            tri = model(ids).logits
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_bad_input_is_refused_before_any_swap():
    model = _model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"experts.gate_up_proj: in_features=64 is not divisible by group_size=128"):
        pyquant.prepare_qat(model, QATConfig(weight=W(granularity="group", group_size=128)))
    assert not any(is_qat_experts(m) for _, m in model.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"experts.down_proj: the weight holds 1 NaN"):
        pyquant.quantize(model, W())
    assert not any(is_packed_experts(m) for _, m in model.named_modules())


def test_routing_indices_out_of_range():
    model = _model("mixtral")
    pyquant.quantize(model, W())
    ex = model.model.layers[0].mlp.experts
    h = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"expert ids outside \[0, 4\)"):
        ex(h, torch.tensor([[0, 4], [1, 2], [3, 0]]), torch.rand(3, 2))


def test_distiller_trains_a_moe_student():
    from pyquant.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    teacher = _model("mixtral")
    student = _model("mixtral")
    student.load_state_dict(teacher.state_dict())
    pyquant.prepare_qat(student, QATConfig())
    student.train()
    d = Distiller(student, teacher, DistillConfig(task="causal_lm", ce=1.0, tsld=1.0, attn_map=1.0))
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ids = torch.randint(0, 96, (2, 10))
    first = last = None
    for step in range(5):
        out = d({"input_ids": ids, "labels": ids})
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        first = out.loss.item() if first is None else first
        last = out.loss.item()
        assert set(out.losses) >= {"ce", "tsld", "attn_map"}
    assert last < first


def test_report_warns_about_uncovered_block_weights():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.mix = nn.Parameter(torch.randn(16, 16))  # a block weight no swap rule covers

        def forward(self, x):
            return self.proj(x) @ self.mix

    report = pyquant.prepare_qat(nn.Sequential(Block()))
    assert report.uncovered == ["0.mix"]
    assert report.block_params == 512 and report.block_params_quantized == 256
    assert "WARNING: block weights left full precision without an exclude pattern naming them: 0.mix" in str(report)


def test_bench_moe_smoke(capsys):
    from pyquant.bench import moe

    assert moe.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "reference-loop" in out and "nothing written" in out
    assert "smoke" not in moe.MOE_SHAPES  # the tiny case does not leak into the real shape table


def test_distiller_router_logit_kd():
    from pyquant.distill import DistillConfig, Distiller

    torch.manual_seed(0)
    teacher = _model("qwen3_moe")
    student = _model("qwen3_moe")
    student.load_state_dict(teacher.state_dict())
    ids = torch.randint(0, 96, (2, 8))
    d0 = Distiller(student, teacher, DistillConfig(task="causal_lm", ce=0.0, router=1.0))
    assert d0({"input_ids": ids, "labels": ids}).losses["router"].item() == pytest.approx(0.0, abs=1e-6)
    pyquant.prepare_qat(student, QATConfig())
    gate = student.model.layers[0].mlp.gate.weight
    with torch.no_grad():  # move the student's router so the two routings differ
        gate.add_(0.3 * torch.randn_like(gate))
    student.train()
    d = Distiller(student, teacher, DistillConfig(task="causal_lm", ce=0.0, router=1.0))
    opt = torch.optim.SGD([gate], lr=0.05)  # the router alone: its KD gradient must pull it back
    losses = []
    for _ in range(5):
        out = d({"input_ids": ids, "labels": ids})
        out.loss.backward()
        assert gate.grad is not None and gate.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(out.losses["router"].item())
    assert losses[-1] < losses[0], losses
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        dense = T.LlamaForCausalLM(T.LlamaConfig(**{**_COMMON, "intermediate_size": 64}))
        Distiller(dense, T.LlamaForCausalLM(dense.config), DistillConfig(task="causal_lm", router=1.0))(
            {"input_ids": ids, "labels": ids})

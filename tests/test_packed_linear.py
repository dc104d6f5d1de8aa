"""PackedLinear: PTQ from nn.Linear / Conv1D vs nn.Linear with the dequantized weight, from_qat, state_dict round
trip (and refusal of a mismatched spec), torch.compile, W2A8, and CUDA-graph capture on a GPU."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pyquant import reference
from pyquant.formats import ActivationQuantConfig, WeightQuantConfig, unpack_codes
from pyquant.nn import PackedLinear
from pyquant.ops import use_backend
from pyquant.ops._dispatch import last_backend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")

SPECS = [
    WeightQuantConfig(method="twn"),
    WeightQuantConfig(method="absmean", granularity="group", group_size=32),
    WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=64, scale_dtype="bfloat16"),
    WeightQuantConfig(method="seq", levels=4, granularity="tensor", scale_dtype="float32"),
    WeightQuantConfig(method="uniform", granularity="channel", clip=2.5),
]


def _dequant_linear(lin: nn.Linear, spec: WeightQuantConfig) -> nn.Linear:
    """nn.Linear holding the fp32 fake-quantized weight (the reference effective weight)."""
    ref = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(reference.fake_quant_weight(lin.weight.float(), spec))
        if lin.bias is not None:
            ref.bias.copy_(lin.bias.float())
    return ref


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("has_bias", [True, False])
def test_from_linear_matches_dequantized_linear(spec, has_bias):
    lin = nn.Linear(128, 37, bias=has_bias)
    m = PackedLinear.from_linear(lin, spec, dtype=torch.float32)
    assert m.qweight.dtype == torch.uint8 and m.scale.dtype == spec.torch_scale_dtype
    x = torch.randn(2, 5, 128)
    with use_backend("reference"):
        y = m(x)
    ref_lin = _dequant_linear(lin, spec)
    ref = ref_lin(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(m.dequantize(), ref_lin.weight.detach(), rtol=0, atol=0)


@pytest.mark.skipif(not INTERPRET, reason="the triton backend on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_linear_triton_backend(dtype):
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32)
    lin = nn.Linear(96, 50).to(dtype)
    m = PackedLinear.from_linear(lin, spec)
    assert m.bias.dtype == dtype
    x = torch.randn(3, 96).to(dtype)
    with use_backend("triton"):
        y = m(x)
    assert last_backend() == ("packed_matmul", "triton") and y.dtype == dtype
    ref = _dequant_linear(lin.float(), spec)(x.float())
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_from_conv1d_matches_linear():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 64)  # nf=24 outputs, nx=64 inputs, weight [64, 24]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    spec = WeightQuantConfig(method="absmean")
    m = PackedLinear.from_linear(conv, spec, dtype=torch.float32)
    assert (m.in_features, m.out_features) == (64, 24)
    x = torch.randn(4, 64)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    with use_backend("reference"):
        y = m(x)
    torch.testing.assert_close(y, _dequant_linear(lin, spec)(x), rtol=1e-5, atol=1e-5)


class _FakeQAT(nn.Module):
    """The interface PackedLinear.from_qat relies on (QATLinear provides it)."""

    def __init__(self, k, n, spec):
        super().__init__()
        self.weight_spec = spec
        self.weight = nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.randn(n, dtype=torch.bfloat16))

    def quantized_weight(self):
        return reference.quantize_weight(self.weight.detach().float(), self.weight_spec)


def test_from_qat_packs_the_fake_quantized_weight_exactly():
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32)
    qat = _FakeQAT(96, 20, spec)
    m = PackedLinear.from_qat(qat)
    assert m.bias.dtype == torch.bfloat16
    codes, s, z = qat.quantized_weight()
    assert torch.equal(unpack_codes(m.qweight, 96), codes)
    torch.testing.assert_close(m.dequantize(), reference.fake_quant_weight(qat.weight.detach().float(), spec),
                               rtol=0, atol=0)


def test_state_dict_round_trip_into_fresh_module():
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=64)
    m = PackedLinear.from_linear(nn.Linear(128, 30), spec, dtype=torch.float32)
    sd = m.state_dict()
    assert {"qweight", "scale", "zero_point", "bias", "_extra_state"} <= set(sd)
    fresh = PackedLinear(128, 30, bias=True, spec=spec, dtype=torch.float32)
    x = torch.randn(3, 128)
    with use_backend("reference"):
        assert not torch.equal(fresh(x), m(x))
        fresh.load_state_dict(sd)
        torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    for name in ("qweight", "scale", "zero_point", "bias"):
        assert torch.equal(getattr(fresh, name), getattr(m, name))


def test_converted_model_save_pretrained_round_trip(tmp_path):
    # safetensors stores tensors only: the spec must travel as a tensor, and a fresh converted model must load it.
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyquant.convert import QATConfig, convert, prepare_qat

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg)
    prepare_qat(model, QATConfig(weight=WeightQuantConfig(method="absmean", granularity="group", group_size=32)))
    convert(model)
    ids = torch.randint(0, 50, (2, 7))
    with use_backend("reference"):
        want = model(ids).logits
        model.save_pretrained(tmp_path)
        fresh = LlamaForCausalLM(cfg)
        prepare_qat(fresh, QATConfig(weight=WeightQuantConfig(method="absmean", granularity="group", group_size=32)))
        convert(fresh)
        assert not torch.equal(fresh(ids).logits, want)
        fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
        torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("other", [
    WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32),
    WeightQuantConfig(method="uniform", symmetric=True, granularity="group", group_size=64),
])
def test_state_dict_refuses_mismatched_spec(other):
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=64)
    sd = PackedLinear.from_linear(nn.Linear(128, 30), spec).state_dict()
    with pytest.raises((ValueError, RuntimeError), match="state dict holds a PackedLinear|size mismatch|Unexpected"):
        PackedLinear(128, 30, spec=other).load_state_dict(sd)


def test_state_dict_refuses_same_shapes_other_method():
    sd = PackedLinear.from_linear(nn.Linear(64, 8), WeightQuantConfig(method="twn")).state_dict()
    with pytest.raises(ValueError, match="state dict holds a PackedLinear with ternary-TWN"):
        PackedLinear(64, 8, spec=WeightQuantConfig(method="absmean")).load_state_dict(sd)


def test_state_dict_refuses_mismatched_act_spec():
    sd = PackedLinear.from_linear(nn.Linear(64, 8), act_spec=ActivationQuantConfig()).state_dict()
    with pytest.raises(ValueError, match="act_spec"):
        PackedLinear(64, 8).load_state_dict(sd)


def test_extra_repr_shows_format_and_granularity():
    r = repr(PackedLinear.from_linear(nn.Linear(128, 8), WeightQuantConfig(method="absmean", granularity="group",
                                                                           group_size=64)))
    assert "ternary-absmean" in r and "group64" in r and "in_features=128" in r
    assert "per-channel" in repr(PackedLinear.from_linear(nn.Linear(64, 8)))


def test_w2a8_forward_matches_reference():
    spec = WeightQuantConfig(method="twn", granularity="group", group_size=32)
    lin = nn.Linear(64, 20)
    m = PackedLinear.from_linear(lin, spec, dtype=torch.float32, act_spec=ActivationQuantConfig())
    x = torch.randn(4, 64) * 3
    with use_backend("reference"):
        y = m(x)
    assert last_backend() == ("packed_matmul_a8", "reference")
    xq = reference.fake_quant_activation(x, ActivationQuantConfig())
    ref = _dequant_linear(lin, spec)(xq)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bad", [
    dict(act_spec=ActivationQuantConfig(symmetric=False)),
    dict(act_spec=ActivationQuantConfig(granularity="tensor")),
])
def test_unsupported_act_spec_is_refused(bad):
    with pytest.raises(ValueError, match="act_spec"):
        PackedLinear(64, 8, **bad)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="in_features"):
        PackedLinear(100, 8, spec=WeightQuantConfig(granularity="group", group_size=64))
    with pytest.raises(TypeError, match="spec"):
        PackedLinear(64, 8, spec="twn")
    with pytest.raises(TypeError, match="nn.Linear"):
        PackedLinear.from_linear(nn.Conv2d(3, 3, 1))
    spec = WeightQuantConfig(method="uniform", symmetric=False)
    codes = torch.randint(0, 4, (8, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="zero_point"):
        PackedLinear.from_quantized(codes, torch.rand(8, 1), None, None, spec)
    with pytest.raises(ValueError, match="scale"):
        PackedLinear.from_quantized(codes, torch.rand(8, 2), torch.rand(8, 1), None, spec)
    with pytest.raises(ValueError, match="codes"):
        PackedLinear.from_quantized(codes, torch.rand(8, 1), None, None, WeightQuantConfig(method="twn"))


def test_backward_reaches_input_and_bias():
    spec = WeightQuantConfig(method="absmean", granularity="group", group_size=32)
    lin = nn.Linear(64, 12)
    m = PackedLinear.from_linear(lin, spec, dtype=torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 12)
    with use_backend("reference"):
        m(x).backward(g)
    ref = _dequant_linear(lin, spec)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_gives_the_same_result(backend):
    torch._dynamo.reset()
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32)
    m = PackedLinear.from_linear(nn.Linear(64, 24), spec, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), m)
    x = torch.randn(3, 7, 64)
    with use_backend("reference"):
        eager = model(x)
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# ---- the validated fast path (PackedMatmulPlan) ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("a8", [False, True], ids=["w2", "w2a8"])
def test_fast_path_equals_checked_path(spec, a8):
    act = ActivationQuantConfig() if a8 else None
    m = PackedLinear.from_linear(nn.Linear(128, 40), spec, dtype=torch.float32, act_spec=act)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        fast = m(x)  # builds the plan, then dispatches directly
        plan = m.__dict__["_fast_plan"]
        checked = plan.checked(x)  # the public op, arguments checked, through the custom op
        again = m(x[:, :2].transpose(0, 1))  # non-contiguous x on the cached plan
    torch.testing.assert_close(fast, checked, rtol=0, atol=0)
    torch.testing.assert_close(again, plan.checked(x[:, :2].transpose(0, 1)), rtol=0, atol=0)
    assert last_backend() == ("packed_matmul_a8" if a8 else "packed_matmul", "reference")
    assert m.__dict__["_fast_plan"] is plan  # validated once, reused


def test_fast_path_checks_x_like_the_checked_path():
    m = PackedLinear.from_linear(nn.Linear(64, 8), WeightQuantConfig(method="twn"), dtype=torch.float32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="last dimension must be in_features=64"):
            m(torch.randn(3, 65))
        with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
            m(torch.randn(3, 64, dtype=torch.float64))
        with pytest.raises(ValueError, match="x is empty"):
            m(torch.randn(0, 64))
        with pytest.raises(ValueError, match="x is on meta"):
            m(torch.randn(3, 64, device="meta"))


def test_fast_path_uses_autograd_op_when_grad_is_needed():
    m = PackedLinear.from_linear(nn.Linear(64, 8), WeightQuantConfig(method="twn"), dtype=torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    y = m(x)
    assert y.grad_fn is not None  # recorded through the custom op's autograd
    y.sum().backward()
    assert x.grad is not None and m.bias.grad is not None


def test_replaced_buffers_are_revalidated_never_trusted_stale():
    spec = WeightQuantConfig(method="absmean", granularity="group", group_size=32)
    m = PackedLinear.from_linear(nn.Linear(64, 8), spec, dtype=torch.float32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y0 = m(x)
        m.scale = m.scale * 2  # a new tensor: the plan must follow it
        torch.testing.assert_close(m(x) - m.bias, 2 * (y0 - m.bias))
        m.scale.data = m.scale.data.clone() / 2  # same object, new storage: rebuilt too
        torch.testing.assert_close(m(x), y0)
        m.qweight = torch.zeros(8, 16, dtype=torch.int8)  # wrong dtype slipped in by attribute assignment
        with pytest.raises(TypeError, match="qweight must be a 2-D torch.uint8"):
            m(x)


def test_bad_buffers_loaded_later_are_caught():
    spec = WeightQuantConfig(method="absmean", granularity="group", group_size=32)
    m = PackedLinear.from_linear(nn.Linear(64, 8), spec, dtype=torch.float32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        m(x)
    sd = m.state_dict()
    bad = dict(sd, scale=sd["scale"][:, :1].contiguous())  # [8, 1] instead of [8, 2]
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        m.load_state_dict(bad, assign=True)
    fresh = PackedLinear(64, 8, spec=spec, dtype=torch.float32)
    with torch.no_grad():
        fresh(x)  # plan built for the zero-initialized buffers
    fresh.load_state_dict(sd)
    assert "_fast_plan" in fresh.__dict__ and fresh.__dict__["_fast_plan"].matches(
        fresh.qweight, fresh.scale, fresh.zero_point, fresh.bias)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_fast_path_follows_backend_order_and_env_changes(monkeypatch):
    """The cached launch plans are keyed on the dispatch state: a new order / env value re-resolves the backend."""
    from pyquant.ops import _dispatch as D

    monkeypatch.delenv(D.ENV_VAR, raising=False)
    m = PackedLinear.from_linear(nn.Linear(64, 8), WeightQuantConfig(method="twn"), dtype=torch.float32)
    x = torch.randn(2, 64)
    calls = []
    monkeypatch.setitem(D._REGISTRY["packed_matmul"], "triton", D._Impl(  # a stand-in backend, counted
        lambda *a: calls.append(a) or torch.zeros(2, 8), None))
    monkeypatch.setattr(D, "backend_status", lambda b, device=None, explicit=False: (b != "cuda", "test"))
    with torch.no_grad():
        m(x)
        assert last_backend() == ("packed_matmul", "triton") and len(calls) == 1
        monkeypatch.setenv(D.ENV_VAR, "reference")  # read at call time, as by the checked path
        torch.testing.assert_close(m(x), m.__dict__["_fast_plan"].checked(x))
        assert last_backend() == ("packed_matmul", "reference") and len(calls) == 1
        monkeypatch.delenv(D.ENV_VAR)
        with use_backend("reference"):
            m(x)
            assert last_backend() == ("packed_matmul", "reference")
        assert torch.equal(m(x), torch.zeros(2, 8)) and len(calls) == 2


def test_env_reader_sees_every_environ_change(monkeypatch):
    from unittest import mock

    from pyquant.ops import _dispatch as D

    monkeypatch.setenv(D.ENV_VAR, "triton,reference")
    assert D._read_backend_env() == "triton,reference"
    with mock.patch.dict(os.environ, {D.ENV_VAR: "reference"}):
        assert D._read_backend_env() == "reference" and D.backend_order() == (("reference",), True)
    monkeypatch.delenv(D.ENV_VAR)
    assert D._read_backend_env() is None and D.backend_order() == (D.BACKENDS, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not D.triton_interpret()


def test_fast_path_shapes_and_plan_cache_bound():
    from pyquant.ops.packed_matmul import PackedMatmulPlan

    m = PackedLinear.from_linear(nn.Linear(32, 8), WeightQuantConfig(method="twn"), dtype=torch.float32)
    with torch.no_grad(), use_backend("reference"):
        for x in (torch.randn(32), torch.randn(5, 32), torch.randn(2, 3, 32), torch.randn(3, 2, 32)):
            y = m(x)
            assert y.shape == (*x.shape[:-1], 8)
            torch.testing.assert_close(y, m.__dict__["_fast_plan"].checked(x), rtol=0, atol=0)
        for rows in range(1, PackedMatmulPlan.MAX_PLANS + 10):  # varying prefill lengths: the cache stays bounded
            m(torch.randn(rows, 32))
        assert 0 < len(m.__dict__["_fast_plan"]._cache) <= PackedMatmulPlan.MAX_PLANS


@pytest.mark.skipif(not INTERPRET, reason="the Triton backend runs on CPU only under TRITON_INTERPRET=1")
def test_fast_path_triton_non_contiguous_buffer_is_never_stale():
    """A non-contiguous buffer is not copied once at bind time (it would go stale): in-place edits are seen."""
    spec = WeightQuantConfig(method="absmean", granularity="group", group_size=32)
    m = PackedLinear.from_linear(nn.Linear(64, 8), spec, dtype=torch.float32)
    m.scale = m.scale.t().contiguous().t()  # same values, column-major
    assert not m.scale.is_contiguous()
    x = torch.randn(3, 64)
    with torch.no_grad(), use_backend("triton"):
        y0 = m(x)
        assert last_backend() == ("packed_matmul", "triton")
        m.scale.mul_(2)  # in place: same object, same storage, the cached plan is kept
        y1 = m(x)
    torch.testing.assert_close(y1 - m.bias, 2 * (y0 - m.bias), rtol=1e-5, atol=1e-5)


def test_bound_gemv_workspace_per_stream(monkeypatch):
    """_cuda_ext.BoundGemv (the CUDA fast path, fake extension on CPU): the split-K workspace of the current stream,
    looked up again only when the stream changes, shared with packed_gemv's; none when the plan does not split."""
    import types

    from pyquant import _cuda_ext

    seen, stream = [], [7]
    fake = types.SimpleNamespace(packed_gemv=lambda x, q, s, z, b, gs, co, ws, mma: seen.append((gs, co, ws)) or x)
    monkeypatch.setattr(_cuda_ext, "load", lambda jit=None: fake)
    monkeypatch.setattr(_cuda_ext, "_workspaces", {})
    monkeypatch.setattr(_cuda_ext, "_current_stream", lambda device: stream[0])
    N, K, gs = 4096, 4096, 128
    q = torch.zeros(N, K // 4, dtype=torch.uint8)
    s = torch.ones(N, K // gs, dtype=torch.float16)
    split = next(M for M in range(1, 9) if _cuda_ext.plan(M, N, K)["workspace_bytes"])
    nosplit = next(M for M in range(1, 9) if not _cuda_ext.plan(M, N, K)["workspace_bytes"])
    bound = _cuda_ext.BoundGemv(split, q, s, None, None, gs, 1.0)
    x = torch.randn(split, K)
    bound(x), bound(x)
    ws = seen[0][2]
    assert seen[0][:2] == (gs, 1.0) and seen[1][2] is ws
    assert ws.numel() >= _cuda_ext.plan(split, N, K)["workspace_bytes"] and not ws.any()
    assert _cuda_ext.workspace(torch.device("cpu"), 7, 1) is ws  # the same buffer packed_gemv would use
    stream[0] = 9  # e.g. a CUDA-graph capture stream
    bound(x)
    assert seen[2][2] is not ws and seen[2][2] is _cuda_ext._workspaces[(torch.device("cpu"), 9)]
    _cuda_ext.BoundGemv(nosplit, q, s, None, None, gs, 1.0)(torch.randn(nosplit, K))
    assert seen[3][2] is None


def test_host_overhead_benchmark_adapter(monkeypatch):
    """benchmarks/test_host_overhead.py's no-op launch: the layer dispatches to 'cuda' and returns the no-op's output."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "test_host_overhead.py"
    mod_spec = importlib.util.spec_from_file_location("_pyquant_host_overhead_bench", path)
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    layer = bench.make_layer(64, 4160, WeightQuantConfig(method="twn"))
    out = torch.empty(3, 64, dtype=torch.bfloat16)
    noop = bench.NoopLaunch(monkeypatch, out)
    with torch.no_grad():
        y = layer(torch.randn(1, 3, 4160).to(torch.bfloat16))
        layer(torch.randn(3, 4160).to(torch.bfloat16))
    assert noop.calls == 2 and last_backend() == ("packed_matmul", "cuda")
    assert y.shape == (1, 3, 64) and y.data_ptr() == out.data_ptr()


# ---- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 4, 64])
def test_gpu_cuda_graph_and_compile(M):
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 cannot run CUDA tensors")
    spec = WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=128)
    lin = nn.Linear(1024, 768).cuda().to(torch.bfloat16)
    m = PackedLinear.from_linear(lin, spec)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    ref = _dequant_linear(lin.float(), spec)(x.float())
    y = m(x)  # warm-up: autotuning happens here, outside the capture
    torch.testing.assert_close(y.float(), ref, rtol=1.6e-2, atol=8e-3 * ref.abs().max().item())
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = m(static_x)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    # the split-K GEMV sums with fp32 atomics (order may vary), so compare with the dtype's tolerance
    torch.testing.assert_close(static_y.float(), m(x2).float(), rtol=1.6e-2, atol=1e-2)
    compiled = torch.compile(m)
    torch.testing.assert_close(compiled(x2).float(), m(x2).float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("spec", [
    WeightQuantConfig(method="uniform", symmetric=False, granularity="group", group_size=32, learnable_scale=True),
    WeightQuantConfig(method="twn", granularity="channel"),
    WeightQuantConfig(method="seq", levels=4, granularity="tensor", learnable_scale=True, scale_dtype="bfloat16"),
], ids=lambda s: s.describe())
def test_from_real_qatlinear_matches_its_forward(spec):
    from pyquant.nn import QATLinear

    qat = QATLinear(96, 24, bias=True, weight_spec=spec)
    with torch.no_grad():
        qat.weight.normal_()
        qat.bias.normal_()
        if qat.weight_scale is not None:  # move the learnable scale away from its init, as training would
            qat.weight_scale.mul_(1.0 + 0.2 * torch.rand_like(qat.weight_scale))
    m = PackedLinear.from_qat(qat, dtype=torch.float32)
    x = torch.randn(4, 96)
    with use_backend("reference"):
        y = m(x)
        ref = qat(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

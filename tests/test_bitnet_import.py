"""pyquant.from_bitnet: checkpoints saved by transformers' own BitNet integration load into PackedLinear.

Tiny Llama models (with biases) are built with transformers' ``replace_with_bitnet_linear`` for both ``linear_class``
variants, filled with random ternary weights and scales, and saved with ``save_pretrained`` (no download).
Effective weights must be bit-identical; logits are compared with HF's BitLinear/AutoBitLinear forward (run eagerly:
transformers wraps it in torch.compile) within a tolerance that only covers the activation rounding differences
documented in ``pyquant/integrations/bitnet.py`` (both quantize activations per token to int8 from the absmax).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import pyquant  # noqa: E402
from pyquant.integrations.bitnet import BITNET_SPEC  # noqa: E402
from pyquant.nn import PackedLinear  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations.bitnet import (  # noqa: E402
    AutoBitLinear, BitLinear, pack_weights, replace_with_bitnet_linear)
from transformers.utils.quantization_config import BitNetQuantConfig  # noqa: E402

V = 80


def _eager():
    return torch._dynamo.config.patch(disable=True)  # HF's BitNet layers are torch.compile'd


def _bitnet_model(linear_class: str):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=V, max_position_embeddings=32,
                                   attention_bias=True, mlp_bias=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    qc = BitNetQuantConfig(linear_class=linear_class, modules_to_not_convert=["lm_head"])
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    for mod in model.modules():
        if isinstance(mod, (BitLinear, AutoBitLinear)):
            n, k = mod.out_features, mod.in_features
            v = torch.randint(-1, 2, (n, k))
            ws = torch.rand(1) * 20 + 5
            bias = torch.randn(n) * 0.1
            if isinstance(mod, BitLinear):
                mod.weight, mod.weight_scale, mod.bias = pack_weights(v.clone()), ws, bias
            else:
                mod.weight = nn.Parameter(v.float(), requires_grad=False)
                mod.bias = nn.Parameter(bias, requires_grad=False)
                mod.weight_scale = 1 / ws
    model.config.quantization_config = qc
    return model


def _effective(mod) -> torch.Tensor:
    """HF's effective weight (what its forward multiplies the dequantized activations by), in fp32."""
    from transformers.integrations.bitnet import unpack_weights
    if isinstance(mod, BitLinear):
        with _eager():
            v = unpack_weights(mod.weight, dtype=torch.float32)
        return v / mod.weight_scale.float()
    return mod.weight.float() * mod.weight_scale.float()


_SAVED = {}


@pytest.fixture(scope="module", params=["bitlinear", "autobitlinear", "autobitlinear-packed"])
def bitnet(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def bitlinear(tmp_path_factory):
    return _saved("bitlinear", tmp_path_factory)


def _saved(variant, tmp_path_factory):
    if variant in _SAVED:
        return _SAVED[variant]
    torch.manual_seed(11)
    model = _bitnet_model(variant.split("-")[0])
    d = tmp_path_factory.mktemp(variant)
    model.save_pretrained(d)
    if variant == "autobitlinear-packed":  # the layout of the published checkpoints: weights packed as uint8
        sd = load_file(str(d / "model.safetensors"))
        for name, mod in model.named_modules():
            if isinstance(mod, AutoBitLinear):
                sd[f"{name}.weight"] = pack_weights(mod.weight.detach().to(torch.int8).clone())
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _SAVED[variant] = variant, model, d
    return _SAVED[variant]


def test_effective_weights_are_bit_identical_and_logits_match_hf(bitnet):
    variant, hf_model, d = bitnet
    model = pyquant.from_bitnet(d)
    hf_layers = {n: m for n, m in hf_model.named_modules() if isinstance(m, (BitLinear, AutoBitLinear))}
    ours = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert set(ours) == set(hf_layers) and len(ours) == 14
    for n, m in ours.items():
        assert m.spec == BITNET_SPEC and m.act_spec is not None  # ternary per-tensor fp32 scale, W2A8
        assert torch.equal(m.dequantize(), _effective(hf_layers[n])), n
        hb = hf_layers[n].bias.float()
        hb = hb * hf_layers[n].weight_scale.float() if isinstance(hf_layers[n], AutoBitLinear) else hb
        assert torch.equal(m.bias, hb), n  # AutoBitLinear scales its bias too
    ids = torch.randint(0, V, (2, 11))
    with _eager(), torch.no_grad():
        ref = hf_model(ids).logits
    with torch.no_grad():
        got = model(ids).logits
    # equal up to fp32 rounding: the activation codes are the same except at exact rounding ties (module doc)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max()
    assert model.config.quantization_config.state == "packed"
    assert not isinstance(model.lm_head, PackedLinear)


def test_imported_model_saves_as_a_pyquant_checkpoint(bitnet, tmp_path):
    _, _, d = bitnet
    model = pyquant.from_bitnet(d)
    model.save_pretrained(tmp_path / "pq")
    qc = json.loads((tmp_path / "pq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "pyquant" and "bitnet" not in qc and len(qc["modules"]) == 14
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pq")
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def _bad(d, tmp_path, config=None, tensors=None):
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    if config is not None:
        cfg = json.loads((bad / "config.json").read_text())
        config(cfg["quantization_config"])
        (bad / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(str(bad / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


L = "model.layers.1.mlp.gate_proj"


@pytest.mark.parametrize("case,match", [
    ("online", r"quantization_mode='online' is not supported"),
    ("rms_norm", r"use_rms_norm=True is not supported"),
    ("linear_class", r"linear_class='ternlinear' is not a BitNet layout"),
    ("not_bitnet", r"quant_method='gptq'"),
    ("code3", rf"{L}\.weight holds the 2-bit code 3"),
    ("shape", rf"unsupported BitNet layout: {L}\.weight is U8\[16, 64\], expected the packed \[128/4, 64\]"),
    ("scale", rf"unsupported BitNet layout: {L}\.weight_scale is F32\[2\]"),
    ("dtype", rf"{L}\.weight has dtype I32"),
    ("zero_scale", rf"{L}\.weight_scale=0\.0 is not a finite non-zero scale"),
])
def test_unsupported_bitnet_layouts_are_refused(bitlinear, tmp_path, case, match):
    _, _, d = bitlinear  # the layout checks are shared by both classes
    config = {
        "online": lambda qc: qc.__setitem__("quantization_mode", "online"),
        "rms_norm": lambda qc: qc.__setitem__("use_rms_norm", True),
        "linear_class": lambda qc: qc.__setitem__("linear_class", "ternlinear"),
        "not_bitnet": lambda qc: qc.__setitem__("quant_method", "gptq"),
    }.get(case)
    tensors = {
        "code3": lambda sd: sd.__setitem__(f"{L}.weight", sd[f"{L}.weight"] | 3),
        "shape": lambda sd: sd.__setitem__(f"{L}.weight", sd[f"{L}.weight"][:16].contiguous()),
        "scale": lambda sd: sd.__setitem__(f"{L}.weight_scale", torch.ones(2)),
        "dtype": lambda sd: sd.__setitem__(f"{L}.weight", sd[f"{L}.weight"].to(torch.int32)),
        "zero_scale": lambda sd: sd.__setitem__(f"{L}.weight_scale", torch.zeros(1)),
    }.get(case)
    with pytest.raises(ValueError, match=match):
        pyquant.from_bitnet(_bad(d, tmp_path, config, tensors))


def test_from_bitnet_refuses_a_quantization_config_argument(bitlinear):
    _, _, d = bitlinear
    with pytest.raises(ValueError, match="do not pass quantization_config"):
        pyquant.from_bitnet(d, quantization_config=pyquant.PyquantConfig())


@pytest.mark.parametrize("kw", [{"device_map": "auto"}, {"dtype": torch.bfloat16}], ids=["device_map", "bf16"])
def test_from_bitnet_takes_from_pretrained_options(bitlinear, kw):
    if "device_map" in kw:
        pytest.importorskip("accelerate")
    _, hf_model, d = bitlinear
    model = pyquant.from_bitnet(d, **kw)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLinear) and q.scale.dtype == torch.float32 and q.qweight.dtype == torch.uint8
    assert q.bias.dtype == kw.get("dtype", torch.float32)
    ids = torch.randint(0, V, (2, 7))
    with _eager(), torch.no_grad():
        ref = hf_model(ids).logits
        got = model(ids).logits.float()
    tol = 1e-5 if "dtype" not in kw else 5e-2  # bf16 activations/embeddings vs HF's fp32 model
    assert (got - ref).abs().max() <= tol * ref.abs().max()

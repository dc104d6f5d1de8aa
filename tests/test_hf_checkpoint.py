"""Ternary models as HF checkpoints: save_pretrained -> from_pretrained through the registered "pyquant" method.

The round trip reloads in a FRESH Python process (one subprocess reloads every saved model, so registration on
``import pyquant`` is really exercised, including ``import pyquant`` after transformers) for tiny Llama, Qwen2,
GPT-2 (Conv1D), OPT, BERT / RoBERTa classification and T5, in both states ("packed" and "qat"), with bit-identical
logits, PackedLinear built on the meta device, and QAT continuing to train exactly like the saved model.  The other
tests run in-process: device_map / low_cpu_mem_usage / dtype, PTQ at load time, bad checkpoints, atomic save.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import pyquant  # noqa: E402
from pyquant.convert import QATConfig, convert, prepare_qat, quantize  # noqa: E402
from pyquant.formats import ActivationQuantConfig, WeightQuantConfig  # noqa: E402
from pyquant.integrations.hf import FORMAT_VERSION, PyquantConfig  # noqa: E402
from pyquant.nn import PackedLinear, QATLinear  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
W, A = WeightQuantConfig, ActivationQuantConfig
V = 96  # vocabulary of the tiny models


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=32))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=32))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128, vocab_size=V,
        max_position_embeddings=32, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=0,
        dropout=0.0, attention_dropout=0.0))


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=V,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _roberta():
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=V,
        max_position_embeddings=40, pad_token_id=1, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2, vocab_size=V, decoder_start_token_id=0,
        dropout_rate=0.0))


# each architecture exercises another format / feature of the checkpoint
ARCHS = {
    "llama": (_llama, QATConfig(weight=W(method="twn"))),  # + a per-module override (see _build)
    "qwen2": (_qwen2, QATConfig(weight=W(method="absmean", granularity="group", group_size=64), activation=A())),
    "gpt2": (_gpt2, QATConfig(weight=W(method="uniform", symmetric=False, granularity="group", group_size=32))),
    "opt": (_opt, QATConfig(weight=W(method="seq", levels=4, learnable_scale=True))),
    "bert": (_bert, QATConfig(weight=W(method="twn", learnable_scale=True),
                              activation=A(symmetric=False, granularity="tensor"))),
    "roberta": (_roberta, QATConfig(weight=W(method="uniform", scale_dtype="bfloat16"))),
    "t5": (_t5, QATConfig(weight=W(method="twn", scale_dtype="float32"))),
}
TRAIN = ("llama", "gpt2", "opt")  # QAT continue-training checks (learned scales: opt)


def _inputs(arch: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 9), generator=g)
    d = {"input_ids": ids}
    if arch == "t5":
        d["decoder_input_ids"] = torch.randint(3, V, (2, 5), generator=g)
    return d


def _build(arch: str, state: str):
    make, qc = ARCHS[arch]
    torch.manual_seed(1234)
    model = make().eval()
    prepare_qat(model, qc)
    if arch == "llama":  # a module whose spec differs from the others -> module_overrides
        q = model.model.layers[0].mlp.down_proj
        lin = nn.Linear(q.in_features, q.out_features, bias=False)
        lin.weight = q.weight
        model.model.layers[0].mlp.down_proj = QATLinear.from_linear(lin, W(method="absmean", granularity="group",
                                                                             group_size=64), A())
    if state == "packed":
        convert(model)
    return model


def _train_losses(model, arch: str, steps: int = 3) -> list:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _inputs(arch, seed=7)
    losses = []
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


RELOAD = r"""
import json, sys, logging, io, os
import torch
torch.set_num_threads(int(os.environ["PQ_THREADS"]))
import transformers
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama, transformers.models.gpt2.modeling_gpt2  # noqa: warm up while
import transformers.models.t5.modeling_t5, transformers.models.bert.modeling_bert  # noqa: the parent saves
root, arches = sys.argv[1], json.loads(sys.argv[2])
sys.stdin.readline()  # the parent has saved every checkpoint
out = {}
# 1. without `import pyquant`: transformers does not know the method, warns and skips quantization
buf = io.StringIO()
h = logging.StreamHandler(buf)
transformers.utils.logging.get_logger("transformers.quantizers.auto").addHandler(h)
m = AutoModelForCausalLM.from_pretrained(os.path.join(root, "llama-packed"))
out["without_pyquant"] = {"q_proj": type(m.model.layers[0].self_attn.q_proj).__name__,
                          "warned": "Unknown quantization type, got pyquant" in buf.getvalue()}
# 2. import pyquant after transformers: registration happens at once
import pyquant
from pyquant.nn import PackedLinear
built_on = []
_init = PackedLinear.__init__
def rec(self, *a, **k):
    _init(self, *a, **k)
    built_on.append(self.qweight.device.type)
PackedLinear.__init__ = rec
from safetensors.torch import save_file
tensors = {}
for arch in arches:
    inputs = {k: torch.tensor(v) for k, v in json.load(open(os.path.join(root, arch + ".inputs.json"))).items()}
    for state in ("packed", "qat"):
        d = os.path.join(root, f"{arch}-{state}")
        cls = getattr(transformers, json.load(open(os.path.join(d, "config.json")))["architectures"][0])
        model = cls.from_pretrained(d)
        kinds = sorted({type(mod).__name__ for mod in model.modules() if type(mod).__name__ in
                        ("PackedLinear", "QATLinear")})
        with torch.no_grad():
            tensors[f"{arch}-{state}"] = model(**inputs).logits.contiguous()
        out[f"{arch}-{state}"] = {"kinds": kinds, "is_quantized": bool(getattr(model, "is_quantized", False))}
        if state == "qat" and os.path.exists(os.path.join(root, arch + ".losses.json")):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-2)
            batch = {k: torch.tensor(v) for k, v in json.load(open(os.path.join(root, arch + ".train.json"))).items()}
            losses = []
            for _ in range(3):
                o = model(**batch, labels=batch["input_ids"])
                opt.zero_grad(); o.loss.backward(); opt.step(); losses.append(o.loss.item())
            out[f"{arch}-{state}"]["losses"] = losses
out["built_on"] = sorted(set(built_on))
save_file(tensors, os.path.join(root, "reloaded.safetensors"))
print(json.dumps(out), flush=True)
# 3. the same process then overwrites a checkpoint with another model and is SIGKILLed halfway (the parent kills it
# when it reads WRITING): the previous files must be intact
import time
d = os.path.join(root, "atomic")
model = transformers.LlamaForCausalLM.from_pretrained(d)
model.model.layers[0].self_attn.q_proj.scale.mul_(2)
orig = type(model).save_pretrained
def slow(self, tmp, **kw):
    orig(self, tmp, **kw)
    f = os.path.join(tmp, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)  # as if killed halfway through writing the weights
    print("WRITING", flush=True)
    time.sleep(120)
type(model).save_pretrained = slow
model.save_pretrained(d)
"""


def _start_reload(root: Path) -> subprocess.Popen:
    """Start RELOAD in a fresh interpreter (it imports torch/transformers while the parent saves, then waits)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PQ_THREADS"] = str(torch.get_num_threads())
    return subprocess.Popen([sys.executable, "-c", RELOAD, str(root), json.dumps(list(ARCHS))], cwd=str(ROOT),
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reload_and_kill(p: subprocess.Popen) -> dict:
    """Let RELOAD run; SIGKILL it once it is halfway through its atomic save."""
    try:
        p.stdin.write("go\n")
        p.stdin.flush()
        report = p.stdout.readline()
        writing = p.stdout.readline()
        if writing.strip() == "WRITING":
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert report.startswith("{"), err[-4000:]
    out = json.loads(report)
    out["killed"] = p.returncode == -signal.SIGKILL
    out["stderr"] = err[-4000:]
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfckpt")
    child = _start_reload(root)
    refs, losses, models = {}, {}, {}
    for arch in ARCHS:
        inputs = _inputs(arch)
        (root / f"{arch}.inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
        for state in ("packed", "qat"):
            model = _build(arch, state)
            model.save_pretrained(root / f"{arch}-{state}")
            with torch.no_grad():
                refs[f"{arch}-{state}"] = model(**inputs).logits
            models[f"{arch}-{state}"] = model
            if state == "qat" and arch in TRAIN:
                (root / f"{arch}.train.json").write_text(json.dumps({k: v.tolist() for k, v in
                                                                     _inputs(arch, seed=7).items()}))
                losses[arch] = _train_losses(copy.deepcopy(model), arch)
                (root / f"{arch}.losses.json").write_text(json.dumps(losses[arch]))
    shutil.copytree(root / "llama-packed", root / "atomic")
    (root / "atomic" / "tokenizer.json").write_text("{}")
    before = {f: (root / "atomic" / f).read_bytes() for f in os.listdir(root / "atomic")}
    report = _reload_and_kill(child)
    return {"root": root, "refs": refs, "losses": losses, "report": report, "models": models, "atomic": before,
            "reloaded": load_file(str(root / "reloaded.safetensors"))}


@pytest.mark.parametrize("state", ["packed", "qat"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_in_a_fresh_process_is_bit_identical(saved, arch, state):
    key = f"{arch}-{state}"
    rep = saved["report"][key]
    assert rep["kinds"] == (["PackedLinear"] if state == "packed" else ["QATLinear"])
    assert rep["is_quantized"]
    ref, got = saved["refs"][key], saved["reloaded"][key]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref), f"{key}: max |diff| {(got - ref).abs().max().item()}"


def test_config_json_carries_the_quantization_config(saved):
    for arch in ARCHS:
        for state in ("packed", "qat"):
            qc = json.loads((saved["root"] / f"{arch}-{state}" / "config.json").read_text())["quantization_config"]
            assert qc["quant_method"] == "pyquant" and qc["state"] == state
            assert qc["format_version"] == FORMAT_VERSION
            assert qc["weight"] == ARCHS[arch][1].weight.to_dict() or arch == "llama"
            files = sorted(os.listdir(saved["root"] / f"{arch}-{state}"))
            assert not [f for f in files if f.endswith((".bin", ".pt"))], files
    qc = json.loads((saved["root"] / "llama-packed" / "config.json").read_text())["quantization_config"]
    assert list(qc["module_overrides"]) == ["model.layers.0.mlp.down_proj"]
    assert qc["module_overrides"]["model.layers.0.mlp.down_proj"]["weight"]["group_size"] == 64
    assert qc["modules_to_not_convert"] == ["lm_head"]


def test_packed_layers_are_built_on_the_meta_device(saved):
    assert saved["report"]["built_on"] == ["meta"]  # no PackedLinear (let alone an fp16 weight) materialised


def test_without_import_pyquant_transformers_skips_the_method(saved):
    r = saved["report"]["without_pyquant"]
    assert r == {"q_proj": "Linear", "warned": True}


@pytest.mark.parametrize("arch", TRAIN)
def test_reloaded_qat_model_trains_like_the_saved_one(saved, arch):
    assert saved["report"][f"{arch}-qat"]["losses"] == saved["losses"][arch]


def test_learned_scales_are_restored(saved):
    model = transformers.OPTForCausalLM.from_pretrained(saved["root"] / "opt-qat")
    ref = saved["models"]["opt-qat"]
    for (n, m), (_, r) in zip(model.named_modules(), ref.named_modules()):
        if isinstance(r, QATLinear):
            assert isinstance(m, QATLinear) and m.weight_spec == r.weight_spec
            assert torch.equal(m.weight_scale, r.weight_scale), n
            assert m.weight_scale.requires_grad


# ---- loading options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"device_map": "auto"}, {"device_map": "cpu"}, {"low_cpu_mem_usage": True},
                                {"device_map": {"": "cpu"}}], ids=["auto", "cpu", "low_cpu_mem", "dict"])
def test_device_map_and_low_cpu_mem_usage(saved, kw):
    if "device_map" in kw:
        pytest.importorskip("accelerate")
    for key in ("llama-packed", "gpt2-qat"):
        cls = transformers.LlamaForCausalLM if key.startswith("llama") else transformers.GPT2LMHeadModel
        model = cls.from_pretrained(saved["root"] / key, **kw)
        with torch.no_grad():
            got = model(**_inputs(key.split("-")[0])).logits
        assert torch.equal(got, saved["refs"][key])


def test_dtype_is_honoured_and_packed_tensors_stay_as_stored(saved):
    model = transformers.LlamaForCausalLM.from_pretrained(saved["root"] / "llama-packed", dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLinear) and q.qweight.dtype == torch.uint8 and q.scale.dtype == torch.float16
    ref = saved["models"]["llama-packed"].model.layers[0].self_attn.q_proj
    assert torch.equal(q.qweight, ref.qweight) and torch.equal(q.scale, ref.scale)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(**_inputs("llama")).logits.float()
    ref_logits = saved["refs"]["llama-packed"]
    assert (got - ref_logits).abs().max() <= 0.05 * ref_logits.abs().max()


def test_convert_after_reloading_a_qat_checkpoint_saves_a_packed_one(saved, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(saved["root"] / "llama-qat")
    convert(model)
    assert model.config.quantization_config.state == "packed"
    model.save_pretrained(tmp_path / "p")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(**_inputs("llama")).logits, saved["refs"]["llama-packed"])


# ---- PTQ at load time --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,state", [("llama", "packed"), ("gpt2", "packed"), ("opt", "qat")])
def test_quantization_config_at_load_quantizes_an_fp_checkpoint(tmp_path, arch, state):
    make, qc = ARCHS[arch]
    torch.manual_seed(5)
    fp = make().eval()
    fp.save_pretrained(tmp_path / "fp")
    ref = copy.deepcopy(fp)
    (quantize if state == "packed" else prepare_qat)(ref, qc)
    cfg = PyquantConfig(weight=qc.weight, activation=qc.activation, state=state)
    model = type(fp).from_pretrained(tmp_path / "fp", quantization_config=cfg)
    kind = PackedLinear if state == "packed" else QATLinear
    assert {type(m) for m in model.modules() if isinstance(m, (PackedLinear, QATLinear))} == {kind}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            assert m.weight is None and "weight" not in m._parameters  # no placeholder left behind
    x = _inputs(arch)
    with torch.no_grad():
        got = model(**x).logits
        assert torch.equal(got, ref(**x).logits)
    model.save_pretrained(tmp_path / "q")
    again = type(fp).from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(**x).logits, got)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]


def test_ptq_at_load_refuses_nan_weights(tmp_path):
    torch.manual_seed(0)
    fp = _llama()
    with torch.no_grad():
        fp.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    fp.save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=PyquantConfig())


@pytest.mark.parametrize("action", ["quantize", "convert"])
def test_quantize_and_convert_refuse_nan_weights(action):
    torch.manual_seed(0)
    model = _llama()
    if action == "convert":
        prepare_qat(model)
    w = model.model.layers[0].self_attn.k_proj.weight
    with torch.no_grad():
        w[0, 0] = float("inf") if action == "convert" else float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj.*NaN/Inf"):
        quantize(model) if action == "quantize" else convert(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "PackedLinear" not in kinds  # nothing was swapped


# ---- bad checkpoints ---------------------------------------------------------------------------------------------
def _tampered(saved, tmp_path, key="llama-packed", tensors=None, config=None):
    src, dst = saved["root"] / key, tmp_path / "bad"
    shutil.copytree(src, dst)
    if tensors is not None:
        sd = load_file(str(dst / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


Q = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("case,match", [
    ("scale_shape", rf"{Q}\.scale is F16\[32, 2\].*needs F16\[32, 1\]"),
    ("scale_dtype", rf"{Q}\.scale is F32\[32, 1\].*needs F16"),
    ("qweight_dtype", rf"{Q}\.qweight is I8"),
    ("qweight_shape", rf"{Q}\.qweight is U8\[32, 32\]"),
    ("missing", rf"{Q}\.qweight is missing"),
    ("nan_scale", rf"{Q}\.scale holds NaN or Inf"),
    ("inf_scale", rf"{Q}\.scale holds NaN or Inf"),
    ("unlisted", rf"{Q}\.qweight is in the checkpoint but its module is not listed"),
    ("unknown_field", r"unknown field\(s\) \['sparsity'\]"),
    ("newer_version", r"format_version=99, newer than this pyquant"),
    ("bad_spec", r"PyquantConfig\.weight: WeightQuantConfig\.method='ternary' is invalid"),
])
def test_bad_checkpoints_are_refused_naming_the_tensor_or_field(saved, tmp_path, case, match):
    t = {
        "scale_shape": lambda sd: sd.__setitem__(f"{Q}.scale", torch.ones(32, 2, dtype=torch.float16)),
        "scale_dtype": lambda sd: sd.__setitem__(f"{Q}.scale", sd[f"{Q}.scale"].float()),
        "qweight_dtype": lambda sd: sd.__setitem__(f"{Q}.qweight", sd[f"{Q}.qweight"].to(torch.int8)),
        "qweight_shape": lambda sd: sd.__setitem__(f"{Q}.qweight", sd[f"{Q}.qweight"].repeat(1, 2)),
        "missing": lambda sd: sd.pop(f"{Q}.qweight"),
        "nan_scale": lambda sd: sd[f"{Q}.scale"].view(-1)[3].fill_(float("nan")),
        "inf_scale": lambda sd: sd[f"{Q}.scale"].view(-1)[0].fill_(float("inf")),
    }.get(case)
    c = {
        "unlisted": lambda qc: qc["modules"].remove(Q),
        "unknown_field": lambda qc: qc.__setitem__("sparsity", 0.5),
        "newer_version": lambda qc: qc.__setitem__("format_version", 99),
        "bad_spec": lambda qc: qc["weight"].__setitem__("method", "ternary"),
    }.get(case)
    d = _tampered(saved, tmp_path, tensors=t, config=c)
    with pytest.raises(ValueError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(d)


def test_config_round_trip_and_unknown_fields():
    cfg = PyquantConfig(weight=W(method="uniform", symmetric=False, granularity="group", group_size=32),
                        activation=A(), state="qat", modules=["a.b"], module_overrides={"a.b": {"weight": {
                            "method": "absmean"}}}, modules_to_not_convert=["lm_head"])
    again = PyquantConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.specs_for("a.b")[0] == W(method="absmean")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['foo'\]"):
        PyquantConfig.from_dict({**cfg.to_dict(), "foo": 1})
    with pytest.raises(ValueError, match=r"module_overrides\['a\.b'\]: unknown field\(s\) \['bits'\]"):
        PyquantConfig(module_overrides={"a.b": {"bits": 2}})
    with pytest.raises(ValueError, match="state='int4'"):
        PyquantConfig(state="int4")
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["pyquant"] is PyquantConfig
    assert AUTO_QUANTIZER_MAPPING["pyquant"].__name__ == "PyquantHfQuantizer"


# ---- atomic save -------------------------------------------------------------------------------------------------
def test_save_is_atomic_under_sigkill(saved):
    """The reload process was SIGKILLed while overwriting root/atomic (new weights half written)."""
    assert saved["report"]["killed"], saved["report"]["stderr"]
    d = saved["root"] / "atomic"
    assert {f: (d / f).read_bytes() for f in os.listdir(d)} == saved["atomic"]  # previous files intact, none added
    leftovers = [f for f in os.listdir(saved["root"]) if "pyquant-tmp" in f]
    assert len(leftovers) == 1  # the killed write's temporary directory, next to the target, safe to delete
    model = transformers.LlamaForCausalLM.from_pretrained(d)
    with torch.no_grad():
        assert torch.equal(model(**_inputs("llama")).logits, saved["refs"]["llama-packed"])


def test_save_replaces_weights_and_keeps_other_files(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved["root"] / "llama-qat", d)
    (d / "tokenizer.json").write_text("{}")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    model = transformers.LlamaForCausalLM.from_pretrained(saved["root"] / "llama-packed")
    model.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((d / "config.json").read_text())["quantization_config"]["state"] == "packed"
    assert not [f for f in os.listdir(tmp_path) if "pyquant-tmp" in f or "pyquant-old" in f]
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    model.model.layers[0].self_attn.q_proj.scale.data = model.model.layers[0].self_attn.q_proj.scale.float()
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.scale is torch\.float32, its spec says float16"):
        model.save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["quantization_config"]["state"] == "packed"  # untouched


def test_atomic_directory_without_rename_exchange(tmp_path, monkeypatch):
    from pyquant.integrations import atomic
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a platform without renameat2(RENAME_EXCHANGE)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"old")
    (d / "tokenizer.json").write_text("{}")
    with atomic.atomic_directory(d) as tmp:
        Path(tmp, "model.safetensors").write_bytes(b"new")
    assert (d / "model.safetensors").read_bytes() == b"new" and (d / "tokenizer.json").read_text() == "{}"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_directory(d) as tmp:
            Path(tmp, "model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert (d / "model.safetensors").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or old directory left behind

"""HF checkpoints of MoE experts and of the EMNLP'22 preset (quantized word embeddings, Q/K/V/probability fake-quant):
save_pretrained -> from_pretrained in a FRESH process gives bit-identical logits, for packed and QAT states; PTQ at
load covers the experts; a checkpoint whose experts tensors do not match its config is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import pyquant
from pyquant import QATConfig, WeightQuantConfig as W

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_experts import _model  # noqa: E402  (tiny MoE configs of every family)

ROOT = Path(__file__).resolve().parents[1]
CASES = [("mixtral", "packed"), ("gpt_oss", "packed"), ("deepseek_v3", "packed"), ("qwen2_moe", "qat"),
         ("olmoe", "qat")]

RELOAD = r"""
import json, sys, torch
import pyquant, transformers as T
out = {}
for d in json.loads(sys.argv[1]):
    kind = "bert" if d.endswith("bert") else "clm"
    cls = T.AutoModelForSequenceClassification if kind == "bert" else T.AutoModelForCausalLM
    m = cls.from_pretrained(d).eval()
    ids = torch.load(d + "/ids.pt", weights_only=True)
    with torch.no_grad():
        y = m(ids).logits
    want = torch.load(d + "/want.pt", weights_only=True)
    out[d] = {"equal": bool(torch.equal(y, want)), "types": sorted({type(x).__name__ for x in m.modules()
                                                                  if "Packed" in type(x).__name__
                                                                  or "QAT" in type(x).__name__})}
print(json.dumps(out))
"""


def _save(model, d: Path, ids):
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(d)
    torch.save(ids, d / "ids.pt")
    torch.save(want, d / "want.pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    dirs = []
    for fam, state in CASES:
        m = _model(fam)
        spec = W(method="uniform", symmetric=False, granularity="group", group_size=32) if fam == "gpt_oss" else \
            W(method="twn", granularity="channel", learnable_scale=state == "qat")
        pyquant.prepare_qat(m, QATConfig(weight=spec))
        if state == "qat":  # move the learnable scales off their init, so restoring them is tested
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n.endswith("_weight_scale") or n.endswith("weight_scale"):
                        p.mul_(1.1)
        else:
            pyquant.convert(m)
        d = root / f"{fam}-{state}"
        _save(m, d, torch.randint(0, 96, (2, 7)))
        dirs.append(str(d))
    for state in ("qat", "packed"):
        cfg = T.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, num_labels=3)
        m = T.BertForSequenceClassification(cfg)
        pyquant.prepare_qat(m, QATConfig(preset="kdqat-emnlp22"))
        if state == "packed":
            pyquant.convert(m)
        d = root / f"emnlp22-{state}-bert"
        _save(m, d, torch.randint(0, 120, (2, 9)))
        dirs.append(str(d))
    env = {k: v for k, v in os.environ.items() if k != "PYQUANT_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(dirs)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return root, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fam,state", CASES)
def test_moe_round_trip_in_a_fresh_process(saved, fam, state):
    root, res = saved
    d = str(root / f"{fam}-{state}")
    assert res[d]["equal"], res[d]
    want = "Packed" if state == "packed" else "QAT"
    assert any(t.startswith(want) and t.endswith("Experts") for t in res[d]["types"]), res[d]
    qc = json.loads((root / f"{fam}-{state}" / "config.json").read_text())["quantization_config"]
    assert qc["experts"] and set(qc["experts"]) <= set(qc["modules"])


@pytest.mark.parametrize("state", ["qat", "packed"])
def test_emnlp22_preset_round_trip(saved, state):
    root, res = saved
    d = str(root / f"emnlp22-{state}-bert")
    assert res[d]["equal"], res[d]
    assert ("PackedEmbedding" if state == "packed" else "QATEmbedding") in res[d]["types"]
    qc = json.loads((Path(d) / "config.json").read_text())["quantization_config"]
    assert qc["embeddings"] == ["bert.embeddings.word_embeddings"]
    assert qc["attention_activation"]["clip"] == 2.5


def test_ptq_at_load_quantizes_the_experts(tmp_path):
    m = _model("mixtral")
    m.save_pretrained(tmp_path / "fp")
    spec = W(method="twn", granularity="channel")
    r = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=pyquant.PyquantConfig(weight=spec))
    ref = _model("mixtral")
    ref.load_state_dict(m.state_dict())
    pyquant.quantize(ref, spec)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(r(ids).logits, ref(ids).logits)
    assert r.config.quantization_config.experts == ["model.layers.0.mlp.experts"]


def test_experts_checkpoint_that_disagrees_with_its_config_is_refused(saved, tmp_path):
    root, _ = saved
    src = root / "mixtral-packed"
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight"]["granularity"] = "group"
    cfg["quantization_config"]["weight"]["group_size"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"experts.gate_up_proj_scale is .* needs"):
        T.AutoModelForCausalLM.from_pretrained(bad)

"""``pyquant env``: the report names every backend with its reason, the GPU (or "no GPU"), versions and ops."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from pyquant import env
from pyquant.ops import BACKENDS


def test_collect_is_json_and_complete():
    d = env.collect()
    json.loads(json.dumps(d))  # plain JSON types only
    assert set(d["versions"]) == set(env.PACKAGES)
    assert d["versions"]["torch"] is not None
    assert set(d["backends"]) == set(BACKENDS)
    for b, st in d["backends"].items():
        assert isinstance(st["available"], bool) and st["reason"], b
    assert d["backends"]["reference"]["available"] is True
    assert "reference" in d["ops"]["packed_matmul"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_report_on_cpu_mentions_each_backend_and_no_gpu():
    d = env.collect()
    assert d["gpu"] == "no GPU" and d["cuda_available"] is False
    assert d["backends"]["cuda"]["available"] is False
    text = env.format_report(d)
    assert "no GPU" in text
    for b in BACKENDS:
        assert any(line.strip().startswith(b) for line in text.splitlines()), b
    assert d["backends"]["cuda"]["reason"] in text
    assert "packed_matmul" in text


def test_triton_interpret_state_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d = env.collect()
    assert d["triton_interpret"] == "1"
    assert "TRITON_INTERPRET: 1" in env.format_report(d)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET: unset" in env.format_report(env.collect())


def test_missing_cuda_extension_is_a_clear_message(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == env.CUDA_EXT else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    st = env.collect()["backends"]["cuda"]
    assert st["available"] is False and "pyquant._cuda_ext is missing" in st["reason"]


def test_backend_status_failure_is_reported_not_raised(monkeypatch):
    from pyquant.ops import _dispatch

    def boom(b, *a, **k):
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(_dispatch, "backend_status", boom)
    d = env.collect()
    assert all(not st["available"] for b, st in d["backends"].items() if b != "cuda" or "missing" not in st["reason"])
    assert "driver exploded" in d["backends"]["reference"]["reason"]


def test_format_report_renders_a_handmade_dict():
    d = {"pyquant": "9.9", "python": "3.x", "platform": "p", "versions": {"torch": "1", "triton": None},
         "gpu": "Fancy GPU 9000", "cuda_runtime": "12.8", "triton_interpret": "", "pyquant_backend": "reference",
         "backends": {"cuda": {"available": True, "reason": "compiled"},
                      "triton": {"available": False, "reason": "because"},
                      "reference": {"available": True, "reason": "always"}},
         "ops": {"packed_matmul": ["cuda", "reference"], "other_op": []}}
    text = env.format_report(d)
    assert "Fancy GPU 9000" in text and "no GPU" not in text
    assert "triton        not installed" in text
    assert "PYQUANT_BACKEND:  reference" in text
    assert "cuda, reference" in text and "other_op" in text and "because" in text


def test_cli_env_json(capsys):
    from pyquant import cli

    assert cli.main(["env", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["backends"]) == set(BACKENDS)

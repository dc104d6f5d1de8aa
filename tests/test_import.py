"""Import hygiene: ``import pyquant`` is cheap, never initializes CUDA and never imports triton or transformers.

Each check runs in a fresh interpreter (a subprocess), so modules imported by other tests cannot hide a regression.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, importlib
for m in {mods!r}:
    importlib.import_module(m)
import torch
{extra}
print(json.dumps({{
    "cuda_initialized": torch.cuda.is_initialized(),
    "triton": sorted(k for k in sys.modules if k == "triton" or k.startswith("triton.")),
    "transformers": sorted(k for k in sys.modules if k == "transformers" or k.startswith("transformers.")),
    "kernels": sorted(k for k in sys.modules if k.startswith("pyquant.kernels") or k == "pyquant._C"),
}}))
"""


def _probe(mods, extra: str = "", env_extra=None) -> dict:
    env = dict(os.environ)
    env.pop("PYQUANT_BACKEND", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE.format(mods=list(mods), extra=extra)], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_probe_detects_imports():
    # The probe itself must be able to fail: importing triton / transformers / touching CUDA is seen.
    r = _probe(["triton"])  # (transformers is detected by the same sys.modules scan; importing it costs ~4 s)
    assert r["triton"] and r["transformers"] == []


def test_import_pyquant_is_lean():
    r = _probe(["pyquant"])
    assert r["cuda_initialized"] is False
    assert r["triton"] == [], f"import pyquant imported {r['triton']}"
    assert r["transformers"] == [], f"import pyquant imported {r['transformers']}"
    assert r["kernels"] == []


def test_submodules_do_not_import_triton_or_touch_cuda():
    # One fresh interpreter for all of them (each costs ~2 s of torch import); the message names what leaked.
    mods = ["pyquant.formats", "pyquant.reference", "pyquant.ops", "pyquant.nn.packed_linear", "pyquant.env"]
    r = _probe(mods)
    assert r["cuda_initialized"] is False
    assert r["triton"] == [], f"importing {mods} imported {r['triton']}"
    assert r["kernels"] == []


def test_reference_call_on_cpu_does_not_load_kernels():
    # Default dispatch of a CPU call (no interpreter) goes to the reference backend without pyquant probing triton
    # or loading a kernel module.  (torch's custom-op machinery itself imports torch._dynamo, which may import
    # triton; that is torch's business, so the check is on pyquant's own triton probe.)
    extra = r"""
import pyquant.ops as ops
from pyquant.ops import _dispatch
from pyquant.formats import packed_cols
x = torch.randn(3, 64)
q = torch.randint(0, 256, (5, packed_cols(64)), dtype=torch.uint8)
s = torch.rand(5, 1, dtype=torch.float16) + 0.5
ops.packed_matmul(x, q, s, in_features=64, code_offset=1.0)
assert ops.last_backend() == ("packed_matmul", "reference"), ops.last_backend()
assert _dispatch._triton_importable.cache_info().currsize == 0, "pyquant probed triton for a CPU call"
"""
    r = _probe(["pyquant"], extra, env_extra={"TRITON_INTERPRET": "0"})
    assert r["cuda_initialized"] is False
    assert r["kernels"] == []


def test_lazy_attributes():
    import pyquant

    assert pyquant.ops.packed_matmul is not None
    assert pyquant.PackedLinear.__name__ == "PackedLinear"
    with pytest.raises(AttributeError, match="no_such_name"):
        pyquant.no_such_name


"""Import hygiene: ``import pyquant`` is cheap, never initializes CUDA and never imports triton or transformers.

The checks run in one fresh interpreter (a subprocess, so modules imported by other tests cannot hide a regression)
that takes a snapshot of ``sys.modules`` and ``torch.cuda.is_initialized()`` after each step; the tests below read
the snapshots.  (One process for all steps: each fresh ``import torch`` costs seconds on a small CI machine.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
snaps = {}

def snap(name):
    import torch
    snaps[name] = {
        "cuda_initialized": torch.cuda.is_initialized(),
        "triton": sorted(k for k in sys.modules if k == "triton" or k.startswith("triton.")),
        "transformers": sorted(k for k in sys.modules if k == "transformers" or k.startswith("transformers.")),
        "kernels": sorted(k for k in sys.modules if k.startswith("pyquant.kernels") or k == "pyquant._C"),
    }

import pyquant
snap("import pyquant")

import pyquant.formats, pyquant.reference, pyquant.ops, pyquant.nn.packed_linear, pyquant.env
snap("submodules")

# Default dispatch of a CPU call (no interpreter) goes to the reference backend without pyquant probing triton or
# loading a kernel module.  (torch's custom-op machinery itself imports torch._dynamo, which may import triton; that
# is torch's business, so this step checks pyquant's own triton probe.)
import torch
from pyquant.ops import _dispatch
from pyquant.formats import packed_cols
x = torch.randn(3, 64)
q = torch.randint(0, 256, (5, packed_cols(64)), dtype=torch.uint8)
s = torch.rand(5, 1, dtype=torch.float16) + 0.5
pyquant.ops.packed_matmul(x, q, s, in_features=64, code_offset=1.0)
snap("cpu call")
snaps["cpu call"]["last_backend"] = list(pyquant.ops.last_backend())
snaps["cpu call"]["triton_probed"] = _dispatch._triton_importable.cache_info().currsize > 0

import triton  # the probe must be able to see an import (else the checks above could not fail)
snap("import triton")

import importlib.util, types
if importlib.util.find_spec("pyquant.convert") is not None:  # documented API: pyquant.convert(model) converts
    pyquant.prepare_qat  # first access through another name of the same module (binds the module attribute)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 16))
    pyquant.prepare_qat(lin, pyquant.QATConfig(exclude=()))
    report = pyquant.convert(lin)
    snaps["lazy"] = {"report": type(report).__name__, "packed": type(lin[0]).__name__}
# transformers' quantizer registry, imported after pyquant, knows the "pyquant" method (registered by pyquant's hook)
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
snaps["hf"] = {"config": AUTO_QUANTIZATION_CONFIG_MAPPING["pyquant"].__name__,
               "quantizer": AUTO_QUANTIZER_MAPPING["pyquant"].__name__}
print(json.dumps(snaps))
"""


@pytest.fixture(scope="module")
def snaps() -> dict:
    env = dict(os.environ)
    env.pop("PYQUANT_BACKEND", None)
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=str(ROOT), env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_pyquant_is_lean(snaps):
    r = snaps["import pyquant"]
    assert r["cuda_initialized"] is False
    assert r["triton"] == [], f"import pyquant imported {r['triton']}"
    assert r["transformers"] == [], f"import pyquant imported {r['transformers']}"
    assert r["kernels"] == []


def test_submodules_do_not_import_triton_or_touch_cuda(snaps):
    r = snaps["submodules"]
    assert r["cuda_initialized"] is False
    assert r["triton"] == [], f"importing pyquant's core modules imported {r['triton']}"
    assert r["kernels"] == []


def test_reference_call_on_cpu_does_not_probe_triton_or_load_kernels(snaps):
    r = snaps["cpu call"]
    assert r["last_backend"] == ["packed_matmul", "reference"]
    assert r["triton_probed"] is False, "pyquant probed triton for a CPU call"
    assert r["cuda_initialized"] is False
    assert r["kernels"] == []


def test_probe_detects_imports(snaps):
    assert "triton" in snaps["import triton"]["triton"]


def test_lazy_attributes():
    import pyquant

    assert pyquant.ops.packed_matmul is not None
    assert pyquant.PackedLinear.__name__ == "PackedLinear"
    with pytest.raises(AttributeError, match="no_such_name"):
        pyquant.no_such_name


def test_transformers_imported_later_sees_the_pyquant_method(snaps):
    assert snaps["hf"] == {"config": "PyquantConfig", "quantizer": "PyquantHfQuantizer"}


def test_pyquant_convert_converts_even_after_the_module_is_imported(snaps):
    assert snaps["lazy"] == {"report": "SwapReport", "packed": "PackedLinear"}

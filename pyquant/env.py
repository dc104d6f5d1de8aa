"""``pyquant env``: versions, GPU, and which backends can run here (and why not).

:func:`collect` gathers a JSON-serializable dict; :func:`format_report` renders it for a terminal.  Importing this
module is cheap (no triton, no transformers, no CUDA); :func:`collect` may initialize CUDA to name the GPU, which is
fine for the command line and never happens at import.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from importlib import metadata
from typing import Any, Dict, List, Optional

__all__ = ["collect", "format_report", "PACKAGES"]

PACKAGES = ("torch", "triton", "transformers", "datasets", "safetensors")
CUDA_EXT = "pyquant._cuda_ext"


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {"cuda_available": False, "gpu": "no GPU", "gpu_count": 0,
                            "cuda_runtime": torch.version.cuda}
    try:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info.update(cuda_available=True, gpu_count=n,
                        gpu=", ".join(torch.cuda.get_device_name(i) for i in range(n)))
    except Exception as e:  # a broken driver is reported, not raised
        info["gpu"] = f"no GPU (CUDA check failed: {e})"
    return info


def _backends() -> Dict[str, Dict[str, Any]]:
    from .ops import _dispatch

    out: Dict[str, Dict[str, Any]] = {}
    for b in _dispatch.BACKENDS:
        if b == "cuda" and importlib.util.find_spec(CUDA_EXT) is None:
            out[b] = {"available": False,
                      "reason": f"{CUDA_EXT} is missing (the CUDA extension's Python module is not installed)"}
            continue
        try:
            ok, why = _dispatch.backend_status(b)
        except Exception as e:  # report, never crash the report
            ok, why = False, f"status check failed: {type(e).__name__}: {e}"
        out[b] = {"available": bool(ok), "reason": str(why)}
    return out


def _ops() -> Dict[str, List[str]]:
    from .ops import _dispatch

    names = set(_dispatch.registered_ops())
    try:  # ops defined with torch.library in the pyquant namespace (if an op module registered no backend yet)
        import torch

        names |= {n for n in dir(torch.ops.pyquant) if not n.startswith("_") and n != "name"}
    except Exception:
        pass
    return {op: list(_dispatch.registered(op)) for op in sorted(names)}


def collect() -> Dict[str, Any]:
    """Everything ``pyquant env`` reports, as plain JSON types."""
    from . import __version__

    d: Dict[str, Any] = {
        "pyquant": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
    }
    d.update(_gpu())
    d["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    d["pyquant_backend"] = os.environ.get("PYQUANT_BACKEND", "")
    try:
        importlib.import_module("pyquant.ops")
        d["backends"] = _backends()
        d["ops"] = _ops()
    except Exception as e:  # keep the rest of the report useful
        d["backends"] = {}
        d["ops"] = {}
        d["ops_error"] = f"import pyquant.ops failed: {type(e).__name__}: {e}"
    return d


def format_report(d: Dict[str, Any]) -> str:
    """Human-readable report of :func:`collect`'s dict."""
    lines = [f"pyquant {d.get('pyquant', '?')}  (python {d.get('python', '?')}, {d.get('platform', '?')})"]
    lines.append("versions:")
    for p, v in d.get("versions", {}).items():
        lines.append(f"  {p:<13} {v or 'not installed'}")
    gpu = d.get("gpu", "no GPU")
    lines.append(f"GPU:            {gpu}" + (f"  (CUDA runtime {d['cuda_runtime']})" if d.get("cuda_runtime") else ""))
    ti = d.get("triton_interpret", "")
    lines.append(f"TRITON_INTERPRET: {ti if ti else 'unset'}"
                 + ("  (Triton kernels run on CPU through the interpreter)" if ti not in ("", "0") else ""))
    lines.append(f"PYQUANT_BACKEND:  {d.get('pyquant_backend') or 'unset (default order cuda, triton, reference)'}")
    lines.append("backends:")
    for b, st in d.get("backends", {}).items():
        lines.append(f"  {b:<10} {'yes' if st['available'] else 'no ':<4} {st['reason']}")
    if d.get("ops_error"):
        lines.append(f"  {d['ops_error']}")
    lines.append("ops (registered backends):")
    ops = d.get("ops", {})
    if not ops:
        lines.append("  none")
    width = max([len(op) for op in ops] + [0])
    for op, bs in ops.items():
        lines.append(f"  {op:<{width}}  {', '.join(bs) if bs else 'none'}")
    return "\n".join(lines)

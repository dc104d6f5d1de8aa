"""pyquant: make Transformers ternary (1.58-bit) and 2-bit.

QAT (``prepare_qat``), distillation (``pyquant.distill``), deployment at 2 bits/weight (``convert``, ``quantize``).
Importing pyquant is cheap and never initializes CUDA: submodules load on first use.
"""
from __future__ import annotations

import importlib

from .formats import ActivationQuantConfig, WeightQuantConfig

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "ops": "pyquant.ops",
    "reference": "pyquant.reference",
    "nn": "pyquant.nn",
    "distill": "pyquant.distill",
    "PackedLinear": "pyquant.nn",
    "QATLinear": "pyquant.nn",
    "QATConfig": "pyquant.convert",
    "prepare_qat": "pyquant.convert",
    "convert": "pyquant.convert",
    "quantize": "pyquant.convert",
    "Distiller": "pyquant.distill",
}

__all__ = ["ActivationQuantConfig", "WeightQuantConfig", "__version__", *_LAZY]


_SUBMODULES = ("ops", "reference", "nn", "distill")  # lazy names that are modules; the rest are attributes


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'pyquant' has no attribute {name!r}")
    m = importlib.import_module(mod)
    if name in _SUBMODULES:
        return m
    # Importing ``pyquant.convert`` binds the *module* to ``pyquant.convert``; re-bind every public name that this
    # module provides so that ``pyquant.convert`` is the function (as documented), not the module.
    for n, target in _LAZY.items():
        if target == mod and n not in _SUBMODULES and hasattr(m, n):
            globals()[n] = getattr(m, n)
    return getattr(m, name)

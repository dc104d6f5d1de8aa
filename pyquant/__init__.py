"""pyquant: make Transformers ternary (1.58-bit) and 2-bit.

QAT (``prepare_qat``), distillation (``pyquant.distill``), deployment at 2 bits/weight (``convert``, ``quantize``).
Importing pyquant is cheap and never initializes CUDA: submodules load on first use.
"""
from __future__ import annotations

import importlib

from .formats import ActivationQuantConfig, WeightQuantConfig
from .integrations import install_hook as _install_hook

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "ops": "pyquant.ops",
    "reference": "pyquant.reference",
    "nn": "pyquant.nn",
    "distill": "pyquant.distill",
    "PackedLinear": "pyquant.nn",
    "QATLinear": "pyquant.nn",
    "QATEmbedding": "pyquant.nn",
    "PackedEmbedding": "pyquant.nn",
    "QATConfig": "pyquant.convert",
    "prepare_qat": "pyquant.convert",
    "convert": "pyquant.convert",
    "quantize": "pyquant.convert",
    "dequantize": "pyquant.convert",
    "Distiller": "pyquant.distill",
    "PyquantConfig": "pyquant.integrations.hf",
    "from_bitnet": "pyquant.integrations.bitnet",
}

__all__ = ["ActivationQuantConfig", "WeightQuantConfig", "__version__", *_LAZY]


_SUBMODULES = ("ops", "reference", "nn", "distill")  # lazy names that are modules; the rest are attributes


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'pyquant' has no attribute {name!r}")
    m = importlib.import_module(mod)
    # note: once ``pyquant.convert`` (the module) is imported, Python binds it to ``pyquant.convert``; that module is
    # callable (it forwards to its ``convert`` function), so ``pyquant.convert(model)`` works either way.
    return m if name in _SUBMODULES else getattr(m, name)


# The "pyquant" transformers quantization method registers itself when transformers' quantizer registry is (or gets)
# imported; transformers is never imported here (pyquant/integrations/__init__.py explains the hook).
_install_hook()

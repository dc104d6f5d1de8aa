"""Distillation: logit / TSLD / hidden-state losses, attention KD, and the ``Distiller`` that combines them.

Names load on first access (``pyquant.distill.Distiller`` imports transformers-free torch code only then); the
attention-KD names come from ``pyquant.distill.attention`` and ``pyquant.distill.capture``.
"""
from __future__ import annotations

import importlib

_LAZY = {
    # chunked logit losses (this package)
    "LogitLossWeights": "pyquant.distill.losses",
    "chunked_logit_losses": "pyquant.distill.losses",
    # Distiller
    "Distiller": "pyquant.distill.distiller",
    "DistillConfig": "pyquant.distill.distiller",
    "DistillOutput": "pyquant.distill.distiller",
    # reference losses (small tensors: classification logits, hidden states)
    "soft_cross_entropy": "pyquant.reference.distill",
    "kl_divergence": "pyquant.reference.distill",
    "logit_kd_loss": "pyquant.reference.distill",
    "tsld_token_weights": "pyquant.reference.distill",
    "tsld_loss": "pyquant.reference.distill",
    "hidden_mse": "pyquant.reference.distill",
    "resolve_layer_map": "pyquant.reference.distill",
    # attention KD
    "attention_map_loss": "pyquant.distill.attention",
    "attention_output_loss": "pyquant.distill.attention",
    "attention_score_mse": "pyquant.distill.attention",
    "capture_attention": "pyquant.distill.capture",
    "attention_kd_losses": "pyquant.distill.capture",
}

__all__ = list(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'pyquant.distill' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))

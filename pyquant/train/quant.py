"""The model-swap step of the recipes, as thin calls into ``pyquant.convert`` (one walker for the whole project).

``prepare_student`` (QAT), ``ptq_to_packed`` (post-training quantization), ``convert_to_packed`` (QAT -> packed),
and ``model_nbytes`` for the size column of the recipes' tables.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from ..convert import QATConfig, convert, prepare_qat, quantize
from ..formats import ActivationQuantConfig, WeightQuantConfig

__all__ = ["prepare_student", "convert_to_packed", "ptq_to_packed", "model_nbytes"]


def _config(weight: WeightQuantConfig, activation: Optional[ActivationQuantConfig], include: Sequence[str],
            exclude: Optional[Sequence[str]]) -> QATConfig:
    return QATConfig(weight=weight, activation=activation, include=tuple(include),
                     exclude=None if exclude is None else tuple(exclude))


def prepare_student(model: nn.Module, weight: WeightQuantConfig, activation: Optional[ActivationQuantConfig] = None,
                    include: Sequence[str] = (), exclude: Optional[Sequence[str]] = None) -> List[str]:
    """Swap the selected linears for ``QATLinear`` in place (``pyquant.prepare_qat``); returns the swapped names."""
    return list(prepare_qat(model, _config(weight, activation, include, exclude)).swapped)


def convert_to_packed(model: nn.Module) -> nn.Module:
    """``QATLinear`` -> ``PackedLinear`` in place (``pyquant.convert``); the packed weights equal the fake-quant ones."""
    convert(model)
    return model


def ptq_to_packed(model: nn.Module, weight: WeightQuantConfig, activation: Optional[ActivationQuantConfig] = None,
                  include: Sequence[str] = (), exclude: Optional[Sequence[str]] = None) -> nn.Module:
    """Post-training quantization (no training) of the selected linears to ``PackedLinear`` in place."""
    quantize(model, _config(weight, activation, include, exclude))
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as stored: parameters + buffers (packed weights count at 2 bits + scales);
    shared (tied) tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total

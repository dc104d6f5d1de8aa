"""The model-swap step of the recipes: QAT preparation, PTQ, and conversion to ``PackedLinear``.

Uses ``pyquant.convert`` (``QATConfig`` / ``prepare_qat`` / ``convert`` / ``quantize``) when it is available.  Until
then (and as a fallback for builds without it) a small equivalent built only on ``pyquant.reference`` is used:
``_RefQATLinear`` fake-quantizes its weight with the reference quantizer and a straight-through backward, and
exposes ``quantized_weight()`` / ``weight_spec`` so ``PackedLinear.from_qat`` converts it exactly.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from .. import reference
from ..formats import ActivationQuantConfig, WeightQuantConfig

__all__ = ["prepare_student", "convert_to_packed", "ptq_to_packed", "linear_names", "model_nbytes"]


def _convert_module():
    import importlib

    try:  # not ``from .. import convert``: pyquant.convert (the attribute) is the function of that name
        return importlib.import_module("pyquant.convert")
    except ImportError:
        return None


class _STEFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, spec):
        ctx.save_for_backward(w)
        ctx.spec = spec
        return reference.fake_quant_weight(w, spec)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        gw, _, _ = reference.fake_quant_weight_backward(g, w, ctx.spec)
        return gw, None


class _STEAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        return reference.fake_quant_activation(x, spec)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _RefQATLinear(nn.Linear):
    """Reference fake-quant linear (fallback while ``pyquant.convert`` is absent)."""

    def __init__(self, linear: nn.Linear, weight_spec: WeightQuantConfig,
                 act_spec: Optional[ActivationQuantConfig]):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_spec = weight_spec
        self.act_spec = act_spec

    def forward(self, x):
        if self.act_spec is not None:
            x = _STEAct.apply(x, self.act_spec)
        w = _STEFakeQuant.apply(self.weight, self.weight_spec)
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def quantized_weight(self):
        return reference.quantize_weight(self.weight.detach(), self.weight_spec)


_DEFAULT_EXCLUDE = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "project_in", "project_out",
                    "embed_out")


def _matches(name: str, pattern: str) -> bool:
    """Same selection rule as ``pyquant.convert.matches``: full name or a dotted suffix, and everything inside."""
    parts = name.split(".") if name else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, "*." + pattern):
            return True
    return False


def linear_names(model: nn.Module, include: Sequence[str] = (), exclude: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the ``nn.Linear`` modules selected (include empty = all; exclude None = heads/lm_head/pooler)."""
    exclude = _DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    out = []
    for name, m in model.named_modules():
        if name and isinstance(m, nn.Linear) and (not include or any(_matches(name, p) for p in include)) \
                and not any(_matches(name, p) for p in exclude):
            out.append(name)
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _qat_config(conv, weight, activation, include, exclude):
    return conv.QATConfig(weight=weight, activation=activation, include=tuple(include),
                          exclude=None if exclude is None else tuple(exclude))


def prepare_student(model: nn.Module, weight: WeightQuantConfig, activation: Optional[ActivationQuantConfig] = None,
                    include: Sequence[str] = (), exclude: Optional[Sequence[str]] = None) -> List[str]:
    """Swap the selected linears for QAT (fake-quant) modules in place; returns the swapped names."""
    if not isinstance(weight, WeightQuantConfig):
        raise TypeError(f"weight must be a WeightQuantConfig, got {type(weight).__name__}")
    if activation is not None and not isinstance(activation, ActivationQuantConfig):
        raise TypeError(f"activation must be an ActivationQuantConfig or None, got {type(activation).__name__}")
    conv = _convert_module()
    if conv is not None:
        return list(conv.prepare_qat(model, _qat_config(conv, weight, activation, include, exclude)).swapped)
    names = linear_names(model, include, exclude)
    if not names:
        raise ValueError(f"no nn.Linear matched include={list(include)} exclude={exclude}")
    for n in names:
        _set(model, n, _RefQATLinear(model.get_submodule(n), weight, activation))
    return names


def convert_to_packed(model: nn.Module) -> nn.Module:
    """QAT modules -> ``PackedLinear`` (in place); the packed weight equals the fake-quantized weight."""
    conv = _convert_module()
    if conv is not None:
        conv.convert(model)
        return model
    from ..nn import PackedLinear

    for name, m in list(model.named_modules()):
        if isinstance(m, _RefQATLinear):
            p = PackedLinear.from_qat(m, dtype=m.weight.dtype)
            _attach_act(p, m.act_spec)
            _set(model, name, p)
    return model


def ptq_to_packed(model: nn.Module, weight: WeightQuantConfig, activation: Optional[ActivationQuantConfig] = None,
                  include: Sequence[str] = (), exclude: Optional[Sequence[str]] = None) -> nn.Module:
    """Post-training quantization (no training) of the selected linears to ``PackedLinear`` (in place)."""
    conv = _convert_module()
    if conv is not None:
        conv.quantize(model, _qat_config(conv, weight, activation, include, exclude))
        return model
    from ..nn import PackedLinear

    for n in linear_names(model, include, exclude):
        lin = model.get_submodule(n)
        p = PackedLinear.from_linear(lin, weight, dtype=lin.weight.dtype)
        _attach_act(p, activation)
        _set(model, n, p)
    return model


def _attach_act(packed: nn.Module, act: Optional[ActivationQuantConfig]) -> None:
    if act is not None:
        packed.register_forward_pre_hook(
            lambda mod, args: (reference.fake_quant_activation(args[0], act),) + tuple(args[1:]))


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

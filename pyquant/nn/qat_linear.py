"""``QATLinear``: a drop-in ``nn.Linear`` (or HF GPT-2 ``Conv1D``) that trains through weight fake-quant.

A thin module: it holds the full-precision master weight (in the original module's orientation, so state-dict keys and
shapes are unchanged and ``save_pretrained`` round-trips), the bias, and -- for learnable specs -- the scale (and zero
point) as parameters.  The math is in ``pyquant.ops`` (``fake_quant_weight``, ``fake_quant_activation``,
``quantize_weight``), which runs the CUDA/Triton kernels or the pure-PyTorch reference.

Forward: ``y = F.linear(fq_a(x), fq_w(W), b)``.  Under autocast ``F.linear`` casts the fake-quantized weight like any
other weight; the fake-quant itself runs in the master weight's dtype with fp32 math.  The forward never modifies a
parameter (DDP-safe); scales of non-learnable specs are statistics recomputed on every call from the current weight.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import ActivationQuantConfig, WeightQuantConfig
from ..ops import fake_quant_activation, fake_quant_weight, quantize_weight

__all__ = ["QATLinear", "is_conv1d"]


def is_conv1d(mod: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D`` (weight stored [in_features, out_features], attribute ``nf``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but keep the module importable
        Conv1D = None
    if Conv1D is not None and isinstance(mod, Conv1D):
        return True
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "weight")


class QATLinear(nn.Module):
    """Linear layer with weight (and optional input) fake-quant for quantization-aware training.

    weight_spec: how the weight is quantized (``WeightQuantConfig``); act_spec: 8-bit dynamic input fake-quant or None.
    transposed: the weight is stored ``[in_features, out_features]`` (GPT-2 ``Conv1D``); ``weight_nk`` is the
    ``[out_features, in_features]`` view either way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_spec: Optional[WeightQuantConfig] = None, act_spec: Optional[ActivationQuantConfig] = None,
                 transposed: bool = False, device=None, dtype=None):
        super().__init__()
        weight_spec = WeightQuantConfig() if weight_spec is None else weight_spec
        if not isinstance(weight_spec, WeightQuantConfig):
            raise TypeError(f"weight_spec must be a WeightQuantConfig, got {type(weight_spec).__name__}")
        if act_spec is not None and not isinstance(act_spec, ActivationQuantConfig):
            raise TypeError(f"act_spec must be an ActivationQuantConfig or None, got {type(act_spec).__name__}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid: expected a positive int")
        weight_spec.resolve_group_size(in_features)  # ValueError when in_features does not divide by group_size
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec, self.transposed = weight_spec, act_spec, bool(transposed)
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_scale: Optional[nn.Parameter] = None
        self.weight_zero_point: Optional[nn.Parameter] = None
        self.fake_quant_weight_enabled = True
        self.fake_quant_activation_enabled = act_spec is not None
        if weight_spec.learnable_scale:
            self.reset_scale()

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, mod: nn.Module, weight_spec: Optional[WeightQuantConfig] = None,
                    act_spec: Optional[ActivationQuantConfig] = None) -> "QATLinear":
        """Wrap an ``nn.Linear`` or ``Conv1D``, sharing its weight and bias Parameters (no copy).

        A learnable scale (and zero point) is initialised by the method's own rule from the current weight.
        """
        if isinstance(mod, nn.Linear):
            transposed, (n, k) = False, mod.weight.shape
        elif is_conv1d(mod):
            transposed, (k, n) = True, mod.weight.shape
        else:
            raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(mod).__name__}")
        if not mod.weight.dtype.is_floating_point:
            raise TypeError(f"the weight must be floating point, got {mod.weight.dtype}")
        spec = WeightQuantConfig() if weight_spec is None else weight_spec
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        if not isinstance(spec, WeightQuantConfig):
            raise TypeError(f"weight_spec must be a WeightQuantConfig, got {type(spec).__name__}")
        if act_spec is not None and not isinstance(act_spec, ActivationQuantConfig):
            raise TypeError(f"act_spec must be an ActivationQuantConfig or None, got {type(act_spec).__name__}")
        spec.resolve_group_size(int(k))
        q.in_features, q.out_features = int(k), int(n)
        q.weight_spec, q.act_spec, q.transposed = spec, act_spec, transposed
        q.weight = mod.weight
        q.bias = mod.bias if getattr(mod, "bias", None) is not None else None
        q.weight_scale = None
        q.weight_zero_point = None
        q.fake_quant_weight_enabled = True
        q.fake_quant_activation_enabled = act_spec is not None
        if spec.learnable_scale:
            q.reset_scale()
        return q

    @torch.no_grad()
    def reset_scale(self) -> None:
        """(Re)initialise the learnable scale / zero point from the current weight by the method's rule."""
        if not self.weight_spec.learnable_scale:
            raise ValueError(f"reset_scale: {self.weight_spec.describe()} has learnable_scale=False")
        _, s, z = quantize_weight(self.weight_nk.detach(), self.weight_spec)
        if self.weight_scale is None:
            self.weight_scale = nn.Parameter(s.clone())
        else:
            self.weight_scale.copy_(s)
        if z is not None:
            if self.weight_zero_point is None:
                self.weight_zero_point = nn.Parameter(z.clone())
            else:
                self.weight_zero_point.copy_(z)

    # ---- views and switches -------------------------------------------------------------------------------------
    @property
    def weight_nk(self) -> torch.Tensor:
        """The master weight as ``[out_features, in_features]`` (a view for Conv1D)."""
        return self.weight.t() if self.transposed else self.weight

    def enable_fake_quant(self, weight: bool = True, activation: bool = True) -> "QATLinear":
        """Switch weight / input fake-quant on or off (ablations); input fake-quant needs an act_spec."""
        if not isinstance(weight, bool) or not isinstance(activation, bool):
            raise TypeError("enable_fake_quant(weight=..., activation=...) takes bools")
        self.fake_quant_weight_enabled = weight
        self.fake_quant_activation_enabled = activation and self.act_spec is not None
        return self

    # ---- math (all in pyquant.ops) ------------------------------------------------------------------------------
    def fake_quant_weight(self) -> torch.Tensor:
        """The effective weight ``[out_features, in_features]`` in the master weight's dtype (differentiable)."""
        return fake_quant_weight(self.weight_nk, self.weight_spec, self.weight_scale, self.weight_zero_point)

    @torch.no_grad()
    def quantized_weight(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(codes uint8 [N, K], scale fp32 [R, G], zero_point fp32 [R, G] | None) by the op the forward uses."""
        return quantize_weight(self.weight_nk.detach(), self.weight_spec,
                               None if self.weight_scale is None else self.weight_scale.detach(),
                               None if self.weight_zero_point is None else self.weight_zero_point.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant_activation_enabled:
            x = fake_quant_activation(x, self.act_spec)
        w = self.fake_quant_weight() if self.fake_quant_weight_enabled else self.weight_nk
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        act = "none" if self.act_spec is None else \
            f"int8-{'sym' if self.act_spec.symmetric else 'asym'}-per-{self.act_spec.granularity}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight_spec.describe()}{', learnable scale' if self.weight_spec.learnable_scale else ''}"
                f", act={act}{', conv1d layout' if self.transposed else ''}"
                f"{'' if self.fake_quant_weight_enabled else ', weight fake-quant OFF'}")

"""``PackedLinear``: a drop-in ``nn.Linear`` whose weight lives at 2 bits/weight (layout: ``pyquant/formats.py``).

A thin module: buffers plus a call to ``pyquant.ops.packed_matmul``, which picks the CUDA, Triton or reference
backend.  The quantization spec travels in the state dict (``_extra_state``) so a mismatched load is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import reference
from ..formats import WeightQuantConfig, pack_codes, packed_cols, unpack_codes
from ..ops import packed_matmul

__all__ = ["PackedLinear"]


class PackedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: Optional[WeightQuantConfig] = None,
        device=None,
        dtype: torch.dtype = torch.float16,
    ):
        super().__init__()
        spec = WeightQuantConfig() if spec is None else spec
        if not isinstance(spec, WeightQuantConfig):
            raise TypeError(f"spec must be a WeightQuantConfig, got {type(spec).__name__}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid: expected a positive int")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.group_size = spec.resolve_group_size(in_features)
        g = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scale", torch.ones(out_features, g, dtype=spec.torch_scale_dtype, device=device))
        if spec.symmetric:
            self.zero_point = None
        else:
            self.register_buffer("zero_point", torch.zeros(out_features, g, dtype=spec.torch_scale_dtype,
                                                           device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], spec: WeightQuantConfig,
                       dtype: torch.dtype = torch.float16) -> "PackedLinear":
        """From codes [N, K] and scales [R, G] (R = 1 for per-tensor: repeated over rows)."""
        n, k = codes.shape
        m = cls(k, n, bias is not None, spec, device=codes.device, dtype=dtype)
        m.qweight.copy_(pack_codes(codes))
        m.scale.copy_(scale.expand(n, -1))
        if zero_point is not None:
            m.zero_point.copy_(zero_point.expand(n, -1))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: Optional[WeightQuantConfig] = None,
                    dtype: Optional[torch.dtype] = None) -> "PackedLinear":
        """Post-training quantization of an ``nn.Linear`` (or GPT-2 ``Conv1D``, whose weight is [K, N])."""
        spec = WeightQuantConfig() if spec is None else spec
        w = _linear_weight(linear)
        codes, s, z = reference.quantize_weight(w.detach(), spec)
        b = getattr(linear, "bias", None)
        dtype = dtype or (w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        return cls.from_quantized(codes, s, z, None if b is None else b.detach(), spec, dtype=dtype)

    @classmethod
    def from_qat(cls, qat: nn.Module, dtype: Optional[torch.dtype] = None) -> "PackedLinear":
        """From a ``QATLinear``: the packed weight equals its fake-quantized weight exactly."""
        codes, s, z = qat.quantized_weight()
        b = qat.bias
        dtype = dtype or (qat.weight.dtype if qat.weight.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        return cls.from_quantized(codes, s, z, None if b is None else b.detach(), qat.weight_spec, dtype=dtype)

    # ---- math ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(x, self.qweight, self.scale, self.zero_point, self.bias,
                             in_features=self.in_features, code_offset=self.spec.code_offset)

    def dequantize(self) -> torch.Tensor:
        """The effective fp32 weight [N, K] (for tests and export; the forward never builds it)."""
        return reference.dequantize_weight(unpack_codes(self.qweight, self.in_features), self.scale,
                                           self.zero_point, self.spec.code_offset)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.spec.describe()}, scale_dtype={self.spec.scale_dtype}")

    # ---- state dict: the spec travels with the tensors ---------------------------------------------------------
    def get_extra_state(self):
        return {"spec": self.spec.to_dict(), "in_features": self.in_features}

    def set_extra_state(self, state):
        spec = WeightQuantConfig.from_dict(state["spec"])
        if spec != self.spec or state["in_features"] != self.in_features:
            raise ValueError(f"state dict holds a PackedLinear with {spec.describe()} and in_features="
                             f"{state['in_features']}; this module is {self.spec.describe()} with in_features="
                             f"{self.in_features}")


def _linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] for nn.Linear and HF GPT-2 Conv1D (stored [in, out])."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(mod).__name__}")

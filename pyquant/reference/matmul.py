"""Pure-PyTorch reference for the packed 2-bit matmul ``y = x @ dequant(Wq).T + b``."""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import unpack_codes
from .quant import dequantize_weight, fake_quant_activation

__all__ = ["dequantize_packed", "packed_matmul", "packed_matmul_a8"]


def dequantize_packed(qweight, scale, zero_point, in_features: int, code_offset: Optional[float]) -> torch.Tensor:
    """uint8 packed [N, packed_cols(K)] -> fp32 [N, K]."""
    return dequantize_weight(unpack_codes(qweight, in_features), scale, zero_point, code_offset)


def packed_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    code_offset: Optional[float],
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype; fp32 math (the kernels accumulate in fp32 too)."""
    w = dequantize_packed(qweight, scale, zero_point, in_features, code_offset)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def packed_matmul_a8(x, qweight, scale, zero_point, bias, in_features, code_offset) -> torch.Tensor:
    """W2A8: x fake-quantized to int8 per token (symmetric, dynamic), then the packed matmul."""
    from ..formats import ActivationQuantConfig

    xq = fake_quant_activation(x.float(), ActivationQuantConfig(symmetric=True, granularity="token"))
    return packed_matmul(xq, qweight, scale, zero_point, bias, in_features, code_offset).to(x.dtype)

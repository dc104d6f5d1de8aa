"""Pure-PyTorch reference for the grouped packed matmul of mixture-of-experts layers (the oracle: a loop over experts).

``y[r] = x[r] @ dequant(Wq[e]).T (+ bias[e])`` for every row ``r`` of the expert-sorted input, where ``e`` is the
expert whose segment ``[offsets[e-1], offsets[e])`` holds ``r`` (layout: ``pyquant/formats.py``, "Packed experts").
"""
from __future__ import annotations

from typing import Optional

import torch

from .matmul import packed_matmul

__all__ = ["grouped_packed_matmul"]


def grouped_packed_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    offsets: torch.Tensor,
    in_features: int,
    code_offset: Optional[float],
) -> torch.Tensor:
    """x [S, K] sorted by expert, qweight [E, N, packed K], scale/zero_point [E, N, G], bias [E, N] or None,
    offsets int [E] (cumulative row counts: expert e owns rows offsets[e-1]:offsets[e]) -> y [S, N] in x's dtype."""
    E, N = qweight.shape[0], qweight.shape[1]
    y = x.new_empty(x.shape[0], N)
    ends = offsets.tolist()
    start = 0
    for e in range(E):
        end = int(ends[e])
        if end > start:
            y[start:end] = packed_matmul(x[start:end], qweight[e], scale[e],
                                         None if zero_point is None else zero_point[e],
                                         None if bias is None else bias[e], in_features, code_offset)
        start = end
    return y

"""``grouped_packed_matmul``: the packed 2-bit matmul of mixture-of-experts layers, one call for every expert.

``y[r] = x[r] @ dequant(Wq[e]).T (+ bias[e])`` for expert-sorted rows ``x`` (expert ``e`` owns rows
``offsets[e-1]:offsets[e]``); ``qweight [E, N, packed K]``, ``scale``/``zero_point [E, N, G]``, ``bias [E, N]``
(layout: ``pyquant/formats.py``, "Packed experts").

Defined once as the torch.library op ``pyquant::grouped_packed_matmul`` (fake implementation for ``torch.compile``;
autograd for ``x`` and ``bias``: the packed weight is frozen).  Backends: ``triton`` (``kernels/grouped_packed_matmul.py``:
one grouped launch, decode path for few rows per expert) and ``reference`` (a loop over experts: the oracle).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ..formats import packed_cols
from ._dispatch import call, kernel_module, register

__all__ = ["grouped_packed_matmul", "check_grouped_packed_matmul_args"]


@torch.library.custom_op("pyquant::grouped_packed_matmul", mutates_args=())
def _grouped_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], offsets: torch.Tensor, in_features: int,
                code_offset: Optional[float]) -> torch.Tensor:
    return call("grouped_packed_matmul", x, qweight, scale, zero_point, bias, offsets, in_features, code_offset)


@_grouped_op.register_fake
def _(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset):
    return x.new_empty(x.shape[0], qweight.shape[1])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, zero_point, bias, offsets, in_features, code_offset = inputs
    ctx.save_for_backward(qweight, scale, zero_point, offsets)
    ctx.in_features, ctx.code_offset, ctx.x_dtype = in_features, code_offset, x.dtype
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


@torch.library.custom_op("pyquant::grouped_packed_matmul_backward", mutates_args=())
def _grouped_backward_op(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                         zero_point: Optional[torch.Tensor], offsets: torch.Tensor, in_features: int,
                         code_offset: Optional[float], x_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d x [S, K] in x_dtype, d bias [E, N] fp32): one dequantization per expert that has rows."""
    gx = grad.new_empty(grad.shape[0], in_features, dtype=x_dtype)
    gb = grad.new_zeros(qweight.shape[0], qweight.shape[1], dtype=torch.float32)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        end = int(end)
        if end > start:
            w = reference.dequantize_packed(qweight[e], scale[e], None if zero_point is None else zero_point[e],
                                            in_features, code_offset)
            g = grad[start:end].float()
            gx[start:end] = (g @ w).to(x_dtype)
            gb[e] = g.sum(0)
        start = end
    return gx, gb


@_grouped_backward_op.register_fake
def _(grad, qweight, scale, zero_point, offsets, in_features, code_offset, x_dtype):
    return (grad.new_empty(grad.shape[0], in_features, dtype=x_dtype),
            grad.new_empty(qweight.shape[0], qweight.shape[1], dtype=torch.float32))


def _backward(ctx, grad):
    # d x[r] = grad[r] @ dequant(W[e]); d bias[e] = sum of grad over expert e's rows (the packed weight is frozen)
    qweight, scale, zero_point, offsets = ctx.saved_tensors
    gx, gb = _grouped_backward_op(grad, qweight, scale, zero_point, offsets, ctx.in_features, ctx.code_offset,
                                  ctx.x_dtype)
    return gx, None, None, None, gb.to(ctx.bias_dtype) if ctx.bias_grad else None, None, None, None


_grouped_op.register_autograd(_backward, setup_context=_setup_context)


@register("grouped_packed_matmul", "reference")
def _reference_impl(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset):
    return reference.grouped_packed_matmul(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset)


def _triton_supports(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset):
    G = scale.shape[2]
    if G > 1 and (in_features // G) % 16:
        return False, f"group_size={in_features // G} (the Triton kernel needs a multiple of 16, or one group per row)"
    return True, "ok"


@register("grouped_packed_matmul", "triton", supports=_triton_supports)
def _triton_impl(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset):
    return kernel_module("grouped_packed_matmul").grouped_packed_matmul(
        x.contiguous(), qweight.contiguous(), scale.contiguous(),
        None if zero_point is None else zero_point.contiguous(), None if bias is None else bias.contiguous(),
        offsets.contiguous(), in_features, code_offset)


def check_grouped_packed_matmul_args(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset,
                                     check_offsets: bool = True) -> None:
    """Raise TypeError/ValueError naming the offending argument; nothing reaches a kernel unchecked."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [rows, in_features], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} columns, expected in_features={in_features}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 3 \
            or qweight.shape[2] != packed_cols(in_features):
        raise ValueError(f"qweight must be uint8 [E, N, {packed_cols(in_features)}] for in_features={in_features}, "
                         f"got {getattr(qweight, 'dtype', None)} {tuple(getattr(qweight, 'shape', ()))}")
    E, N = qweight.shape[:2]
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[:2]) != (E, N) or t.shape[2] < 1 \
                or in_features % t.shape[2] or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float tensor [E={E}, N={N}, G] with G dividing in_features="
                             f"{in_features}, got {getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {tuple(zero_point.shape)} differs from scale shape {tuple(scale.shape)}")
    if zero_point is None and code_offset is None:
        raise ValueError("code_offset must be given (a float) when zero_point is None")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (E, N)
                             or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float tensor [E={E}, N={N}], got {tuple(getattr(bias, 'shape', ()))}")
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() != E \
            or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be an int32/int64 tensor [E={E}] of cumulative row counts, got "
                         f"{getattr(offsets, 'dtype', None)} {tuple(getattr(offsets, 'shape', ()))}")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero_point", zero_point), ("bias", bias),
                    ("offsets", offsets)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if check_offsets:  # one small host read; callers that built offsets themselves pass check_offsets=False
        o = offsets.to(torch.int64)
        if E and (int(o[-1]) != x.shape[0] or bool((o[1:] < o[:-1]).any()) or int(o[0]) < 0):
            raise ValueError(f"offsets must be non-decreasing cumulative counts ending at the number of rows "
                             f"({x.shape[0]}), got {o.tolist()[:16]}")


def grouped_packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          zero_point: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                          offsets: Optional[torch.Tensor] = None, *, in_features: int,
                          code_offset: Optional[float] = None, check_offsets: bool = True) -> torch.Tensor:
    """y [S, N] = per-expert packed matmul of expert-sorted rows x [S, K]; see the module docstring."""
    check_grouped_packed_matmul_args(x, qweight, scale, zero_point, bias, offsets, in_features, code_offset,
                                     check_offsets)
    return _grouped_op(x, qweight, scale, zero_point, bias, offsets, in_features,
                       None if code_offset is None else float(code_offset))

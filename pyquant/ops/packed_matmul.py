"""``packed_matmul``: y = x @ dequant(Wq).T + b with W at 2 bits/weight (layout: ``pyquant/formats.py``).

Defined once as the torch.library op ``pyquant::packed_matmul`` (traceable by ``torch.compile`` through its fake
implementation); backends register below.  The public wrapper validates arguments and flattens x to 2-D.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..formats import group_size_of, validate_packed
from ._dispatch import call, register

__all__ = ["packed_matmul", "check_packed_matmul_args"]

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("pyquant::packed_matmul", mutates_args=())
def _packed_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    code_offset: Optional[float],
) -> torch.Tensor:
    return call("packed_matmul", x, qweight, scale, zero_point, bias, in_features, code_offset)


@_packed_matmul_op.register_fake
def _(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, zero_point, bias, in_features, code_offset = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.in_features, ctx.code_offset, ctx.x_dtype = in_features, code_offset, x.dtype
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # Gradient w.r.t. x only (the packed weight is frozen): dequantize once, in x's dtype.
    qweight, scale, zero_point = ctx.saved_tensors
    w = reference.dequantize_packed(qweight, scale, zero_point, ctx.in_features, ctx.code_offset)
    gx = (grad.float() @ w).to(ctx.x_dtype)
    gb = grad.float().sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
    return gx, None, None, None, gb, None, None


_packed_matmul_op.register_autograd(_backward, setup_context=_setup_context)


@register("packed_matmul", "reference")
def _reference_impl(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return reference.packed_matmul(x, qweight, scale, zero_point, bias, in_features, code_offset)


def check_packed_matmul_args(x, qweight, scale, zero_point, bias, in_features, code_offset) -> None:
    """Raise TypeError/ValueError naming the offending argument; nothing reaches a kernel unchecked."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be in_features={in_features}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): expected at least one row")
    validate_packed(qweight, scale, zero_point, in_features, group_size_of(scale, in_features))
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qweight is on {qweight.device}")
    if zero_point is None and code_offset is None:
        raise ValueError("code_offset must be given (a float) when zero_point is None")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (qweight.shape[0],) \
                or not bias.dtype.is_floating_point or bias.device != x.device:
            raise ValueError(f"bias must be a float tensor of shape ({qweight.shape[0]},) on {x.device}, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")


def packed_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    in_features: int,
    code_offset: Optional[float] = None,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ ((codes - z) * scale).T + bias, output in x's dtype.

    qweight: uint8 [N, packed_cols(K)]; scale: [N, K // group_size]; zero_point: like scale (asymmetric formats)
    or None with ``code_offset`` (the format's constant z).  Any leading shape and strides of x are accepted.
    """
    check_packed_matmul_args(x, qweight, scale, zero_point, bias, in_features, code_offset)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _packed_matmul_op(x2, qweight, scale, zero_point, bias, in_features,
                          None if code_offset is None else float(code_offset))
    return y.reshape(*lead, qweight.shape[0])

"""``attention_map_kl``: per-query-row KL(P_T || P_S) of two attention maps, never materializing L_q x L_k.

Defined once as the torch.library ops ``pyquant::attention_map_kl`` (forward: KL rows and the two row log-sum-exps)
and ``pyquant::attention_map_kl_backward`` (dQ_S, dK_S from the saved log-sum-exps); backends register below:
``triton`` (``kernels/attention_kd.py``, streaming, O(B*H*L) memory) and ``reference`` (materialized fp32 maps).
Conventions (mask, causal alignment, GQA grouping, valid rows): ``pyquant/reference/attention.py``.

The reduction to a scalar loss (paper / mean_rows, temperature^2) is plain torch on the [B, H, L_q] rows, in
``pyquant.distill.attention``; ``scale_s`` / ``scale_t`` here are the *effective* multipliers (scale / temperature).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

from .. import reference
from ._dispatch import call, register, kernel_module

__all__ = ["attention_map_kl", "check_attention_map_args", "KERNEL_MAX_HEAD_DIM"]

QK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_HEAD_DIM = 256  # kernels/attention_kd.py pads head dims to a power of two in registers
KERNEL_MAX_SCALE = float(2 ** 26)  # kernels/attention_kd.py MAX_SCALE (its masking sentinel x scale stays finite)


@torch.library.custom_op("pyquant::attention_map_kl", mutates_args=())
def _attention_map_kl_op(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return call("attention_map_kl", q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t)


@_attention_map_kl_op.register_fake
def _(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t):
    b, h, lq, _ = q_s.shape
    return tuple(q_s.new_empty(b, h, lq, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("pyquant::attention_map_kl_backward", mutates_args=())
def _attention_map_kl_backward_op(
    grad_rows: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale_s: float,
    scale_t: float,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return call("attention_map_kl_backward", grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, causal,
                scale_s, scale_t, lse_s, lse_t)


@_attention_map_kl_backward_op.register_fake
def _(grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t, lse_s, lse_t):
    return torch.empty_like(q_s), torch.empty_like(k_s)


def _setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, key_padding_mask, lse_s, lse_t)
    ctx.causal, ctx.scale_s, ctx.scale_t = causal, scale_s, scale_t
    ctx.mark_non_differentiable(lse_s, lse_t)


def _backward(ctx, grad_kl, grad_lse_s, grad_lse_t):
    # the log-sum-exps are statistics for the backward, not differentiable outputs; the teacher gets no gradient
    q_s, k_s, q_t, k_t, kpm, lse_s, lse_t = ctx.saved_tensors
    if grad_kl is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None, None, None, None
    dq, dk = _attention_map_kl_backward_op(grad_kl.contiguous(), q_s, k_s, q_t, k_t, kpm, ctx.causal,
                                           ctx.scale_s, ctx.scale_t, lse_s, lse_t)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None)


_attention_map_kl_op.register_autograd(_backward, setup_context=_setup_context)


# ---- reference backend ------------------------------------------------------------------------------------------
@register("attention_map_kl", "reference")
def _reference_fwd(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t):
    kl, lse_s, lse_t = reference.attention_map_kl_rows(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t)
    return kl.contiguous(), lse_s.contiguous(), lse_t.contiguous()


@register("attention_map_kl_backward", "reference")
def _reference_bwd(grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t, lse_s, lse_t):
    dq, dk = reference.attention_map_kl_rows_backward(grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, causal,
                                                      scale_s, scale_t)
    return dq.contiguous(), dk.contiguous()


# ---- triton backend (kernels imported lazily, on the first call that selects it) -------------------------------
def _kernels():
    return kernel_module("attention_kd")


_WARNED = set()


def _triton_supports(q_s, k_s, q_t, k_t, key_padding_mask=None, causal=False, scale_s=1.0, scale_t=1.0, *rest):
    d = max(q_s.shape[-1], q_t.shape[-1])
    why = None
    if d > KERNEL_MAX_HEAD_DIM:
        why = f"head dim {d} > {KERNEL_MAX_HEAD_DIM}"
    elif max(scale_s, scale_t) > KERNEL_MAX_SCALE:
        why = f"effective softmax scale {max(scale_s, scale_t):g} > {KERNEL_MAX_SCALE:g}"
    elif max(t.numel() for t in (q_s, k_s, q_t, k_t)) >= 2**31:
        why = "a tensor has >= 2**31 elements (the kernel indexes with int32)"
    if why is None:
        return True, "ok"
    if q_s.is_cuda and why not in _WARNED:  # a silent switch to O(L^2) memory would surprise; say it once
        _WARNED.add(why)
        warnings.warn(f"pyquant attention_map_kl: the Triton kernel does not support this call ({why}); "
                      "falling back to the materialized reference (O(L^2) memory)", RuntimeWarning, stacklevel=3)
    return False, why


@register("attention_map_kl", "triton", supports=_triton_supports)
def _triton_fwd(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t):
    return _kernels().attention_kd_fwd(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t)


def _triton_supports_bwd(grad_rows, q_s, k_s, q_t, k_t, *rest):
    return _triton_supports(q_s, k_s, q_t, k_t, *rest)


@register("attention_map_kl_backward", "triton", supports=_triton_supports_bwd)
def _triton_bwd(grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t, lse_s, lse_t):
    return _kernels().attention_kd_bwd(grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t,
                                       lse_s, lse_t)


# ---- public wrapper ---------------------------------------------------------------------------------------------
def check_attention_map_args(q_s, k_s, q_t, k_t, key_padding_mask=None, causal=False) -> None:
    """Raise TypeError/ValueError naming the offending argument; nothing reaches a kernel unchecked."""
    for name, t in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in QK_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if t.device != q_s.device:
            raise ValueError(f"{name} is on {t.device} but q_s is on {q_s.device}")
    b, h, lq, ds = q_s.shape
    if k_s.shape[0] != b or k_s.shape[3] != ds or h % k_s.shape[1]:
        raise ValueError(f"k_s has shape {tuple(k_s.shape)}: expected [{b}, H_kv, L_k, {ds}] with H_kv dividing "
                         f"the student's {h} query heads")
    lk = k_s.shape[2]
    if q_t.shape[0] != b or q_t.shape[2] != lq:
        raise ValueError(f"q_t has shape {tuple(q_t.shape)}: expected [{b}, {h}, {lq}, d_t] (batch and query length "
                         f"of q_s {tuple(q_s.shape)})")
    if q_t.shape[1] != h:
        raise ValueError(f"q_t has {q_t.shape[1]} query heads but q_s has {h}: the maps are compared head by head, "
                         "so teacher and student need the same number of query heads (no head mapping is defined)")
    dt = q_t.shape[3]
    if k_t.shape[0] != b or k_t.shape[2] != lk or k_t.shape[3] != dt or h % k_t.shape[1]:
        raise ValueError(f"k_t has shape {tuple(k_t.shape)}: expected [{b}, H_kv, {lk}, {dt}] with H_kv dividing {h}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.is_complex():
            raise TypeError(f"key_padding_mask must be bool or integer (nonzero = keep), got {key_padding_mask.dtype}"
                            "; pass additive float masks as attn_mask")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}: expected ({b}, {lk}) "
                             "= [batch, key length]")
        if key_padding_mask.device != q_s.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q_s is on {q_s.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def _check_scale(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite positive float, got {v!r}")
    return float(v)


def attention_map_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    scale_s: float,
    scale_t: float,
) -> torch.Tensor:
    """Per-row KL(P_T || P_S), fp32 [B, H, L_q]; P = softmax(q.k * scale + mask) with *effective* scales
    (softmax scale / temperature).  Differentiable w.r.t. q_s and k_s; the teacher (q_t, k_t) gets no gradient.

    q_s [B, H, L_q, d_s], k_s [B, H_kv_s, L_k, d_s], q_t [B, H, L_q, d_t], k_t [B, H_kv_t, L_k, d_t];
    key_padding_mask [B, L_k] bool/int (nonzero = keep); causal: key j visible to query i iff j <= i + L_k - L_q.
    Rows with no kept key are 0.
    """
    check_attention_map_args(q_s, k_s, q_t, k_t, key_padding_mask, causal)
    scale_s = _check_scale("scale_s", scale_s)
    scale_t = _check_scale("scale_t", scale_t)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    kl, _, _ = _attention_map_kl_op(q_s, k_s, q_t.detach(), k_t.detach(), key_padding_mask, causal, scale_s, scale_t)
    return kl

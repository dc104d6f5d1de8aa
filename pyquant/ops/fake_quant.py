"""Fake-quant ops for QAT: weight quantize -> dequantize with a straight-through backward, and 8-bit dynamic activation
fake-quant.  Math: ``pyquant/reference/quant.py`` (the oracle); formats and the dequant rule: ``pyquant/formats.py``.

Ops (``torch.library`` custom ops, each with a fake implementation so ``torch.compile`` traces them):

* ``pyquant::quantize_weight(w, spec_json, scale?, zero_point?) -> (codes uint8 [N, K], scale fp32 [R, G],
  zero_point fp32 [R, G] | empty)`` -- what ``QATLinear.quantized_weight`` and ``convert`` use;
* ``pyquant::fake_quant_weight(w, spec_json, scale?, zero_point?) -> w_hat`` (w's dtype), differentiable in w, scale and
  zero_point through ``pyquant::fake_quant_weight_backward``;
* ``pyquant::fake_quant_weight_backward(grad, w, spec_json, scale?, zero_point?) -> (grad_w, grad_scale, grad_zp)``
  (empty tensors stand for "no gradient");
* ``pyquant::fake_quant_activation(x, symmetric, per_token, clip?) -> x_hat`` with the identity (STE) backward (zero
  where ``|x| >= clip`` when a clip is given).

Memory: the forward saves nothing but its inputs (w and the scale parameters, which autograd keeps alive anyway); the
backward recomputes codes and the in-range mask from them in the same fused pass that reduces the scale gradient, so
no full-size fp32 temporary (and no uint8 mask) is kept between forward and backward.

The spec travels as its JSON string (a constant for ``torch.compile``); the public wrappers take the dataclass.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import reference
from ..formats import ActivationQuantConfig, WeightQuantConfig
from ._dispatch import call, register, kernel_module

__all__ = [
    "quantize_weight",
    "fake_quant_weight",
    "fake_quant_weight_backward",
    "fake_quant_activation",
    "check_fake_quant_weight_args",
]

W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=256)
def _spec(spec_json: str) -> WeightQuantConfig:
    return WeightQuantConfig.from_json(spec_json)


def _spec_json(spec: WeightQuantConfig) -> str:
    """The op argument for a spec (a constant for torch.compile, which need not trace json.dumps)."""
    return _json_cached(spec)


# What torch.compiler.assume_constant_result(_spec_json) does, without importing torch._dynamo (and with it triton)
# at `import pyquant` time: dynamo calls the function eagerly and uses the result as a constant.
_spec_json._dynamo_marked_constant = True


@functools.lru_cache(maxsize=256)
def _json_cached(spec: WeightQuantConfig) -> str:
    return spec.to_json()


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _opt(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Ops return an empty tensor for 'absent' (custom ops cannot return None)."""
    return None if t is None or t.numel() == 0 else t


def _scale_shape(spec: WeightQuantConfig, w: torch.Tensor) -> Tuple[int, int]:
    n, k = w.shape
    return (1, 1) if spec.granularity == "tensor" else (n, k // spec.resolve_group_size(k))


def _scale_shape_fake(spec: WeightQuantConfig, w: torch.Tensor):
    """Like _scale_shape, for symbolic sizes under torch.compile (the wrapper validated the real ones)."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return (1, 1)
    return (n, k // spec.group_size) if spec.granularity == "group" else (n, 1)


# ---- pyquant::quantize_weight -----------------------------------------------------------------------------------
@torch.library.custom_op("pyquant::quantize_weight", mutates_args=())
def _quantize_weight_op(w: torch.Tensor, spec_json: str, scale: Optional[torch.Tensor],
                        zero_point: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return call("quantize_weight", w, spec_json, scale, zero_point)


@_quantize_weight_op.register_fake
def _(w, spec_json, scale, zero_point):
    spec = _spec(spec_json)
    r, g = _scale_shape_fake(spec, w)
    zp = w.new_empty(r, g, dtype=torch.float32) if not spec.symmetric else w.new_empty(0, dtype=torch.float32)
    return w.new_empty(w.shape, dtype=torch.uint8), w.new_empty(r, g, dtype=torch.float32), zp


@register("quantize_weight", "reference")
def _quantize_weight_ref(w, spec_json, scale, zero_point):
    codes, s, zp = reference.quantize_weight(w, _spec(spec_json), scale, zero_point)
    return codes, s, (_empty(w) if zp is None else zp)


# ---- pyquant::fake_quant_weight (+ backward) -------------------------------------------------------------------
@torch.library.custom_op("pyquant::fake_quant_weight", mutates_args=())
def _fake_quant_weight_op(w: torch.Tensor, spec_json: str, scale: Optional[torch.Tensor],
                          zero_point: Optional[torch.Tensor]) -> torch.Tensor:
    return call("fake_quant_weight", w, spec_json, scale, zero_point)


@_fake_quant_weight_op.register_fake
def _(w, spec_json, scale, zero_point):
    return torch.empty_like(w)


@register("fake_quant_weight", "reference")
def _fake_quant_weight_ref(w, spec_json, scale, zero_point):
    return reference.fake_quant_weight(w, _spec(spec_json), scale, zero_point)


@torch.library.custom_op("pyquant::fake_quant_weight_backward", mutates_args=())
def _fake_quant_weight_backward_op(grad: torch.Tensor, w: torch.Tensor, spec_json: str, scale: Optional[torch.Tensor],
                                   zero_point: Optional[torch.Tensor]
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return call("fake_quant_weight_backward", grad, w, spec_json, scale, zero_point)


@_fake_quant_weight_backward_op.register_fake
def _(grad, w, spec_json, scale, zero_point):
    gs = torch.empty_like(scale) if scale is not None else w.new_empty(0, dtype=torch.float32)
    gz = torch.empty_like(zero_point) if zero_point is not None else w.new_empty(0, dtype=torch.float32)
    return torch.empty_like(w), gs, gz


@register("fake_quant_weight_backward", "reference")
def _fake_quant_weight_backward_ref(grad, w, spec_json, scale, zero_point):
    gw, gs, gz = reference.fake_quant_weight_backward(grad, w, _spec(spec_json), scale, zero_point)
    return gw, (_empty(w) if gs is None else gs), (_empty(w) if gz is None else gz)


def _fq_setup_context(ctx, inputs, output):
    w, spec_json, scale, zero_point = inputs
    ctx.save_for_backward(w, scale, zero_point)
    ctx.spec_json = spec_json


def _fq_backward(ctx, grad):
    w, scale, zero_point = ctx.saved_tensors
    gw, gs, gz = _fake_quant_weight_backward_op(grad.contiguous(), w, ctx.spec_json, scale, zero_point)
    return gw, None, _opt(gs) if scale is not None else None, _opt(gz) if zero_point is not None else None


_fake_quant_weight_op.register_autograd(_fq_backward, setup_context=_fq_setup_context)


# ---- pyquant::fake_quant_activation ----------------------------------------------------------------------------
@torch.library.custom_op("pyquant::fake_quant_activation", mutates_args=())
def _fake_quant_activation_op(x: torch.Tensor, symmetric: bool, per_token: bool,
                              clip: Optional[float] = None) -> torch.Tensor:
    return call("fake_quant_activation", x, symmetric, per_token, clip)


@_fake_quant_activation_op.register_fake
def _(x, symmetric, per_token, clip=None):
    return torch.empty_like(x)


def _act_spec(symmetric, per_token, clip) -> ActivationQuantConfig:
    return ActivationQuantConfig(symmetric=symmetric, granularity="token" if per_token else "tensor", clip=clip)


@register("fake_quant_activation", "reference")
def _fake_quant_activation_ref(x, symmetric, per_token, clip=None):
    return reference.fake_quant_activation(x, _act_spec(symmetric, per_token, clip))


def _fqa_setup_context(ctx, inputs, output):
    x, symmetric, per_token = inputs[:3]
    ctx.clip = inputs[3] if len(inputs) > 3 else None
    if ctx.clip is not None:
        ctx.save_for_backward(x)


def _fqa_backward(ctx, grad):
    # Straight-through: a dynamic min-max range clips nothing, so the gradient passes unchanged -- except where a
    # clip range cut the input (zero there, as reference.fake_quant_activation_backward).
    if ctx.clip is None:
        return grad, None, None, None
    (x,) = ctx.saved_tensors
    return grad * (x.abs() < ctx.clip).to(grad.dtype), None, None, None


_fake_quant_activation_op.register_autograd(_fqa_backward, setup_context=_fqa_setup_context)


# ---- triton backend (kernels imported lazily, on the first call that selects it) -------------------------------
def _kernels():
    return kernel_module("fake_quant")


def _triton_supports_w(*args, **kwargs):
    w = args[1] if isinstance(args[0], torch.Tensor) and len(args) == 5 else args[0]
    if w.dtype not in W_DTYPES:
        return False, f"weight dtype {w.dtype} (kernels take float32/bfloat16/float16)"
    if w.numel() >= 2**31:
        return False, "weight has >= 2**31 elements (kernels index with int32)"
    return True, "ok"


def _triton_supports_x(x, symmetric, per_token, clip=None):
    if x.dtype not in W_DTYPES:
        return False, f"x dtype {x.dtype} (kernels take float32/bfloat16/float16)"
    if x.numel() >= 2**31:
        return False, "x has >= 2**31 elements (kernels index with int32)"
    return True, "ok"


@register("quantize_weight", "triton", supports=_triton_supports_w)
def _quantize_weight_triton(w, spec_json, scale, zero_point):
    codes, s, zp = _kernels().fake_quant_weight_fwd(w.contiguous(), _spec(spec_json), scale, zero_point,
                                                    want_out=False, want_codes=True)[1:]
    return codes, s, (_empty(w) if zp is None else zp)


@register("fake_quant_weight", "triton", supports=_triton_supports_w)
def _fake_quant_weight_triton(w, spec_json, scale, zero_point):
    return _kernels().fake_quant_weight_fwd(w.contiguous(), _spec(spec_json), scale, zero_point,
                                            want_out=True, want_codes=False)[0]


@register("fake_quant_weight_backward", "triton", supports=_triton_supports_w)
def _fake_quant_weight_backward_triton(grad, w, spec_json, scale, zero_point):
    gw, gs, gz = _kernels().fake_quant_weight_bwd(grad.contiguous(), w.contiguous(), _spec(spec_json), scale,
                                                  zero_point)
    return gw, (_empty(w) if gs is None else gs), (_empty(w) if gz is None else gz)


@register("fake_quant_activation", "triton", supports=_triton_supports_x)
def _fake_quant_activation_triton(x, symmetric, per_token, clip=None):
    return _kernels().fake_quant_activation(x.contiguous(), symmetric, per_token, clip)


# ---- public wrappers --------------------------------------------------------------------------------------------
def check_fake_quant_weight_args(w, spec, scale, zero_point) -> None:
    """Raise TypeError/ValueError naming the offending argument; nothing reaches a kernel unchecked."""
    if not isinstance(spec, WeightQuantConfig):
        raise TypeError(f"spec must be a WeightQuantConfig, got {type(spec).__name__}")
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in W_DTYPES:
        raise TypeError(f"w must be float32, bfloat16 or float16, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {tuple(w.shape)})")
    want = _scale_shape(spec, w)  # raises ValueError when in_features does not divide by group_size
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor or None, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want} for {spec.describe()} and w {tuple(w.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != w.device:
            raise ValueError(f"{name} is on {t.device} but w is on {w.device}")
    if scale is None and zero_point is not None:
        raise ValueError("zero_point was given without scale: a learnable zero point needs a learnable scale")
    if scale is not None and not spec.symmetric and zero_point is None:
        raise ValueError(f"zero_point is required with a given scale for the asymmetric spec {spec.describe()}")
    if scale is not None and spec.symmetric and zero_point is not None:
        raise ValueError(f"zero_point must be None for the symmetric spec {spec.describe()} (z is the constant "
                         f"code offset {spec.code_offset})")


def quantize_weight(w: torch.Tensor, spec: WeightQuantConfig, scale: Optional[torch.Tensor] = None,
                    zero_point: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """W [N, K] -> (codes uint8 [N, K], scale fp32 [R, G], zero_point fp32 [R, G] or None); no gradient.

    ``scale=None``: the method's own statistics (TWN thresholds at Delta); a given (learnable) scale quantizes every
    method as ``clamp(round(W / s + z), 0, levels - 1)``.  Scales are rounded through ``spec.scale_dtype``.
    """
    check_fake_quant_weight_args(w, spec, scale, zero_point)
    codes, s, zp = _quantize_weight_op(w.detach(), _spec_json(spec), None if scale is None else scale.detach(),
                                       None if zero_point is None else zero_point.detach())
    return codes, s, _opt(zp)


def fake_quant_weight(w: torch.Tensor, spec: WeightQuantConfig, scale: Optional[torch.Tensor] = None,
                      zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """quantize -> dequantize W [N, K] in one pass, output in w's dtype; straight-through backward.

    Gradients: w (zero outside ``spec.clip`` and, with a learnable scale, outside the quantizer's range), and the
    learnable ``scale`` / ``zero_point`` (LSQ or PACT, reduced per channel/group), as in
    ``pyquant.reference.fake_quant_weight_backward``.
    """
    check_fake_quant_weight_args(w, spec, scale, zero_point)
    return _fake_quant_weight_op(w if w.is_contiguous() else w.contiguous(), _spec_json(spec), scale, zero_point)


def fake_quant_weight_backward(grad: torch.Tensor, w: torch.Tensor, spec: WeightQuantConfig,
                               scale: Optional[torch.Tensor] = None, zero_point: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The straight-through backward on its own: (grad_w, grad_scale | None, grad_zero_point | None)."""
    check_fake_quant_weight_args(w, spec, scale, zero_point)
    if not isinstance(grad, torch.Tensor) or grad.shape != w.shape or not grad.dtype.is_floating_point:
        raise ValueError(f"grad must be a floating-point tensor of w's shape {tuple(w.shape)}, got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    if grad.device != w.device:
        raise ValueError(f"grad is on {grad.device} but w is on {w.device}")
    gw, gs, gz = _fake_quant_weight_backward_op(grad.contiguous(), w.contiguous(), _spec_json(spec), scale, zero_point)
    return gw, _opt(gs), _opt(gz)


def fake_quant_activation(x: torch.Tensor, spec: Optional[ActivationQuantConfig] = None) -> torch.Tensor:
    """Dynamic 8-bit min-max fake-quant of x [..., D] (per token: per row of the last dim), STE backward.

    With ``spec.clip``: x is clipped to [-clip, clip] first and the gradient is zero where |x| >= clip (the
    EMNLP'22 setting, see ``ActivationQuantConfig``)."""
    spec = ActivationQuantConfig() if spec is None else spec
    if not isinstance(spec, ActivationQuantConfig):
        raise TypeError(f"spec must be an ActivationQuantConfig, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in W_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor [..., D], got shape {tuple(x.shape)}")
    return _fake_quant_activation_op(x if x.is_contiguous() else x.contiguous(), spec.symmetric,
                                     spec.granularity == "token", spec.clip)

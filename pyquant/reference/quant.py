"""Pure-PyTorch reference for weight/activation quantization, fake-quant and its STE backward.

Readable, float32 math; the oracle for the Triton/CUDA kernels and the CPU fallback backend.
Conventions (see ``pyquant/formats.py``): codes ``c`` in {0..levels-1}, ``w_hat = (c - z) * s``, rounding half up.

Scale shapes: ``[1, 1]`` (per-tensor), ``[N, 1]`` (per-channel) or ``[N, K // group_size]`` (per-group); every
function here broadcasts a per-tensor scale over rows.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..formats import ActivationQuantConfig, WeightQuantConfig

__all__ = [
    "scale_shape",
    "init_weight_scale",
    "round_half_up",
    "quantize_weight",
    "dequantize_weight",
    "fake_quant_weight",
    "fake_quant_weight_backward",
    "lsq_grad_scale",
    "fake_quant_activation",
    "fake_quant_activation_backward",
]

TWN_DELTA_RATIO = 0.7  # TWN threshold: Delta = 0.7 * mean|W| (Li & Liu 2016; TernaryBERT / EMNLP'22 code)
UNIFORM_SYM_DIVISOR = 1.5  # symmetric int2 min-max init: s = max|W| / ((Q_P + Q_N) / 2) = max|W| / 1.5


def round_half_up(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5)


def scale_shape(spec: WeightQuantConfig, out_features: int, in_features: int) -> Tuple[int, int]:
    gs = spec.resolve_group_size(in_features)
    if spec.granularity == "tensor":
        return (1, 1)
    return (out_features, in_features // gs)


def _grouped(w: torch.Tensor, spec: WeightQuantConfig) -> torch.Tensor:
    """View W [N, K] as [R, G, group] where each (r, g) slice shares one scale."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, n * k)
    gs = spec.resolve_group_size(k)
    return w.reshape(n, k // gs, gs)


def _clip(w: torch.Tensor, spec: WeightQuantConfig) -> torch.Tensor:
    return w.clamp(-spec.clip, spec.clip) if spec.clip is not None else w


def _round_scale(s: torch.Tensor, spec: WeightQuantConfig) -> torch.Tensor:
    """Round through the storage dtype (so QAT sees the packed model's exact scales) and keep it > 0."""
    dt = spec.torch_scale_dtype
    s = s.clamp_min(torch.finfo(dt).tiny)
    return s.to(dt).to(torch.float32)


def init_weight_scale(w: torch.Tensor, spec: WeightQuantConfig) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The method's statistics: (scale fp32 [R, G], zero_point fp32 [R, G] or None), rounded through scale_dtype.

    For ``twn`` the returned scale is alpha (the non-learnable forward also needs Delta: see quantize_weight).
    """
    _check_weight(w)
    g = _grouped(_clip(w.float(), spec), spec)
    a = g.abs()
    zero = None
    if spec.method == "twn":
        delta = TWN_DELTA_RATIO * a.mean(-1, keepdim=True)
        keep = a > delta
        cnt = keep.sum(-1)
        s = torch.where(cnt > 0, (a * keep).sum(-1) / cnt.clamp_min(1), torch.zeros_like(cnt, dtype=a.dtype))
    elif spec.method == "absmean":
        s = a.mean(-1)
    elif spec.method == "seq":
        alpha = a.amax(-1)
        s = alpha * (2.0 / 3.0) if spec.ternary else alpha / 2.0
    elif spec.symmetric:  # uniform symmetric
        s = a.amax(-1) / UNIFORM_SYM_DIVISOR
    else:  # uniform asymmetric, min-max over a range that includes 0 (as PyTorch's MinMaxObserver): keeps
        # z = -min/s in [0, 3], finite in a 16-bit scale_dtype (a constant or all-positive group gave z = -inf/huge)
        mn, mx = g.amin(-1).clamp_max(0.0), g.amax(-1).clamp_min(0.0)
        s = _round_scale((mx - mn) / spec.max_code, spec)
        zero = (-mn / s).to(spec.torch_scale_dtype).to(torch.float32)
        return s, zero
    return _round_scale(s, spec), zero


def _expand(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[R, G] (R in {1, N}) -> [N, K], each group's value repeated over its columns."""
    r, g = t.shape
    return t.reshape(r, g, 1).expand(n, g, k // g).reshape(n, k)


def _z(spec: WeightQuantConfig, zero_point: Optional[torch.Tensor], n: int, k: int):
    if spec.symmetric:
        return spec.code_offset
    if zero_point is None:
        raise ValueError("zero_point is required for an asymmetric spec")
    return _expand(zero_point.float(), n, k)


def quantize_weight(
    w: torch.Tensor,
    spec: WeightQuantConfig,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize W [N, K] -> (codes uint8 [N, K], scale fp32, zero_point fp32 or None).

    With ``scale=None`` the method's own statistics are used (TWN thresholds at Delta); with a given (learnable)
    scale every method quantizes as ``c = clamp(round(W/s + z), 0, levels-1)``.
    """
    _check_weight(w)
    n, k = w.shape
    wc = _clip(w.float(), spec)
    if scale is None:
        s, zp = init_weight_scale(w, spec)
        if spec.method == "twn":
            g = _grouped(wc, spec)
            delta = TWN_DELTA_RATIO * g.abs().mean(-1, keepdim=True)
            c = 1 + torch.sign(g) * (g.abs() > delta)
            return c.reshape(n, k).to(torch.uint8), s, None
    else:
        _check_scale(scale, spec, n, k, "scale")
        s = _round_scale(scale.float(), spec)
        zp = None
        if not spec.symmetric:
            if zero_point is None:
                raise ValueError("zero_point is required with a given scale for an asymmetric spec")
            _check_scale(zero_point, spec, n, k, "zero_point")
            zp = zero_point.float().to(spec.torch_scale_dtype).float()
    v = wc / _expand(s, n, k)
    c = round_half_up(v + _z(spec, zp, n, k)).clamp(0, spec.max_code)
    return c.to(torch.uint8), s, zp


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    code_offset: Optional[float],
) -> torch.Tensor:
    """(codes [N, K], scale [R, G], zero_point [R, G] | None, code_offset) -> fp32 [N, K] = (c - z) * s."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D tensor [N, K], got {getattr(codes, 'shape', type(codes).__name__)}")
    n, k = codes.shape
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is None and name == "zero_point":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] not in (1, n) or t.shape[1] == 0 \
                or k % t.shape[1]:
            raise ValueError(f"{name} must be 2-D [1 or {n}, G] with G dividing K={k}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if zero_point is not None:
        z = _expand(zero_point.float(), n, k)
    elif code_offset is None:
        raise ValueError("code_offset is required when zero_point is None")
    else:
        z = code_offset
    return (codes.float() - z) * _expand(scale.float(), n, k)


def fake_quant_weight(
    w: torch.Tensor,
    spec: WeightQuantConfig,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """quantize -> dequantize, returned in w's dtype."""
    codes, s, zp = quantize_weight(w, spec, scale, zero_point)
    return dequantize_weight(codes, s, zp, spec.code_offset).to(w.dtype)


def lsq_grad_scale(spec: WeightQuantConfig, in_features: int, numel: int) -> float:
    """LSQ's gradient scale g = 1 / sqrt(N * Q_P), N = number of weights sharing one scale."""
    if spec.granularity == "tensor":
        per = numel
    else:
        per = spec.resolve_group_size(in_features)
    return 1.0 / math.sqrt(per * spec.qp)


def fake_quant_weight_backward(
    grad_out: torch.Tensor,
    w: torch.Tensor,
    spec: WeightQuantConfig,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Straight-through backward: (grad_w, grad_scale, grad_zero_point).

    grad_w: grad_out where the weight is inside the clip range (``|w| <= clip``) and, with a learnable scale, inside
    the quantizer's range (-Q_N <= w/s <= Q_P, LSQ); 0 elsewhere.
    grad_scale (learnable only), per element before the per-scale sum:
      lsq:  (c - z) - v * inside     (= round(v) - v inside, -Q_N / Q_P at the clip), times g = 1/sqrt(N * Q_P)
      pact: (c - z) * (1 - inside)   (only clipped weights), no gradient scale
    grad_zero_point (asymmetric learnable only): -s outside the range, 0 inside (STE), times g for lsq.
    """
    _check_weight(w)
    if not isinstance(grad_out, torch.Tensor) or grad_out.shape != w.shape:
        raise ValueError(f"grad_out must have the weight's shape {tuple(w.shape)}, got "
                         f"{tuple(grad_out.shape) if isinstance(grad_out, torch.Tensor) else type(grad_out).__name__}")
    n, k = w.shape
    wf = w.float()
    go = grad_out.float()
    clip_mask = (wf.abs() <= spec.clip) if spec.clip is not None else torch.ones_like(wf, dtype=torch.bool)
    if scale is None:
        return (go * clip_mask).to(w.dtype), None, None
    codes, s, zp = quantize_weight(w, spec, scale, zero_point)
    s_full = _expand(s, n, k)
    z = _z(spec, zp, n, k)
    v = _clip(wf, spec) / s_full
    inside = ((v + z) >= 0) & ((v + z) <= spec.max_code)
    grad_w = go * (inside & clip_mask)
    q = codes.float() - z
    if spec.scale_grad == "lsq":
        ds = q - v * inside
        g = lsq_grad_scale(spec, k, w.numel())
    else:
        ds = q * (~inside)
        g = 1.0
    grad_s = _reduce_to(go * ds * g, scale.shape)
    grad_z = None
    if not spec.symmetric:
        grad_z = _reduce_to(go * (-s_full) * (~inside) * g, zero_point.shape)
    return grad_w.to(w.dtype), grad_s.to(scale.dtype), None if grad_z is None else grad_z.to(zero_point.dtype)


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    n, k = t.shape
    r, g = shape
    return t.reshape(n, g, k // g).sum(-1).reshape(n, g).sum(0, keepdim=True) if r == 1 else \
        t.reshape(n, g, k // g).sum(-1)


def fake_quant_activation(x: torch.Tensor, spec: ActivationQuantConfig) -> torch.Tensor:
    """Dynamic 8-bit min-max fake-quant of x [..., D] (per token = per row of the last dim), after clipping to
    ``[-spec.clip, spec.clip]`` when ``spec.clip`` is set."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    xf = x.float()
    if spec.clip is not None:  # clip, then the range of the clipped values (kd-qat-large-enc utils_quant.py:28-32)
        xf = xf.clamp(-spec.clip, spec.clip)
    red = dict(dim=-1, keepdim=True) if spec.granularity == "token" else {}
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        s = (xf.abs().amax(**red) / 127.0).clamp_min(tiny)
        q = round_half_up(xf / s).clamp(-127, 127)
        out = q * s
    else:
        # the range includes 0 (z in [0, 255]); without it an all-positive token had z clamped to 0 and values
        # above (max - min) clipped, and an all-negative one lost its top codes
        mn, mx = xf.amin(**red).clamp_max(0.0), xf.amax(**red).clamp_min(0.0)
        s = ((mx - mn) / 255.0).clamp_min(tiny)
        z = round_half_up(-mn / s).clamp(0, 255)
        q = (round_half_up(xf / s) + z).clamp(0, 255)
        out = (q - z) * s
    return out.to(x.dtype)


def fake_quant_activation_backward(grad: torch.Tensor, x: torch.Tensor, spec: ActivationQuantConfig) -> torch.Tensor:
    """Straight-through gradient of :func:`fake_quant_activation`: ``grad`` unchanged, except zero where
    ``|x| >= spec.clip`` (the unclipped input; kd-qat-large-enc utils_quant.py:57-58)."""
    if spec.clip is None:
        return grad
    return grad * (x.abs() < spec.clip).to(grad.dtype)


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {w.dtype}")


def _check_scale(t, spec: WeightQuantConfig, n: int, k: int, name: str) -> None:
    want = scale_shape(spec, n, k)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {want} for {spec.describe()} and weight [{n}, {k}], got {got}")

"""Attention distillation losses (Kim et al., EMNLP 2022): attention-map KL, attention-output MSE, and the
TernaryBERT score-MSE baseline.

``attention_map_loss`` runs the streaming op ``pyquant.ops.attention_map_kl`` (Triton kernel on CUDA: O(B*H*L)
memory, no L x L map; the materialized reference elsewhere) and reduces its per-row KL here.  Every normalization
choice is documented in ``pyquant/reference/attention.py`` (the oracle the tests compare against):

* row loss ``KL(P_T || P_S)`` over kept keys, ``P = softmax(scale * q.k / temperature + mask)``;
* ``reduction="paper"``: per example and head, the KL summed over its valid query rows and kept keys divided by
  *that example's* valid length, then the mean over batch x heads -- MarsJacobs/kd-qat-large-enc ``main.py``
  (d037e2d) l. 743/748 ``torch.sum(..., dim=-1) / seq_lengths.view(-1, 1)`` and l. 752 ``torch.mean(kld_loss)``
  (summing the layers' losses is the caller's, l. 758); ``"mean_rows"``: mean over all valid rows;
* both multiplied by ``temperature ** 2``;
* padding keys are masked; padding query rows (the key-padding mask, when L_q == L_k) and rows with no kept key are
  excluded; ``causal=True`` masks key j for query i unless j <= i + L_k - L_q.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..ops.attention_kd import attention_map_kl, check_attention_map_args

__all__ = ["attention_map_loss", "attention_output_loss", "attention_score_mse"]


def _scales(q_s, q_t, scale, teacher_scale, temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite positive float, got {temperature!r}")
    for name, v in (("scale", scale), ("teacher_scale", teacher_scale)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{name} must be None or a finite positive float, got {v!r}")
    sc_s = 1.0 / math.sqrt(q_s.shape[-1]) if scale is None else float(scale)
    t = teacher_scale if teacher_scale is not None else scale
    sc_t = 1.0 / math.sqrt(q_t.shape[-1]) if t is None else float(t)
    return sc_s, sc_t


def _check_attn_mask(attn_mask, b, h, lq, lk, device):
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, b) or attn_mask.shape[1] not in (1, h) \
            or tuple(attn_mask.shape[2:]) != (lq, lk):
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}: expected [{b} or 1, {h} or 1, {lq}, {lk}]")
    if not (attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point):
        raise TypeError(f"attn_mask must be bool (True = keep) or an additive float mask, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q_s is on {device}")


def attention_map_loss(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    teacher_scale: Optional[float] = None,
    temperature: float = 1.0,
    reduction: str = "paper",
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention-map distillation loss KL(P_T || P_S) of one layer, a differentiable fp32 scalar.

    q_s [B, H, L_q, d_s], k_s [B, H_kv_s, L_k, d_s] (student, after RoPE; GQA/MQA: H_kv_s divides H, K not
    repeated); q_t [B, H, L_q, d_t], k_t [B, H_kv_t, L_k, d_t] (teacher, no gradient; same number of query heads).
    key_padding_mask: [B, L_k] bool/int, nonzero = keep.  ``scale``: the student's softmax scale (default
    1/sqrt(d_s)); ``teacher_scale``: default ``scale`` when given, else 1/sqrt(d_t).  ``reduction``:
    ``"paper"`` (default) = mean over batch x heads of [sum over the example's valid query rows and kept keys of
    KL(P_T || P_S)] / the example's valid length, as kd-qat-large-enc ``main.py`` l. 743/748
    (``/ seq_lengths.view(-1, 1)``) and l. 752 (``torch.mean``); ``"mean_rows"`` = mean over all valid query rows
    (every valid token weighs the same).  Anything else raises ValueError.  ``attn_mask`` (optional,
    [B|1, H|1, L_q, L_k], bool keep-mask or additive float): a general mask, computed by the materialized
    reference (O(L^2) memory) -- the streaming kernel takes key-padding + causal, which covers encoder and decoder
    models.
    """
    check_attention_map_args(q_s, k_s, q_t, k_t, key_padding_mask, causal)
    if reduction not in reference.ATTENTION_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid: expected one of {reference.ATTENTION_REDUCTIONS}")
    sc_s, sc_t = _scales(q_s, q_t, scale, teacher_scale, temperature)
    b, h, lq, _ = q_s.shape
    lk = k_s.shape[2]
    if attn_mask is not None:
        _check_attn_mask(attn_mask, b, h, lq, lk, q_s.device)
        return reference.attention_map_loss(q_s, k_s, q_t, k_t, key_padding_mask, causal=causal, scale=sc_s,
                                            teacher_scale=sc_t, temperature=temperature, reduction=reduction,
                                            attn_mask=attn_mask)
    tau = float(temperature)
    kl = attention_map_kl(q_s, k_s, q_t, k_t, key_padding_mask, causal=causal, scale_s=sc_s / tau,
                          scale_t=sc_t / tau)
    # valid rows without building [L_q, L_k]: a row has a kept key iff some key is kept within its causal window
    valid = _row_valid(b, lq, lk, key_padding_mask, causal, q_s.device)
    return reference.reduce_attention_kl(kl, valid, reduction, tau)


def _row_valid(b, lq, lk, key_padding_mask, causal, device) -> torch.Tensor:
    """bool [B, 1, L_q] in O(B * L) memory (same rule as ``reference.attention_row_valid``)."""
    i = torch.arange(lq, device=device)
    if key_padding_mask is None:
        has_key = (i + (lk - lq) >= 0) if causal else torch.ones(lq, dtype=torch.bool, device=device)
        valid = has_key[None, :].expand(b, lq)
    else:
        kp = key_padding_mask != 0
        if causal:
            # number of kept keys among 0..i+(lk-lq): prefix count
            cnt = torch.cumsum(kp.to(torch.int32), dim=1)
            last = (i + (lk - lq)).clamp(max=lk - 1)
            has_key = torch.where(last >= 0, cnt[:, last.clamp(min=0)] > 0, torch.zeros_like(kp[:, :1]).expand(b, lq))
        else:
            has_key = kp.any(1, keepdim=True).expand(b, lq)
        valid = has_key & kp if lq == lk else has_key
    return valid[:, None, :]


def attention_output_loss(
    out_s: torch.Tensor, out_t: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MSE between student and teacher attention sub-layer outputs [B, L, D] (teacher detached), fp32 scalar.

    No mask: mean over all elements (the paper's ``MSELoss``).  With key_padding_mask [B, L] (nonzero = keep): mean
    over the valid tokens' elements; 0 if none is valid.  In BERT this is the ``BertSelfOutput`` output
    (LayerNorm(W_O context + b + X)); in pre-LN decoders the attention block output (before the residual add).
    """
    for name, t in (("out_s", out_s), ("out_t", out_t)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 3 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 3-D tensor [batch, seq_len, hidden], got {tuple(t.shape)}")
    if out_s.shape != out_t.shape:
        raise ValueError(f"out_s has shape {tuple(out_s.shape)} but out_t has {tuple(out_t.shape)}: they must match "
                         "(no projection between hidden sizes is defined)")
    if out_s.device != out_t.device:
        raise ValueError(f"out_t is on {out_t.device} but out_s is on {out_s.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype.is_floating_point:
            raise TypeError("key_padding_mask must be a bool or integer torch.Tensor (nonzero = keep) or None")
        if tuple(key_padding_mask.shape) != tuple(out_s.shape[:2]):
            raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}: expected "
                             f"{tuple(out_s.shape[:2])} = [batch, seq_len]")
    return reference.attention_output_loss(out_s, out_t, key_padding_mask)


def attention_score_mse(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    teacher_scale: Optional[float] = None,
) -> torch.Tensor:
    """TernaryBERT baseline: MSE of the scaled pre-softmax scores, masked entries zeroed in both, mean over all
    B*H*L_q*L_k entries.  Materializes both [B, H, L_q, L_k] maps: for comparison only."""
    check_attention_map_args(q_s, k_s, q_t, k_t, key_padding_mask, causal)
    sc_s, sc_t = _scales(q_s, q_t, scale, teacher_scale, 1.0)
    return reference.attention_score_mse(q_s, k_s, q_t, k_t, key_padding_mask, causal=causal, scale=sc_s,
                                         teacher_scale=sc_t)

"""Pure-PyTorch reference for attention distillation losses (materializes the L_q x L_k maps, fp32).

Conventions shared with the fused kernel (``kernels/attention_kd.py``) and the public API
(``pyquant.distill.attention``):

* ``q``: [B, H, L_q, d]; ``k``: [B, H_kv, L_k, d] with ``H % H_kv == 0``.  Query head ``h`` uses key head
  ``h // (H // H_kv)`` (the grouping of ``transformers``' ``repeat_kv``), so GQA/MQA needs no repeated K.
  Teacher and student must have the same number of *query* heads (the maps are compared head by head); their key-head
  counts and head dims may differ.
* Scores ``s = (q . k) * scale / temperature``; ``scale`` defaults to ``1/sqrt(d)`` per model.
* ``key_padding_mask``: [B, L_k], bool or integer, nonzero = keep.  ``causal=True``: query ``i`` sees key ``j`` iff
  ``j <= i + (L_k - L_q)`` (bottom-right aligned; the usual ``j <= i`` when ``L_q == L_k``).
* A query row is *valid* when at least one key is kept for it and, when ``L_q == L_k`` and a key-padding mask is
  given, the query token itself is not padding (the key-padding mask doubles as the query-padding mask).
  Rows that are not valid contribute 0 (never NaN).
* Row loss: ``KL_i = sum_j P_T[i, j] * (log P_T[i, j] - log P_S[i, j])`` over kept keys.
* Reductions (``reduce_attention_kl``), both multiplied by ``temperature**2``:
  ``"paper"``: ``mean over (b, h) of [sum of example b's valid rows' KL] / n_b`` with n_b = the number of valid query
  rows of example b (its own valid length; an example with none adds 0) -- Kim et al.'s code
  (MarsJacobs/kd-qat-large-enc ``main.py`` at d037e2d: l. 727 ``mask[sent, :, :s, :s] = 1.0`` keeps the example's
  s valid query rows and keys, l. 743/748 ``torch.sum(..., dim=-1) / seq_lengths.view(-1, 1)`` divides each
  (example, head) sum by that example's length, l. 752 ``torch.mean(kld_loss)`` averages over batch x heads).
  For a right-padded BERT batch n_b is exactly its ``seq_length``.  The paper's code clamps both probabilities at
  1e-8 before the logs (l. 737-738); this KL does not: the two differ only on entries where a probability is below
  1e-8 (tests/test_attention_kd.py compares them on padded batches);
  ``"mean_rows"``: ``sum(valid rows' KL) / (H * number of valid (b, i) rows)`` -- the mean over valid rows.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "attention_keep_mask",
    "attention_row_valid",
    "attention_map_kl_rows",
    "attention_map_kl_rows_backward",
    "reduce_attention_kl",
    "attention_map_loss",
    "attention_output_loss",
    "attention_score_mse",
    "ATTENTION_REDUCTIONS",
]

ATTENTION_REDUCTIONS = ("paper", "mean_rows")


def _repeat_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    g = n_heads // k.shape[1]
    return k if g == 1 else k.repeat_interleave(g, dim=1)


def attention_keep_mask(
    batch: int,
    lq: int,
    lk: int,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    attn_mask: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """bool [B, 1|H, L_q, L_k]: True where query i may attend key j.

    ``attn_mask`` (reference only): bool (True = keep) or additive float (``-inf``/very negative = masked, anything
    else kept; finite additive biases are *added* to the scores by ``_scores``), shape broadcastable to [B, H, L_q, L_k].
    """
    keep = torch.ones(batch, 1, lq, lk, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        keep = keep & (key_padding_mask != 0)[:, None, None, :].to(device)
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        keep = keep & (j <= i + (lk - lq))
    if attn_mask is not None:
        am = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
        keep = keep & am.to(device)
    return keep


def attention_row_valid(keep: torch.Tensor, key_padding_mask: Optional[torch.Tensor], lq: int, lk: int) -> torch.Tensor:
    """bool [B, 1|H, L_q]: rows that count in the reduction (see the module docstring)."""
    valid = keep.any(-1)
    if key_padding_mask is not None and lq == lk:
        valid = valid & (key_padding_mask != 0)[:, None, :].to(valid.device)
    return valid


def _scores(q, k, scale, temperature, attn_mask):
    s = torch.matmul(q.float(), _repeat_kv(k, q.shape[1]).float().transpose(-1, -2)) * (scale / temperature)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        bias = attn_mask.float()
        s = s + torch.where(bias > torch.finfo(attn_mask.dtype).min / 2, bias, torch.zeros_like(bias)) / temperature
    return s


def _default_scale(d: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def attention_map_kl_rows(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale_s: float,
    scale_t: float,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL(P_T || P_S) [B, H, L_q] fp32 and the row log-sum-exps (lse_s, lse_t) of the effective scores.

    ``scale_s``/``scale_t`` are the effective multipliers (softmax scale / temperature).  Rows with no kept key get
    KL = 0 and lse = 0 (the kernel's convention).  Differentiable by autograd w.r.t. q_s, k_s.
    """
    b, h, lq, _ = q_s.shape
    lk = k_s.shape[2]
    keep = attention_keep_mask(b, lq, lk, key_padding_mask, causal, attn_mask, q_s.device)
    keep = keep.expand(b, h, lq, lk)
    s_s = _scores(q_s, k_s, scale_s, 1.0, attn_mask)
    s_t = _scores(q_t, k_t, scale_t, 1.0, attn_mask).detach()
    neg = torch.tensor(float("-inf"), device=q_s.device)
    s_s = torch.where(keep, s_s, neg)
    s_t = torch.where(keep, s_t, neg)
    row_ok = keep.any(-1)
    # rows with every key masked: replace by zeros so that no -inf - -inf appears; their result is zeroed below
    s_s = torch.where(row_ok[..., None], s_s, torch.zeros_like(s_s))
    s_t = torch.where(row_ok[..., None], s_t, torch.zeros_like(s_t))
    lse_s = torch.logsumexp(s_s, -1)
    lse_t = torch.logsumexp(s_t, -1)
    p_t = torch.exp(s_t - lse_t[..., None])
    diff = torch.where(keep, s_t - s_s, torch.zeros_like(s_s))
    kl = (p_t * diff).sum(-1) - lse_t + lse_s
    zero = torch.zeros_like(kl)
    return torch.where(row_ok, kl, zero), torch.where(row_ok, lse_s, zero), torch.where(row_ok, lse_t, zero)


def attention_map_kl_rows_backward(
    grad_rows: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dq_s, dk_s) for upstream gradient ``grad_rows`` [B, H, L_q] on the per-row KL: the explicit formula
    dS = g * (P_S - P_T) * scale_s, dQ = dS @ K_S, dK = dS^T @ Q_S summed over the query heads sharing a key head."""
    b, h, lq, _ = q_s.shape
    hk, lk = k_s.shape[1], k_s.shape[2]
    keep = attention_keep_mask(b, lq, lk, key_padding_mask, causal, None, q_s.device).expand(b, h, lq, lk)
    row_ok = keep.any(-1, keepdim=True)

    def probs(q, k, sc):
        s = _scores(q, k, sc, 1.0, None).masked_fill(~keep, float("-inf"))
        s = torch.where(row_ok, s, torch.zeros_like(s))
        return torch.where(keep, torch.softmax(s, -1), torch.zeros_like(s))

    ds = grad_rows.float()[..., None] * (probs(q_s, k_s, scale_s) - probs(q_t, k_t, scale_t)) * scale_s
    dq = ds @ _repeat_kv(k_s, h).float()
    dk = (ds.transpose(-1, -2) @ q_s.float()).reshape(b, hk, h // hk, lk, -1).sum(2)
    return dq.to(q_s.dtype), dk.to(k_s.dtype)


def reduce_attention_kl(
    kl_rows: torch.Tensor, row_valid: torch.Tensor, reduction: str = "paper", temperature: float = 1.0
) -> torch.Tensor:
    """Reduce per-row KL [B, H, L_q] over valid rows (bool, broadcastable) to a scalar (see the module docstring).

    ``"paper"``: per (example, head) the sum over valid rows divided by that example's number of valid rows, mean
    over B x H (kd-qat-large-enc main.py l. 743/748 ``/ seq_lengths.view(-1, 1)``, l. 752 ``torch.mean``);
    ``"mean_rows"``: the mean over all valid rows.  Unknown names raise ValueError."""
    if reduction not in ATTENTION_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is invalid: expected one of {ATTENTION_REDUCTIONS}")
    b, h, lq = kl_rows.shape
    valid = row_valid.expand(b, h, lq)
    kept = torch.where(valid, kl_rows, torch.zeros_like(kl_rows))
    if reduction == "paper":
        # each (example, head) sum over its valid rows divided by its own valid length, then the mean over B x H
        n = valid.sum(-1)
        out = (kept.sum(-1) / n.clamp_min(1)).mean()
    else:
        total = kept.sum()
        n = valid.sum()
        out = torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))
    return out * (float(temperature) ** 2)


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
    """Materialized attention-map KL loss (the oracle): builds both fp32 probability maps like the paper's code.

    ``scale`` is the student's softmax scale (default 1/sqrt(d_s)); ``teacher_scale`` defaults to ``scale`` when
    given, else 1/sqrt(d_t).  Gradients flow to q_s and k_s only (the teacher is detached).
    """
    sc_s = _default_scale(q_s.shape[-1], scale)
    sc_t = _default_scale(q_t.shape[-1], teacher_scale if teacher_scale is not None else scale)
    tau = float(temperature)
    kl, _, _ = attention_map_kl_rows(q_s, k_s, q_t.detach(), k_t.detach(), key_padding_mask, causal,
                                     sc_s / tau, sc_t / tau, attn_mask)
    b, h, lq, _ = q_s.shape
    keep = attention_keep_mask(b, lq, k_s.shape[2], key_padding_mask, causal, attn_mask, q_s.device)
    valid = attention_row_valid(keep, key_padding_mask, lq, k_s.shape[2])
    return reduce_attention_kl(kl, valid, reduction, tau)


def attention_output_loss(
    out_s: torch.Tensor, out_t: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MSE between attention sub-layer outputs [B, L, D] (teacher detached), fp32.

    Without a mask: the mean over all elements (``torch.nn.functional.mse_loss``, as the paper's code).  With a
    key-padding mask [B, L]: the mean over the valid tokens' elements, sum(diff^2 over valid) / (n_valid * D); 0 when
    no token is valid.
    """
    diff = out_s.float() - out_t.detach().float()
    if key_padding_mask is None:
        return (diff * diff).mean()
    m = (key_padding_mask != 0).to(diff.device)
    sq = (diff * diff).sum(-1)
    n = m.sum() * diff.shape[-1]
    total = torch.where(m, sq, torch.zeros_like(sq)).sum()
    return torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))


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
    """TernaryBERT baseline: MSE between the scaled pre-softmax scores with masked entries set to 0 in both maps;
    mean over all B*H*L_q*L_k entries (as TernaryBERT's ``MSELoss`` on the zeroed maps).  Materializes both maps."""
    b, h, lq, _ = q_s.shape
    lk = k_s.shape[2]
    sc_s = _default_scale(q_s.shape[-1], scale)
    sc_t = _default_scale(q_t.shape[-1], teacher_scale if teacher_scale is not None else scale)
    keep = attention_keep_mask(b, lq, lk, key_padding_mask, causal, None, q_s.device).expand(b, h, lq, lk)
    s_s = _scores(q_s, k_s, sc_s, 1.0, None)
    s_t = _scores(q_t.detach(), k_t.detach(), sc_t, 1.0, None)
    diff = torch.where(keep, s_s - s_t, torch.zeros_like(s_s))
    return (diff * diff).mean()

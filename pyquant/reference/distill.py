"""Pure-PyTorch reference of the distillation losses on logits and hidden states.

Conventions (shared with the chunked implementation in ``pyquant.distill.losses``):

* logits are ``[..., V]`` (any leading shape, e.g. ``[B, L, V]``); they are *already aligned* with ``labels``
  (for causal LMs the caller shifts: ``logits[:, :-1]`` against ``labels[:, 1:]``).
* ``labels`` (when given) are integer ``[...]`` with ``ignore_index`` (default -100) marking tokens that take no
  part in any token loss; without labels every token counts.
* all math is fp32, whatever the input dtype.
* temperature ``T``: the soft losses compare ``softmax(s / T)`` with ``softmax(t / T)`` and are multiplied by
  ``T**2`` so that their gradient magnitude does not shrink as ``1/T**2`` when T grows (Hinton et al., 2015);
  with ``T = 1`` nothing is scaled.

Losses
------
``soft_cross_entropy``   per token  ``-T^2 * sum_v p_t(v) log p_s(v)``                     (mean over tokens)
``kl_divergence``        per token  ``T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v))``       (mean over tokens)
    (same gradient w.r.t. the student as the soft CE: they differ by the teacher's entropy, a constant)
``tsld_token_weights``   TSLD (Kim et al., NeurIPS 2023): ``CE_i = -log p_t(label_i)`` of the *teacher*, and
    ``w_i = softmax_i(CE_i / tau)`` over the valid tokens of each sequence (last-but-one dim), ``tau = 10``;
    detached (no gradient).  Tokens the teacher finds hard get more weight, the weights of a sequence sum to 1.
``tsld_loss``            ``reduction="sum"`` (default, the paper's code): ``sum_seq sum_i w_i * softCE_i`` over every
    sequence and valid token -- aiha-lab/TSLD ``utils/utils_quant.py`` line 100 (``(... * token_scale).sum() # SUM``);
    ``reduction="mean"``: ``(1 / n_seq) * sum_seq sum_i w_i * softCE_i`` (sequences with no valid token excluded),
    the per-sequence mean that line 101 of the same file leaves commented out.  With "sum" the term grows with the
    batch size (B times the "mean" value) relative to the ground-truth CE, as in the paper's training.
    The TSLD objective adds the ground-truth CE of the student (``cross_entropy``) to this term; the Distiller
    weights and logs both separately.  Difference from the paper's code on ignored tokens (``ignore_index``): the
    paper's ``CrossEntropyLoss(reduction="none")`` gives an ignored token CE 0, which still enters the softmax
    (weight exp(0) / Z) and its soft CE is summed; pyquant gives ignored tokens weight 0 and excludes them.  The
    paper trains on packed blocks with no ignored token (``utils/lm_dataset.py`` group_texts), where both agree.
``hidden_mse``           ``sum over mapped layers of mean((h_s - h_t)^2)`` over valid tokens and features.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "soft_cross_entropy",
    "kl_divergence",
    "logit_kd_loss",
    "cross_entropy",
    "teacher_token_ce",
    "tsld_token_weights",
    "tsld_loss",
    "hidden_mse",
    "resolve_layer_map",
    "KD_KINDS",
    "TSLD_REDUCTIONS",
]

KD_KINDS = ("soft_ce", "kl")
TSLD_REDUCTIONS = ("sum", "mean")


def check_tsld_reduction(reduction, name: str = "reduction") -> str:
    if not isinstance(reduction, str) or reduction not in TSLD_REDUCTIONS:
        raise ValueError(f"{name}={reduction!r} is invalid: expected one of {TSLD_REDUCTIONS} ('sum' is the "
                         "paper's code, aiha-lab/TSLD utils/utils_quant.py:100)")
    return reduction


def _check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be [..., V] with at least 2 dims, got shape {tuple(x.shape)}")


def _check_pair(student_logits, teacher_logits) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)} (same tokens and same vocabulary)"
        )


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a float > 0")
    return float(temperature)


def _valid(labels: Optional[torch.Tensor], shape, ignore_index: int, device) -> torch.Tensor:
    """Boolean mask [...] of the tokens that count."""
    if labels is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits' leading shape {tuple(shape)}")
    return labels != ignore_index


def _mean_over(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    n = valid.sum()
    return (per_token * valid).sum() / n.clamp_min(1)


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0, labels=None,
                       ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``-T^2 sum_v softmax(t/T) log_softmax(s/T)`` per token; ``reduction`` "mean" (over valid tokens) or "none"."""
    _check_pair(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    pt = F.softmax(teacher_logits.float() / t, dim=-1)
    per = -(pt * log_ps).sum(-1) * (t * t)
    return _reduce(per, labels, ignore_index, reduction)


def kl_divergence(student_logits, teacher_logits, temperature: float = 1.0, labels=None,
                  ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` per token; ``reduction`` "mean" or "none"."""
    _check_pair(student_logits, teacher_logits)
    t = _check_temperature(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * (t * t)
    return _reduce(per, labels, ignore_index, reduction)


def logit_kd_loss(student_logits, teacher_logits, temperature: float = 1.0, kind: str = "soft_ce", labels=None,
                  ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Logit KD of the given ``kind`` ("soft_ce" or "kl")."""
    if kind == "soft_ce":
        return soft_cross_entropy(student_logits, teacher_logits, temperature, labels, ignore_index, reduction)
    if kind == "kl":
        return kl_divergence(student_logits, teacher_logits, temperature, labels, ignore_index, reduction)
    raise ValueError(f"kind={kind!r} is invalid: expected one of {KD_KINDS}")


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Ground-truth cross-entropy in fp32; mean over tokens whose label is not ``ignore_index``."""
    _check_logits("logits", logits)
    _valid(labels, logits.shape[:-1], ignore_index, logits.device)
    safe = labels.clamp_min(0)
    per = -F.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return _reduce(per, labels, ignore_index, reduction)


def teacher_token_ce(teacher_logits, labels, ignore_index: int = -100) -> torch.Tensor:
    """Per-token CE of the teacher ``-log p_t(label)``, fp32 ``[...]``; 0 at ignored tokens."""
    per = cross_entropy(teacher_logits, labels, ignore_index, reduction="none")
    return per * (labels != ignore_index)


def tsld_token_weights(teacher_ce, labels=None, tau: float = 10.0, ignore_index: int = -100) -> torch.Tensor:
    """TSLD weights ``softmax over the sequence of (CE_i / tau)``, ignored tokens get weight 0; detached fp32.

    ``teacher_ce`` is ``[..., L]`` (per-token CE of the teacher, e.g. from :func:`teacher_token_ce`); the softmax
    runs over the last dim.  A sequence with no valid token gets all-zero weights.
    """
    if not isinstance(teacher_ce, torch.Tensor) or not teacher_ce.dtype.is_floating_point or teacher_ce.dim() < 1:
        raise TypeError("teacher_ce must be a floating-point tensor [..., L]")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau={tau!r} is invalid: expected a float > 0 (TSLD uses 10)")
    valid = _valid(labels, teacher_ce.shape, ignore_index, teacher_ce.device)
    z = (teacher_ce.detach().float() / float(tau)).masked_fill(~valid, float("-inf"))
    any_valid = valid.any(-1, keepdim=True)
    z = torch.where(any_valid, z, torch.zeros_like(z))  # avoid NaN from an all -inf row
    return torch.softmax(z, dim=-1) * valid


def tsld_loss(student_logits, teacher_logits, labels, tau: float = 10.0, temperature: float = 1.0,
              ignore_index: int = -100, reduction: str = "sum") -> torch.Tensor:
    """TSLD logit term on ``[..., L, V]`` logits, labels ``[..., L]``.

    ``reduction="sum"`` (default): ``sum over sequences and tokens of w_i * softCE_i``, as aiha-lab/TSLD
    ``utils/utils_quant.py`` line 100; ``"mean"``: the same divided by the number of sequences with a valid token
    (the per-sequence mean, line 101 there, commented out).  ``w_i``: :func:`tsld_token_weights` (line 95).
    """
    check_tsld_reduction(reduction)
    _check_pair(student_logits, teacher_logits)
    if student_logits.dim() < 3:
        raise ValueError(f"student_logits must be [..., L, V] for TSLD, got shape {tuple(student_logits.shape)}")
    w = tsld_token_weights(teacher_token_ce(teacher_logits, labels, ignore_index), labels, tau, ignore_index)
    per = soft_cross_entropy(student_logits, teacher_logits, temperature, labels, ignore_index, reduction="none")
    seq_loss = (w * per).sum(-1)
    if reduction == "sum":
        return seq_loss.sum()
    has = (labels != ignore_index).any(-1)
    return (seq_loss * has).sum() / has.sum().clamp_min(1)


def _reduce(per: torch.Tensor, labels, ignore_index: int, reduction: str) -> torch.Tensor:
    valid = _valid(labels, per.shape, ignore_index, per.device)
    if reduction == "none":
        return per * valid
    if reduction == "mean":
        return _mean_over(per, valid)
    raise ValueError(f"reduction={reduction!r} is invalid: expected 'mean' or 'none'")


def resolve_layer_map(n_student: int, n_teacher: int, layer_map: Optional[Sequence[int]] = None) -> list:
    """Teacher index for each student hidden state (index 0 = embedding output).

    Equal depths map one to one.  Different depths need ``layer_map`` (length ``n_student``, teacher indices);
    otherwise ValueError, so a mismatch is never silently truncated.
    """
    if layer_map is None:
        if n_student != n_teacher:
            raise ValueError(
                f"student has {n_student} hidden states and teacher has {n_teacher}: pass layer_map (a teacher index "
                f"for each of the {n_student} student states, e.g. uniform: "
                f"{[round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)]})"
            )
        return list(range(n_student))
    lm = list(layer_map)
    if len(lm) != n_student or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_teacher
                                   for i in lm):
        raise ValueError(f"layer_map={lm!r} is invalid: expected {n_student} ints in [0, {n_teacher})")
    return lm


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               layer_map: Optional[Sequence[int]] = None, attention_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """Sum over student states ``j`` of ``mean((h_s[j] - h_t[map[j]])^2)`` (fp32).

    States are ``[B, L, D]`` (embedding output first, then each layer, as ``output_hidden_states`` returns them).
    With ``attention_mask [B, L]`` only its nonzero tokens count (mean over those tokens times D).
    """
    if not isinstance(student_hidden, (list, tuple)) or not isinstance(teacher_hidden, (list, tuple)):
        raise TypeError("student_hidden and teacher_hidden must be sequences of [B, L, D] tensors")
    lm = resolve_layer_map(len(student_hidden), len(teacher_hidden), layer_map)
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for j, i in enumerate(lm):
        hs, ht = student_hidden[j], teacher_hidden[i]
        if hs.shape != ht.shape:
            raise ValueError(f"student hidden state {j} has shape {tuple(hs.shape)} but teacher state {i} has "
                             f"{tuple(ht.shape)} (hidden MSE needs equal widths)")
        d2 = (hs.float() - ht.float()).pow(2)
        if attention_mask is None:
            total = total + d2.mean()
        else:
            m = attention_mask.to(d2.dtype).unsqueeze(-1)
            total = total + (d2 * m).sum() / (m.sum() * d2.shape[-1]).clamp_min(1)
    return total

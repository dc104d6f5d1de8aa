"""Chunked logit losses: ground-truth CE + logit KD + TSLD without ever holding a full fp32 ``[tokens, V]`` tensor.

The student side is either its logits (any dtype; each chunk is upcast to fp32 on its own) or, better, its final
hidden states plus the lm_head weight, in which case the student's logits are never materialized at all (the idea of
Liger-Kernel's fused-linear chunked distillation).  The teacher side is logits (e.g. bf16) or hidden + weight too.

How autograd works through the chunks: the forward of ``_ChunkedLogitLoss`` walks the tokens ``chunk_size`` at a
time, builds the chunk's fp32 logits, evaluates the weighted loss with ``torch.autograd.grad`` right away and keeps
only the gradient w.r.t. the student input (in the input's dtype; for the fused-linear form also the accumulated
lm_head weight/bias gradient).  The backward multiplies the stored gradients by the incoming scalar gradient.  The
peak extra memory is therefore O(chunk_size * V) fp32 plus one gradient the size of the student input.

TSLD needs the teacher CE of every token before any weight is known (the softmax runs over the sequence), so a
first pass over the chunks computes the per-token teacher CE (a [tokens] vector), then the weights, then the main
pass.

FUSED KERNEL LATER: the per-chunk body (``_chunk_terms``) is the place for a fused Triton kernel (online softmax over
V of student and teacher at once, emitting the per-token losses and d(loss)/d(logits) without the fp32 chunk).

The math equals ``pyquant.reference.distill`` (tested to fp32 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference.distill import KD_KINDS, check_tsld_reduction, tsld_token_weights

__all__ = ["LogitLossWeights", "chunked_logit_losses"]


@dataclass(frozen=True)
class LogitLossWeights:
    """Weights of the logit terms (0 disables a term; it is then not computed).

    ``tsld_reduction``: "sum" (default; sum over sequences and tokens of w_i * softCE_i, aiha-lab/TSLD
    ``utils/utils_quant.py`` line 100) or "mean" (divided by the number of sequences, line 101 there, commented out).
    """

    ce: float = 1.0
    kd: float = 0.0
    tsld: float = 0.0
    temperature: float = 1.0
    kd_kind: str = "soft_ce"
    tsld_tau: float = 10.0
    tsld_reduction: str = "sum"

    def __post_init__(self):
        for name in ("ce", "kd", "tsld"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"LogitLossWeights.{name}={v!r} is invalid: expected a float >= 0")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"LogitLossWeights.temperature={self.temperature!r} is invalid: expected a float > 0")
        if self.kd_kind not in KD_KINDS:
            raise ValueError(f"LogitLossWeights.kd_kind={self.kd_kind!r} is invalid: expected one of {KD_KINDS}")
        if isinstance(self.tsld_tau, bool) or not isinstance(self.tsld_tau, (int, float)) or not self.tsld_tau > 0:
            raise ValueError(f"LogitLossWeights.tsld_tau={self.tsld_tau!r} is invalid: expected a float > 0")
        check_tsld_reduction(self.tsld_reduction, "LogitLossWeights.tsld_reduction")


def _project(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    if weight is None:
        return x.float()
    y = x.float() @ weight.float().t()
    return y + bias.float() if bias is not None else y


def _chunk_terms(s_logits: torch.Tensor, t_logits: Optional[torch.Tensor], labels: torch.Tensor,
                 tok_w: Optional[torch.Tensor], w: LogitLossWeights, ignore_index: int):
    """Per-token terms of one chunk (fp32, summed over tokens): (ce_sum, kd_sum, tsld_sum)."""
    valid = labels != ignore_index
    zero = s_logits.new_zeros(())
    ce = kd = ts = zero
    if w.ce:
        logp = F.log_softmax(s_logits, dim=-1)
        nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ce = (nll * valid).sum()
    if w.kd or w.tsld:
        T = float(w.temperature)
        log_ps = F.log_softmax(s_logits / T, dim=-1)
        log_pt = F.log_softmax(t_logits / T, dim=-1)
        pt = log_pt.exp()
        soft = -(pt * log_ps).sum(-1) * (T * T)
        if w.kd:
            per = soft if w.kd_kind == "soft_ce" else (pt * log_pt).sum(-1) * (T * T) + soft
            kd = (per * valid).sum()
        if w.tsld:
            ts = (soft * tok_w).sum()
    return ce, kd, ts


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, t_x, t_weight, t_bias, labels, seq_len, w, chunk_size, ignore_index):
        # the losses are fp32 math by contract: no autocast (a bf16 autocast region would round the chunk logits)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _ChunkedLogitLoss._forward(ctx, x, weight, bias, t_x, t_weight, t_bias, labels, seq_len, w,
                                              chunk_size, ignore_index)

    @staticmethod
    def _forward(ctx, x, weight, bias, t_x, t_weight, t_bias, labels, seq_len, w, chunk_size, ignore_index):
        n = x.shape[0]
        valid = labels != ignore_index
        n_valid = valid.sum().clamp_min(1).float()
        need_t = bool(w.kd or w.tsld)

        tok_w = None
        n_seq = None
        if w.tsld:  # pass 1: teacher CE per token -> TSLD weights per sequence
            tce = torch.zeros(n, dtype=torch.float32, device=x.device)
            for a in range(0, n, chunk_size):
                b = min(a + chunk_size, n)
                tl = _project(t_x[a:b], t_weight, t_bias)
                lab = labels[a:b]
                nll = -F.log_softmax(tl, -1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                tce[a:b] = nll * (lab != ignore_index)
            lab2 = labels.view(-1, seq_len)
            tok_w = tsld_token_weights(tce.view(-1, seq_len), lab2, w.tsld_tau, ignore_index).reshape(-1)
            # "sum" (the paper's): no division; "mean": over the sequences that have a valid token
            n_seq = valid.view(-1, seq_len).any(-1).sum().clamp_min(1).float() if w.tsld_reduction == "mean" \
                else torch.ones((), dtype=torch.float32, device=x.device)

        grad_x = torch.zeros_like(x) if x.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight is not None and weight.requires_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=x.device)
        for a in range(0, n, chunk_size):
            b = min(a + chunk_size, n)
            with torch.enable_grad():
                xc = x[a:b].detach().requires_grad_(grad_x is not None)
                wc = weight.detach().requires_grad_(grad_w is not None) if weight is not None else None
                bc = bias.detach().requires_grad_(grad_b is not None) if bias is not None else None
                sl = _project(xc, wc, bc)
                tl = _project(t_x[a:b], t_weight, t_bias) if need_t else None
                ce, kd, ts = _chunk_terms(sl, tl, labels[a:b], None if tok_w is None else tok_w[a:b], w,
                                          ignore_index)
                total = w.ce * ce / n_valid + w.kd * kd / n_valid
                if w.tsld:
                    total = total + w.tsld * ts / n_seq
                wanted = [t for t in (xc, wc, bc) if t is not None and t.requires_grad]
                grads = torch.autograd.grad(total, wanted) if wanted and total.requires_grad else [None] * len(wanted)
            gi = iter(grads)
            if grad_x is not None:
                g = next(gi)
                if g is not None:
                    grad_x[a:b] = g.to(grad_x.dtype)
            if grad_w is not None:
                g = next(gi)
                if g is not None:
                    grad_w += g
            if grad_b is not None:
                g = next(gi)
                if g is not None:
                    grad_b += g
            sums += torch.stack([ce.detach(), kd.detach(), ts.detach()])
        ce_m = sums[0] / n_valid
        kd_m = sums[1] / n_valid
        ts_m = sums[2] / n_seq if n_seq is not None else sums[2]
        total = w.ce * ce_m + w.kd * kd_m + w.tsld * ts_m
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_x, grad_w, grad_b)))
        ctx.has = (grad_x is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce_m, kd_m, ts_m)
        return total, ce_m, kd_m, ts_m

    @staticmethod
    def backward(ctx, g_total, *_):
        gx, gw, gb = ctx.saved_tensors
        hx, hw, hb = ctx.has
        out_x = (gx * g_total).to(ctx.dtypes[0]) if hx else None
        out_w = (gw * g_total).to(ctx.dtypes[1]) if hw else None
        out_b = (gb * g_total).to(ctx.dtypes[2]) if hb else None
        return out_x, out_w, out_b, None, None, None, None, None, None, None, None


def chunked_logit_losses(
    student: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    loss_weights: LogitLossWeights = LogitLossWeights(),
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Weighted ``ce + kd + tsld`` over aligned tokens, in chunks.  Returns ``(total, {"ce", "kd", "tsld"})``.

    student: ``[B, L, V]`` logits, or ``[B, L, D]`` hidden states when ``weight`` (lm_head ``[V, D]``) is given.
    teacher: likewise ``[B, L, V]`` logits, or ``[B, L, D_t]`` hidden with ``teacher_weight [V, D_t]``; needed for
        kd/tsld.  labels: ``[B, L]`` int (``ignore_index`` skips a token), already aligned (shifted) by the caller.
    Only ``total`` carries gradient; the parts (detached, unweighted: ce and kd means over valid tokens, tsld reduced
    as ``loss_weights.tsld_reduction``) are for logging and equal ``pyquant.reference.distill`` cross_entropy /
    logit_kd_loss / tsld_loss.
    """
    if not isinstance(loss_weights, LogitLossWeights):
        raise TypeError(f"loss_weights must be a LogitLossWeights, got {type(loss_weights).__name__}")
    if not isinstance(student, torch.Tensor) or not student.dtype.is_floating_point or student.dim() != 3:
        raise ValueError(f"student must be a floating-point [B, L, V or D] tensor, got {_desc(student)}")
    bsz, seq_len = student.shape[:2]
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or tuple(labels.shape) != (bsz, seq_len):
        raise ValueError(f"labels must be an integer tensor of shape {(bsz, seq_len)}, got {_desc(labels)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected a positive int")
    vocab = _vocab("student", student, weight, bias)
    need_t = bool(loss_weights.kd or loss_weights.tsld)
    if need_t:
        if teacher is None:
            raise ValueError("teacher is required when loss_weights.kd or loss_weights.tsld is nonzero")
        if not isinstance(teacher, torch.Tensor) or teacher.dim() != 3 or tuple(teacher.shape[:2]) != (bsz, seq_len):
            raise ValueError(f"teacher must be [B={bsz}, L={seq_len}, *], got {_desc(teacher)}")
        tv = _vocab("teacher", teacher, teacher_weight, teacher_bias)
        if tv != vocab:
            raise ValueError(f"teacher vocabulary size {tv} != student vocabulary size {vocab}: logit distillation "
                             "needs the same vocabulary (tokenizer)")
        t_x = teacher.detach().reshape(bsz * seq_len, -1)
        t_w = None if teacher_weight is None else teacher_weight.detach()
        t_b = None if teacher_bias is None else teacher_bias.detach()
    else:
        t_x = t_w = t_b = None
    x = student.reshape(bsz * seq_len, -1)
    total, ce, kd, ts = _ChunkedLogitLoss.apply(x, weight, bias, t_x, t_w, t_b, labels.reshape(-1), seq_len,
                                                loss_weights, chunk_size, ignore_index)
    parts = {}
    if loss_weights.ce:
        parts["ce"] = ce
    if loss_weights.kd:
        parts["kd"] = kd
    if loss_weights.tsld:
        parts["tsld"] = ts
    return total, parts


def _vocab(name, x, weight, bias) -> int:
    if weight is None:
        if bias is not None:
            raise ValueError(f"{name} bias given without a weight")
        return x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name} weight must be [V, D={x.shape[-1]}], got {_desc(weight)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{name} bias must be [V={weight.shape[0]}], got {_desc(bias)}")
    return weight.shape[0]


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype})"
    return type(t).__name__

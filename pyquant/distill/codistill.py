"""Co-distillation, CTCD (Lee et al., Findings of EMNLP 2023, "Co-training and Co-distillation for Quality
Improvement and Compression of Language Models", arXiv 2311.02849): teacher and student are trained together, each
on its own task loss plus the distillation loss from the other model's (detached) prediction, with one optimizer
over both.

**Unverified against the paper's text: only the abstract (and the first paragraph of the introduction) could be
reached** (ar5iv / arXiv / ACL Anthology 2023.findings-emnlp.500 pages as stored, checked 2026-12-01; the authors
released no code).  What the abstract does say, and this module follows: the two models are *co-trained* while
*mutually* distilling knowledge, and "distilling knowledge from the smaller model to the larger model during
co-training improves the performance of the larger model" -- so the teacher's KD term (student -> teacher) is used.
Everything else below -- the loss form, the KL direction, T, the weights, one optimizer, the fine-tuning (rather
than pre-training) stage -- is this library's reading, not a checked paper line:

* student: ``alpha_h * CE(z_S, y) + alpha_s * T^2 * KL(softmax(z_T.detach() / T) || softmax(z_S / T))``
* teacher: ``alpha_h * CE(z_T, y) + alpha_s * T^2 * KL(softmax(z_S.detach() / T) || softmax(z_T / T))``
* regression: MSE to the label and MSE to the other's detached prediction.
* loss = student's + teacher's; the gradients of each model come only from its own terms (the other side is
  detached), so one backward and one optimizer step update both (``Distiller.trainable_module()`` returns the
  Distiller, whose parameters are student + teacher; pyquant's train loop uses it).

Options (``DistillConfig(codistill=True, ce=alpha_h, kd=alpha_s, temperature=T, kd_t_squared=...)``): the T^2
factor is on by default (Hinton et al.'s convention); ``kd_t_squared=False`` drops it, which is the form the same
authors wrote for their weak-teacher study (DWT, Findings of ACL 2023, Eq. 3: ``alpha_h * H + alpha_s *
KL(p_T^tau || p_S^tau)``, default ``alpha_h : alpha_s = 1 : 1``, Sec. 3) -- a plausible, but still unverified,
reading of CTCD too.  The library's defaults T = 2 and alpha_h = alpha_s = 1 come from the issue; an independent
third-party replication (leovianaf/project-co-training-co-distillation, ``ctcd/train_model.py``; not the authors')
uses the same: T = 2, soft weight 1, ``T^2 * KL(other.detach() || own)`` per side, one optimizer over both -- and
applies it during MLM pre-training (6-layer teacher, 4-layer student).  Pass the paper's values explicitly once its
text is available.

Cost: the teacher's backward and its optimizer state.  AdamW keeps exp_avg + exp_avg_sq for the teacher too:
+8 bytes per teacher parameter in fp32 (asserted exactly in tests/test_methods.py::test_codistill_cost_measured;
for a 110M-parameter teacher that is +0.88 GB, computed, plus its gradients, 4 bytes/param, and the activations its
backward keeps).  Step time, measured on this repository's shared 2-core CPU with a tiny BERT pair (student 2 x 32,
teacher 4 x 64, batch 8 x 16), three runs: 499 -> 1504, 96 -> 464 and 43 -> 100 ms per step, one-way KD ->
co-distillation (2.3-5x; the teacher's forward already ran in one-way KD, the extra is its backward, which here runs on the larger
model, and its optimizer step).  CPU timings on a contended machine are noisy; no GPU
number was measured.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.distill import kl_divergence

__all__ = ["check_trainable_teacher", "codistill_forward"]


def check_trainable_teacher(teacher) -> None:
    """Co-distillation trains the teacher: refuse a missing or frozen one before training starts."""
    if teacher is None:
        raise ValueError("codistill=True needs a teacher (it is trained together with the student)")
    params = list(teacher.parameters())
    if not params or not any(p.requires_grad for p in params):
        raise ValueError("codistill=True trains the teacher, but the teacher is frozen (no parameter has "
                         "requires_grad=True); call teacher.requires_grad_(True), or use codistill=False for "
                         "one-way distillation from a frozen teacher")


def _task_loss(logits, labels, c):
    if c.task == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels, reduction=c.ce_reduction)


def _kd(own, other, c, scale):
    if c.task == "regression":
        return F.mse_loss(own.squeeze(-1), other.detach().squeeze(-1))
    return kl_divergence(own, other.detach(), c.temperature) * scale


def codistill_forward(distiller, inputs: dict, labels: torch.Tensor):
    """One CTCD step of ``Distiller`` (``config.codistill``); returns a ``DistillOutput`` with the student's terms
    ``ce``/``kd`` and the teacher's ``teacher_ce``/``teacher_kd``."""
    from .distiller import DistillOutput

    c = distiller.config
    s = distiller.student(**inputs).logits.float()
    t = distiller.teacher(**inputs).logits.float()
    alpha = distiller.kd_weight()
    k = distiller.kd_scale()
    terms = {"ce": _task_loss(s, labels, c), "kd": _kd(s, t, c, k),
             "teacher_ce": _task_loss(t, labels, c), "teacher_kd": _kd(t, s, c, k)}
    total = c.ce * (terms["ce"] + terms["teacher_ce"]) + alpha * (terms["kd"] + terms["teacher_kd"])
    losses = {k: v.detach() for k, v in terms.items()}
    losses["total"] = total.detach()
    return DistillOutput(loss=total, losses=losses)

"""CR-ILD (Ko et al., EACL 2023, "Revisiting Intermediate Layer Distillation for Compressing Language Models: An
Overfitting Perspective"; code: github.com/jongwooko/CR-ILD): last-layer Q/K/V self-relation distillation with
MixUp of the input embeddings and a consistency term, followed by logit KD.  Lines cited from that repository's
snapshot (``training_functions.py``, ``losses.py``, ``modules/modeling.py``, ``scripts/standard_glue_truncated_bert.sh``).

What the released code does, and what this module does:

* **Relations** (``training_functions.py:220-231`` ``compute_relations``): ``R = X X^T / sqrt(d_head)`` per head,
  each model with its own head size; Q-Q, K-K and V-V relations of the **last layer only** (``distill_object``
  "QKV" of ``--mode TinyBERT-QKV``, run_finetune.py:150-152; ``teacher_qrys[-1]`` at :363-366, keys :379-382,
  values :395-398 when ``attention_l2l`` is off).  Here: the last attention call of each captured forward.
* **Relation loss** (``losses.py`` ``Attention_KL``): ``-mean_rows sum_keys softmax(R_T) * log_softmax(R_S)``, the
  mean over all B*H*L rows; Q/K/V call it **without the attention mask** (training_functions.py:370, 386, 402), so
  padding keys and padding rows count.  ``relation_loss(..., mask=None)`` reproduces this (a soft cross-entropy,
  which differs from KL(P_T||P_S) by the teacher's entropy: same gradient); summed over Q, K and V.
* **MixUp** (training_functions.py:240-242; modeling.py:1137-1153): ``lam ~ Beta(1, 1)``, ``lam = max(lam,
  1 - lam)``, partner = the batch reversed, attention masks united (a key is kept if either partner keeps it);
  teacher and student see the same lam and partner.  The released code mixes the embedding *output* (word +
  position + token type after LayerNorm, ``get_embedding_output``); pyquant mixes the word embeddings and passes
  them as ``inputs_embeds`` (each model its own table; position/token-type embeddings and LayerNorm are applied
  after mixing, and the batch's own token types are kept) -- the only model-agnostic entry point of a HF model.
* **Consistency** (training_functions.py:252-259, 310-318): against the student's own clean pass without gradient,
  ``w_ic * (epoch / E) * [lam * L(S_mixed, S_clean; mask) + (1 - lam) * L(S_mixed, S_clean[rev]; mask[rev])]``,
  ``w_ic = 0.1`` (opts.py:124), ``epoch`` the 0-based epoch (run_finetune.py:305-306), with the mask applied as an
  additive ``-10000`` on the keys (losses.py Attention_KL).  The released code computes it only inside the "A"
  (attention) and "H" (hidden) branches (training_functions.py:310, 347), and the CR-ILD script runs
  ``--mode TinyBERT-QKV`` (distill_object "QKV"), so **its consistency branch is never entered** even though
  the script passes ``--use_ic_att --use_ic_rep --w_ic 0.1``.  pyquant applies the term to the same Q/K/V
  relations that are distilled (the paper's method); ``consistency=0`` gives the released code's behaviour.
* **Logit KD** (second stage of the script: ``--mode KD``, 4 epochs, batch 16, T = 2.0 from opts.py:71;
  ``DistillKL``: ``-T^2 mean_batch sum softmax(t/T) log_softmax(s/T)``): ``crild_stages()`` returns both
  ``DistillConfig`` s (stage 1: relation loss only, as the released stage 1 trains without CE or logit loss).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["relation_loss", "qkv_relation_loss", "mixup_lambda", "mixup_inputs", "crild_stages", "check_capturable",
           "crild_forward"]


def _relation(x: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x.float(), x.float().transpose(-1, -2)) / math.sqrt(x.shape[-1])


def relation_loss(x_s: torch.Tensor, x_t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``-mean_rows sum softmax(R_T) log_softmax(R_S)`` with ``R = X X^T / sqrt(d_head)`` (losses.py Attention_KL).

    x_s [B, H, L, d_s], x_t [B, H, L, d_t] (each scaled by its own head size); ``mask`` [B, L] (nonzero = keep): the
    keys get ``(1 - mask) * -10000`` as in the released code; None = no mask (the released Q/K/V losses).  The
    mean runs over all B*H*L rows either way."""
    if x_s.dim() != 4 or x_t.dim() != 4 or x_s.shape[:3] != x_t.shape[:3]:
        raise ValueError(f"relation_loss: student {tuple(x_s.shape)} and teacher {tuple(x_t.shape)} must be "
                         "[B, H, L, d] with equal B, H (heads) and L")
    r_s, r_t = _relation(x_s), _relation(x_t.detach())
    if mask is not None:
        add = (1.0 - mask.float())[:, None, None, :] * -10000.0
        r_s, r_t = r_s + add, r_t + add
    return -(F.softmax(r_t, -1) * F.log_softmax(r_s, -1)).sum(-1).mean()


def qkv_relation_loss(s_entry, t_entry, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of the Q-Q, K-K and V-V relation losses of two captured attention entries (the last layer)."""
    return sum(relation_loss(getattr(s_entry, n), getattr(t_entry, n), mask) for n in ("q", "k", "v"))


def mixup_lambda(generator: Optional[torch.Generator] = None) -> float:
    """``lam ~ Beta(1, 1)`` (= Uniform(0, 1)), ``lam = max(lam, 1 - lam)`` (training_functions.py:240-242)."""
    lam = float(torch.rand((), generator=generator))
    return max(lam, 1.0 - lam)


def mixup_inputs(model, inputs: dict, lam: float) -> dict:
    """``inputs`` with ``input_ids`` replaced by ``inputs_embeds = lam * E + (1 - lam) * E[rev]`` (this model's word
    embeddings) and the attention mask united with the reversed batch's (modeling.py:1144-1153)."""
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError(f"CR-ILD MixUp needs {type(model).__name__}.get_input_embeddings()")
    ids = inputs["input_ids"]
    rev = torch.arange(ids.shape[0] - 1, -1, -1, device=ids.device)
    e = emb(ids)
    out = {k: v for k, v in inputs.items() if k != "input_ids"}
    out["inputs_embeds"] = lam * e + (1.0 - lam) * e[rev]
    am = inputs.get("attention_mask")
    if am is not None:
        out["attention_mask"] = ((am + am[rev]) != 0).to(am.dtype)
    return out


def crild_stages(task: str = "classification", consistency: float = 0.1):
    """The released script's two stages as ``DistillConfig`` s: (stage 1: last-layer Q/K/V relations + MixUp +
    consistency, no CE / logit loss; stage 2: logit KD at T = 2, ``DistillKL`` = soft CE x T^2, no CE)."""
    from .distiller import DistillConfig

    return (DistillConfig(task=task, ce=0.0, crild=1.0, crild_consistency=consistency),
            DistillConfig(task=task, ce=0.0, kd=1.0, temperature=2.0, kd_kind="soft_ce"))


def check_capturable(student, teacher) -> None:
    """Refuse, before training, models whose last layer's Q/K/V cannot be captured (attention outside
    AttentionInterface, e.g. DeBERTa-v2 and Falcon: only their probabilities are available) or whose head counts
    differ (the relations are per head)."""
    from .capture import capture_attention

    if teacher is None:
        raise ValueError("crild needs a teacher")
    for nm, m in (("student", student), ("teacher", teacher)):
        if not hasattr(m, "config"):
            raise ValueError(f"crild: the {nm} must be a transformers model (its Q/K/V are captured), got "
                             f"{type(m).__name__}")
        with capture_attention(m) as rec:
            path = rec.path
        if path != "interface":
            raise ValueError(f"crild: the {nm} ({type(m).__name__}) computes its attention inside its own modules "
                             "(not through transformers' AttentionInterface), so its last layer's Q/K/V cannot be "
                             "captured; CR-ILD needs a model such as BERT/RoBERTa/Llama")
    for key in ("num_attention_heads", "num_key_value_heads"):
        hs, ht = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if hs is not None and ht is not None and hs != ht:
            raise ValueError(f"crild: student {key}={hs} != teacher {key}={ht}: the Q/K/V relations are compared "
                             "head by head")


def crild_forward(distiller, inputs: dict, labels: torch.Tensor):
    """One CR-ILD step of ``Distiller`` (``config.crild`` > 0); returns a ``DistillOutput``."""
    from .capture import capture_attention
    from .distiller import DistillOutput
    from ..reference.distill import logit_kd_loss

    c = distiller.config
    student, teacher = distiller.student, distiller.teacher
    lam = mixup_lambda() if c.crild_mixup else None
    s_in = mixup_inputs(student, inputs, lam) if lam is not None else inputs
    t_in = mixup_inputs(teacher, inputs, lam) if lam is not None else inputs
    with torch.no_grad(), capture_attention(teacher) as t_rec:
        t_out = teacher(**t_in)
    with capture_attention(student) as s_rec:
        s_out = student(**s_in)
    if len(s_rec) == 0 or len(t_rec) == 0 or s_rec[-1].v is None or t_rec[-1].v is None:
        raise ValueError("crild: no last-layer Q/K/V were captured from the forward")
    s_last, t_last = s_rec[-1], t_rec[-1]
    s_rec.clear()
    t_rec.clear()
    losses = {}
    rel = qkv_relation_loss(s_last, t_last)
    total = rel * c.crild
    losses["crild"] = rel.detach()
    if lam is not None and c.crild_consistency:
        with torch.no_grad(), capture_attention(student) as c_rec:
            student(**inputs)
        clean = c_rec[-1]
        c_rec.clear()
        am = inputs.get("attention_mask")
        if am is None:
            am = torch.ones(inputs["input_ids"].shape, dtype=torch.long, device=inputs["input_ids"].device)
        rev = torch.arange(am.shape[0] - 1, -1, -1, device=am.device)
        cons = lam * sum(relation_loss(getattr(s_last, n), getattr(clean, n), am) for n in ("q", "k", "v")) \
            + (1.0 - lam) * sum(relation_loss(getattr(s_last, n), getattr(clean, n)[rev], am[rev])
                                for n in ("q", "k", "v"))
        total = total + cons * (c.crild_consistency * distiller._progress[1])
        losses["crild_consistency"] = cons.detach()
    if c.kd:
        s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
        if c.task == "regression":
            kd = F.mse_loss(s_logits.squeeze(-1), t_logits.squeeze(-1))
        else:
            kd = logit_kd_loss(s_logits, t_logits, c.temperature, c.kd_kind)
        total = total + kd * distiller.kd_weight()
        losses["kd"] = kd.detach()
    if c.ce and not c.crild_mixup:
        s_logits = s_out.logits.float()
        ce = F.mse_loss(s_logits.squeeze(-1), labels.float()) if c.task == "regression" else \
            F.cross_entropy(s_logits, labels, reduction=c.ce_reduction)
        total = total + ce * c.ce
        losses["ce"] = ce.detach()
    losses["total"] = total.detach()
    return DistillOutput(loss=total, losses=losses)

"""``Distiller``: a frozen FP teacher + a (QAT) student + weighted losses, each reported separately.

Losses (weight 0 disables one; it is then not computed):

* ``ce``      ground-truth cross-entropy (causal LM: next token; classification: label; regression: MSE)
* ``kd``      logit KD, soft cross-entropy or KL at temperature T (times T^2, ``kd_t_squared=True``, the default;
  ``False``: without the T^2 factor, as DWT's Eq. 3), see ``pyquant.reference.distill``
* ``tsld``    TSLD token-scaled logit distillation (causal LM only); with ``ce`` this is the TSLD objective
* ``hidden``  hidden-state MSE over the embedding output and every layer (``layer_map`` when depths differ)
* ``attn_map`` / ``attn_output``  attention-map KL and attention-output MSE from ``pyquant.distill.capture``;
  with ``attn_gamma`` set they enter as the unified mix ``attn_kd`` (gamma * map + (1 - gamma) * output) instead.
* ``attn_score``  TernaryBERT's attention-score MSE (pre-softmax scaled scores, masked entries zeroed, summed over
  layers; ``pyquant.distill.attention.attention_score_mse``, materializes the L x L maps): the baseline row.
* ``router``  MoE students: KL(softmax(teacher router logits) || softmax(student router logits)) per token, mean over
  the non-padding tokens, summed over the MoE layers (``output_router_logits=True``; optional, off by default).

Reductions (named options; "paper" = the seed papers' code, cited line by line in the README's distillation table):

* ``tsld_reduction``: "sum" (default, aiha-lab/TSLD utils/utils_quant.py:100) or "mean" (per sequence, line 101).
* ``ce_reduction`` (classification): "mean" (default) or "sum" -- kd-qat-large-enc main.py:666
  ``nll_loss(..., reduction='sum')`` (its ``gt_loss``; the shipped run_kd_qat_*.sh scripts set gt_loss=0).
* ``hidden_reduction``: "paper" (default): mean over all B*L*D entries including padding, summed over the embedding
  output and every layer (kd-qat-large-enc main.py:763-766 ``MSELoss()(student_rep, teacher_rep)``; TSLD's layer-
  to-layer loss likewise, aiha-lab/TSLD utils/utils_quant.py:113-115); it depends on how far the batch is padded.
  "masked": mean over the non-padding tokens x D only (padding-invariant).
* ``attn_map_reduction``: "paper" (default): per example the KL summed over its valid query rows and keys divided by
  its own valid length, mean over B x H (kd-qat-large-enc main.py l. 743/748, 752); "mean_rows": mean over all valid
  query rows (``pyquant.distill.attention.attention_map_loss``).  Both are padding-invariant.
* ``attn_output_reduction``: "paper" (default): ``MSELoss`` mean over all B*L*D entries of the attention sub-layer
  output, no padding mask, summed over layers (kd-qat-large-enc main.py:688-693); "masked": non-padding tokens only.
* classification logit KD at ``temperature=1``, ``kd_kind="soft_ce"`` is the paper's ``soft_cross_entropy`` (mean over
  the batch, main.py:144-147, used at :674); regression logit KD is ``MSELoss`` (main.py:676).

Other seed methods (options of the same Distiller; each cites its paper/repo in its module):

* ``crild`` > 0: CR-ILD (pyquant/distill/crild.py) -- last-layer Q/K/V self-relation loss on a MixUp batch
  (``crild_mixup``) plus the consistency term ``crild_consistency * (epoch / E) * ...``; ``crild_stages()`` gives
  the released two-stage recipe (stage 2 = logit KD at T = 2).
* ``codistill=True``: co-distillation, CTCD (pyquant/distill/codistill.py) -- the teacher is trained too, one
  optimizer over both (``trainable_module()`` is the Distiller itself); a frozen teacher is refused.  Unverified:
  only the paper's abstract was available (the module docstring says which choices are the library's).
* ``kd_schedule``: the logit-KD weight alpha_s over training (weak-teacher KD, DWT): "constant" (default; the
  paper's experiments, alpha_h : alpha_s = 1 : 1) or "linear" (``kd * (kd_schedule_start -> kd_schedule_end)``,
  4 -> 1 by default: the decay the paper *suggests* but did not run, Sec. 3.2 last sentence; the linear shape is
  this library's choice) driven by ``set_progress(step, total)``, which pyquant's train loop calls every step (the
  HF Trainer: ``pyquant.distill.progress.ProgressCallback``).  DWT's objective, Lee et al., Findings of ACL 2023,
  Eq. 3: ``alpha_h * CE + alpha_s * KL(p_T^tau || p_S^tau)`` -- no tau^2 factor: ``kd_kind="kl",
  kd_t_squared=False`` (identical to the default at ``temperature=1``; the paper does not state its tau).

Causal-LM logit losses are computed in token chunks (``pyquant.distill.losses``); when the student's head is a
plain ``nn.Linear`` the Distiller runs the base model and feeds its final hidden states and the lm_head weight to
the chunked loss, so neither a full fp32 nor even a full model-dtype student ``[B, L, V]`` logits tensor exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.attention import ATTENTION_REDUCTIONS
from ..reference.distill import KD_KINDS, TSLD_REDUCTIONS, hidden_mse, logit_kd_loss, resolve_layer_map
from .losses import LogitLossWeights, chunked_logit_losses

__all__ = ["DistillConfig", "DistillOutput", "Distiller", "TASKS"]

TASKS = ("causal_lm", "classification", "regression")
CE_REDUCTIONS = ("mean", "sum")
KD_SCHEDULES = ("constant", "linear")
MSE_REDUCTIONS = ("masked", "paper")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DistillConfig:
    """Loss weights and options.  ``layer_map``: teacher hidden-state index for each student hidden state."""

    task: str = "causal_lm"
    ce: float = 1.0
    kd: float = 0.0
    tsld: float = 0.0
    hidden: float = 0.0
    attn_map: float = 0.0
    attn_output: float = 0.0
    attn_score: float = 0.0
    router: float = 0.0
    attn_gamma: Optional[float] = None
    temperature: float = 1.0
    kd_kind: str = "soft_ce"
    tsld_tau: float = 10.0
    tsld_reduction: str = "sum"
    ce_reduction: str = "mean"
    hidden_reduction: str = "paper"
    attn_output_reduction: str = "paper"
    attn_map_reduction: str = "paper"
    layer_map: Optional[tuple] = None
    attn_layer_map: Optional[tuple] = None
    chunk_size: int = 1024
    teacher_dtype: Optional[str] = None
    crild: float = 0.0
    crild_mixup: bool = True
    crild_consistency: float = 0.1
    codistill: bool = False
    kd_schedule: str = "constant"
    kd_schedule_start: float = 4.0
    kd_schedule_end: float = 1.0
    kd_t_squared: bool = True

    def __post_init__(self):
        n = "DistillConfig"
        if self.task not in TASKS:
            raise ValueError(f"{n}.task={self.task!r} is invalid: expected one of {TASKS}")
        for name in ("ce", "kd", "tsld", "hidden", "attn_map", "attn_output", "crild", "crild_consistency",
                     "kd_schedule_start", "kd_schedule_end", "attn_score", "router"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{n}.{name}={v!r} is invalid: expected a float >= 0")
        if self.attn_gamma is not None and not (isinstance(self.attn_gamma, (int, float))
                                                and 0.0 <= self.attn_gamma <= 1.0):
            raise ValueError(f"{n}.attn_gamma={self.attn_gamma!r} is invalid: expected None or a float in [0, 1]")
        if self.tsld and self.task != "causal_lm":
            raise ValueError(f"{n}.tsld={self.tsld} needs task='causal_lm' (TSLD weights tokens), got {self.task!r}")
        if self.kd_kind not in KD_KINDS:
            raise ValueError(f"{n}.kd_kind={self.kd_kind!r} is invalid: expected one of {KD_KINDS}")
        if self.tsld_reduction not in TSLD_REDUCTIONS:
            raise ValueError(f"{n}.tsld_reduction={self.tsld_reduction!r} is invalid: expected one of "
                             f"{TSLD_REDUCTIONS}")
        if self.ce_reduction not in CE_REDUCTIONS:
            raise ValueError(f"{n}.ce_reduction={self.ce_reduction!r} is invalid: expected one of {CE_REDUCTIONS}")
        if self.ce_reduction == "sum" and self.task != "classification":
            raise ValueError(f"{n}.ce_reduction='sum' is defined for task='classification' only (the paper's NLL "
                             f"sum), got task={self.task!r}")
        for name in ("hidden_reduction", "attn_output_reduction"):
            if getattr(self, name) not in MSE_REDUCTIONS:
                raise ValueError(f"{n}.{name}={getattr(self, name)!r} is invalid: expected one of {MSE_REDUCTIONS}")
        if self.attn_map_reduction not in ATTENTION_REDUCTIONS:
            raise ValueError(f"{n}.attn_map_reduction={self.attn_map_reduction!r} is invalid: expected one of "
                             f"{ATTENTION_REDUCTIONS}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"{n}.temperature={self.temperature!r} is invalid: expected a float > 0")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"{n}.chunk_size={self.chunk_size!r} is invalid: expected a positive int")
        if self.teacher_dtype is not None and self.teacher_dtype not in _DTYPES:
            raise ValueError(f"{n}.teacher_dtype={self.teacher_dtype!r} is invalid: expected None or one of "
                             f"{tuple(_DTYPES)}")
        for name in ("layer_map", "attn_layer_map"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        if not (self.ce or self.kd or self.tsld or self.hidden or self.attn_map or self.attn_output or self.crild
                or self.attn_score or self.router):
            raise ValueError(f"{n}: every loss weight is 0; enable at least one of ce/kd/tsld/hidden/attn_*/crild")
        self._check_methods(n)

    def _check_methods(self, n: str) -> None:
        for name in ("crild_mixup", "codistill", "kd_t_squared"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{n}.{name}={getattr(self, name)!r} is invalid: expected a bool")
        if self.kd_schedule not in KD_SCHEDULES:
            raise ValueError(f"{n}.kd_schedule={self.kd_schedule!r} is invalid: expected one of {KD_SCHEDULES}")
        if self.kd_schedule != "constant" and not self.kd:
            raise ValueError(f"{n}.kd_schedule={self.kd_schedule!r} schedules the logit-KD weight, but kd=0")
        others = [k for k in ("tsld", "hidden", "attn_map", "attn_output", "attn_score") if getattr(self, k)]
        if self.crild:
            if self.task == "causal_lm":
                raise ValueError(f"{n}.crild needs task='classification' or 'regression' (CR-ILD distils BERT-style "
                                 "encoders), got 'causal_lm'")
            if others or self.attn_gamma is not None:
                raise ValueError(f"{n}.crild cannot be combined with {others or ['attn_gamma']}: CR-ILD distils the "
                                 "last layer's Q/K/V relations only")
            if self.crild_mixup and self.ce:
                raise ValueError(f"{n}.crild with crild_mixup=True and ce={self.ce}: the labels of a MixUp batch are "
                                 "undefined here (the released stage 1 trains without CE); set ce=0 or "
                                 "crild_mixup=False")
        if self.codistill:
            if self.task == "causal_lm":
                raise ValueError(f"{n}.codistill needs task='classification' or 'regression', got 'causal_lm'")
            if not (self.ce and self.kd):
                raise ValueError(f"{n}.codistill needs ce > 0 and kd > 0 (each model's task loss + alpha * T^2 * KL "
                                 f"from the other), got ce={self.ce}, kd={self.kd}")
            if others or self.crild or self.teacher_dtype is not None:
                raise ValueError(f"{n}.codistill is logit co-distillation: it cannot be combined with "
                                 f"{others + (['crild'] if self.crild else []) + (['teacher_dtype'] if self.teacher_dtype else [])}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layer_map", "attn_layer_map"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @property
    def needs_teacher(self) -> bool:
        return bool(self.kd or self.tsld or self.hidden or self.attn_map or self.attn_output or self.crild
                    or self.attn_score or self.router)

    @property
    def needs_attention(self) -> bool:
        return bool(self.attn_map or self.attn_output or self.attn_score)


@dataclass
class DistillOutput:
    loss: torch.Tensor  # weighted total, differentiable
    losses: Dict[str, torch.Tensor]  # each term, detached, unweighted


def _n_layers(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    return None


class Distiller(nn.Module):
    """``Distiller(student, teacher, config)``; ``forward(batch) -> DistillOutput``.

    batch: dict with ``input_ids``, ``attention_mask`` (optional, also ``token_type_ids``) and ``labels``
    (causal LM: token ids with -100 on padding, unshifted; classification: class ids [B]; regression: floats [B]).
    The teacher is frozen (eval mode, ``requires_grad=False``, run under ``no_grad``, optionally cast to
    ``teacher_dtype``); it is a submodule so ``.to(device)`` moves it, but it never appears in ``parameters()`` of
    the student optimizer (use ``distiller.student.parameters()``) -- except with ``codistill=True``, where it is
    trained too and ``parameters()`` holds both (``trainable_module()``).
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], config: DistillConfig = DistillConfig()):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        if config.needs_teacher and teacher is None:
            raise ValueError("teacher is None but the config uses teacher losses (kd/tsld/hidden/attn_*)")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        self.student = student
        self.config = config
        self._teacher = [teacher]  # not registered: keeps it out of parameters()/state_dict()/DDP
        self._progress = (0.0, 0.0)  # (step / total_steps, epoch / num_epochs), set_progress()
        if config.codistill:  # CTCD trains both: the teacher is registered, so parameters() holds both
            from .codistill import check_trainable_teacher

            check_trainable_teacher(teacher)
            self._check_compatible(student, teacher)  # e.g. num_labels, before any step
            self.co_teacher = teacher
        elif teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            if config.teacher_dtype is not None:
                teacher.to(_DTYPES[config.teacher_dtype])
            self._check_compatible(student, teacher)
        if config.crild:
            from .crild import check_capturable

            check_capturable(student, teacher)
        if config.needs_attention:
            try:
                from . import capture  # noqa: F401
            except ImportError as e:
                raise ValueError("attn_map/attn_output losses need pyquant.distill.capture, which is not available "
                                 f"in this build ({e})") from e
        self.logit_weights = LogitLossWeights(ce=config.ce if config.task == "causal_lm" else 0.0,
                                              kd=config.kd * self.kd_scale() if config.task == "causal_lm" else 0.0,
                                              tsld=config.tsld, temperature=config.temperature,
                                              kd_kind=config.kd_kind, tsld_tau=config.tsld_tau,
                                              tsld_reduction=config.tsld_reduction) \
            if (config.ce or config.kd or config.tsld) and config.task == "causal_lm" else None

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0]

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() move the (unregistered) teacher as well
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
            if self.config.teacher_dtype is not None:
                self.teacher.to(_DTYPES[self.config.teacher_dtype])
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None and not self.config.codistill:
            self.teacher.eval()
        return self

    def trainable_module(self) -> nn.Module:
        """What the optimizer trains and the checkpoints hold: the student, or the Distiller (student + teacher)
        with ``codistill=True``."""
        return self if self.config.codistill else self.student

    def set_progress(self, step: int, total_steps: int, epoch: Optional[int] = None,
                     num_epochs: Optional[int] = None) -> None:
        """Training progress for the schedules: ``kd_schedule`` uses step / total_steps; CR-ILD's consistency factor
        uses epoch / num_epochs (0-based epoch, as the released code) when given, else step / total_steps."""
        for nm, v in (("step", step), ("total_steps", total_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"set_progress: {nm}={v!r} is invalid: expected an int >= 0")
        if total_steps == 0:
            raise ValueError("set_progress: total_steps=0 is invalid: expected > 0")
        frac = min(step / total_steps, 1.0)
        ep = frac
        if epoch is not None or num_epochs is not None:
            if not (isinstance(epoch, int) and isinstance(num_epochs, int) and num_epochs > 0 and epoch >= 0):
                raise ValueError(f"set_progress: epoch={epoch!r}, num_epochs={num_epochs!r} are invalid: expected "
                                 "ints with 0 <= epoch and num_epochs > 0 (or both None)")
            ep = min(epoch / num_epochs, 1.0)
        self._progress = (frac, ep)

    def kd_weight(self) -> float:
        """The logit-KD weight now: ``kd`` ("constant") or ``kd * (start + (end - start) * step / total)``
        ("linear", DWT's alpha_s decayed 4 -> 1)."""
        c = self.config
        if c.kd_schedule == "constant":
            return float(c.kd)
        return float(c.kd) * (c.kd_schedule_start + (c.kd_schedule_end - c.kd_schedule_start) * self._progress[0])

    def kd_scale(self) -> float:
        """Factor on the (T^2-scaled) logit-KD term: 1, or 1 / T^2 with ``kd_t_squared=False`` (DWT Eq. 3)."""
        return 1.0 if self.config.kd_t_squared else 1.0 / float(self.config.temperature) ** 2

    # ---- checks before any training -----------------------------------------------------------------------------
    def _check_compatible(self, student: nn.Module, teacher: nn.Module) -> None:
        c = self.config
        scfg, tcfg = getattr(student, "config", None), getattr(teacher, "config", None)
        if c.task == "causal_lm" and (c.kd or c.tsld):
            sv, tv = getattr(scfg, "vocab_size", None), getattr(tcfg, "vocab_size", None)
            if sv is not None and tv is not None and sv != tv:
                raise ValueError(f"teacher vocab_size={tv} != student vocab_size={sv}: logit distillation needs the "
                                 "same vocabulary (tokenizer)")
        if c.task != "causal_lm" and c.kd:
            sl, tl = getattr(scfg, "num_labels", None), getattr(tcfg, "num_labels", None)
            if sl is not None and tl is not None and sl != tl:
                raise ValueError(f"teacher num_labels={tl} != student num_labels={sl}")
        ns, nt = _n_layers(student), _n_layers(teacher)
        if c.hidden and ns is not None and nt is not None:
            resolve_layer_map(ns + 1, nt + 1, c.layer_map)  # raises a clear ValueError
            sh, th = getattr(scfg, "hidden_size", None), getattr(tcfg, "hidden_size", None)
            if sh is not None and th is not None and sh != th:
                raise ValueError(f"hidden MSE needs equal widths: student hidden_size={sh}, teacher hidden_size={th}")
        if c.needs_attention and ns is not None and nt is not None:
            resolve_layer_map(ns, nt, c.attn_layer_map)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(self, batch: Dict[str, torch.Tensor]) -> DistillOutput:
        c = self.config
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            raise ValueError("batch must be a dict with 'input_ids' and 'labels' (and optionally 'attention_mask')")
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        labels = batch["labels"]
        if c.codistill:
            from .codistill import codistill_forward

            return codistill_forward(self, inputs, labels)
        if c.crild:
            from .crild import crild_forward

            return crild_forward(self, inputs, labels)
        if c.kd_schedule != "constant" and self.logit_weights is not None:
            self.logit_weights = dataclasses.replace(self.logit_weights, kd=self.kd_weight() * self.kd_scale())
        want_hidden = bool(c.hidden)
        fused = c.task == "causal_lm" and self._fused_head_ok(self.student)
        s_rec = t_rec = None
        t_out = None
        teacher = self.teacher
        if teacher is not None and c.needs_teacher:
            with torch.no_grad():
                cm = self._capture(teacher) if c.needs_attention else contextlib.nullcontext()
                with cm as t_rec:
                    t_out = self._run(teacher, inputs, want_hidden, fused and self._fused_head_ok(teacher),
                                      bool(c.router))
        cm = self._capture(self.student) if c.needs_attention else contextlib.nullcontext()
        with cm as s_rec:
            s_out = self._run(self.student, inputs, want_hidden, fused, bool(c.router))

        losses: Dict[str, torch.Tensor] = {}
        total = None

        def add(name, value, weight):
            nonlocal total
            losses[name] = value.detach()
            term = value * weight
            total = term if total is None else total + term

        if c.task == "causal_lm":
            if self.logit_weights is not None:
                lab = labels[:, 1:]
                if "attention_mask" in inputs and inputs["attention_mask"] is not None:
                    lab = lab.masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
                s_x, s_w, s_b = s_out["head_input"]
                kw = {}
                if t_out is not None and (c.kd or c.tsld):
                    t_x, t_w, t_b = t_out["head_input"]
                    kw = dict(teacher=t_x[:, :-1], teacher_weight=t_w, teacher_bias=t_b)
                lt, parts = chunked_logit_losses(s_x[:, :-1], lab.contiguous(), weight=s_w, bias=s_b,
                                                 loss_weights=self.logit_weights, chunk_size=c.chunk_size, **kw)
                total = lt
                losses.update({k: v.detach() for k, v in parts.items()})
                if "kd" in losses and self.kd_scale() != 1.0:  # report the term as weighted (without T^2)
                    losses["kd"] = losses["kd"] * self.kd_scale()
        else:
            s_logits = s_out["logits"].float()
            if c.task == "regression":
                s_logits = s_logits.squeeze(-1)
            if c.ce:
                ce = F.mse_loss(s_logits, labels.float()) if c.task == "regression" else \
                    F.cross_entropy(s_logits, labels, reduction=c.ce_reduction)
                add("ce", ce, c.ce)
            if c.kd:
                t_logits = t_out["logits"].float()
                if c.task == "regression":
                    kd = F.mse_loss(s_logits, t_logits.squeeze(-1))
                else:
                    kd = logit_kd_loss(s_logits, t_logits, c.temperature, c.kd_kind) * self.kd_scale()
                add("kd", kd, self.kd_weight())
        if c.hidden:
            hm = hidden_mse(list(s_out["hidden_states"]), list(t_out["hidden_states"]), c.layer_map,
                            None if c.hidden_reduction == "paper" else inputs.get("attention_mask"))
            add("hidden", hm, c.hidden)
        if c.router:
            add("router", _router_kl(s_out["router_logits"], t_out["router_logits"], inputs.get("attention_mask")),
                c.router)
        if c.attn_score:
            add("attn_score", self._score_mse(s_rec, t_rec), c.attn_score)
        if c.attn_map or c.attn_output:
            from .capture import attention_kd_losses

            ad = attention_kd_losses(s_rec, t_rec, gamma=c.attn_gamma, map_weight=c.attn_map,
                                     output_weight=c.attn_output,
                                     layer_map=None if c.attn_layer_map is None else list(c.attn_layer_map),
                                     temperature=1.0, reduction=c.attn_map_reduction,
                                     output_mask=c.attn_output_reduction == "masked")
            if c.attn_gamma is not None:
                add("attn_kd", ad["attn_kd"], 1.0)
                for k in ("attn_map", "attn_output"):
                    if k in ad:
                        losses[k] = ad[k].detach()
            else:
                if c.attn_map:
                    add("attn_map", ad["attn_map"], c.attn_map)
                if c.attn_output:
                    add("attn_output", ad["attn_output"], c.attn_output)
        if s_rec is not None:  # free what the attention losses did not consume
            s_rec.clear()
            t_rec.clear()
        losses["total"] = total.detach()
        return DistillOutput(loss=total, losses=losses)

    def _score_mse(self, s_rec, t_rec) -> torch.Tensor:
        from .attention import attention_score_mse

        lm = resolve_layer_map(len(s_rec), len(t_rec),
                               None if self.config.attn_layer_map is None else list(self.config.attn_layer_map))
        total = None
        for j, i in enumerate(lm):
            s, t = s_rec[j], t_rec[i]
            v = attention_score_mse(s.q, s.k, t.q, t.k, s.key_padding_mask, causal=s.causal, scale=s.scaling,
                                    teacher_scale=t.scaling)
            total = v if total is None else total + v
        return total

    # ---- helpers --------------------------------------------------------------------------------------------------
    @staticmethod
    def _capture(model):
        from .capture import capture_attention

        return capture_attention(model)

    @staticmethod
    def _fused_head_ok(model: nn.Module) -> bool:
        """True when logits = lm_head(base(x).last_hidden_state) exactly (plain Linear head, no soft-capping)."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        cfg = getattr(model, "config", None)
        if type(head) is not nn.Linear or cfg is None:
            return False
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
            return False
        prefix = getattr(model, "base_model_prefix", "")
        return bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)

    @staticmethod
    def _run(model: nn.Module, inputs, want_hidden: bool, fused: bool, want_router: bool = False) -> dict:
        rk = {"output_router_logits": True} if want_router else {}
        if fused:
            base = getattr(model, model.base_model_prefix)
            out = base(**inputs, output_hidden_states=want_hidden, use_cache=False, return_dict=True, **rk)
            head = model.get_output_embeddings()
            res = {"head_input": (out.last_hidden_state, head.weight, head.bias)}
        else:
            kw = {"use_cache": False} if _is_causal(model) else {}
            out = model(**inputs, output_hidden_states=want_hidden, return_dict=True, **kw, **rk)
            res = {"logits": out.logits, "head_input": (out.logits, None, None)}
        if want_hidden:
            res["hidden_states"] = out.hidden_states
        if want_router:
            rl = getattr(out, "router_logits", None)
            if not rl:
                raise ValueError(f"DistillConfig.router: {type(model).__name__} returned no router logits "
                                 "(output_router_logits=True): it is not a mixture-of-experts model")
            res["router_logits"] = tuple(rl)
        return res


def _router_kl(s_logits, t_logits, attention_mask) -> torch.Tensor:
    """Sum over MoE layers of the mean over non-padding tokens of KL(softmax(t) || softmax(s)) of the router logits
    ([tokens, experts] per layer, tokens = B * L in the batch's order)."""
    if len(s_logits) != len(t_logits):
        raise ValueError(f"DistillConfig.router: student has {len(s_logits)} MoE layers, teacher {len(t_logits)}")
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
    total = None
    for s, t in zip(s_logits, t_logits):
        if s.shape != t.shape:
            raise ValueError(f"DistillConfig.router: router logits {tuple(s.shape)} (student) vs {tuple(t.shape)} "
                             "(teacher): the experts must match")
        kl = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), reduction="none", log_target=True)
        kl = kl.sum(-1)
        if keep is not None and keep.numel() == kl.numel():
            kl = kl[keep]
        term = kl.mean()
        total = term if total is None else total + term
    return total


def _is_causal(model) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "is_decoder", False)) or type(model).__name__.endswith("ForCausalLM")

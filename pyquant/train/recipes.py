"""Recipes as library functions: GLUE encoder QAT (EMNLP'22), causal-LM QAT with TSLD, and FP fine-tuning.

The CLI (``pyquant.train.cli``) parses options and calls these; tests and the benchmarks call them directly.

Encoder QAT (Kim et al., EMNLP 2022, following TernaryBERT): teacher = the task-fine-tuned FP model, student
initialized from it, ternary TWN weights on every Transformer-block linear with 8-bit activations (W2A8;
embeddings, pooler and classifier stay FP), losses logit KD (soft CE) + hidden-state MSE + attention-map and/or
attention-output KD, no ground-truth CE; 3 epochs, lr 2e-5, linear warmup 10%, weight decay 0.01, batch 32,
max length 128 (64 for SST-2/CoLA).

Decoder QAT (TSLD, Kim et al., NeurIPS 2023): ternary per-row (per-channel) weights, W2A16, lm_head and embeddings
FP, loss = ground-truth CE + TSLD token-scaled logit distillation (tau = 10); perplexity with a sliding window.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..distill.distiller import DistillConfig, Distiller
from ..formats import ActivationQuantConfig, WeightQuantConfig
from ..convert import QATConfig, prepare_qat
from .data import (CausalCollator, PadCollator, block_examples, encode_pairs, glue_metrics, glue_task, paper_score,
                   sliding_window_perplexity)
from .loop import TrainConfig, TrainResult, train
from .quant import prepare_student

__all__ = ["save_model_dir", "load_model", "load_tokenizer", "evaluate_glue", "finetune", "qat_glue", "qat_clm",
           "glue_distill_config", "attention_kd_available", "best_and_last"]


def attention_kd_available() -> bool:
    try:
        from ..distill import capture  # noqa: F401
    except ImportError:
        return False
    return True


def save_model_dir(model: nn.Module, tokenizer, directory) -> None:
    """``save_pretrained`` of ``model`` (+ ``tokenizer``) into ``directory`` atomically: the directory holds the
    previous files or the complete new ones, never a mix (``pyquant.integrations.atomic``)."""
    from transformers.utils import logging as hf_logging

    from ..integrations.atomic import atomic_directory

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar between the commands' own lines
    try:
        with atomic_directory(directory) as tmp:
            type(model).save_pretrained(model, tmp)  # the class method: this block already makes the write atomic
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on the cause
        raise ValueError(f"cannot load a tokenizer from {name_or_path!r}: {e}") from e


def load_model(name_or_path: str, kind: str, num_labels: Optional[int] = None, dtype=None) -> nn.Module:
    """``kind``: "classification" (AutoModelForSequenceClassification) or "causal_lm" (AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if kind == "classification":
            kw = {} if num_labels is None else {"num_labels": num_labels}
            if num_labels == 1:
                kw["problem_type"] = "regression"
            return AutoModelForSequenceClassification.from_pretrained(name_or_path, **kw)
        if kind == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(name_or_path, **({} if dtype is None else {"dtype": dtype}))
    except Exception as e:
        raise ValueError(f"cannot load a {kind} model from {name_or_path!r}: {e}") from e
    raise ValueError(f"kind={kind!r} is invalid: expected 'classification' or 'causal_lm'")


@torch.no_grad()
def evaluate_glue(model: nn.Module, task: str, dev_examples: List[Dict], pad_id: int, batch_size: int = 64
                  ) -> Dict[str, float]:
    t = glue_task(task)
    coll = PadCollator(pad_id, t.is_regression)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    preds, gold = [], []
    for i in range(0, len(dev_examples), batch_size):
        b = coll(dev_examples[i:i + batch_size])
        logits = model(**{k: v.to(device) for k, v in b.items() if k != "labels"}).logits.float()
        preds += logits.squeeze(-1).tolist() if t.is_regression else logits.argmax(-1).tolist()
        gold += b["labels"].tolist()
    model.train(was)
    return glue_metrics(task, preds, gold)


def glue_distill_config(task: str, kd: bool, attention: str = "map", hidden: bool = True,
                        mse_reduction: str = "paper", gt_loss: bool = False) -> DistillConfig:
    """EMNLP'22 losses (kd=True): logit + hidden + attention ("map", "output", "both", "none", or "score": the
    TernaryBERT baseline's attention-score MSE); kd=False: CE only.

    The defaults are the shipped scripts' (run_kd_qat_map.sh: gt_loss=0, pred_distill=1, rep_distill=1,
    attnmap_distill=1; run_kd_qat_output.sh: output_distill=1 instead; map_coeff = output_coeff = 1).
    ``mse_reduction``: "paper" (the paper code's unmasked MSE for the hidden and attention-output losses) or
    "masked" (``DistillConfig.hidden_reduction`` / ``attn_output_reduction``).  ``gt_loss=True`` adds the
    ground-truth loss as that code computes it when enabled (classification: NLL summed over the batch, main.py:666;
    regression: pyquant's MSE to the labels -- the paper's code uses MSE to the *teacher* there, main.py:668).
    """
    t = glue_task(task)
    tk = "regression" if t.is_regression else "classification"
    if not kd:
        return DistillConfig(task=tk, ce=1.0)
    if attention not in ("map", "output", "both", "none", "score"):
        raise ValueError(f"attention={attention!r} is invalid: expected 'map', 'output', 'both', 'none' or 'score'")
    if attention != "none" and not attention_kd_available():
        raise ValueError("attention KD needs pyquant.distill.capture, which is not available in this build; "
                         "pass attention='none' (--attention-kd none)")
    red = mse_reduction
    return DistillConfig(task=tk, ce=1.0 if gt_loss else 0.0,
                         ce_reduction="sum" if gt_loss and tk == "classification" else "mean",
                         kd=1.0, hidden=1.0 if hidden else 0.0,
                         attn_map=1.0 if attention in ("map", "both") else 0.0,
                         attn_output=1.0 if attention in ("output", "both") else 0.0,
                         attn_score=1.0 if attention == "score" else 0.0,
                         hidden_reduction=red, attn_output_reduction=red)


def _glue_examples(task, tokenizer, rows, max_length):
    return encode_pairs(rows, tokenizer, max_length or glue_task(task).max_length)


def finetune(model: nn.Module, train_examples: Sequence, collate, cfg: TrainConfig, task: str = "classification",
             eval_fn=None, run_config: Optional[dict] = None) -> TrainResult:
    """Full-precision fine-tuning with ground-truth loss only (makes a teacher)."""
    d = Distiller(model, None, DistillConfig(task=task, ce=1.0))
    return train(d, train_examples, collate, cfg, run_config=run_config, eval_fn=eval_fn)


def qat_glue(teacher: nn.Module, student: nn.Module, task: str, train_examples: Sequence, pad_id: int,
             cfg: TrainConfig, distill: DistillConfig, weight: Optional[WeightQuantConfig],
             activation: Optional[ActivationQuantConfig] = ActivationQuantConfig(),
             dev_examples: Optional[List[Dict]] = None, run_config: Optional[dict] = None,
             exclude: Optional[Sequence[str]] = None, preset: Optional[str] = None,
             pad_to: Optional[int] = None) -> TrainResult:
    """QAT of ``student`` (prepared here, in place) with the given losses; teacher frozen -- except with
    ``distill.codistill`` (CTCD): then the teacher (which must have trainable parameters) is trained together with
    the student by one optimizer and updated in place (pass a copy to keep the original); the dev evaluations score
    the student.

    ``preset``: a ``QATConfig`` preset (e.g. "kdqat-emnlp22") used instead of ``weight`` / ``activation`` /
    ``exclude`` (pass those as None).  ``pad_to``: pad every batch to this length (default: dynamic padding).
    ``cfg.eval_every``: periodic dev evaluation (every entry lands in the result's history).
    """
    t = glue_task(task)
    if preset is not None:
        if weight is not None or activation is not None or exclude is not None:
            raise ValueError(f"preset={preset!r} sets the quantization itself; weight/activation/exclude must be None")
        prepare_qat(student, QATConfig(preset=preset))
    else:
        prepare_student(student, weight, activation, exclude=exclude)
    d = Distiller(student, teacher if distill.needs_teacher else None, distill)
    # the loop evaluates what it trains: the student, or the Distiller (student + teacher) when co-distilling
    ev = (lambda m: evaluate_glue(m.student if isinstance(m, Distiller) else m, task, dev_examples, pad_id)) \
        if dev_examples else None
    return train(d, train_examples, PadCollator(pad_id, t.is_regression, pad_to), cfg, run_config=run_config,
                 eval_fn=ev)


def best_and_last(task: str, history: Sequence[Dict]) -> Dict[str, Optional[Dict]]:
    """{"best": {"step", "score", "eval"}, "last": {...}} over the dev evaluations in ``history``, the best picked
    and scored as the EMNLP'22 code does (``pyquant.train.data.paper_score``; ties keep the earlier one)."""
    evals = [h for h in history if "eval" in h and h["eval"]]
    if not evals:
        return {"best": None, "last": None}

    def rec(h):
        return {"step": h["step"], "score": paper_score(task, h["eval"])[1], "eval": h["eval"]}

    best = evals[0]
    for h in evals[1:]:
        if paper_score(task, h["eval"])[0] > paper_score(task, best["eval"])[0]:
            best = h
    return {"best": rec(best), "last": rec(evals[-1])}


def qat_clm(teacher: Optional[nn.Module], student: nn.Module, train_ids: Sequence[int], block: int, cfg: TrainConfig,
            weight: WeightQuantConfig = WeightQuantConfig(method="twn", granularity="channel"),
            tsld: bool = True, attention_map: float = 0.0, valid_ids: Optional[Sequence[int]] = None,
            run_config: Optional[dict] = None, chunk_size: int = 1024, eval_stride: Optional[int] = None
            ) -> TrainResult:
    """Decoder QAT, W2A16: ground-truth CE + TSLD (when ``tsld``), optional attention-map KD."""
    prepare_student(student, weight, None)
    dc = DistillConfig(task="causal_lm", ce=1.0, tsld=1.0 if tsld else 0.0, attn_map=attention_map,
                       chunk_size=chunk_size)
    d = Distiller(student, teacher if dc.needs_teacher else None, dc)
    ev = (lambda m: {"perplexity": sliding_window_perplexity(m, valid_ids, block, eval_stride)}) \
        if valid_ids is not None else None
    return train(d, block_examples(train_ids, block), CausalCollator(), cfg, run_config=run_config, eval_fn=ev)

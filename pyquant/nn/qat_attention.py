"""8-bit fake-quant of Q, K, V and the attention probabilities inside a HuggingFace model's attention (QAT).

The EMNLP'22 KD-QAT setting (MarsJacobs/kd-qat-large-enc ``transformer/modeling_quant.py`` lines 141-156)
quantizes, per tensor with the activation clip (``SymQuantizer``, layerwise=True): the per-head query and key before
``Q K^T`` (lines 141-142), and the attention probabilities *after dropout* and the value before ``P V``
(lines 150, 153-154).  That needs the probabilities as a tensor, so this path computes attention explicitly
("eager" math): **O(B * H * L_q * L_k) memory** for the scores/probabilities of every layer kept for backward, where
SDPA / flash attention would keep O(B * H * L).  At GLUE lengths (L <= 128) this is what the paper's code does too.

``enable_attention_quant(model, spec)`` registers the implementation ``"pyquant_qat"`` with transformers'
``AttentionInterface``, marks every attention module (``ATTR`` holds the spec) and switches the model to it.
``pyquant.distill.capture`` honours the mark: while attention is captured for distillation the marked modules still
run this quantized path (the recorded Q/K are the quantized ones the student's probabilities come from, as in the
paper's map loss; the streaming KD kernel then computes the map loss from them).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats import ActivationQuantConfig
from ..ops import fake_quant_activation

__all__ = ["IMPL_NAME", "ATTR", "qat_attention_forward", "quantize_qk", "enable_attention_quant",
           "attention_modules"]

IMPL_NAME = "pyquant_qat"
ATTR = "_pyquant_attn_act"
_REGISTERED = False


def quantize_qk(module: nn.Module, query: torch.Tensor, key: torch.Tensor):
    spec = getattr(module, ATTR)
    return fake_quant_activation(query, spec), fake_quant_activation(key, spec)


def _keep_or_bias(mask: Optional[torch.Tensor], lq: int, lk: int, causal: bool, device):
    """Additive float bias [.., L_q, L_k] (or None) from an SDPA-style mask (None / bool keep / additive float)."""
    if mask is None:
        if not causal or lq == 1:
            return None
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        mask = j <= i + (lk - lq)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill(~mask, float("-inf"))
    return mask.float()


def qat_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    """Attention with 8-bit fake-quant of Q, K, V and the probabilities after dropout; (output [B, L, H, d],
    probabilities before dropout [B, H, L_q, L_k]) as transformers' attention functions return them."""
    spec: ActivationQuantConfig = getattr(module, ATTR)
    b, h, lq, d = query.shape
    lk = key.shape[2]
    q, k = quantize_qk(module, query, key)
    v = fake_quant_activation(value, spec)
    if k.shape[1] != h:  # GQA / MQA
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    sc = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * sc
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    bias = _keep_or_bias(attention_mask, lq, lk, bool(is_causal), query.device)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query row with no kept key (all -inf)
    p = nn.functional.dropout(probs, p=dropout, training=module.training)
    p = fake_quant_activation(p.to(query.dtype), spec)
    out = torch.matmul(p, v).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL_NAME, qat_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(IMPL_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:  # pragma: no cover - older transformers pass the SDPA-style 4-D mask to every implementation
        pass
    _REGISTERED = True


def attention_modules(model: nn.Module):
    """(name, module) of the modules that call transformers' attention function: ``*Attention`` classes with a
    ``scaling`` attribute and a ``config`` (BERT/RoBERTa ``*SelfAttention``, Llama-style ``*Attention``)."""
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "scaling") and hasattr(m, "config")]


def enable_attention_quant(model: nn.Module, spec: ActivationQuantConfig):
    """Mark every attention module with ``spec`` and switch ``model`` to the ``"pyquant_qat"`` implementation;
    returns the marked module names.  ValueError when the model has no such module or cannot switch."""
    if not isinstance(spec, ActivationQuantConfig):
        raise TypeError(f"attention activation spec must be an ActivationQuantConfig, got {type(spec).__name__}")
    mods = attention_modules(model)
    if not mods or not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} has no attention module that calls transformers' "
                         "AttentionInterface (a '*Attention' module with 'scaling'): Q/K/V/probability fake-quant "
                         "cannot be applied; set QATConfig.attention_activation=None")
    _register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPL_NAME)
    else:  # pragma: no cover
        model.config._attn_implementation = IMPL_NAME
    if getattr(model.config, "_attn_implementation", None) != IMPL_NAME:
        raise ValueError(f"{type(model).__name__} did not switch to the {IMPL_NAME!r} attention implementation")
    for _, m in mods:
        setattr(m, ATTR, spec)
    return [n for n, _ in mods]

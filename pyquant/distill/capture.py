"""Capture what attention distillation needs from a HuggingFace model's forward, without attention maps.

``capture_attention(model)`` switches the model to a registered ``transformers`` attention implementation
(``AttentionInterface``, name ``"pyquant_capture"``) that computes the real attention output with SDPA -- the
model's output is unchanged and no L x L map is built -- and records per attention call: Q and K after RoPE
([B, H, L_q, d], [B, H_kv, L_k, d]; K not repeated for GQA), the key-padding mask and causality derived from the mask
the model passes, and the softmax scale.  Forward hooks (a small table, not per-model patches) record the attention
sub-layer output for the output loss:

* BERT / RoBERTa / ELECTRA-style encoders: ``<layer>.attention.output`` (a ``*SelfOutput``:
  LayerNorm(W_O context + b + X)), the sibling of the ``<layer>.attention.self`` module that calls the attention;
* Llama / Mistral / Qwen / GPT-2-style pre-LN decoders: the attention module itself (``<layer>.self_attn``,
  ``<layer>.attn`` or ``<layer>.self_attention``, a ``*Attention`` class), ``output[0]`` (the attention block output
  after the output projection, before the residual add).

``attention_kd_losses(student_record, teacher_record, ...)`` turns a captured (student, teacher) forward pair into
the summed layer losses and frees the recorded tensors.  Designed for training forwards (no KV cache).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..reference.distill import resolve_layer_map
from .attention import attention_map_loss, attention_output_loss

__all__ = ["IMPL_NAME", "AttentionEntry", "AttentionRecord", "capture_attention", "attention_kd_losses"]

IMPL_NAME = "pyquant_capture"
_state = threading.local()  # id(module) -> record of the innermost active capture of a model containing it


@dataclass
class AttentionEntry:
    """One attention call.  ``key_padding_mask`` [B, L_k] bool (None: no padding); ``attn_mask`` is set only when
    the model's mask is not key-padding (+ causal) -- then the loss uses the materialized reference."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    scaling: float
    causal: bool
    key_padding_mask: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None


@dataclass
class AttentionRecord:
    """Per-layer entries of the captured forward(s), in call order (``record[i]`` is the i-th attention call)."""

    entries: List[AttentionEntry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i) -> AttentionEntry:
        return self.entries[i]

    def __iter__(self) -> Iterator[AttentionEntry]:
        return iter(self.entries)

    def clear(self) -> None:
        """Drop every recorded tensor (the losses call this after use)."""
        self.entries.clear()


# ---- mask decoding -------------------------------------------------------------------------------------------------
def _causal_keep(lq: int, lk: int, device) -> torch.Tensor:
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def _decode_mask(mask: Optional[torch.Tensor], b: int, lq: int, lk: int, is_causal: bool, device):
    """(key_padding_mask [B, L_k] | None, causal, general keep-mask | None) from the mask the model passes.

    ``mask``: None (then ``is_causal`` decides, as in transformers' SDPA path), bool [B|1, 1|H, L_q, L_k]
    (True = keep), or additive float (0 = keep, dtype min = masked).  The mask is re-expressed as key padding (its
    last query row, which sees every non-padding key in both bidirectional and causal masks) plus causal, and
    verified on the rows that count (non-padding queries); anything else is kept as a general mask.
    """
    if mask is None:
        return None, bool(is_causal) and lq > 1, None
    if mask.dim() != 4 or mask.shape[-2:] != (lq, lk):
        raise ValueError(f"capture: unexpected attention mask of shape {tuple(mask.shape)}; expected 4-D "
                         f"[B, 1, {lq}, {lk}] (the SDPA mask format)")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        floor = torch.finfo(mask.dtype).min / 2
        keep = mask > floor
        if bool((mask[keep] != 0).any()):  # an additive bias (ALiBi-like): not a keep/drop mask
            return None, False, mask
    if keep.shape[1] != 1:
        return None, False, mask
    keep = keep[:, 0].expand(b, lq, lk)
    kpm = keep[:, -1, :]
    rows = kpm if lq == lk else torch.ones(b, lq, dtype=torch.bool, device=device)
    for causal in (False, True):
        want = kpm[:, None, :].expand(b, lq, lk)
        if causal:
            want = want & _causal_keep(lq, lk, device)
        if bool(((keep == want) | ~rows[:, :, None]).all()):
            return (None if bool(kpm.all()) else kpm.contiguous()), causal, None
    return None, False, mask


# ---- the registered attention implementation -----------------------------------------------------------------------
def _capture_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                               **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..nn import qat_attention

    if getattr(module, qat_attention.ATTR, None) is not None:  # QAT Q/K/V/probability fake-quant: explicit
        # probabilities (O(L^2), pyquant/nn/qat_attention.py); record the quantized Q/K the probabilities come from
        out = qat_attention.qat_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                  dropout=dropout, **kwargs)
        query, key = qat_attention.quantize_qk(module, query, key)
    else:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    rec = _active_records().get(id(module))
    if rec is not None:
        b, _, lq, d = query.shape
        lk = key.shape[2]
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", False)
        # every layer gets the same mask object: decode it once per forward (decoding syncs with the device).
        # The cache holds the mask itself, so its id cannot be reused by another tensor while cached.
        ck = (id(attention_mask), b, lq, lk, bool(is_causal))
        hit = rec._mask_cache.get(ck)  # type: ignore[attr-defined]
        if hit is None or hit[0] is not attention_mask:
            hit = (attention_mask, _decode_mask(attention_mask, b, lq, lk, is_causal, query.device))
            rec._mask_cache[ck] = hit  # type: ignore[attr-defined]
        kpm, causal, general = hit[1]
        sc = scaling if scaling is not None else getattr(module, "scaling", None)
        sc = float(sc) if sc is not None else d ** -0.5
        name = rec._names.get(id(module), type(module).__name__)
        rec.entries.append(AttentionEntry(name=name, q=query, k=key, scaling=sc, causal=causal,
                                          key_padding_mask=kpm, attn_mask=general))
        rec._pending[id(module)] = rec.entries[-1]
    return out


def _active_records() -> Dict[int, AttentionRecord]:
    d = getattr(_state, "records", None)
    if d is None:
        d = _state.records = {}
    return d


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(IMPL_NAME, _capture_attention_forward)
    try:  # transformers >= 4.53 builds the mask per implementation: ours takes the SDPA mask
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(IMPL_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:  # pragma: no cover - older transformers pass the SDPA-style 4-D mask to every implementation
        pass
    _REGISTERED = True


# ---- output hooks: one small table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _OutputRule:
    """How to find an attention module's output module and read the sub-layer output from its forward output."""

    describe: str
    pair: Callable[[str, nn.Module, Dict[str, nn.Module]], Optional[Tuple[nn.Module, nn.Module]]]
    read: Callable[[object], torch.Tensor]


def _pair_self_output(name, mod, mods):
    # <x>.output (class *SelfOutput) pairs with its sibling <x>.self, the module that calls the attention function
    if not type(mod).__name__.endswith("SelfOutput") or not name.endswith(".output"):
        return None
    att = mods.get(name[: -len(".output")] + ".self")
    return (att, mod) if att is not None else None


_ATTN_MODULE_NAMES = ("self_attn", "attn", "self_attention")


def _pair_self_attn(name, mod, mods):
    # the module that calls the attention function also applies the output projection: its output[0]
    last = name.split(".")[-1]
    return (mod, mod) if last in _ATTN_MODULE_NAMES and type(mod).__name__.endswith("Attention") else None


_OUTPUT_RULES: Tuple[_OutputRule, ...] = (
    _OutputRule("BERT-style *SelfOutput sibling of <layer>.attention.self", _pair_self_output, lambda out: out),
    _OutputRule("Llama/GPT-2-style <layer>.self_attn|attn|self_attention (*Attention) output[0]", _pair_self_attn,
                lambda out: out[0] if isinstance(out, (tuple, list)) else out),
)


def _set_impl(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - transformers without set_attn_implementation
        model.config._attn_implementation = impl


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionRecord]:
    """Run the block with ``model``'s attention captured; yields an :class:`AttentionRecord`.

    The model computes its attention with SDPA (output unchanged); its previous attention implementation is restored
    on exit.  The record stays readable after the block (pass it to :func:`attention_kd_losses`, which frees it).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    _register()
    previous = getattr(model.config, "_attn_implementation", None)
    rec = AttentionRecord()
    mods = dict(model.named_modules())
    rec._names = {id(m): n for n, m in mods.items()}  # type: ignore[attr-defined]
    rec._pending = {}  # type: ignore[attr-defined]
    rec._mask_cache = {}  # type: ignore[attr-defined]
    handles = []
    for name, mod in mods.items():
        for rule in _OUTPUT_RULES:
            pair = rule.pair(name, mod, mods)
            if pair is None:
                continue
            att, out_mod = pair

            def hook(_m, _args, out, _att=att, _read=rule.read):
                entry = rec._pending.pop(id(_att), None)
                if entry is not None:
                    entry.output = _read(out)

            handles.append(out_mod.register_forward_hook(hook))
            break
    records = _active_records()
    prev = {id(m): records.get(id(m)) for m in mods.values()}
    records.update({k: rec for k in prev})
    try:
        _set_impl(model, IMPL_NAME)
        if getattr(model.config, "_attn_implementation", None) != IMPL_NAME:
            raise ValueError(f"{type(model).__name__} did not switch to the {IMPL_NAME!r} attention implementation: "
                             "capture needs a model whose attention goes through transformers' AttentionInterface")
        yield rec
    finally:
        for h in handles:
            h.remove()
        for k, r in prev.items():
            if r is None:
                records.pop(k, None)
            else:
                records[k] = r
        rec._pending.clear()
        rec._mask_cache.clear()
        if previous is not None and previous != IMPL_NAME:
            _set_impl(model, previous)


# ---- losses from a captured forward pair ------------------------------------------------------------------------------
def attention_kd_losses(
    student_record: AttentionRecord,
    teacher_record: AttentionRecord,
    *,
    gamma: Optional[float] = None,
    map_weight: float = 1.0,
    output_weight: float = 1.0,
    layer_map: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    reduction: str = "paper",
    output_mask: bool = True,
) -> Dict[str, torch.Tensor]:
    """Summed layer losses of a captured (student, teacher) forward pair; frees both records afterwards.

    Returns ``{"attn_map": sum over layers of attention_map_loss, "attn_output": sum of attention_output_loss,
    "attn_kd": ...}``.  ``attn_map`` / ``attn_output`` are unweighted.  ``attn_kd`` is the unified mix
    ``gamma * attn_map + (1 - gamma) * attn_output`` when ``gamma`` is given, else
    ``map_weight * attn_map + output_weight * attn_output``; a weight of 0 (or gamma 0 / 1) skips computing that
    loss (its entry is then 0).  ``layer_map``: a teacher attention index for each student attention call (length =
    number of student calls); default one to one (equal counts required).  The student's masks are used; the
    teacher's must describe the same padding.  ``output_mask=False``: the output MSE is the mean over all B*L*D
    entries, padding included (kd-qat-large-enc main.py:688-693, ``MSELoss()`` on the attention sub-layer output).
    """
    for nm, r in (("student_record", student_record), ("teacher_record", teacher_record)):
        if not isinstance(r, AttentionRecord):
            raise TypeError(f"{nm} must be an AttentionRecord from capture_attention, got {type(r).__name__}")
    if len(student_record) == 0:
        raise ValueError("student_record is empty: run the student's forward inside capture_attention(student) "
                         "(records are freed after attention_kd_losses uses them)")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                              or not 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma={gamma!r} is invalid: expected None or a float in [0, 1]")
    for nm, w in (("map_weight", map_weight), ("output_weight", output_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{nm}={w!r} is invalid: expected a float >= 0")
    lm = resolve_layer_map(len(student_record), len(teacher_record), layer_map)
    wm, wo = (gamma, 1.0 - gamma) if gamma is not None else (float(map_weight), float(output_weight))
    dev = student_record[0].q.device
    total_map = torch.zeros((), device=dev)
    total_out = torch.zeros((), device=dev)
    try:
        for j, i in enumerate(lm):
            s, t = student_record[j], teacher_record[i]
            if s.causal != t.causal:
                raise ValueError(f"student attention {j} ({s.name}) is {'causal' if s.causal else 'bidirectional'} but "
                                 f"teacher attention {i} ({t.name}) is not")
            if (s.key_padding_mask is None) != (t.key_padding_mask is None) or (
                    s.key_padding_mask is not None and not torch.equal(s.key_padding_mask, t.key_padding_mask)):
                raise ValueError(f"student attention {j} ({s.name}) and teacher attention {i} ({t.name}) saw "
                                 "different padding: run both models on the same batch")
            if wm:
                total_map = total_map + attention_map_loss(
                    s.q, s.k, t.q, t.k, s.key_padding_mask, causal=s.causal, scale=s.scaling,
                    teacher_scale=t.scaling, temperature=temperature, reduction=reduction,
                    attn_mask=s.attn_mask if s.attn_mask is not None else t.attn_mask)
            if wo:
                if s.output is None or t.output is None:
                    which = s if s.output is None else t
                    raise ValueError(f"no attention sub-layer output was recorded for {which.name}: this "
                                     "architecture is not in pyquant.distill.capture's output table "
                                     f"({'; '.join(r.describe for r in _OUTPUT_RULES)}); use output_weight=0")
                kpm = s.key_padding_mask if output_mask and s.q.shape[2] == s.k.shape[2] else None
                total_out = total_out + attention_output_loss(s.output, t.output, kpm)
    finally:
        student_record.clear()
        teacher_record.clear()
    return {"attn_map": total_map, "attn_output": total_out, "attn_kd": wm * total_map + wo * total_out}

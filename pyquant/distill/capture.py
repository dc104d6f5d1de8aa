"""Capture what attention distillation needs from a HuggingFace model's forward, without attention maps.

``capture_attention(model)`` switches the model to a registered ``transformers`` attention implementation
(``AttentionInterface``, name ``"pyquant_capture"``) that computes the real attention output with SDPA (the eager
math when the call has a logit soft-cap, which SDPA lacks) -- the model's output is unchanged and no L x L map is
built -- and records per attention call: Q, K, V after RoPE ([B, H, L_q, d], [B, H_kv, L_k, d]; not repeated for
GQA), the key-padding mask and causality derived from the mask the model passes (or the general mask: sliding
window, T5's position bias), the softmax scale and soft-cap.  A model whose attention does not go through
AttentionInterface (DeBERTa-v2, Falcon) is captured as its own ``output_attentions`` probabilities instead (the
probability path, :func:`capture_attention`).  Tested per family in tests/test_capture_families.py.  Forward hooks (a small table, not per-model patches) record the attention
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

from ..reference.attention import ATTENTION_REDUCTIONS
from ..reference.distill import resolve_layer_map
from .attention import attention_map_loss, attention_output_loss

__all__ = ["IMPL_NAME", "AttentionEntry", "AttentionRecord", "capture_attention", "attention_kd_losses"]

IMPL_NAME = "pyquant_capture"
_state = threading.local()  # id(module) -> record of the innermost active capture of a model containing it


@dataclass
class AttentionEntry:
    """One attention call.  ``key_padding_mask`` [B, L_k] bool (None: no padding); ``attn_mask`` is set only when
    the model's mask is not key-padding (+ causal) -- then the loss uses the materialized reference.  ``v``: the
    values [B, H_kv, L_k, d] (CR-ILD's V relation).  ``softcap``: the logit soft-cap (Gemma-2: scores =
    softcap * tanh(scores / softcap) before the mask).  ``probs``: the model's own probabilities [B, H, L_q, L_k],
    set instead of q/k/v (which are then None) for models whose attention does not go through AttentionInterface
    (the probability path, see :func:`capture_attention`)."""

    name: str
    q: Optional[torch.Tensor]
    k: Optional[torch.Tensor]
    scaling: Optional[float]
    causal: bool
    key_padding_mask: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    probs: Optional[torch.Tensor] = None


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
            return _general_kpm(keep, lq, lk), False, mask
    if keep.shape[1] != 1:
        return _general_kpm(keep, lq, lk), False, mask
    keep = keep[:, 0].expand(b, lq, lk)
    kpm = keep[:, -1, :]
    rows = kpm if lq == lk else torch.ones(b, lq, dtype=torch.bool, device=device)
    for causal in (False, True):
        want = kpm[:, None, :].expand(b, lq, lk)
        if causal:
            want = want & _causal_keep(lq, lk, device)
        if bool(((keep == want) | ~rows[:, :, None]).all()):
            return (None if bool(kpm.all()) else kpm.contiguous()), causal, None
    return _general_kpm(keep[:, None], lq, lk), False, mask


def _general_kpm(keep: torch.Tensor, lq: int, lk: int) -> Optional[torch.Tensor]:
    """Key padding of a general self-attention keep-mask [B, 1|H, L, L] (sliding window, position bias): key j is
    padding iff no query keeps it (a non-padding key is kept at least by its own query row in causal, sliding-window
    and bidirectional masks).  It marks the padding query rows the losses exclude; None when nothing is padding."""
    if lq != lk:
        return None
    kpm = keep.any(1).any(1)
    return None if bool(kpm.all()) else kpm.contiguous()


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
    elif kwargs.get("softcap") is not None:  # SDPA has no logit soft-cap (Gemma-2): the eager math, same output
        out = _eager_attention(module, query, key, value, attention_mask, scaling, dropout, kwargs["softcap"])
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
        pb = kwargs.get("position_bias")
        if pb is not None:  # T5: an additive per-head bias on top of the mask (SDPA's create_position_bias_mask)
            pb = pb.expand(b, -1, lq, lk)
            if general is not None:
                general = pb + (general if general.dtype != torch.bool else torch.where(
                    general, 0.0, torch.finfo(pb.dtype).min).to(pb.dtype))
            else:
                general = pb
        sc = scaling if scaling is not None else getattr(module, "scaling", None)
        sc = float(sc) if sc is not None else d ** -0.5
        name = rec._names.get(id(module), type(module).__name__)
        cap = kwargs.get("softcap")
        rec.entries.append(AttentionEntry(name=name, q=query, k=key, scaling=sc, causal=causal,
                                          key_padding_mask=kpm, attn_mask=general, v=value,
                                          softcap=None if cap is None else float(cap)))
        rec._pending[id(module)] = rec.entries[-1]
    return out


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout, softcap):
    """The eager attention math of transformers' soft-capped models (gemma2 ``eager_attention_forward``): scores
    = softcap * tanh(scale * q.k / softcap) + mask, fp32 softmax, dropout, @ V; returns (output [B, L, H, d], probs)."""
    h = query.shape[1]
    k = _repeat(key, h)
    v = _repeat(value, h)
    sc = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, k.transpose(2, 3)) * sc
    w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask[:, :, :, : k.shape[-2]]
        w = w.masked_fill(~m, torch.finfo(w.dtype).min) if m.dtype == torch.bool else w + m
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _repeat(x: torch.Tensor, h: int) -> torch.Tensor:
    return x if x.shape[1] == h else x.repeat_interleave(h // x.shape[1], dim=1)


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


_ATTN_KEYS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")


def _probability_path(model: nn.Module, rec: AttentionRecord) -> list:
    """Hooks for a model whose attention is computed inside its own modules (DeBERTa-v2's disentangled attention,
    Falcon): its forward is run with ``output_attentions=True`` (the model's own eager math, output unchanged) and
    each returned probability map becomes an entry with ``probs`` set (O(L^2) memory per layer, held until the loss).
    The maps are stripped from the model output unless the caller asked for them."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    roots = [model] + ([base] if isinstance(base, nn.Module) and base is not model else [])
    rec._depth = 0  # type: ignore[attr-defined]

    def pre(_m, args, kwargs):
        if rec._depth == 0:
            rec._user_asked = bool(kwargs.get("output_attentions"))
            rec._got = False
            rec._kpm = kwargs.get("attention_mask")
        rec._depth += 1
        kwargs["output_attentions"] = True
        return args, kwargs

    def post(_m, _args, _kwargs, out):
        rec._depth -= 1
        if not rec._got and hasattr(out, "keys") and any(out.get(k) is not None for k in _ATTN_KEYS):
            rec._got = True
            _entries_from_probs(rec, out)
        if not rec._user_asked and hasattr(out, "keys"):
            out = type(out)(**{k: v for k, v in out.items() if k not in _ATTN_KEYS})
        return out

    hs = []
    for r in roots:
        hs.append(r.register_forward_pre_hook(pre, with_kwargs=True))
        hs.append(r.register_forward_hook(post, with_kwargs=True))
    return hs


def _entries_from_probs(rec: AttentionRecord, out) -> None:
    maps: list = []
    if out.get("attentions") is not None:
        maps += [("attentions", i, p) for i, p in enumerate(out["attentions"])]
    if out.get("encoder_attentions") is not None:
        maps += [("encoder_attentions", i, p) for i, p in enumerate(out["encoder_attentions"])]
    dec, cross = out.get("decoder_attentions"), out.get("cross_attentions")
    for i, p in enumerate(dec or ()):
        maps.append(("decoder_attentions", i, p))
        if cross is not None:
            maps.append(("cross_attentions", i, cross[i]))
    am = rec._kpm
    outputs = rec._outputs
    rec._outputs = []
    for j, (key, i, p) in enumerate(maps):
        if p is None:
            continue
        b, _, lq, lk = p.shape
        kpm = None
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape == (b, lk) and key != "cross_attentions" \
                and not bool(am.bool().all()):
            kpm = am.bool()
        causal = lq == lk and lq > 1 and bool((p.triu(1) == 0).all())
        rec.entries.append(AttentionEntry(name=f"{rec._arch}.{key}[{i}]", q=None, k=None, scaling=None,
                                          causal=causal, key_padding_mask=kpm, probs=p,
                                          output=outputs[j] if len(outputs) == len(maps) else None))


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionRecord]:
    """Run the block with ``model``'s attention captured; yields an :class:`AttentionRecord`.

    Two paths, chosen per model, both leaving the model's output unchanged:

    * **interface** (every model that follows transformers' AttentionInterface: BERT/RoBERTa, Llama, Mistral,
      Qwen3, GPT-NeoX, GPT-2, Gemma-2, T5, BART, ...): the model switches to the ``"pyquant_capture"``
      implementation, which computes the attention with SDPA -- or, when the call needs what SDPA lacks (a logit
      soft-cap, Gemma-2), with the eager math -- and records q, k, v, the mask (key padding + causal, or the
      general mask: sliding window, T5's position bias, ALiBi-style additive biases), the scale and the soft-cap.
      Its previous attention implementation is restored on exit.
    * **probabilities** (models whose attention is computed inside their own modules and cannot be switched:
      DeBERTa-v2, Falcon): the forward runs with ``output_attentions=True`` and the model's own probability maps
      are recorded (``entry.probs``, q/k/v None; O(L^2) memory per layer).  In training mode these are the maps
      the model returns, i.e. after attention dropout for Falcon-ALiBi and DeBERTa-v2.

    The record stays readable after the block (pass it to :func:`attention_kd_losses`, which frees it);
    ``record.path`` says which path ran.
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
    rec._outputs = []  # type: ignore[attr-defined]
    rec._arch = type(model).__name__  # type: ignore[attr-defined]
    rec.path = "interface"  # type: ignore[attr-defined]
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
                elif rec.path == "probabilities":
                    rec._outputs.append(_read(out))

            handles.append(out_mod.register_forward_hook(hook))
            break
    records = _active_records()
    prev = {id(m): records.get(id(m)) for m in mods.values()}
    records.update({k: rec for k in prev})
    try:
        _set_impl(model, IMPL_NAME)
        if getattr(model.config, "_attn_implementation", None) != IMPL_NAME:
            rec.path = "probabilities"  # type: ignore[attr-defined]
            handles += _probability_path(model, rec)
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
        rec._outputs = []
        if previous is not None and previous != IMPL_NAME and rec.path == "interface":
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
    if reduction not in ATTENTION_REDUCTIONS:  # even when the map loss is off: a misspelt name never passes
        raise ValueError(f"reduction={reduction!r} is invalid: expected one of {ATTENTION_REDUCTIONS}")
    for nm, w in (("map_weight", map_weight), ("output_weight", output_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{nm}={w!r} is invalid: expected a float >= 0")
    lm = resolve_layer_map(len(student_record), len(teacher_record), layer_map)
    wm, wo = (gamma, 1.0 - gamma) if gamma is not None else (float(map_weight), float(output_weight))
    dev = _lengths(student_record[0])[2]
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
            if wm and _explicit(s, t):
                total_map = total_map + _explicit_map_loss(s, t, temperature, reduction)
            elif wm:
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
                lq, lk, _ = _lengths(s)
                kpm = s.key_padding_mask if output_mask and lq == lk else None
                total_out = total_out + attention_output_loss(s.output, t.output, kpm)
    finally:
        student_record.clear()
        teacher_record.clear()
    return {"attn_map": total_map, "attn_output": total_out, "attn_kd": wm * total_map + wo * total_out}


# ---- explicit maps: soft-capped scores and the probability path ---------------------------------------------------
def _lengths(e: AttentionEntry):
    t = e.probs if e.probs is not None else e.q
    lk = e.probs.shape[-1] if e.probs is not None else e.k.shape[2]
    return t.shape[2], lk, t.device


def _explicit(s: AttentionEntry, t: AttentionEntry) -> bool:
    """Soft-cap, recorded probabilities, or an additive bias (T5 position bias, ALiBi: each model its own) need
    each model's own explicit map; key padding / causal / bool masks take the streaming loss."""
    return any(e.probs is not None or e.softcap is not None
               or (e.attn_mask is not None and e.attn_mask.dtype != torch.bool) for e in (s, t))


def _log_probs(e: AttentionEntry, temperature: float, detach: bool):
    """(log P [B, H, L_q, L_k] fp32 with -inf on dropped keys, keep-mask) of one entry, as the model computes P."""
    from ..reference.attention import attention_keep_mask

    if e.probs is not None:
        if temperature != 1.0:
            raise ValueError(f"{e.name}: attention-map temperature {temperature} needs the scores, but this model's "
                             "attention is captured as probabilities (its attention does not go through "
                             "AttentionInterface); use temperature=1")
        p = e.probs.float()
        p = p.detach() if detach else p
        keep = p > 0
        return torch.where(keep, torch.log(p.clamp_min(torch.finfo(torch.float32).tiny)),
                           torch.full_like(p, float("-inf"))), keep
    q, k = (e.q.detach(), e.k.detach()) if detach else (e.q, e.k)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    sc = torch.matmul(q.float(), _repeat(k, h).float().transpose(-1, -2)) * e.scaling
    if e.softcap is not None:
        sc = torch.tanh(sc / e.softcap) * e.softcap
    m = e.attn_mask
    if m is not None and m.dtype != torch.bool:
        bias = m.float()
        sc = sc + torch.where(bias > torch.finfo(m.dtype).min / 2, bias, torch.zeros_like(bias))
    sc = sc / temperature
    keep = attention_keep_mask(b, lq, lk, e.key_padding_mask, e.causal, m, q.device).expand(b, h, lq, lk)
    sc = sc.masked_fill(~keep, float("-inf"))
    row_ok = keep.any(-1, keepdim=True)
    lp = torch.log_softmax(torch.where(row_ok, sc, torch.zeros_like(sc)), -1)
    return torch.where(keep, lp, torch.full_like(lp, float("-inf"))), keep


def _explicit_map_loss(s: AttentionEntry, t: AttentionEntry, temperature: float, reduction: str) -> torch.Tensor:
    """KL(P_T || P_S) per row from explicit maps (O(L^2)), reduced like :func:`attention_map_loss`: rows with a kept
    key, padding query rows excluded (L_q == L_k), ``reduction`` "paper"/"mean_rows", times temperature^2."""
    from ..reference.attention import attention_row_valid, reduce_attention_kl

    ls, keep_s = _log_probs(s, float(temperature), detach=False)
    lt, keep_t = _log_probs(t, float(temperature), detach=True)
    if ls.shape != lt.shape:
        raise ValueError(f"student attention {s.name} map {tuple(ls.shape)} and teacher attention {t.name} map "
                         f"{tuple(lt.shape)} differ: attention-map KD needs equal heads and lengths")
    pt = lt.exp()
    term = torch.where(keep_t, pt * (lt - ls.clamp_min(torch.finfo(torch.float32).min)), torch.zeros_like(pt))
    kl = term.sum(-1)
    lq, lk, _ = _lengths(s)
    valid = attention_row_valid(keep_t, s.key_padding_mask, lq, lk)
    return reduce_attention_kl(kl, valid, reduction, float(temperature))

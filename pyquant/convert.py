"""Model swap for any HuggingFace model: ``prepare_qat`` (Linear/Conv1D -> QATLinear), ``convert`` (QATLinear ->
PackedLinear, bit-identical effective weights) and ``quantize`` (post-training, Linear/Conv1D -> PackedLinear).

One generic walker plus a small table of exceptions; no per-model patches.

Which layers are quantized (defaults follow TernaryBERT / the EMNLP'22 KD-QAT practice and BitNet/ParetoQ for decoders:
every linear layer inside the Transformer blocks is quantized; embeddings and the task head stay full precision):

* candidates are ``nn.Linear`` and HF GPT-2 ``Conv1D`` modules (embeddings are not linear: only the word embedding
  is quantized, per row, and only when ``QATConfig.embeddings`` is set -- e.g. by ``preset="kdqat-emnlp22"``),
  and transformers' fused mixture-of-experts modules (3-D ``gate_up_proj``/``up_proj``/``down_proj``; see
  ``pyquant/nn/experts.py``: one mechanism for every family built with ``use_experts_implementation``);
* ``QATConfig.exclude=None`` means :data:`DEFAULT_EXCLUDE`: ``lm_head`` (incl. T5's and RoBERTa's LM head), the
  classifier heads (``classifier``, ``score``, ``qa_outputs``, BERT's ``cls`` MLM head), BERT's ``pooler`` (part of the
  classification head), and the embedding-side projections (OPT ``project_in``/``project_out``, GPT-NeoX
  ``embed_out``), and the MoE routers (``gate``, ``router``, ``shared_expert_gate``: like heads, they stay FP).

Every report says how much of the model's *block weights* it covers: every >= 2-D floating parameter outside the
embeddings and the heads; block weights left full precision that no exclude pattern names are listed by name.

Patterns are shell-style globs (``fnmatch``, case-sensitive) over dotted module names.  A pattern selects a module
when it matches the module's full name or a trailing part of it at a dot boundary (``"q_proj"`` matches
``model.layers.0.self_attn.q_proj``; ``"layers.0.*"`` matches everything in block 0), and it selects everything
inside a module it selects (``"lm_head"`` covers ``lm_head.dense``).  Bad input is refused before anything is swapped:
a user pattern that matches no module, a config that matches no layer, a layer whose in_features does not divide by the
group size, or a model that already holds QATLinear/PackedLinear layers (preparing twice is an error, not a no-op).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .formats import ActivationQuantConfig, WeightQuantConfig
from .nn import experts as _experts
from .nn.embedding import PackedEmbedding, QATEmbedding, check_embedding_spec
from .nn.packed_linear import PackedLinear
from .nn.qat_linear import QATLinear, is_conv1d
from .ops import fake_quant_activation, quantize_weight

__all__ = ["QATConfig", "SwapReport", "prepare_qat", "convert", "quantize", "dequantize", "DEFAULT_EXCLUDE", "PRESETS",
           "matches"]

# Called as hook(model, report) after every successful swap.  pyquant.integrations.hf appends one that records the
# model's PyquantConfig in a transformers model's config (so save_pretrained writes it); this layer stays unaware of
# transformers' API (dependency inversion: integrations sit above convert).
AFTER_SWAP: List = []
# Called as hook(model) after ``dequantize``: pyquant.integrations.hf drops the model's quantization_config.
AFTER_DEQUANTIZE: List = []

HEADS: Tuple[str, ...] = (
    "lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "project_in", "project_out", "embed_out",
)
ROUTERS: Tuple[str, ...] = ("gate", "router", "shared_expert_gate")  # MoE routing layers stay FP, like heads
DEFAULT_EXCLUDE: Tuple[str, ...] = HEADS + ROUTERS

# The EMNLP'22 KD-QAT setting (MarsJacobs/kd-qat-large-enc, run_kd_qat_*.sh: weight_bits=2, input_bits=8,
# clip_val=2.5 from main.py:212-215):
# * every block Linear and the pooler: TWN per tensor (QuantizeLinear passes layerwise=True, transformer/
#   utils_quant.py:268) with weights clipped to +-2.5 (:133-134, 259), and 8-bit symmetric per-tensor input
#   fake-quant after clipping to +-2.5 (:261-262, 274; the pooler's act_flag=False at modeling_quant.py:309 is
#   overridden: QuantizeLinear.__init__ sets act_flag=True at utils_quant.py:238 and main.py:579 sets it from
#   --act_quant);
# * word embeddings: TWN per row, clip 2.5 (utils_quant.py:285-316, layerwise=False -> :144-152); position and
#   token-type embeddings FP (modeling_quant.py:60-62), classifier FP nn.Linear (modeling_quant.py:458);
# * Q, K, V and the attention probabilities after dropout: 8-bit per tensor, clip 2.5 (modeling_quant.py:141-154).
# Scales are fp32 (the paper's code never rounds alpha to 16 bits).
_EMNLP22_W = WeightQuantConfig(method="twn", granularity="tensor", clip=2.5, scale_dtype="float32")
_EMNLP22_A = ActivationQuantConfig(clip=2.5, granularity="tensor")
PRESETS: Dict[str, Dict[str, object]] = {
    "kdqat-emnlp22": {
        "weight": _EMNLP22_W,
        "activation": _EMNLP22_A,
        "exclude": tuple(p for p in DEFAULT_EXCLUDE if p != "pooler"),
        "embeddings": WeightQuantConfig(method="twn", granularity="channel", clip=2.5, scale_dtype="float32"),
        "attention_activation": _EMNLP22_A,
    },
}


def _patterns(value, name: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"QATConfig.{name} must be a tuple of module-name patterns, got {type(value).__name__}")
    for p in value:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"QATConfig.{name} has an invalid pattern {p!r}: expected a non-empty string")
    return tuple(value)


@dataclass(frozen=True)
class QATConfig:
    """What ``prepare_qat`` swaps and how.

    weight: the weight format (default ternary TWN, per channel).  activation: 8-bit dynamic input fake-quant
    (W2A8) or None (weight-only).  include: patterns of modules to quantize (empty: every candidate).
    exclude: patterns kept full precision; None means :data:`DEFAULT_EXCLUDE` (embeddings and heads stay FP).
    embeddings: a per-row spec for the word (input) embeddings (``QATEmbedding``; ``convert`` packs it into a
    ``PackedEmbedding``) or None (FP).  attention_activation: 8-bit fake-quant of Q, K, V and the attention
    probabilities after dropout (``pyquant/nn/qat_attention.py``; explicit O(L^2) probabilities) or None.
    preset: a name from :data:`PRESETS` (``"kdqat-emnlp22"``: the EMNLP'22 KD-QAT setting) that fills every field
    above; a field given together with a preset must equal the preset's value (else ValueError).
    """

    weight: Optional[WeightQuantConfig] = None
    activation: Optional[ActivationQuantConfig] = None
    include: Tuple[str, ...] = ()
    exclude: Optional[Tuple[str, ...]] = None
    embeddings: Optional[WeightQuantConfig] = None
    attention_activation: Optional[ActivationQuantConfig] = None
    preset: Optional[str] = None

    def __post_init__(self):
        for name, cls in (("weight", WeightQuantConfig), ("embeddings", WeightQuantConfig),
                          ("activation", ActivationQuantConfig), ("attention_activation", ActivationQuantConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls.from_dict(getattr(self, name)))
        if self.preset is not None:
            self._apply_preset()
        if self.weight is None:
            object.__setattr__(self, "weight", WeightQuantConfig())
        if self.embeddings is not None:
            check_embedding_spec(self.embeddings)
        if self.attention_activation is not None and not isinstance(self.attention_activation,
                                                                    ActivationQuantConfig):
            raise TypeError(f"QATConfig.attention_activation must be an ActivationQuantConfig or None, got "
                            f"{type(self.attention_activation).__name__}")
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", WeightQuantConfig.from_dict(self.weight))
        if isinstance(self.activation, dict):
            object.__setattr__(self, "activation", ActivationQuantConfig.from_dict(self.activation))
        if not isinstance(self.weight, WeightQuantConfig):
            raise TypeError(f"QATConfig.weight must be a WeightQuantConfig, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationQuantConfig):
            raise TypeError(f"QATConfig.activation must be an ActivationQuantConfig or None, got "
                            f"{type(self.activation).__name__}")
        object.__setattr__(self, "include", _patterns(self.include, "include") or ())
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))

    def _apply_preset(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ValueError(f"QATConfig.preset={self.preset!r} is invalid: expected one of {sorted(PRESETS)}")
        if self.include:
            raise ValueError(f"QATConfig(preset={self.preset!r}) selects the layers itself; include={self.include!r} "
                             "contradicts it (drop include, or drop the preset)")
        for name, value in PRESETS[self.preset].items():
            given = getattr(self, name)
            if name == "exclude" and given is not None:
                given = tuple(given)
            if given is not None and given != value:
                raise ValueError(f"QATConfig(preset={self.preset!r}) sets {name}={value!r}; {name}={given!r} "
                                 "contradicts it (drop the option, or drop the preset)")
            if name != "exclude":  # the preset's exclusions act as defaults (unmatched patterns are fine)
                object.__setattr__(self, name, value)

    @property
    def resolved_exclude(self) -> Tuple[str, ...]:
        if self.exclude is not None:
            return self.exclude
        return PRESETS[self.preset]["exclude"] if self.preset is not None else DEFAULT_EXCLUDE

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict(),
                "activation": None if self.activation is None else self.activation.to_dict(),
                "include": list(self.include), "exclude": None if self.exclude is None else list(self.exclude),
                "embeddings": None if self.embeddings is None else self.embeddings.to_dict(),
                "attention_activation": None if self.attention_activation is None
                else self.attention_activation.to_dict(),
                "preset": self.preset}

    @classmethod
    def from_dict(cls, d: dict) -> "QATConfig":
        if not isinstance(d, dict):
            raise TypeError(f"QATConfig.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"QATConfig.from_dict: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        if "include" in d and isinstance(d["include"], list):
            d["include"] = tuple(d["include"])
        if "exclude" in d and isinstance(d["exclude"], list):
            d["exclude"] = tuple(d["exclude"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QATConfig":
        return cls.from_dict(json.loads(s))


@dataclass
class SwapReport:
    """What a swap did: ``swapped`` module names, ``kept`` candidate layers left full precision (excluded),
    ``params_quantized`` (weights now quantized) out of ``params_total`` (all parameters before the swap)."""

    action: str
    swapped: List[str]
    kept: List[str]
    params_quantized: int
    params_total: int
    block_params: int = 0  # >= 2-D float weights outside embeddings and heads (see the module doc)
    block_params_quantized: int = 0
    uncovered: List[str] = field(default_factory=list)  # block weights left FP that no exclude pattern names

    @property
    def block_coverage(self) -> float:
        return self.block_params_quantized / self.block_params if self.block_params else 0.0

    @property
    def count(self) -> int:
        return len(self.swapped)

    @property
    def fraction_quantized(self) -> float:
        return self.params_quantized / self.params_total if self.params_total else 0.0

    def __str__(self) -> str:
        s = (f"{self.action}: {self.count} layers swapped, {self.params_quantized:,} of {self.params_total:,} "
             f"parameters quantized ({100 * self.fraction_quantized:.1f}%); kept full precision: "
             f"{', '.join(self.kept) if self.kept else 'none'}")
        if self.block_params:
            s += (f"\nblock weights quantized: {self.block_params_quantized:,} of {self.block_params:,} "
                  f"({100 * self.block_coverage:.1f}%)")
        if self.uncovered:
            shown = ", ".join(self.uncovered[:6]) + (f" and {len(self.uncovered) - 6} more"
                                                     if len(self.uncovered) > 6 else "")
            s += f"\nWARNING: block weights left full precision without an exclude pattern naming them: {shown}"
        return s


# ---- the walker --------------------------------------------------------------------------------------------------
def matches(name: str, pattern: str) -> bool:
    """True when ``pattern`` selects module ``name`` (see the module doc: full name or dotted suffix, and inside)."""
    parts = name.split(".") if name else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, "*." + pattern):
            return True
    return False


def _is_candidate(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _select(model: nn.Module, cfg: QATConfig) -> Tuple[List[Tuple[str, nn.Module]], List[str]]:
    """(targets, kept): validates patterns; raises before anything is swapped."""
    names = [n for n, _ in model.named_modules() if n]
    for what, pats in (("include", cfg.include), ("exclude", cfg.exclude or ())):
        for p in pats:
            if not any(matches(n, p) for n in names):
                raise ValueError(f"QATConfig.{what} pattern {p!r} matches no module of {type(model).__name__} "
                                 f"(patterns are globs over dotted names such as {names[-1]!r})" if names else
                                 f"QATConfig.{what} pattern {p!r}: the model has no submodules")
    return _pick(model, cfg, _is_candidate)


def _tied_names(model: nn.Module) -> List[str]:
    """Linear/Conv1D layers whose weight *is* an input embedding's Parameter (``tie_word_embeddings``: the LM head of
    GPT-2, tied Llama/Qwen/Gemma, T5...).  Such a layer stays full precision whatever the patterns say: packing it
    would leave the embedding without its weight, and the tie ``save_pretrained``/``from_pretrained`` restore would
    break the reload.  ``include`` naming one is refused (untie the head first to quantize it).

    While transformers loads a checkpoint (quantization at load time) the model is built on the meta device without
    its ties, which are made after the weights are read: there a layer counts as tied when transformers' own map of
    the ties to make (``all_tied_weights_keys``, ``{tied weight: source}``) lists its still-meta weight."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    pending = getattr(model, "all_tied_weights_keys", None) or {}
    return [n for n, m in model.named_modules()
            if n and _is_candidate(m) and (id(getattr(m, "weight", None)) in emb or (
                f"{n}.weight" in pending and getattr(getattr(m, "weight", None), "is_meta", False)))]


def _pick(model: nn.Module, cfg: QATConfig, candidate) -> Tuple[List[Tuple[str, nn.Module]], List[str]]:
    """(targets, kept) among the modules ``candidate`` accepts, by the config's include / exclude patterns."""
    targets, kept, seen = [], [], set()
    tied = set(_tied_names(model))
    for n, m in model.named_modules():
        if not n or not candidate(m):
            continue
        if cfg.include and not any(matches(n, p) for p in cfg.include):
            continue
        if any(matches(n, p) for p in cfg.resolved_exclude):
            kept.append(n)
            continue
        if n in tied:
            if cfg.include:
                raise ValueError(f"include (QATConfig.include / PyquantConfig.include) selects {n!r}, whose weight "
                                 "is tied to the input embedding "
                                 "(tie_word_embeddings); a tied layer stays full precision. Exclude it, or untie "
                                 "it first to quantize it (model.config.tie_word_embeddings = False and give it its "
                                 "own nn.Parameter copy of the weight)")
            kept.append(n)
            continue
        if id(m) in seen:
            continue  # named_modules() already lists a shared module once; _set replaces it under every name
        seen.add(id(m))
        targets.append((n, m))
    return targets, kept


def _select_experts(model: nn.Module, cfg: QATConfig) -> Tuple[List[Tuple[str, nn.Module]], List[str]]:
    """Fused MoE experts modules selected by the same include / exclude patterns as the linear layers."""
    return _pick(model, cfg, _experts.is_experts)


def _nothing_selected(model: nn.Module, cfg: QATConfig) -> ValueError:
    return ValueError(f"the config matches no nn.Linear/Conv1D layer or MoE experts module of {type(model).__name__} "
                      f"(include={cfg.include!r}, exclude={cfg.resolved_exclude!r})")


def _coverage(model: nn.Module, quantized: List[str], on_purpose) -> Tuple[int, int, List[str], List[str]]:
    """(block weights, of which quantized, block weights left FP that nothing excludes on purpose, modules holding
    block weights kept FP on purpose).

    Block weights: every >= 2-D floating Parameter outside embeddings and heads.  ``quantized``: names of swapped
    modules (their weights count as quantized); ``on_purpose(name)``: True for modules kept FP deliberately."""
    qset = set(quantized)
    total = done = 0
    uncovered, seen, kept = [], set(), []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) or any(matches(mname, p) for p in HEADS):
            continue
        for pname, prm in mod.named_parameters(recurse=False):
            if id(prm) in seen or prm.dim() < 2 or not prm.dtype.is_floating_point:
                continue
            seen.add(id(prm))
            if pname.endswith(("bias", "_weight_scale", "_weight_zero_point")):
                continue  # biases (MoE experts hold 2-D ones) and learnable quantization scales stay FP by design
            total += prm.numel()
            if mname in qset:
                done += prm.numel()
            elif on_purpose(mname):
                if mname not in kept:
                    kept.append(mname)
            else:
                uncovered.append(f"{mname}.{pname}" if mname else pname)
    return total, done, uncovered, kept


def _report(action: str, model: nn.Module, swapped: List[str], kept: List[str], quantized: int, total: int,
            on_purpose) -> SwapReport:
    b_total, b_done, unc, fp = _coverage(model, swapped, on_purpose)
    kept = kept + [n for n in fp if n not in kept]
    return SwapReport(action, swapped, kept, quantized, total, b_total, b_done, unc)


def _on_purpose(cfg: QATConfig):
    def check(name: str) -> bool:
        if any(matches(name, p) for p in cfg.resolved_exclude):
            return True
        return bool(cfg.include) and not any(matches(name, p) for p in cfg.include)
    return check


def _in_features(m: nn.Module) -> int:
    return int(m.weight.shape[0] if is_conv1d(m) else m.weight.shape[1])


def _validate_targets(targets, spec: WeightQuantConfig, experts_targets=()) -> None:
    problems = []
    for n, m in experts_targets:
        problems += _experts.validate_experts(n, m, spec)
    for n, m in targets:
        if not m.weight.dtype.is_floating_point:
            problems.append(f"{n}: weight dtype {m.weight.dtype} is not floating point")
            continue
        k = _in_features(m)
        if spec.granularity == "group" and k % spec.group_size:
            problems.append(f"{n}: in_features={k} is not divisible by group_size={spec.group_size}")
    if problems:
        raise ValueError("cannot quantize these layers (nothing was swapped): " + "; ".join(problems)
                         + " -- exclude them or pick another group_size/granularity")


def _check_finite(targets, action: str) -> None:
    """NaN/Inf in a weight would silently become a finite code: refuse, naming the layers (before any swap)."""
    bad = []
    for n, m in targets:
        w = m.weight_nk if isinstance(m, QATLinear) else m.weight
        if w.is_floating_point() and not w.is_meta and not bool(torch.isfinite(w).all()):
            bad.append(f"{n} ({int((~torch.isfinite(w)).sum())} NaN/Inf weight values)")
        for t in ("weight_scale", "weight_zero_point"):
            v = getattr(m, t, None) if isinstance(m, QATLinear) else None
            if v is not None and not bool(torch.isfinite(v).all()):
                bad.append(f"{n} (non-finite {t})")
    if bad:
        raise ValueError(f"{action}: layer(s) with non-finite weights cannot be quantized (nothing was swapped): "
                         + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))


def _notify(model: nn.Module, report: "SwapReport") -> "SwapReport":
    for hook in list(AFTER_SWAP):
        hook(model, report)
    return report


def _refuse_quantized(model: nn.Module, action: str) -> None:
    quantized = (QATLinear, PackedLinear, QATEmbedding, PackedEmbedding, _experts.QATExpertsMixin,
                 _experts.PackedExpertsMixin)
    done = [n for n, m in model.named_modules() if isinstance(m, quantized)]
    if done:
        kinds = {("QAT experts" if _experts.is_qat_experts(m) else "packed experts" if _experts.is_packed_experts(m)
                  else type(m).__name__): None for _, m in model.named_modules() if isinstance(m, quantized)}
        kind = "/".join(kinds)
        raise ValueError(f"{action}: the model already holds {len(done)} {kind} layer(s) (e.g. {done[0]!r}); "
                         f"it was already prepared/converted -- nothing was swapped")


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` and at every other name under which the module at ``name`` is reachable (a module
    shared by two parents is replaced everywhere, so the model never holds the old and the new layer at once)."""
    old = model.get_submodule(name)
    for alias, m in model.named_modules(remove_duplicate=False):
        if m is old and alias:
            parent_name, _, child = alias.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)


def _total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _native_act(act_spec: Optional[ActivationQuantConfig]) -> Optional[ActivationQuantConfig]:
    """The act_spec PackedLinear's fused W2A8 forward supports (int8 symmetric per token, no clip), else None."""
    if act_spec is not None and act_spec.symmetric and act_spec.granularity == "token" and act_spec.clip is None:
        return act_spec
    return None


def _attach_act_quant(packed: PackedLinear, act_spec: Optional[ActivationQuantConfig]) -> None:
    """Input fake-quant that PackedLinear's W2A8 op does not cover (asymmetric, per-tensor or clipped): a pre-hook
    keeps the QAT model's semantics (the hook is not saved in the state dict)."""
    if act_spec is None or _native_act(act_spec) is not None:
        return
    packed.input_act_spec = act_spec

    def _pre(mod, args):
        return (fake_quant_activation(args[0], mod.input_act_spec),) + tuple(args[1:])

    packed.register_forward_pre_hook(_pre)


def _packed_exceptions(packed: PackedLinear) -> None:
    """The table of exceptions: HF T5's feed-forward reads ``wo.weight.dtype`` to cast its input (and skips the cast
    when ``wo.weight`` is not a tensor); a packed layer has no dense weight, so expose ``weight = None``."""
    if not hasattr(packed, "weight"):
        packed.weight = None


def _word_embedding(model: nn.Module) -> Tuple[str, nn.Embedding]:
    """(name, module) of the model's word (input) embedding; ValueError when it cannot be quantized."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"QATConfig.embeddings: {type(model).__name__} has no nn.Embedding input embedding "
                         f"(get_input_embeddings() gave {type(emb).__name__}); set embeddings=None")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        raise ValueError("QATConfig.embeddings: the word embedding is tied to the output head (lm_head); quantizing "
                         "it would leave the head on the same FP weight -- set embeddings=None or untie the weights")
    name = next(n for n, m in model.named_modules() if m is emb)
    return name, emb


# ---- public API --------------------------------------------------------------------------------------------------
def prepare_qat(model: nn.Module, config: Optional[QATConfig] = None) -> SwapReport:
    """Swap the selected ``nn.Linear``/``Conv1D`` layers for ``QATLinear`` in place; return what was swapped.

    The QATLinear layers share the original weight/bias Parameters (state-dict keys and shapes are unchanged; a
    learnable spec adds ``weight_scale`` / ``weight_zero_point``), so an optimizer built before still holds them.
    Every target is validated before the first swap.
    """
    _check_model(model)
    config = QATConfig() if config is None else config
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig, got {type(config).__name__}")
    _refuse_quantized(model, "prepare_qat")
    targets, kept = _select(model, config)
    etargets, ekept = _select_experts(model, config)
    if not targets and not etargets:
        raise _nothing_selected(model, config)
    _validate_targets(targets, config.weight, etargets)
    emb = _word_embedding(model) if config.embeddings is not None else None
    if config.attention_activation is not None:
        from .nn.qat_attention import attention_modules

        if not attention_modules(model):
            raise ValueError(f"QATConfig.attention_activation: {type(model).__name__} has no attention module that "
                             "calls transformers' AttentionInterface; set attention_activation=None")
    total = _total_params(model)
    new = [(n, QATLinear.from_linear(m, config.weight, config.activation)) for n, m in targets]
    for n, q in new:
        _set(model, n, q)
    names, count = [n for n, _ in new], sum(q.weight.numel() for _, q in new)
    for n, m in etargets:
        count += _experts.prepare_qat_experts(n, m, config.weight)
        names.append(n)
    if emb is not None:
        _set(model, emb[0], QATEmbedding(emb[1], config.embeddings))
        names.append(emb[0])
        count += emb[1].weight.numel()
    if config.attention_activation is not None:
        from .nn.qat_attention import enable_attention_quant

        enable_attention_quant(model, config.attention_activation)
    return _notify(model, _report("prepare_qat", model, names, kept + ekept, count, total, _on_purpose(config)))


def convert(model: nn.Module) -> SwapReport:
    """Replace every ``QATLinear`` by a ``PackedLinear`` (2 bits/weight), and every ``QATEmbedding`` by a
    ``PackedEmbedding`` (2 bits/weight + one scale per row; gather + dequantize), in place.

    The packed codes and scales come from ``QATLinear.quantized_weight()`` -- the op the QAT forward uses -- so the
    packed layer's effective weight equals the fake-quantized weight bit for bit; the bias keeps the master weight's
    dtype.  Input fake-quant is kept: int8 symmetric per-token by PackedLinear's fused W2A8 forward (``act_spec``),
    other activation specs by a forward pre-hook on the packed layer (not part of the state dict).
    """
    _check_model(model)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]
    embs = [(n, m) for n, m in model.named_modules() if isinstance(m, QATEmbedding)]
    etargets = [(n, m) for n, m in model.named_modules() if _experts.is_qat_experts(m)]
    if not targets and not embs and not etargets:
        raise ValueError(f"convert: {type(model).__name__} holds no QATLinear layer (run prepare_qat first, or use "
                         f"quantize() for post-training quantization)")
    _check_finite(targets, "convert")
    total = _total_params(model)
    new = []
    with torch.no_grad():
        for n, q in targets:
            act = q.act_spec if q.fake_quant_activation_enabled else None
            p = PackedLinear.from_qat(q, dtype=q.weight.dtype, act_spec=_native_act(act))
            p.transposed = q.transposed
            _attach_act_quant(p, act)
            _packed_exceptions(p)
            new.append((n, p, q.weight.numel()))
        # QATEmbedding -> PackedEmbedding: 2-bit codes + one scale per row (same codes and scales as the QAT forward)
        new += [(n, PackedEmbedding.from_qat(e), e.weight.numel()) for n, e in embs]
    swapped = [n for n, _, _ in new] + [n for n, _ in etargets]
    b_total, b_done, unc, _ = _coverage(model, swapped, _on_purpose(QATConfig()))  # before the swap (Parameters)
    for n, p, _ in new:
        _set(model, n, p)
    count = sum(c for *_, c in new)
    for n, m in etargets:
        count += _experts.convert_experts(n, m)
    kept = [n for n, m in model.named_modules() if n and (_is_candidate(m) or _experts.is_experts(m))]
    return _notify(model, SwapReport("convert", swapped, kept, count, total, b_total, b_done, unc))


def quantize(model: nn.Module, spec: Union[WeightQuantConfig, QATConfig, None] = None) -> SwapReport:
    """Post-training quantization straight to ``PackedLinear`` (the no-QAT baseline), in place.

    ``spec``: a ``WeightQuantConfig`` (default layer selection) or a full ``QATConfig`` (selection + W2A8).
    """
    _check_model(model)
    if spec is None:
        spec = QATConfig()
    elif isinstance(spec, WeightQuantConfig):
        spec = QATConfig(weight=spec)
    elif not isinstance(spec, QATConfig):
        raise TypeError(f"spec must be a WeightQuantConfig or QATConfig, got {type(spec).__name__}")
    _refuse_quantized(model, "quantize")
    targets, kept = _select(model, spec)
    etargets, ekept = _select_experts(model, spec)
    if not targets and not etargets:
        raise _nothing_selected(model, spec)
    _validate_targets(targets, spec.weight, etargets)
    _check_finite(targets, "quantize")
    for n, m in etargets:
        _experts._check_finite_all(n, m)
    total = _total_params(model)
    swapped = [n for n, _ in targets] + [n for n, _ in etargets]
    b_total, b_done, unc, fp = _coverage(model, swapped, _on_purpose(spec))
    new = []
    with torch.no_grad():
        for n, m in targets:
            w = m.weight.detach()
            w_nk = w.t() if is_conv1d(m) else w
            codes, s, z = quantize_weight(w_nk, spec.weight)
            b = getattr(m, "bias", None)
            p = PackedLinear.from_quantized(codes, s, z, None if b is None else b.detach(), spec.weight,
                                            dtype=w.dtype, act_spec=_native_act(spec.activation))
            p.transposed = is_conv1d(m)
            _attach_act_quant(p, spec.activation)
            _packed_exceptions(p)
            new.append((n, p, w.numel()))
        if spec.embeddings is not None:
            en, e = _word_embedding(model)
            new.append((en, PackedEmbedding.from_qat(QATEmbedding(e, spec.embeddings)), e.weight.numel()))
    for n, p, _ in new:
        _set(model, n, p)
    count = sum(c for *_, c in new)
    for n, m in etargets:
        count += _experts.quantize_experts(n, m, spec.weight)
    if spec.attention_activation is not None:
        from .nn.qat_attention import enable_attention_quant

        enable_attention_quant(model, spec.attention_activation)
    kept = kept + ekept
    swapped = [n for n, _, _ in new] + [n for n, _ in etargets]
    return _notify(model, SwapReport("quantize", swapped, kept + [n for n in fp if n not in kept], count, total,
                                     b_total, b_done, unc))


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating Parameter (embeddings, norms: what stays FP), else the default."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.get_default_dtype())


def _dense(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The dense FP module holding ``m``'s effective weight (the one its quantized forward computes with)."""
    if isinstance(m, (QATEmbedding, PackedEmbedding)):
        w = m.fake_quant_weight() if isinstance(m, QATEmbedding) else m(torch.arange(m.num_embeddings,
                                                                                         device=m.qweight.device))
        e = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device=w.device, dtype=dtype)
        e.weight.data.copy_(w)
        return e
    w = m.fake_quant_weight() if isinstance(m, QATLinear) else m.dequantize()  # [N, K]
    b = m.bias
    n, k = w.shape
    if getattr(m, "transposed", False):  # built from a GPT-2 Conv1D: give one back (its state-dict layout)
        from transformers.pytorch_utils import Conv1D
        d = Conv1D(n, k).to(device=w.device, dtype=dtype)
        d.weight.data.copy_(w.t())
        if b is None:
            d.bias = None
    else:
        d = nn.Linear(k, n, bias=b is not None, device=w.device, dtype=dtype)
        d.weight.data.copy_(w)
    if b is not None:
        d.bias.data.copy_(b)
    return d


def dequantize(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every pyquant layer (QATLinear / PackedLinear / QATEmbedding / PackedEmbedding) by a dense
    ``nn.Linear`` (``Conv1D`` where the layer came from one) / ``nn.Embedding`` holding its *effective* weight, in
    place, and drop the model's pyquant ``quantization_config``; returns ``model`` (``model.dequantize()`` of a model
    loaded from a pyquant checkpoint does the same).  The dense model computes what the quantized one computed except
    for activation fake-quant (W2A8 input quantization), which a dense layer does not do.  ``dtype``: the dense
    weights' dtype (default: the dtype of the model's FP parameters).  MoE experts and attention Q/K/V fake-quant are
    refused (ValueError): not supported yet."""
    _check_model(model)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    bad = [n for n, m in model.named_modules() if _experts.is_qat_experts(m) or _experts.is_packed_experts(m)]
    if bad:
        raise ValueError(f"dequantize: MoE experts modules ({bad[:3]}) cannot be dequantized yet")
    from .nn.qat_attention import ATTR
    if any(getattr(m, ATTR, None) is not None for m in model.modules()):
        raise ValueError("dequantize: the model's attention runs Q/K/V/probability fake-quant "
                         "(QATConfig.attention_activation), which dequantize cannot undo yet")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (QATLinear, PackedLinear, QATEmbedding, PackedEmbedding))]
    if not layers:
        raise ValueError(f"dequantize: {type(model).__name__} holds no pyquant layer")
    dtype = dtype or _float_dtype(model)
    with torch.no_grad():
        new = [(n, _dense(m, dtype)) for n, m in layers]
    for n, d in new:
        _set(model, n, d)
    for hook in list(AFTER_DEQUANTIZE):
        hook(model)
    return model


class _CallableModule(types.ModuleType):
    """``pyquant.convert`` names both this module and its ``convert`` function: importing the module rebinds the
    package attribute to the module, so the module forwards calls to the function to keep ``pyquant.convert(model)``
    working whichever of the two the attribute holds."""

    def __call__(self, model: nn.Module) -> SwapReport:
        return convert(model)


sys.modules[__name__].__class__ = _CallableModule

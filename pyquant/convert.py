"""Model swap for any HuggingFace model: ``prepare_qat`` (Linear/Conv1D -> QATLinear), ``convert`` (QATLinear ->
PackedLinear, bit-identical effective weights) and ``quantize`` (post-training, Linear/Conv1D -> PackedLinear).

One generic walker plus a small table of exceptions; no per-model patches.

Which layers are quantized (defaults follow TernaryBERT / the EMNLP'22 KD-QAT practice and BitNet/ParetoQ for decoders:
every linear layer inside the Transformer blocks is quantized; embeddings and the task head stay full precision):

* candidates are ``nn.Linear`` and HF GPT-2 ``Conv1D`` modules (embeddings are not linear, so they are never touched),
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
from .nn.packed_linear import PackedLinear
from .nn.qat_linear import QATLinear, is_conv1d
from .ops import fake_quant_activation, quantize_weight

__all__ = ["QATConfig", "SwapReport", "prepare_qat", "convert", "quantize", "DEFAULT_EXCLUDE", "matches"]

HEADS: Tuple[str, ...] = (
    "lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "project_in", "project_out", "embed_out",
)
ROUTERS: Tuple[str, ...] = ("gate", "router", "shared_expert_gate")  # MoE routing layers stay FP, like heads
DEFAULT_EXCLUDE: Tuple[str, ...] = HEADS + ROUTERS


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
    """

    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activation: Optional[ActivationQuantConfig] = None
    include: Tuple[str, ...] = ()
    exclude: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
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

    @property
    def resolved_exclude(self) -> Tuple[str, ...]:
        return DEFAULT_EXCLUDE if self.exclude is None else self.exclude

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict(),
                "activation": None if self.activation is None else self.activation.to_dict(),
                "include": list(self.include), "exclude": None if self.exclude is None else list(self.exclude)}

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
    targets, kept, seen = [], [], set()
    for n, m in model.named_modules():
        if not n or not _is_candidate(m):
            continue
        if cfg.include and not any(matches(n, p) for p in cfg.include):
            continue
        if any(matches(n, p) for p in cfg.resolved_exclude):
            kept.append(n)
            continue
        if id(m) in seen:
            continue  # named_modules() already lists a shared module once; _set replaces it under every name
        seen.add(id(m))
        targets.append((n, m))
    return targets, kept


def _select_experts(model: nn.Module, cfg: QATConfig) -> Tuple[List[Tuple[str, nn.Module]], List[str]]:
    """Fused MoE experts modules selected by the same include / exclude patterns as the linear layers."""
    targets, kept = [], []
    for n, m in model.named_modules():
        if not n or not _experts.is_experts(m):
            continue
        if cfg.include and not any(matches(n, p) for p in cfg.include):
            continue
        if any(matches(n, p) for p in cfg.resolved_exclude):
            kept.append(n)
            continue
        targets.append((n, m))
    return targets, kept


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


def _refuse_quantized(model: nn.Module, action: str) -> None:
    done = [n for n, m in model.named_modules() if isinstance(m, (QATLinear, PackedLinear))
            or _experts.is_qat_experts(m) or _experts.is_packed_experts(m)]
    if done:
        mods = [m for _, m in model.named_modules()]
        kind = next(k for k, hit in (("QATLinear", any(isinstance(m, QATLinear) for m in mods)),
                                     ("QAT experts", any(_experts.is_qat_experts(m) for m in mods)),
                                     ("PackedLinear", any(isinstance(m, PackedLinear) for m in mods)),
                                     ("packed experts", True)) if hit)
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
    """The act_spec PackedLinear's fused W2A8 forward supports (int8 symmetric per token), else None."""
    if act_spec is not None and act_spec.symmetric and act_spec.granularity == "token":
        return act_spec
    return None


def _attach_act_quant(packed: PackedLinear, act_spec: Optional[ActivationQuantConfig]) -> None:
    """Input fake-quant that PackedLinear's W2A8 op does not cover (asymmetric or per-tensor): a forward pre-hook
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
    total = _total_params(model)
    new = [(n, QATLinear.from_linear(m, config.weight, config.activation)) for n, m in targets]
    for n, q in new:
        _set(model, n, q)
    count = sum(q.weight.numel() for _, q in new)
    for n, m in etargets:
        count += _experts.prepare_qat_experts(n, m, config.weight)
    return _report("prepare_qat", model, [n for n, _ in new] + [n for n, _ in etargets], kept + ekept, count, total,
                   _on_purpose(config))


def convert(model: nn.Module) -> SwapReport:
    """Replace every ``QATLinear`` by a ``PackedLinear`` (2 bits/weight) in place.

    The packed codes and scales come from ``QATLinear.quantized_weight()`` -- the op the QAT forward uses -- so the
    packed layer's effective weight equals the fake-quantized weight bit for bit; the bias keeps the master weight's
    dtype.  Input fake-quant is kept: int8 symmetric per-token by PackedLinear's fused W2A8 forward (``act_spec``),
    other activation specs by a forward pre-hook on the packed layer (not part of the state dict).
    """
    _check_model(model)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]
    etargets = [(n, m) for n, m in model.named_modules() if _experts.is_qat_experts(m)]
    if not targets and not etargets:
        raise ValueError(f"convert: {type(model).__name__} holds no QATLinear layer (run prepare_qat first, or use "
                         f"quantize() for post-training quantization)")
    total = _total_params(model)
    new = []
    with torch.no_grad():
        for n, q in targets:
            act = q.act_spec if q.fake_quant_activation_enabled else None
            p = PackedLinear.from_qat(q, dtype=q.weight.dtype, act_spec=_native_act(act))
            _attach_act_quant(p, act)
            _packed_exceptions(p)
            new.append((n, p, q.weight.numel()))
    swapped = [n for n, _, _ in new] + [n for n, _ in etargets]
    on_purpose = _on_purpose(QATConfig())
    b_total, b_done, unc, _ = _coverage(model, swapped, on_purpose)  # before the swap: weights are still Parameters
    for n, p, _ in new:
        _set(model, n, p)
    count = sum(c for *_, c in new)
    for n, m in etargets:
        count += _experts.convert_experts(n, m)
    kept = [n for n, m in model.named_modules() if n and (_is_candidate(m) or _experts.is_experts(m))]
    return SwapReport("convert", swapped, kept, count, total, b_total, b_done, unc)


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
            _attach_act_quant(p, spec.activation)
            _packed_exceptions(p)
            new.append((n, p, w.numel()))
    for n, p, _ in new:
        _set(model, n, p)
    count = sum(c for *_, c in new)
    for n, m in etargets:
        count += _experts.quantize_experts(n, m, spec.weight)
    kept = kept + ekept
    return SwapReport("quantize", swapped, kept + [n for n in fp if n not in kept], count, total, b_total, b_done,
                      unc)


class _CallableModule(types.ModuleType):
    """``pyquant.convert`` names both this module and its ``convert`` function: importing the module rebinds the
    package attribute to the module, so the module forwards calls to the function to keep ``pyquant.convert(model)``
    working whichever of the two the attribute holds."""

    def __call__(self, model: nn.Module) -> SwapReport:
        return convert(model)


sys.modules[__name__].__class__ = _CallableModule

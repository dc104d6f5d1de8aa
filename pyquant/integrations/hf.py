"""The ``"pyquant"`` transformers quantization method: ternary / 2-bit models as ordinary HF checkpoints.

* :class:`PyquantConfig` (``quant_method="pyquant"``) is what ``config.json`` carries under ``quantization_config``:
  the format version, the state (``"qat"``: ``QATLinear`` master weights + learned scales, or ``"packed"``:
  ``PackedLinear`` 2-bit codes + scales), the default weight / activation specs (the dict round trip of
  :class:`~pyquant.formats.WeightQuantConfig` / :class:`~pyquant.formats.ActivationQuantConfig`), the explicit list of
  quantized ``modules``, ``module_overrides`` for modules whose specs differ from the default, and
  ``modules_to_not_convert`` (patterns kept full precision).
* :class:`PyquantHfQuantizer` (an ``HfQuantizer``): ``from_pretrained`` of a pyquant checkpoint swaps the listed layers
  for ``PackedLinear`` / ``QATLinear`` on the meta device *before* any weight is read, checks every quantized tensor
  of the checkpoint (name, shape, dtype) against the config from the safetensors headers -- so a bad checkpoint is
  refused before anything loads -- and lets transformers load the tensors as stored (``dtype``, ``device_map``,
  ``low_cpu_mem_usage`` work as for any model).  ``from_pretrained(fp_dir, quantization_config=PyquantConfig(...))``
  quantizes at load time, one weight at a time as transformers materialises it (post-training, the ``quantize``
  path; ``state="qat"`` gives a ``prepare_qat`` model instead).  transformers loads sequentially when a quantizer
  quantizes on the fly (``core_model_loading``: no thread pool), so only the weight being quantized is in memory in
  full precision.
* ``prepare_qat`` / ``convert`` / ``quantize`` of a transformers model attach a matching ``PyquantConfig`` to
  ``model.config`` (see :func:`attach`), so ``save_pretrained`` writes it; the model's ``save_pretrained`` is made
  atomic (:mod:`pyquant.integrations.atomic`).

Only stable quantizer hooks are used (``_process_model_before/after_weight_loading``, ``param_needs_quantization``,
``get_quantize_ops``, ``is_serializable``, ``is_trainable``), present in transformers 5.17 through 5.24.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin
from transformers.quantizers.base import HfQuantizer

from ..formats import ActivationQuantConfig, WeightQuantConfig, packed_cols
from .. import convert as _convert
from ..convert import QATConfig, _attach_act_quant, _native_act, _packed_exceptions, _select, _validate_targets
from ..nn import experts as _experts
from ..nn.embedding import PackedEmbedding, QATEmbedding
from ..nn.packed_linear import PackedLinear
from ..nn.qat_linear import QATLinear, is_conv1d
from .atomic import atomic_directory

__all__ = ["PyquantConfig", "PyquantHfQuantizer", "FORMAT_VERSION", "attach", "save_pretrained",
           "install_atomic_save"]

FORMAT_VERSION = 1
QUANT_METHOD = "pyquant"
STATES = ("qat", "packed")
_FIELDS = ("quant_method", "format_version", "state", "weight", "activation", "modules", "module_overrides",
           "experts", "embeddings", "attention_activation",
           "modules_to_not_convert", "include", "bitnet")
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}
_ST_FLOATS = ("F16", "BF16", "F32", "F64")


def _patterns(value, name: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"PyquantConfig.{name}={value!r} is invalid: expected a list of non-empty strings")
    return list(value)


def _weight_spec(v, where: str) -> WeightQuantConfig:
    if isinstance(v, WeightQuantConfig):
        return v
    if isinstance(v, dict):
        try:
            return WeightQuantConfig.from_dict(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"PyquantConfig.{where}: {e}") from None
    raise ValueError(f"PyquantConfig.{where}={v!r} is invalid: expected a WeightQuantConfig or its dict")


def _act_spec(v, where: str) -> Optional[ActivationQuantConfig]:
    if v is None or isinstance(v, ActivationQuantConfig):
        return v
    if isinstance(v, dict):
        try:
            return ActivationQuantConfig.from_dict(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"PyquantConfig.{where}: {e}") from None
    raise ValueError(f"PyquantConfig.{where}={v!r} is invalid: expected an ActivationQuantConfig, its dict, or None")


class PyquantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a pyquant checkpoint (and the argument for PTQ at load time).

    weight / activation: the default specs (objects or their dicts).  state: ``"packed"`` or ``"qat"``.
    modules: the quantized module names (written on save; None = select by ``include`` / ``modules_to_not_convert``
    patterns, as ``QATConfig`` does -- the PTQ-at-load case).  module_overrides: ``{name: {"weight": {...},
    "activation": {...} | None}}`` for modules whose specs differ from the default.  modules_to_not_convert:
    patterns kept full precision (None = pyquant's default exclusions: embeddings and heads).  include: patterns to
    quantize (empty = every Linear/Conv1D).  Any other field is refused (ValueError naming it); a ``format_version``
    newer than this pyquant understands is refused with the upgrade hint.  bitnet: internal to
    ``pyquant.from_bitnet`` (the BitNet config being imported; never written to a saved checkpoint).
    """

    def __init__(self, weight=None, activation=None, state: str = "packed", modules=None, module_overrides=None,
                 modules_to_not_convert=None, include=None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, bitnet=None, experts=None, embeddings=None,
                 attention_activation=None, **kwargs):
        if kwargs:
            raise ValueError(f"PyquantConfig: unknown field(s) {sorted(kwargs)} in quantization_config; known "
                             f"fields: {sorted(_FIELDS)} (written by a newer pyquant? then upgrade pyquant)")
        if getattr(quant_method, "value", quant_method) != QUANT_METHOD:
            raise ValueError(f"PyquantConfig.quant_method={quant_method!r} is invalid: expected {QUANT_METHOD!r}")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"PyquantConfig.format_version={format_version!r} is invalid: expected an int >= 1")
        if format_version > FORMAT_VERSION:
            from .. import __version__
            raise ValueError(f"this checkpoint was written in pyquant format_version={format_version}, newer than "
                             f"this pyquant {__version__} reads (format_version <= {FORMAT_VERSION}): upgrade pyquant")
        if state not in STATES:
            raise ValueError(f"PyquantConfig.state={state!r} is invalid: expected one of {STATES}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.state = state
        self.weight = _weight_spec(WeightQuantConfig() if weight is None else weight, "weight")
        self.activation = _act_spec(activation, "activation")
        self.modules = _patterns(modules, "modules")
        self.module_overrides = {}
        if module_overrides is not None:
            if not isinstance(module_overrides, dict):
                raise ValueError(f"PyquantConfig.module_overrides={module_overrides!r} is invalid: expected a dict "
                                 f"{{module name: {{'weight': ..., 'activation': ...}}}}")
            for name, ov in module_overrides.items():
                if not isinstance(ov, dict):
                    raise ValueError(f"PyquantConfig.module_overrides[{name!r}] must be a dict, got {ov!r}")
                bad = set(ov) - {"weight", "activation"}
                if bad:
                    raise ValueError(f"PyquantConfig.module_overrides[{name!r}]: unknown field(s) {sorted(bad)}; "
                                     f"known: ['activation', 'weight']")
                self.module_overrides[name] = {
                    "weight": _weight_spec(ov.get("weight", self.weight), f"module_overrides[{name!r}].weight"),
                    "activation": _act_spec(ov.get("activation", self.activation),
                                            f"module_overrides[{name!r}].activation")}
        self.modules_to_not_convert = _patterns(modules_to_not_convert, "modules_to_not_convert")
        self.include = _patterns(include, "include") or []
        # which of ``modules`` are MoE experts modules / word embeddings (the rest are Linear/Conv1D layers), and the
        # Q/K/V/probability fake-quant of the attention (QATConfig.attention_activation), restored after a load
        self.experts = _patterns(experts, "experts") or []
        self.embeddings = _patterns(embeddings, "embeddings") or []
        for what, names in (("experts", self.experts), ("embeddings", self.embeddings)):
            stray = [n for n in names if self.modules is None or n not in self.modules]
            if stray:
                raise ValueError(f"PyquantConfig.{what} lists {stray[:5]}, which are not in PyquantConfig.modules")
        self.attention_activation = _act_spec(attention_activation, "attention_activation")
        if bitnet is not None:  # set by from_bitnet only: the BitNet quantization_config being imported
            from .bitnet import check_bitnet_config
            bitnet = check_bitnet_config(bitnet)
        self.bitnet = bitnet

    # ---- per-module specs ---------------------------------------------------------------------------------------
    def specs_for(self, name: str) -> Tuple[WeightQuantConfig, Optional[ActivationQuantConfig]]:
        ov = self.module_overrides.get(name)
        return (self.weight, self.activation) if ov is None else (ov["weight"], ov["activation"])

    def qat_config(self) -> QATConfig:
        return QATConfig(weight=self.weight, activation=self.activation, include=tuple(self.include),
                         exclude=None if self.modules_to_not_convert is None else tuple(self.modules_to_not_convert))

    # ---- serialization ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD, "format_version": self.format_version, "state": self.state,
            "weight": self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "modules": None if self.modules is None else list(self.modules),
            "module_overrides": {n: {"weight": ov["weight"].to_dict(),
                                     "activation": None if ov["activation"] is None else ov["activation"].to_dict()}
                                 for n, ov in self.module_overrides.items()},
            "modules_to_not_convert": None if self.modules_to_not_convert is None
            else list(self.modules_to_not_convert),
            "include": list(self.include),
            "experts": list(self.experts), "embeddings": list(self.embeddings),
            "attention_activation": None if self.attention_activation is None
            else self.attention_activation.to_dict(),
            **({} if self.bitnet is None else {"bitnet": dict(self.bitnet)}),
        }

    def __iter__(self):
        yield from copy.deepcopy(self.to_dict()).items()

    def __eq__(self, other):
        return isinstance(other, PyquantConfig) and self.to_dict() == other.to_dict()

    __hash__ = None


# ---- model surgery -----------------------------------------------------------------------------------------------
def _dims(mod: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight [in, out])."""
    if is_conv1d(mod):
        k, n = mod.weight.shape
    else:
        n, k = mod.weight.shape
    return int(k), int(n)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    _convert._set(model, name, new)


def _resolve(model: nn.Module, name: str, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The module name in ``model`` for a name saved from a model with or without the base-model prefix."""
    if name in modules:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1:] in modules:
            return name[len(prefix) + 1:]
        if f"{prefix}.{name}" in modules:
            return f"{prefix}.{name}"
    return None


def _new_packed(mod: nn.Module, spec: WeightQuantConfig, act: Optional[ActivationQuantConfig],
                device) -> PackedLinear:
    k, n = _dims(mod)
    bias = getattr(mod, "bias", None)
    dtype = mod.weight.dtype if mod.weight.dtype.is_floating_point else torch.float16
    p = PackedLinear(k, n, bias is not None, spec, device=device, dtype=dtype, act_spec=_native_act(act))
    p.transposed = is_conv1d(mod)
    _attach_act_quant(p, act)
    return p


def _new_embedding(mod: nn.Embedding, spec: WeightQuantConfig, state: str) -> nn.Module:
    """QATEmbedding around the (meta) embedding, or a PackedEmbedding with empty buffers of the packed shapes."""
    if state == "qat":
        return QATEmbedding(mod, spec)
    v, d = mod.weight.shape
    dev = mod.weight.device
    return PackedEmbedding(torch.empty(v, packed_cols(d), dtype=torch.uint8, device=dev),
                           torch.empty(v, 1, dtype=spec.torch_scale_dtype, device=dev), d, spec, mod.padding_idx,
                           dtype=mod.weight.dtype)


def _init_placeholder() -> torch.Tensor:
    """What a packed layer's ``weight`` reads during loading: some models' ``_init_weights`` touch
    ``module.<linear>.weight`` of a parent module (GPT-2's c_proj); flagged initialised, so transformers skips it.
    Replaced by ``weight = None`` after the load."""
    t = torch.empty(0, device="meta")
    t._is_hf_initialized = True
    return t


def _new_qat(mod: nn.Module, spec: WeightQuantConfig, act: Optional[ActivationQuantConfig],
             scale_dtypes: Optional[Dict[str, torch.dtype]] = None) -> QATLinear:
    """A QATLinear around the (meta) layer without computing a scale from its (absent) weight; the learnable scale
    / zero point are empty parameters of the checkpoint's shape, filled by the load."""
    q = QATLinear.from_linear(mod, dataclasses.replace(spec, learnable_scale=False), act)
    q.weight_spec = spec
    if spec.learnable_scale:
        from ..reference.quant import scale_shape
        k, n = q.in_features, q.out_features
        shape = (1, 1) if spec.granularity == "tensor" else scale_shape(spec, n, k)
        dts = scale_dtypes or {}
        q.weight_scale = nn.Parameter(torch.empty(shape, dtype=dts.get("weight_scale", torch.float32),
                                                  device=mod.weight.device))
        if not spec.symmetric:
            q.weight_zero_point = nn.Parameter(torch.empty(shape, dtype=dts.get("weight_zero_point", torch.float32),
                                                           device=mod.weight.device))
    return q


def _expected_experts(state: str, mod: nn.Module, spec: WeightQuantConfig) -> Dict[str, Tuple[Tuple[str, ...], tuple]]:
    out = {}
    sd = _ST_DTYPES[spec.torch_scale_dtype]
    for w, (e, n, k) in _experts.expert_shapes(mod).items():
        g = 1 if spec.granularity == "tensor" else k // spec.resolve_group_size(k)
        if state == "packed":
            out[f"{w}_qweight"] = (("U8",), (e, n, packed_cols(k)))
            out[f"{w}_scale"] = ((sd,), (e, n, g))
            if not spec.symmetric:
                out[f"{w}_zero_point"] = ((sd,), (e, n, g))
        else:
            out[w] = (_ST_FLOATS, tuple(mod._parameters[w].shape))
            if spec.learnable_scale:
                shape = (e, 1, 1) if spec.granularity == "tensor" else (e, n, g)
                out[f"{w}_weight_scale"] = (_ST_FLOATS, shape)
                if not spec.symmetric:
                    out[f"{w}_weight_zero_point"] = (_ST_FLOATS, shape)
        b = mod._parameters.get(f"{w}_bias")
        if b is not None:
            out[f"{w}_bias"] = (_ST_FLOATS, tuple(b.shape))
    return out


def _expected_tensors(kind: str, mod: nn.Module, spec: WeightQuantConfig) -> Dict[str, Tuple[Tuple[str, ...], tuple]]:
    """{tensor name: (allowed safetensors dtypes, shape or None)} a module of this kind must find in the checkpoint."""
    if _experts.is_experts(mod):
        return _expected_experts(kind, mod, spec)
    if isinstance(mod, nn.Embedding):
        v, d = mod.weight.shape
        if kind == "packed":
            return {"qweight": (("U8",), (v, packed_cols(d))), "scale": ((_ST_DTYPES[spec.torch_scale_dtype],), (v, 1))}
        return {"weight": (_ST_FLOATS, (v, d))}
    k, n = _dims(mod)
    out = {}
    if kind == "packed":
        g = k // spec.resolve_group_size(k)
        sd = _ST_DTYPES[spec.torch_scale_dtype]
        out["qweight"] = (("U8",), (n, packed_cols(k)))
        out["scale"] = ((sd,), (n, g))
        if not spec.symmetric:
            out["zero_point"] = ((sd,), (n, g))
    else:
        out["weight"] = (_ST_FLOATS, tuple(mod.weight.shape))
        if spec.learnable_scale:
            shape = (1, 1) if spec.granularity == "tensor" else (n, k // spec.resolve_group_size(k))
            out["weight_scale"] = (_ST_FLOATS, shape)
            if not spec.symmetric:
                out["weight_zero_point"] = (_ST_FLOATS, shape)
    if getattr(mod, "bias", None) is not None:
        out["bias"] = (_ST_FLOATS, (n,))
    return out


def _read_headers(files) -> Dict[str, Tuple[str, tuple]]:
    from safetensors import safe_open
    header = {}
    for f in files or ():
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"pyquant checkpoints are safetensors only; refusing to read {f}")
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                sl = h.get_slice(key)
                header[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return header


_QUANT_SUFFIXES = (".qweight", ".zero_point", ".weight_scale", ".weight_zero_point",
                   "_qweight", "_weight_scale", "_weight_zero_point")  # the last three: packed / QAT MoE experts


def _renamed(model: nn.Module, header: Dict[str, Tuple[str, tuple]]) -> Dict[str, Tuple[str, Optional[tuple]]]:
    """The header with its keys renamed the way transformers maps checkpoint keys on load: ``save_pretrained`` writes
    some families' legacy layout (Mixtral's ``block_sparse_moe`` for ``mlp``; per-expert ``experts.<i>.gate_proj``
    tensors for a fused FP ``experts.gate_up_proj``, which the loader fuses again).  A key produced by a converter
    (several stored tensors -> one) keeps its dtype but no shape (shape None: not comparable).  Without that API
    (older transformers) the keys stay as stored."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
    except Exception:  # an older transformers without key conversion: nothing to rename
        return header
    if not transforms:
        return header
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out: Dict[str, Tuple[str, Optional[tuple]]] = {}
    for key, (dt, sh) in header.items():
        new, conv = rename_source_key(key, renamings, converters)
        out[new] = (dt, None if conv is not None else sh)
    return out


def _key_finder(model: nn.Module, header):
    """key -> the checkpoint key holding it (saved with or without the base-model prefix), or None."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def find(key):
        for c in (key, f"{prefix}.{key}" if prefix else None,
                  key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None):
            if c is not None and c in header:
                return c
        return None
    return find


def _check_checkpoint(model: nn.Module, plan, state: str, header: Dict[str, Tuple[str, tuple]]) -> Dict[str, dict]:
    """Compare the checkpoint's quantized tensors with the plan before anything loads; returns, per module, the
    dtypes found for QAT scales (kept as stored)."""
    find = _key_finder(model, header)

    problems, matched, found_dtypes = [], set(), {}
    for name, mod, spec, _act in plan:
        found_dtypes[name] = {}
        for t, (dts, shape) in _expected_tensors(state, mod, spec).items():
            key = find(f"{name}.{t}")
            if key is None:
                problems.append(f"{name}.{t} is missing from the checkpoint")
                continue
            matched.add(key)
            dt, sh = header[key]
            if dt not in dts or (shape is not None and sh is not None and sh != shape):
                want = "/".join(dts)
                problems.append(f"{key} is {dt}{list(sh) if sh is not None else []} but the quantization_config ({spec.describe()}, state "
                                f"{state!r}) needs {want}{list(shape)}")
            if t in ("weight_scale", "weight_zero_point"):
                found_dtypes[name][t] = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                                         "F64": torch.float64}[dt]
        ex = find(f"{name}._extra_state")
        if ex is not None:
            matched.add(ex)
    for key in header:
        if key.endswith(_QUANT_SUFFIXES) and key not in matched:
            problems.append(f"{key} is in the checkpoint but its module is not listed in quantization_config.modules "
                            f"as a {state!r} layer")
    if problems:
        raise ValueError(f"the checkpoint does not match its quantization_config ({len(problems)} problem(s); nothing "
                         f"was loaded): " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return found_dtypes


def _validate_loaded(model: nn.Module) -> None:
    """After loading: every swapped layer holds real tensors of the configured shapes and dtypes."""
    from ..formats import validate_packed
    problems = []
    for name, m in model.named_modules():
        if not getattr(m, "_pyquant_loading", False):
            continue
        tensors = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        for t, v in tensors.items():
            if v is not None and v.is_meta:
                problems.append(f"{name}.{t} was not loaded (still on the meta device)")
            elif v is not None and v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
                problems.append(f"{name}.{t} holds NaN or Inf (a corrupt or diverged checkpoint)")
        if isinstance(m, PackedLinear) and not any(v.is_meta for v in tensors.values() if v is not None):
            try:
                validate_packed(m.qweight, m.scale, m.zero_point, m.in_features, m.group_size)
                if m.scale.dtype != m.spec.torch_scale_dtype:
                    raise ValueError(f"scale dtype {m.scale.dtype} != {m.spec.scale_dtype}")
            except (TypeError, ValueError) as e:
                problems.append(f"{name}: {e}")
    if problems:
        raise ValueError("the model did not load completely (refusing a model with uninitialised quantized layers): "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


# ---- PTQ at load time ----------------------------------------------------------------------------------------------
def _quantize_op_class():
    from transformers.core_model_loading import ConversionOps

    class PyquantQuantize(ConversionOps):
        """Quantizes one checkpoint weight into its PackedLinear's codes/scales as transformers materialises it."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        @torch.no_grad()
        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            from ..ops import quantize_weight
            key, value = next(iter(input_dict.items()))
            value = value[0] if isinstance(value, list) else value
            mod_name = key.rpartition(".")[0]
            mod = model.get_submodule(mod_name)
            w = value.detach()
            try:
                w_nk = w.t() if mod._pyquant_ptq_transposed else w
                _check_finite(w_nk, mod_name)
                codes, s, z = quantize_weight(w_nk.float() if w_nk.dtype == torch.float64 else w_nk, mod.spec)
                tmp = PackedLinear.from_quantized(codes, s, z, None, mod.spec, dtype=torch.float32)
            except Exception as e:
                # transformers turns an exception here into a RuntimeError after the load; record the error and
                # let the load finish with inert tensors, then _process_model_after_weight_loading raises it as is
                self.hf_quantizer._ptq_errors[mod_name] = e
                tmp = PackedLinear(mod.in_features, mod.out_features, False, mod.spec, device=w.device,
                                   dtype=torch.float32)
            out = {f"{mod_name}.qweight": tmp.qweight, f"{mod_name}.scale": tmp.scale,
                   f"{mod_name}.weight": torch.empty(0, device=w.device, dtype=w.dtype),  # the placeholder
                   f"{mod_name}._extra_state": mod.get_extra_state()}
            if tmp.zero_point is not None:
                out[f"{mod_name}.zero_point"] = tmp.zero_point
            return out

    return PyquantQuantize


def _check_finite(w: torch.Tensor, name: str) -> None:
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"layer {name!r}: the weight holds {bad} NaN/Inf value(s); refusing to quantize it")


class PyquantHfQuantizer(HfQuantizer):
    """transformers quantizer of the ``"pyquant"`` method (see the module doc)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = PyquantConfig(**quantization_config)
        if not isinstance(quantization_config, PyquantConfig):
            raise TypeError(f"quantization_config must be a PyquantConfig, got {type(quantization_config).__name__}")
        # our own copy: the load records what it swapped in the config (PTQ at load), and the user's object must
        # stay reusable for the next from_pretrained
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self._ptq_errors: Dict[str, Exception] = {}
        if not self.pre_quantized:
            cfg = self.quantization_config
            given = [f for f in ("modules", "module_overrides", "experts", "embeddings") if getattr(cfg, f)]
            if given:
                raise ValueError(
                    f"PyquantConfig.{given[0]} describes a saved pyquant checkpoint; quantization at load time (this "
                    f"checkpoint is full precision) selects layers by `include` / `modules_to_not_convert` patterns "
                    f"with one weight/activation spec, and does not apply {', '.join(given)}. Use include=[...] / "
                    "modules_to_not_convert=[...], or quantize in Python with pyquant.prepare_qat / quantize "
                    "(per-module specs, embeddings) and save_pretrained")

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("device_map offloads to 'disk': pyquant's packed layers load onto CPU or GPU devices "
                             "only (the packed model is ~8x smaller than fp16: use device_map='auto' or 'cpu')")
        if self.pre_quantized and self.quantization_config.modules is None:
            raise ValueError("quantization_config of a pyquant checkpoint must list its quantized `modules` "
                             "(this config.json was not written by pyquant's save_pretrained)")

    def update_dtype(self, dtype):
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        mod_name, _, t = param_name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            return False
        return t == "weight" and getattr(mod, "_pyquant_ptq_transposed", None) is not None

    def get_quantize_ops(self):
        return _quantize_op_class()(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        modules = dict(model.named_modules())
        if cfg.bitnet is not None:
            return self._before_bitnet(model, modules, checkpoint_files)
        if self.pre_quantized:
            plan, problems = [], []
            experts, embeddings = set(cfg.experts), set(cfg.embeddings)
            kinds = {}
            for saved in cfg.modules:
                name = _resolve(model, saved, modules)
                m = None if name is None else modules[name]
                ok = m is not None and (_experts.is_experts(m) if saved in experts else
                                        isinstance(m, nn.Embedding) if saved in embeddings else
                                        isinstance(m, nn.Linear) or is_conv1d(m))
                if not ok:
                    problems.append(saved)
                    continue
                kinds[name] = "experts" if saved in experts else "embedding" if saved in embeddings else "linear"
                plan.append((name, m, *cfg.specs_for(saved)))
            if problems:
                raise ValueError(f"quantization_config.modules lists {problems[:5]} which are not layers of the kind "
                                 f"the config names (Linear/Conv1D, MoE experts, word embedding) in "
                                 f"{type(model).__name__}: the checkpoint was saved from another architecture")
            found = _check_checkpoint(model, plan, cfg.state, _renamed(model, _read_headers(checkpoint_files))) \
                if checkpoint_files else {}
            for name, mod, spec, act in plan:
                if kinds[name] == "experts":
                    if cfg.state == "packed":
                        _experts.packed_placeholder(mod, spec)
                        for w in mod.pq_weight_names:  # the family's _init_weights reads module.<w> while loading
                            mod.__dict__[w] = _init_placeholder()
                    else:
                        _experts.qat_placeholder(mod, spec)
                    mod._pyquant_loading = True
                    continue
                if kinds[name] == "embedding":
                    new = _new_embedding(mod, spec, cfg.state)
                    new._pyquant_loading = True
                    _set(model, name, new)
                    continue
                spec.resolve_group_size(_dims(mod)[0])
                if cfg.state == "packed":
                    new = _new_packed(mod, spec, act, device=mod.weight.device)
                    new.weight = _init_placeholder()
                else:
                    new = _new_qat(mod, spec, act, found.get(name))
                new._pyquant_loading = True
                _set(model, name, new)
            return model
        # not pre-quantized: PTQ (state "packed") or prepare_qat (state "qat") at load time
        qc = cfg.qat_config()
        targets, _ = _select(model, qc)
        etargets, _ = _convert._select_experts(model, qc)
        _validate_targets(targets, qc.weight, etargets)
        # MoE experts are quantized right after the load (their fused 3-D weights are read whole; see the README)
        self._ptq_experts = [n for n, _ in etargets]
        for n, m in targets:
            if cfg.state == "qat":
                new = _new_qat(m, qc.weight, qc.activation)  # the learnable scale is initialised after the load
                new._pyquant_needs_scale = qc.weight.learnable_scale
            else:
                new = _new_packed(m, qc.weight, qc.activation, device=m.weight.device)
                new._pyquant_ptq_transposed = is_conv1d(m)
                new.register_parameter("weight", nn.Parameter(torch.empty(m.weight.shape, dtype=m.weight.dtype,
                                                                          device="meta"), requires_grad=False))
            new._pyquant_loading = True
            _set(model, n, new)
        return model

    def _before_bitnet(self, model, modules, checkpoint_files):
        from .bitnet import BitNetLoading, _ST_TO_TORCH, expected_layout
        if not checkpoint_files:
            raise ValueError("from_bitnet needs the checkpoint's safetensors files (a state_dict was passed)")
        header = _read_headers(checkpoint_files)
        find = _key_finder(model, header)
        plan, matched = [], set()
        for name, mod in modules.items():
            if isinstance(mod, nn.Linear) and find(f"{name}.weight_scale") is not None:
                k, n = _dims(mod)
                layout = expected_layout(name, k, n, header, find)
                matched.add(find(f"{name}.weight_scale"))
                plan.append((name, mod, layout))
        stray = [key for key in header if key.endswith(".weight_scale") and key not in matched]
        if stray:
            raise ValueError(f"BitNet tensors {stray[:5]} belong to no nn.Linear layer of {type(model).__name__}")
        if not plan:
            raise ValueError(f"no BitNet layer found: no '<linear>.weight_scale' tensor of the checkpoint matches an "
                             f"nn.Linear of {type(model).__name__}")
        for name, mod, (wdt, wsh, sdt, ssh) in plan:
            k, n = _dims(mod)
            new = BitNetLoading(k, n, _ST_TO_TORCH[wdt], wsh, _ST_TO_TORCH[sdt], ssh, mod.bias is not None,
                                mod.weight.dtype, mod.weight.device)
            new._pyquant_loading = True
            new._pyquant_bitnet = name
            _set(model, name, new)
        return model

    def _after_bitnet(self, model) -> None:
        from .bitnet import to_packed
        cfg = self.quantization_config
        _validate_loaded(model)
        names = []
        for name, m in list(model.named_modules()):
            if getattr(m, "_pyquant_bitnet", None) is not None:
                new = to_packed(name, m, cfg.bitnet["linear_class"], None)
                _packed_exceptions(new)
                _set(model, name, new)
                names.append(name)
        kept = [n for n, m in model.named_modules() if n and _convert._is_candidate(m)]
        cfg.modules, cfg.module_overrides, cfg.modules_to_not_convert, cfg.bitnet = names, {}, kept, None

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.bitnet is not None:
            self._after_bitnet(model)
            install_atomic_save(model)
            return model
        if self._ptq_errors:
            first = next(iter(self._ptq_errors.values()))
            msg = "quantization at load time failed (the model was not returned): " + "; ".join(
                f"{k}: {v}" for k, v in self._ptq_errors.items())
            raise (ValueError(msg) if isinstance(first, ValueError) else RuntimeError(msg)) from first
        for name, m in model.named_modules():
            if getattr(m, "_pyquant_ptq_transposed", None) is not None:
                if "weight" in m._parameters:
                    del m._parameters["weight"]
                del m._pyquant_ptq_transposed
            if isinstance(m, QATLinear) and getattr(m, "_pyquant_needs_scale", False):
                if m.weight.is_meta:
                    raise ValueError(f"{name}.weight was not loaded")
                _check_finite(m.weight_nk, name)
                m.reset_scale()
                del m._pyquant_needs_scale
        for name in getattr(self, "_ptq_experts", ()):
            m = model.get_submodule(name)
            if cfg.state == "qat":
                _experts.prepare_qat_experts(name, m, cfg.weight)
            else:
                _experts.quantize_experts(name, m, cfg.weight)
        self._ptq_experts = []
        _validate_loaded(model)
        if cfg.attention_activation is not None:
            from ..nn.qat_attention import enable_attention_quant
            enable_attention_quant(model, cfg.attention_activation)
        for m in model.modules():
            if getattr(m, "_pyquant_loading", False):
                del m._pyquant_loading
                if isinstance(m, PackedLinear):
                    m.__dict__.pop("weight", None)
                    _packed_exceptions(m)
                if _experts.is_packed_experts(m):
                    for w in m.pq_weight_names:
                        m.__dict__.pop(w, None)
        if not self.pre_quantized:
            # the model now is a pyquant checkpoint-to-be: describe exactly what was swapped
            new = describe(model, cfg.state)
            for f in ("modules", "module_overrides", "weight", "activation", "experts", "embeddings"):
                setattr(cfg, f, getattr(new, f))
            self.pre_quantized = True
        install_atomic_save(model)
        return model

    def _dequantize(self, model, dtype=None):
        return _convert.dequantize(model, dtype)

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return self.quantization_config.state == "qat"

    @property
    def is_qat_trainable(self) -> bool:
        return self.quantization_config.state == "qat"

    @property
    def is_compileable(self) -> bool:
        return True


# ---- describing an in-process model ------------------------------------------------------------------------------
def _module_specs(m: nn.Module):
    if isinstance(m, QATLinear):
        return m.weight_spec, m.act_spec
    if _experts.is_qat_experts(m) or _experts.is_packed_experts(m):
        return m.pq_spec, None
    if isinstance(m, (QATEmbedding, PackedEmbedding)):
        return m.spec, None
    act = m.act_spec if m.act_spec is not None else getattr(m, "input_act_spec", None)
    return m.spec, act


def describe(model: nn.Module, state: Optional[str] = None, modules_to_not_convert=None) -> PyquantConfig:
    """The PyquantConfig of a model's current QATLinear / PackedLinear layers (the most common specs become the
    default, the others ``module_overrides``)."""
    qat = [(n, m) for n, m in model.named_modules() if isinstance(m, (QATLinear, QATEmbedding))
           or _experts.is_qat_experts(m)]
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, (PackedLinear, PackedEmbedding))
              or _experts.is_packed_experts(m)]
    if qat and packed:
        raise ValueError(f"{type(model).__name__} holds both QATLinear ({qat[0][0]!r}) and PackedLinear "
                         f"({packed[0][0]!r}) layers; convert it fully before saving")
    layers = qat or packed
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no QATLinear/PackedLinear layer")
    found = "qat" if qat else "packed"
    if state is not None and state != found:
        raise ValueError(f"state={state!r} but the model holds {found} layers")
    specs = {n: _module_specs(m) for n, m in layers}
    key = lambda ws_as: json.dumps([ws_as[0].to_dict(), None if ws_as[1] is None else ws_as[1].to_dict()],
                                   sort_keys=True)
    counts = collections.Counter(key(v) for v in specs.values())
    default_key = counts.most_common(1)[0][0]
    default = next(v for v in specs.values() if key(v) == default_key)
    overrides = {n: {"weight": v[0], "activation": v[1]} for n, v in specs.items() if key(v) != default_key}
    if modules_to_not_convert is None:
        modules_to_not_convert = [n for n, m in model.named_modules() if n and _convert._is_candidate(m)]
    from ..nn.qat_attention import ATTR
    attn = next((getattr(m, ATTR) for m in model.modules() if getattr(m, ATTR, None) is not None), None)
    return PyquantConfig(weight=default[0], activation=default[1], state=found, modules=[n for n, _ in layers],
                         module_overrides=overrides, modules_to_not_convert=modules_to_not_convert,
                         experts=[n for n, m in layers if _experts.is_qat_experts(m) or _experts.is_packed_experts(m)],
                         embeddings=[n for n, m in layers if isinstance(m, (QATEmbedding, PackedEmbedding))],
                         attention_activation=attn)


def attach(model: nn.Module, report=None) -> None:
    """Set ``model.config.quantization_config`` to the model's PyquantConfig and make ``save_pretrained`` atomic.
    Called by ``prepare_qat`` / ``convert`` / ``quantize`` on transformers models (a no-op for other modules)."""
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        return
    try:
        cfg = describe(model, modules_to_not_convert=None if report is None else list(report.kept))
    except ValueError as e:  # e.g. QAT and packed layers mixed by hand: the swap stands, save_pretrained will refuse
        import warnings
        warnings.warn(f"pyquant: no quantization_config recorded for this model ({e})", RuntimeWarning, stacklevel=3)
        return
    model.config.quantization_config = cfg
    hq = getattr(model, "hf_quantizer", None)
    if isinstance(hq, PyquantHfQuantizer):
        hq.quantization_config = model.config.quantization_config
    install_atomic_save(model)


# ---- atomic save -----------------------------------------------------------------------------------------------------
def save_pretrained(model, save_directory, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` written atomically (see ``pyquant.integrations.atomic``);
    safetensors only."""
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("safe_serialization=False: pyquant checkpoints are safetensors only")
    kwargs.pop("safe_serialization", None)
    if kwargs.get("push_to_hub"):
        raise ValueError("push_to_hub: save to a local directory first, then upload it (huggingface_hub)")
    if not kwargs.get("is_main_process", True):
        return type(model).save_pretrained(model, save_directory, **kwargs)
    if any(isinstance(m, (QATLinear, PackedLinear, QATEmbedding, PackedEmbedding, _experts.QATExpertsMixin,
                          _experts.PackedExpertsMixin)) for m in model.modules()):
        bad = [f"{n}.scale is {m.scale.dtype}, its spec says {m.spec.scale_dtype}" for n, m in model.named_modules()
               if isinstance(m, PackedLinear) and m.scale.dtype != m.spec.torch_scale_dtype]
        if bad:  # e.g. model.to(dtype) cast the packed scales: such a checkpoint would not reload
            raise ValueError("refusing to save packed layers whose tensors disagree with their spec (nothing was "
                             "written): " + "; ".join(bad[:5]))
        # the config always describes the layers the model holds now (also after a hand-made module swap)
        old = getattr(model.config, "quantization_config", None)
        keep = old.modules_to_not_convert if isinstance(old, PyquantConfig) else None
        model.config.quantization_config = describe(model, modules_to_not_convert=keep)
        hq = getattr(model, "hf_quantizer", None)
        if isinstance(hq, PyquantHfQuantizer):
            hq.quantization_config = model.config.quantization_config
    with atomic_directory(save_directory) as tmp:
        type(model).save_pretrained(model, tmp, **kwargs)


def _save_method(self, save_directory, **kwargs):
    return save_pretrained(self, save_directory, **kwargs)


def _half(self, *args):
    return nn.Module.half(self, *args)


def _float(self, *args):
    return nn.Module.float(self, *args)


def install_atomic_save(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` atomic (an instance attribute over the class method).  Also lets a model
    loaded from a pyquant checkpoint take ``.half()`` / ``.float()`` like an in-process one: transformers refuses
    both for any model with an ``hf_quantizer`` (right for bitsandbytes / GPTQ, whose quantized tensors a cast
    would break), while pyquant's casts keep the packed scales bit-exact (``apply_keeping_dtypes``), exactly what
    ``model.to(torch.float16)`` -- which transformers allows -- already does."""
    # functools.partial, not types.MethodType: a bound method pickles as getattr(model, "_save_method"), which does
    # not exist, so torch.save(model) / pickle of the whole model would not load back; a partial of a module-level
    # function pickles (and deep-copies) with the model
    for name, fn in (("save_pretrained", _save_method), ("half", _half), ("float", _float)):
        model.__dict__[name] = functools.update_wrapper(functools.partial(fn, model), fn)


def _after_swap(model, report) -> None:
    attach(model, report)


def _after_dequantize(model) -> None:
    """``pyquant.dequantize`` of an in-process model: the dense model is no pyquant checkpoint any more (a model
    loaded with a quantizer is handled by transformers' own ``model.dequantize``, which calls ``_dequantize``)."""
    cfg = getattr(model, "config", None)
    if isinstance(getattr(cfg, "quantization_config", None), PyquantConfig) \
            and getattr(model, "hf_quantizer", None) is None:
        del cfg.quantization_config


def _register() -> None:
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not PyquantConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from an importlib.reload
        register_quantization_config(QUANT_METHOD)(PyquantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not PyquantHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(PyquantHfQuantizer)
    if _after_swap not in _convert.AFTER_SWAP:
        _convert.AFTER_SWAP.append(_after_swap)
    if _after_dequantize not in _convert.AFTER_DEQUANTIZE:
        _convert.AFTER_DEQUANTIZE.append(_after_dequantize)


# Importing this module directly (``from pyquant.integrations.hf import PyquantConfig``) imports transformers, whose
# registry import runs the hook while this module is half-initialised; the hook then leaves registration to this line.
from . import register as _register_now  # noqa: E402

_register_now()

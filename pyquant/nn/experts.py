"""Ternary / 2-bit mixture-of-experts: QAT and packed inference for transformers' fused expert modules.

In transformers 5 the experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS and ~70 other families are
one module holding fused 3-D parameters (``gate_up_proj [E, 2I, H]`` (or ``up_proj``) and ``down_proj [E, H, I]``;
``[E, in, out]`` when ``is_transposed``), made dispatchable by ``transformers.integrations.moe
.use_experts_implementation`` (which sets ``has_gate``, ``has_bias``, ``is_transposed``, ... on the instance).  One
mechanism serves every such family, with no per-model code:

* :func:`prepare_qat_experts` gives the module a subclass of its own class with :class:`QATExpertsMixin` in front:
  on every forward the 3-D weights are replaced, for the duration of the call, by their fake-quantized values (one
  fused fake-quant launch per tensor, over the ``[E*N, K]`` view -- or ``[E, N*K]`` for per-tensor scales, so every
  expert gets its own scale), and the module's own forward runs -- whichever experts implementation
  (eager / batched_mm / grouped_mm) the model selected, routing weights, gating (``_apply_gate``, e.g. GPT-OSS's
  clamped interleaved gate), biases and post-expert norms exactly as the model does.  The FP master weights stay
  the module's Parameters (state-dict keys unchanged); gradients reach them through the straight-through estimator.
* :func:`convert_experts` / :func:`quantize_experts` turn it into :class:`PackedExpertsMixin`: the 3-D weights become
  packed buffers (``<name>_qweight [E, N, packed K]`` uint8, ``<name>_scale [E, N, G]``, ``<name>_zero_point``;
  layout in ``pyquant/formats.py``, "Packed experts") and the forward runs the grouped packed matmul
  (``pyquant.ops.grouped_packed_matmul``: tokens sorted by expert, one launch per projection for all experts).

Keeping the instance (and ``isinstance(m, MixtralExperts)``) means transformers' own code paths -- weight init,
tensor-parallel plans, the experts interface -- still recognise the module.  Experts are weight-only: activation
fake-quant (W2A8) applies to the Linear layers.  Not supported (refused before anything is swapped): expert
parallelism (``_is_expert_parallel``) and modules whose K does not divide by the group size.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..formats import WeightQuantConfig, pack_codes, packed_cols, unpack_codes
from ..ops import fake_quant_weight, grouped_packed_matmul, quantize_weight
from .packed_linear import apply_keeping_dtypes

__all__ = ["is_experts", "expert_weight_names", "QATExpertsMixin", "PackedExpertsMixin", "is_qat_experts",
           "is_packed_experts", "validate_experts", "prepare_qat_experts", "convert_experts", "quantize_experts",
           "expert_params", "expert_shapes", "packed_placeholder", "qat_placeholder"]

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


# ---- detection ------------------------------------------------------------------------------------------------
def expert_weight_names(mod: nn.Module) -> List[str]:
    """Names of the fused 3-D expert weights the module holds as Parameters (FP or QAT state)."""
    return [n for n in EXPERT_WEIGHTS if isinstance(mod._parameters.get(n), torch.Tensor)
            and mod._parameters[n].dim() == 3]


def is_experts(mod: nn.Module) -> bool:
    """A transformers experts module in full precision (made by ``use_experts_implementation``)."""
    return (hasattr(mod, "has_gate") and hasattr(mod, "is_transposed") and not is_packed_experts(mod)
            and not is_qat_experts(mod) and bool(expert_weight_names(mod)))


def is_qat_experts(mod: nn.Module) -> bool:
    return isinstance(mod, QATExpertsMixin)


def is_packed_experts(mod: nn.Module) -> bool:
    return isinstance(mod, PackedExpertsMixin)


def expert_params(mod: nn.Module) -> int:
    """Number of expert weights (E*N*K summed over the fused tensors) of an FP / QAT / packed experts module."""
    if is_packed_experts(mod):
        return sum(int(e * n * k) for e, n, k in mod.pq_shapes.values())
    return sum(mod._parameters[n].numel() for n in expert_weight_names(mod))


def _enk(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A stored expert weight as [E, N (out), K (in)] (a view for ``is_transposed`` modules)."""
    return t.transpose(1, 2) if mod.is_transposed else t


def _view_spec(spec: WeightQuantConfig, E: int, N: int, K: int) -> Tuple[Tuple[int, int], WeightQuantConfig]:
    """The 2-D view the fused fake-quant kernel sees, and the spec on it: per-tensor scales become one scale per
    expert (a per-row spec over [E, N*K]); per-channel / group scales are per (expert, row) over [E*N, K]."""
    if spec.granularity == "tensor":
        return (E, N * K), dataclasses.replace(spec, granularity="channel")
    return (E * N, K), spec


def _scale_shape(spec: WeightQuantConfig, E: int, N: int, K: int) -> Tuple[int, int, int]:
    if spec.granularity == "tensor":
        return (E, 1, 1)
    return (E, N, K // spec.resolve_group_size(K))


def validate_experts(name: str, mod: nn.Module, spec: WeightQuantConfig) -> List[str]:
    """Problems that stop ``mod`` from being quantized with ``spec`` (empty when it can be)."""
    problems = []
    if getattr(mod, "_is_expert_parallel", False):
        problems.append(f"{name}: expert parallelism (_is_expert_parallel) is not supported")
    for w in expert_weight_names(mod):
        t = mod._parameters[w]
        if not t.dtype.is_floating_point:
            problems.append(f"{name}.{w}: dtype {t.dtype} is not floating point")
            continue
        K = _enk(mod, t).shape[2]
        if spec.granularity == "group" and K % spec.group_size:
            problems.append(f"{name}.{w}: in_features={K} is not divisible by group_size={spec.group_size}")
    return problems


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: the weight holds {bad} NaN/Inf value(s); refusing to quantize it "
                         f"(a NaN would silently become a finite code)")


# ---- QAT ----------------------------------------------------------------------------------------------------------
class QATExpertsMixin:
    """Mixed in front of a transformers experts class: fake-quantized expert weights on every forward.

    Attributes set by :func:`prepare_qat_experts`: ``pq_spec`` (WeightQuantConfig), ``pq_weight_names``,
    ``pq_fake_quant_enabled``; learnable specs add Parameters ``<name>_weight_scale`` (and ``_weight_zero_point``)
    of shape [E, N, G] ([E, 1, 1] per-tensor).
    """

    def pq_fake_quant(self, name: str) -> torch.Tensor:
        """The fake-quantized weight ``name`` in its stored layout and dtype (differentiable)."""
        w = _enk(self, self._parameters[name])
        E, N, K = w.shape
        shape2, spec2 = _view_spec(self.pq_spec, E, N, K)
        s = getattr(self, f"{name}_weight_scale", None)
        z = getattr(self, f"{name}_weight_zero_point", None)
        rows = shape2[0]
        fq = fake_quant_weight(w.reshape(shape2), spec2, None if s is None else s.reshape(rows, -1),
                               None if z is None else z.reshape(rows, -1))
        fq = fq.reshape(E, N, K)
        return fq.transpose(1, 2) if self.is_transposed else fq

    @torch.no_grad()
    def pq_quantized(self, name: str) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(codes uint8 [E, N, K], scale [E, N, G], zero_point [E, N, G] | None): the op the forward uses."""
        w = _enk(self, self._parameters[name]).detach()
        return _quantize_enk(w, self.pq_spec, getattr(self, f"{name}_weight_scale", None),
                             getattr(self, f"{name}_weight_zero_point", None))

    def forward(self, *args, **kwargs):
        if not self.pq_fake_quant_enabled:
            return super().forward(*args, **kwargs)
        fq: Dict[str, torch.Tensor] = {n: self.pq_fake_quant(n) for n in self.pq_weight_names}
        saved = {n: self._parameters[n] for n in fq}
        try:
            # the module's own forward reads self.<name>: for this call it sees the fake-quantized tensor, which
            # is differentiable w.r.t. the master Parameter (STE) and the learnable scale
            self._parameters.update(fq)
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(saved)

    def extra_repr(self) -> str:
        return f"pyquant QAT experts: {self.pq_spec.describe()} on {', '.join(self.pq_weight_names)}"


def _quantize_enk(w: torch.Tensor, spec: WeightQuantConfig, s: Optional[torch.Tensor], z: Optional[torch.Tensor]):
    E, N, K = w.shape
    shape2, spec2 = _view_spec(spec, E, N, K)
    rows = shape2[0]
    codes, sc, zp = quantize_weight(w.reshape(shape2), spec2, None if s is None else s.detach().reshape(rows, -1),
                                    None if z is None else z.detach().reshape(rows, -1))
    sshape = _scale_shape(spec, E, N, K)
    codes = codes.reshape(E, N, K)
    sc = sc.reshape(sshape).expand(E, N, sshape[2])
    zp = None if zp is None else zp.reshape(sshape).expand(E, N, sshape[2])
    return codes, sc, zp


def _subclass(base: type, mixin: type, prefix: str) -> type:
    cache = mixin.__dict__.get("_pq_classes")
    if cache is None:
        cache = {}
        setattr(mixin, "_pq_classes", cache)
    if base not in cache:
        cache[base] = type(f"{prefix}{base.__name__}", (mixin, base), {"__module__": base.__module__, "_pq_base": base})
    return cache[base]


def prepare_qat_experts(name: str, mod: nn.Module, spec: WeightQuantConfig) -> int:
    """Make ``mod`` a QAT experts module in place (validated by the caller); returns the expert weights covered."""
    _check_finite_all(name, mod)
    base = type(mod)
    mod.__class__ = _subclass(base, QATExpertsMixin, "QAT")
    mod.pq_spec = spec
    mod.pq_weight_names = expert_weight_names(mod)
    mod.pq_fake_quant_enabled = True
    if spec.learnable_scale:
        for n in mod.pq_weight_names:
            _, s, z = mod.pq_quantized(n)
            shape = _scale_shape(spec, *_enk(mod, mod._parameters[n]).shape)
            mod.register_parameter(f"{n}_weight_scale", nn.Parameter(s[:, : shape[1]].float().clone()))
            if z is not None:
                mod.register_parameter(f"{n}_weight_zero_point", nn.Parameter(z[:, : shape[1]].float().clone()))
    return expert_params(mod)


def _check_finite_all(name: str, mod: nn.Module) -> None:
    for n in expert_weight_names(mod):
        _check_finite(f"{name}.{n}", mod._parameters[n])


# ---- packed --------------------------------------------------------------------------------------------------------
class PackedExpertsMixin:
    """Mixed in front of a transformers experts class: packed 2-bit expert weights, grouped packed matmul forward.

    Buffers per fused weight ``<name>``: ``<name>_qweight`` uint8 [E, N, packed_cols(K)], ``<name>_scale`` [E, N, G],
    ``<name>_zero_point`` (asymmetric formats); ``pq_shapes[name] = (E, N, K)``.  Biases stay FP Parameters.
    """

    def _pq_project(self, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, f"{name}_bias", None) if self.has_bias else None
        return grouped_packed_matmul(x, getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scale"),
                                     getattr(self, f"{name}_zero_point", None), bias, offsets,
                                     in_features=self.pq_shapes[name][2], code_offset=self.pq_spec.code_offset,
                                     check_offsets=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        E = self.pq_shapes[self.pq_weight_names[-1]][0]
        if top_k_index.numel() and (int(top_k_index.min()) < 0 or int(top_k_index.max()) >= E):
            raise ValueError(f"top_k_index holds expert ids outside [0, {E}): min {int(top_k_index.min())}, "
                             f"max {int(top_k_index.max())}")
        num_tokens, k = hidden_states.shape[0], top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        token_idx = order // k
        offsets = torch.bincount(expert_ids, minlength=E).cumsum(0)
        x = hidden_states[token_idx]
        first = "gate_up_proj" if self.has_gate else "up_proj"
        h = self._pq_project(first, x, offsets)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        out = self._pq_project("down_proj", h, offsets)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out.float() * top_k_weights.reshape(-1)[order].float().unsqueeze(-1)
        final = torch.zeros(num_tokens, out.shape[-1], dtype=torch.float32, device=out.device)
        final.index_add_(0, token_idx, out)
        return final.to(hidden_states.dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() convert the FP biases; the packed scales and zero points keep the format's dtype
        names = [f"{n}_{suffix}" for n in self.pq_weight_names for suffix in ("scale", "zero_point")]
        return apply_keeping_dtypes(self, fn, recurse, names, super()._apply)

    def pq_dequantize(self, name: str) -> torch.Tensor:
        """The effective fp32 weight ``name`` in the module's stored layout (tests and export only)."""
        E, N, K = self.pq_shapes[name]
        q = getattr(self, f"{name}_qweight")
        codes = unpack_codes(q.reshape(E * N, -1), K).reshape(E, N, K).float()
        s = getattr(self, f"{name}_scale").float()
        z = getattr(self, f"{name}_zero_point", None)
        gs = K // s.shape[2]
        zz = torch.full_like(s, self.pq_spec.code_offset) if z is None else z.float()
        w = (codes - zz.repeat_interleave(gs, dim=2)) * s.repeat_interleave(gs, dim=2)
        return w.transpose(1, 2) if self.is_transposed else w

    def get_extra_state(self) -> torch.Tensor:
        meta = {"spec": self.pq_spec.to_dict(), "shapes": {n: list(v) for n, v in self.pq_shapes.items()}}
        return torch.tensor(list(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        try:
            meta = json.loads(bytes(state.to("cpu", torch.uint8).tolist()).decode())
        except (AttributeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"packed experts extra state is not the JSON this module writes: {e}") from None
        spec = WeightQuantConfig.from_dict(meta.get("spec", {}))
        shapes = {n: tuple(v) for n, v in meta.get("shapes", {}).items()}
        if spec != self.pq_spec or shapes != self.pq_shapes:
            raise ValueError(f"state dict holds packed experts {spec.describe()} {shapes}; this module is "
                             f"{self.pq_spec.describe()} {self.pq_shapes}")

    def extra_repr(self) -> str:
        return (f"pyquant packed experts: {self.pq_spec.describe()}, "
                + ", ".join(f"{n} {list(s)}" for n, s in self.pq_shapes.items()))


def _become_packed(mod: nn.Module, spec: WeightQuantConfig, shapes: Dict[str, Tuple[int, int, int]]) -> None:
    base = getattr(type(mod), "_pq_base", type(mod))
    mod.__class__ = _subclass(base, PackedExpertsMixin, "Packed")
    mod.__dict__.pop("pq_fake_quant_enabled", None)
    mod.pq_spec = spec
    mod.pq_shapes = dict(shapes)
    mod.pq_weight_names = list(shapes)


def expert_shapes(mod: nn.Module) -> Dict[str, Tuple[int, int, int]]:
    """{fused weight name: (E, N, K)} of an FP / QAT / packed experts module (N outputs, K inputs per expert)."""
    if is_packed_experts(mod):
        return dict(mod.pq_shapes)
    return {n: tuple(_enk(mod, mod._parameters[n]).shape) for n in expert_weight_names(mod)}


def packed_placeholder(mod: nn.Module, spec: WeightQuantConfig) -> None:
    """FP experts (typically on the meta device, before a checkpoint loads) -> packed experts whose buffers are
    empty tensors of the packed shapes on the weights' device, to be filled by the load (pyquant.integrations.hf)."""
    shapes = expert_shapes(mod)
    for n, (E, N, K) in shapes.items():
        dev = mod._parameters[n].device
        del mod._parameters[n]
        g = 1 if spec.granularity == "tensor" else K // spec.resolve_group_size(K)
        mod.register_buffer(f"{n}_qweight", torch.empty(E, N, packed_cols(K), dtype=torch.uint8, device=dev))
        mod.register_buffer(f"{n}_scale", torch.empty(E, N, g, dtype=spec.torch_scale_dtype, device=dev))
        if not spec.symmetric:
            mod.register_buffer(f"{n}_zero_point", torch.empty(E, N, g, dtype=spec.torch_scale_dtype, device=dev))
    _become_packed(mod, spec, shapes)


def qat_placeholder(mod: nn.Module, spec: WeightQuantConfig) -> None:
    """FP experts -> QAT experts without computing scales from the (absent) weights: learnable scales are empty
    fp32 Parameters of the checkpoint's shape, filled by the load."""
    mod.__class__ = _subclass(type(mod), QATExpertsMixin, "QAT")
    mod.pq_spec = spec
    mod.pq_weight_names = expert_weight_names(mod)
    mod.pq_fake_quant_enabled = True
    if spec.learnable_scale:
        for n in mod.pq_weight_names:
            w = mod._parameters[n]
            shape = _scale_shape(spec, *_enk(mod, w).shape)
            mod.register_parameter(f"{n}_weight_scale", nn.Parameter(torch.empty(shape, device=w.device)))
            if not spec.symmetric:
                mod.register_parameter(f"{n}_weight_zero_point", nn.Parameter(torch.empty(shape, device=w.device)))


def _to_packed(mod: nn.Module, quantized: Dict[str, tuple], spec: WeightQuantConfig) -> None:
    """Swap the 3-D Parameters for packed buffers and give the module the packed forward (in place)."""
    shapes = {}
    for n, (codes, s, z) in quantized.items():
        E, N, K = codes.shape
        shapes[n] = (E, N, K)
        del mod._parameters[n]
        for suffix in ("weight_scale", "weight_zero_point"):
            mod._parameters.pop(f"{n}_{suffix}", None)
        mod.register_buffer(f"{n}_qweight", pack_codes(codes.reshape(E * N, K)).reshape(E, N, packed_cols(K)))
        mod.register_buffer(f"{n}_scale", s.to(spec.torch_scale_dtype).contiguous())
        if z is not None:
            mod.register_buffer(f"{n}_zero_point", z.to(spec.torch_scale_dtype).contiguous())
    _become_packed(mod, spec, shapes)


@torch.no_grad()
def convert_experts(name: str, mod: nn.Module) -> int:
    """QAT experts -> packed experts in place; the packed weights equal the fake-quantized ones bit for bit."""
    _check_finite_all(name, mod)
    q = {n: mod.pq_quantized(n) for n in mod.pq_weight_names}
    count = expert_params(mod)
    _to_packed(mod, q, mod.pq_spec)
    return count


@torch.no_grad()
def quantize_experts(name: str, mod: nn.Module, spec: WeightQuantConfig) -> int:
    """FP experts -> packed experts in place (post-training quantization, the method's own statistics)."""
    _check_finite_all(name, mod)
    q = {n: _quantize_enk(_enk(mod, mod._parameters[n]).detach(), spec, None, None)
         for n in expert_weight_names(mod)}
    count = expert_params(mod)
    _to_packed(mod, q, spec)
    return count

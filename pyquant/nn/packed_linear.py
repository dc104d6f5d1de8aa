"""``PackedLinear``: a drop-in ``nn.Linear`` whose weight lives at 2 bits/weight (layout: ``pyquant/formats.py``).

A thin module: buffers plus a call to ``pyquant.ops.packed_matmul``, which picks the CUDA, Triton or reference
backend.  The quantization spec travels in the state dict (``_extra_state``) so a mismatched load is refused.

With ``act_spec=ActivationQuantConfig()`` (8-bit, symmetric, per token) the forward is the W2A8 op
``pyquant.ops.packed_matmul_a8``: the input is quantized to int8 per token inside the fused kernel.

The forward allocates nothing on the host and syncs nothing, so it works under ``torch.compile`` (the op is traced
through its fake implementation) and inside CUDA-graph capture (run it once before capturing so the Triton
autotuner has picked its config).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from .. import reference
from ..formats import ActivationQuantConfig, WeightQuantConfig, pack_codes, packed_cols, unpack_codes
from ..ops import packed_matmul, packed_matmul_a8
from ..ops.packed_matmul import PackedMatmulPlan

__all__ = ["PackedLinear", "apply_keeping_dtypes"]


def apply_keeping_dtypes(module: nn.Module, fn, recurse: bool, names, base_apply) -> nn.Module:
    """``nn.Module._apply`` for a module whose buffers ``names`` hold quantized data (scales, zero points) whose
    dtype is part of the format: ``model.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` move them to the new
    device but keep their dtype, so a dtype change never re-rounds a scale (bitsandbytes and torchao keep their
    quantized state the same way).  Every other tensor of the module (the FP bias, non-quantized submodules) is
    converted as usual by ``base_apply`` (the caller's ``super()._apply``).  Returns ``module``."""
    kept = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    for n in kept:
        module._buffers[n] = None  # nn.Module._apply skips None buffers
    try:
        base_apply(fn, recurse)
    finally:
        for n, t in kept.items():
            module._buffers[n] = t
    for n, t in kept.items():
        new = fn(t)
        if new.dtype != t.dtype:
            new = t.to(device=new.device)  # the device move only: the values stay bit-exact
        module._buffers[n] = new
    return module


class PackedLinear(nn.Module):
    # True when built from a GPT-2 Conv1D (weight stored [in, out]): pyquant.dequantize gives a Conv1D back
    transposed = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: Optional[WeightQuantConfig] = None,
        device=None,
        dtype: torch.dtype = torch.float16,
        act_spec: Optional[ActivationQuantConfig] = None,
    ):
        super().__init__()
        spec = WeightQuantConfig() if spec is None else spec
        if not isinstance(spec, WeightQuantConfig):
            raise TypeError(f"spec must be a WeightQuantConfig, got {type(spec).__name__}")
        _check_act_spec(act_spec)
        self.act_spec = act_spec
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} is invalid: expected a positive int")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.group_size = spec.resolve_group_size(in_features)
        g = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scale", torch.ones(out_features, g, dtype=spec.torch_scale_dtype, device=device))
        if spec.symmetric:
            self.register_buffer("zero_point", None)
        else:
            self.register_buffer("zero_point", torch.zeros(out_features, g, dtype=spec.torch_scale_dtype,
                                                           device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], spec: WeightQuantConfig,
                       dtype: torch.dtype = torch.float16,
                       act_spec: Optional[ActivationQuantConfig] = None) -> "PackedLinear":
        """From codes [N, K] and scales [R, G] (R = 1 for per-tensor: repeated over rows)."""
        if not isinstance(spec, WeightQuantConfig):
            raise TypeError(f"spec must be a WeightQuantConfig, got {type(spec).__name__}")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            raise ValueError(f"codes must be a 2-D tensor [N, K], got {getattr(codes, 'shape', type(codes).__name__)}")
        n, k = codes.shape
        g = k // spec.resolve_group_size(k)
        for name, t in (("scale", scale), ("zero_point", zero_point)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] not in (1, n) or t.shape[1] != g:
                raise ValueError(f"{name} must have shape [{n} or 1, {g}] for {spec.describe()} and codes [{n}, {k}], "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        if (zero_point is None) != spec.symmetric:
            raise ValueError(f"zero_point must be {'None' if spec.symmetric else 'given'} for {spec.describe()}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"bias must be a tensor of shape ({n},), "
                             f"got {getattr(bias, 'shape', type(bias).__name__)}")
        if codes.numel() and int(codes.max()) > spec.max_code:
            raise ValueError(f"codes must lie in [0, {spec.max_code}] for {spec.describe()}")
        m = cls(k, n, bias is not None, spec, device=codes.device, dtype=dtype, act_spec=act_spec)
        m.qweight.copy_(pack_codes(codes))
        m.scale.copy_(scale.expand(n, -1))
        if zero_point is not None:
            m.zero_point.copy_(zero_point.expand(n, -1))
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: Optional[WeightQuantConfig] = None,
                    dtype: Optional[torch.dtype] = None,
                    act_spec: Optional[ActivationQuantConfig] = None) -> "PackedLinear":
        """Post-training quantization of an ``nn.Linear`` (or GPT-2 ``Conv1D``, whose weight is [K, N])."""
        spec = WeightQuantConfig() if spec is None else spec
        w = _linear_weight(linear)
        codes, s, z = reference.quantize_weight(w.detach(), spec)
        b = getattr(linear, "bias", None)
        dtype = dtype or (w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        return cls.from_quantized(codes, s, z, None if b is None else b.detach(), spec, dtype=dtype,
                                  act_spec=act_spec)

    @classmethod
    def from_qat(cls, qat: nn.Module, dtype: Optional[torch.dtype] = None,
                 act_spec: Optional[ActivationQuantConfig] = None) -> "PackedLinear":
        """From a ``QATLinear``: the packed weight equals its fake-quantized weight exactly."""
        codes, s, z = qat.quantized_weight()
        b = qat.bias
        dtype = dtype or (qat.weight.dtype if qat.weight.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        return cls.from_quantized(codes, s, z, None if b is None else b.detach(), qat.weight_spec, dtype=dtype,
                                  act_spec=act_spec)

    # ---- math ---------------------------------------------------------------------------------------------------
    # The forward validates the packed tensors once and then runs a PackedMatmulPlan (pyquant/ops/packed_matmul.py):
    # per call only x is checked and the backend comes from a cache.  The plan is rebuilt -- the tensors validated
    # again -- whenever any of qweight / scale / zero_point / bias is not the object (or storage) it was built for
    # (load_state_dict(assign=True), .to(), meta-device materialization, attribute assignment), and after every
    # state-dict load (_load_from_state_dict below): a validated state is never trusted stale.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the checked custom op, exactly as compile has always seen it
            op = packed_matmul if self.act_spec is None else packed_matmul_a8
            return op(x, self.qweight, self.scale, self.zero_point, self.bias, in_features=self.in_features,
                      code_offset=self.spec.code_offset)
        bufs = self._buffers
        q, s, z, b = bufs["qweight"], bufs["scale"], bufs["zero_point"], self._parameters.get("bias")
        plan = self.__dict__.get("_fast_plan")
        if plan is None or not plan.matches(q, s, z, b):
            plan = self._validated_plan()
        return plan(x)

    def _validated_plan(self) -> PackedMatmulPlan:
        """Check the packed tensors (raising ValueError/TypeError naming the bad one) and cache the fast path."""
        plan = PackedMatmulPlan(self._buffers["qweight"], self._buffers["scale"], self._buffers["zero_point"],
                                self._parameters.get("bias"), self.in_features, self.spec.code_offset,
                                a8=self.act_spec is not None)
        self.__dict__["_fast_plan"] = plan  # not a submodule / buffer: bypass nn.Module.__setattr__
        return plan

    def __getstate__(self):
        # the cached plan holds bound kernel launchers (local functions, device workspaces): not picklable, and
        # rebuilt from the tensors at the first forward anyway -- torch.save(model) / pickle leave it out
        state = super().__getstate__()
        state.pop("_fast_plan", None)
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_fast_plan", None)
        super()._load_from_state_dict(*args, **kwargs)
        if not any(t.is_meta for t in self._buffers.values() if t is not None):
            self._validated_plan()  # bad tensors loaded with assign=True fail here, not at the first forward

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() convert the bias; scale and zero_point keep the format's dtype
        self.__dict__.pop("_fast_plan", None)
        return apply_keeping_dtypes(self, fn, recurse, ("scale", "zero_point"), super()._apply)

    def dequantize(self) -> torch.Tensor:
        """The effective fp32 weight [N, K] (for tests and export; the forward never builds it)."""
        return reference.dequantize_weight(unpack_codes(self.qweight, self.in_features), self.scale,
                                           self.zero_point, self.spec.code_offset)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.spec.describe()}, scale_dtype={self.spec.scale_dtype}"
                + ("" if self.act_spec is None else ", activations=int8-per-token (W2A8)"))

    # ---- state dict: the spec travels with the tensors ---------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        # A uint8 tensor holding JSON (not a dict): safetensors / save_pretrained store only tensors.
        meta = {"spec": self.spec.to_dict(), "in_features": self.in_features,
                "act_spec": None if self.act_spec is None else self.act_spec.to_dict()}
        return torch.tensor(list(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state):
        if isinstance(state, torch.Tensor):
            try:
                state = json.loads(bytes(state.to("cpu", torch.uint8).tolist()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"PackedLinear extra state is not the JSON this module writes: {e}") from None
        if not isinstance(state, dict) or "spec" not in state or "in_features" not in state:
            raise ValueError(f"PackedLinear extra state must be a dict with 'spec' and 'in_features', got {state!r}")
        spec = WeightQuantConfig.from_dict(state["spec"])
        if spec != self.spec or state["in_features"] != self.in_features:
            raise ValueError(f"state dict holds a PackedLinear with {spec.describe()} and in_features="
                             f"{state['in_features']}; this module is {self.spec.describe()} with in_features="
                             f"{self.in_features}")
        act = state.get("act_spec")
        act = None if act is None else ActivationQuantConfig.from_dict(act)
        if act != self.act_spec:
            raise ValueError(f"state dict holds a PackedLinear with act_spec={act}; this module has "
                             f"act_spec={self.act_spec}")


def _check_act_spec(act_spec) -> None:
    if act_spec is None:
        return
    if not isinstance(act_spec, ActivationQuantConfig):
        raise TypeError(f"act_spec must be an ActivationQuantConfig or None, got {type(act_spec).__name__}")
    if not act_spec.symmetric or act_spec.granularity != "token" or act_spec.clip is not None:
        raise ValueError(f"act_spec={act_spec} is not supported by the fused W2A8 op: expected "
                         "ActivationQuantConfig(bits=8, symmetric=True, granularity='token')")


def _linear_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] for nn.Linear and HF GPT-2 Conv1D (stored [in, out])."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(mod).__name__}")

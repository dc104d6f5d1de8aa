"""Import HF BitNet checkpoints (``quant_method: "bitnet"``) into pyquant's packed kernels.

``pyquant.from_bitnet(path, **from_pretrained_kwargs)`` loads a checkpoint written by transformers' BitNet
integration (both ``linear_class`` variants it ships, ``quantization_mode="offline"``) through ``from_pretrained``
with the ``"pyquant"`` quantizer: each BitNet layer is first built as a small loading module holding exactly the
checkpoint's tensors (``weight`` as stored -- uint8 packed or ternary float -- and ``weight_scale``), so transformers'
loader (``dtype``, ``device_map``, tied weights, non-persistent buffers) works unchanged; after the load every such
layer is repacked, one at a time, into a :class:`~pyquant.nn.PackedLinear` (ternary codes ``c = w + 1`` in pyquant's
layout, one fp32 scale per tensor).  The returned model is an ordinary pyquant packed model: ``save_pretrained``
writes a ``"pyquant"`` checkpoint that ``from_pretrained`` reloads after ``import pyquant``.

Layouts read (transformers 5.17-5.24 ``integrations/bitnet.py``):

* ``"bitlinear"``: ``weight`` uint8 ``[N/4, K]``, value ``v`` of output row ``j*N/4 + i`` in bits ``2j..2j+1`` of
  ``weight[i]`` as ``v + 1``; ``weight_scale`` one value; ``y = (x_q @ v^T) / (s_x * weight_scale)``, so the
  effective weight is ``v / weight_scale`` -> pyquant scale ``1 / weight_scale`` (computed in fp32: ``v`` is in
  {-1, 0, 1}, so ``v * fl(1/ws)`` equals ``v / ws`` rounded once, bit for bit).
* ``"autobitlinear"`` (offline): ``weight`` packed as above (the published checkpoints) or the ternary values as
  floats ``[N, K]`` (what transformers writes when it saves an AutoBitLinear model); ``y = (x_q @ v^T + b) *
  weight_scale`` -> pyquant scale ``weight_scale`` and bias ``b * weight_scale`` (fp32; HF rounds the sum before
  scaling, so with a bias the outputs agree to fp32 rounding, not bit for bit).

Activations: both classes quantize the input per token to 8 bits, symmetric, from the token's absmax -- pyquant's
``ActivationQuantConfig()`` (the fused W2A8 op).  Differences, all at rounding level: HF computes
``round_half_even(x * (127 / max(absmax, 1e-5)))`` and pyquant ``floor(x / (absmax / 127) + 0.5)``; a code differs
only when ``x * 127 / absmax`` lands within float rounding of a half-integer (then by one level), and a token with
absmax < 1e-5 is scaled differently (both give ~0).  HF's clamp to -128 is never reached (|x_q| <= 127 by
construction).  The weights are bit-identical; logits agree to fp32 rounding except where such a tie flips one
activation code.

Refused with a ValueError naming the field or tensor: ``quant_method`` other than ``"bitnet"``,
``quantization_mode="online"`` (the checkpoint stores full-precision weights, quantized at every forward),
``use_rms_norm=True`` (BitLinear's own input RMSNorm), an unknown ``linear_class``, and any tensor whose dtype or
shape is not one of the layouts above (``out_features`` not divisible by 4, scale not a single value, a code 3,
non-ternary float weights, non-finite or zero scales).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..formats import ActivationQuantConfig, WeightQuantConfig
from ..nn.packed_linear import PackedLinear

__all__ = ["from_bitnet", "BITNET_SPEC", "BITNET_ACT", "unpack_bitnet_codes"]

BITNET_SPEC = WeightQuantConfig(method="absmean", granularity="tensor", scale_dtype="float32")
BITNET_ACT = ActivationQuantConfig(bits=8, symmetric=True, granularity="token")
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
_FLOATS = ("F16", "BF16", "F32", "F64")
_ST_TO_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "U8": torch.uint8}


def check_bitnet_config(qc) -> dict:
    """The BitNet quantization_config as a dict, validated (ValueError naming the unsupported field)."""
    if qc is None:
        raise ValueError("the checkpoint's config.json has no quantization_config: it is not a BitNet checkpoint")
    d = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    qm = getattr(d.get("quant_method"), "value", d.get("quant_method"))
    if qm != "bitnet":
        raise ValueError(f"quantization_config.quant_method={qm!r}: from_bitnet reads 'bitnet' checkpoints only")
    lc = d.get("linear_class", "bitlinear")
    if lc not in LINEAR_CLASSES:
        raise ValueError(f"quantization_config.linear_class={lc!r} is not a BitNet layout pyquant reads: expected one "
                         f"of {LINEAR_CLASSES}")
    mode = d.get("quantization_mode", "offline")
    if mode != "offline":
        raise ValueError(f"quantization_config.quantization_mode={mode!r} is not supported: an 'online' BitNet "
                         f"checkpoint stores full-precision weights (quantized at every forward), not packed ternary "
                         f"ones -- drop its quantization_config and load it with "
                         f"quantization_config=PyquantConfig(weight=WeightQuantConfig(method='absmean', "
                         f"granularity='tensor')) for post-training ternarization")
    if d.get("use_rms_norm", False):
        raise ValueError("quantization_config.use_rms_norm=True is not supported: BitLinear then normalises its input "
                         "with its own RMSNorm, which pyquant's packed layer does not carry")
    d["quant_method"] = "bitnet"
    d["linear_class"], d["quantization_mode"] = lc, mode
    return d


class BitNetLoading(nn.Module):
    """Loading-time stand-in for a BitNet layer: the checkpoint's tensors exactly as stored (replaced by a
    PackedLinear right after the load)."""

    def __init__(self, in_features: int, out_features: int, weight_dtype: torch.dtype, weight_shape: Tuple[int, ...],
                 scale_dtype: torch.dtype, scale_shape: Tuple[int, ...], bias: bool, bias_dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(weight_shape, dtype=weight_dtype, device=device))
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=scale_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    def forward(self, x):  # pragma: no cover - replaced before the model is returned
        raise RuntimeError("BitNetLoading is a loading-time placeholder")


def expected_layout(name: str, in_features: int, out_features: int, header: Dict[str, Tuple[str, tuple]],
                    key_of) -> Tuple[str, tuple, str, tuple]:
    """(weight dtype, weight shape, scale dtype, scale shape) of a BitNet layer in the checkpoint, validated."""
    wk, sk = key_of(f"{name}.weight"), key_of(f"{name}.weight_scale")
    if wk is None:
        raise ValueError(f"{name}.weight is missing from the BitNet checkpoint")
    wdt, wsh = header[wk]
    sdt, ssh = header[sk]
    n, k = out_features, in_features
    if wdt == "U8":
        if n % 4 or wsh != (n // 4, k):
            raise ValueError(f"unsupported BitNet layout: {wk} is U8{list(wsh)}, expected the packed "
                             f"[{n}/4, {k}] = [{n / 4:g}, {k}] of a [{n}, {k}] layer (out_features divisible by 4)")
    elif wdt in _FLOATS:
        if wsh != (n, k):
            raise ValueError(f"unsupported BitNet layout: {wk} is {wdt}{list(wsh)}, expected [{n}, {k}]")
    else:
        raise ValueError(f"unsupported BitNet layout: {wk} has dtype {wdt}, expected U8 (packed) or a float dtype")
    if sdt not in _FLOATS or math.prod(ssh) != 1:
        raise ValueError(f"unsupported BitNet layout: {sk} is {sdt}{list(ssh)}, expected one float value "
                         f"(a per-tensor scale)")
    return wdt, wsh, sdt, ssh


def unpack_bitnet_codes(packed: torch.Tensor) -> torch.Tensor:
    """HF BitNet packing (uint8 [N/4, K], row-chunked) -> codes uint8 [N, K] in {0, 1, 2} (value + 1)."""
    p = packed.shape[0]
    codes = torch.empty((4 * p, packed.shape[1]), dtype=torch.uint8, device=packed.device)
    for j in range(4):
        codes[j * p:(j + 1) * p] = (packed >> (2 * j)) & 3
    return codes


@torch.no_grad()
def to_packed(name: str, mod: BitNetLoading, linear_class: str, dtype: Optional[torch.dtype]) -> PackedLinear:
    """Repack one loaded BitNet layer into a PackedLinear with bit-identical effective weights."""
    w = mod.weight
    if w.dtype == torch.uint8:
        codes = unpack_bitnet_codes(w)
        if bool((codes == 3).any()):
            raise ValueError(f"unsupported BitNet layout: {name}.weight holds the 2-bit code 3 (value 2), which is not "
                             f"ternary")
    else:
        if not bool(((w == -1) | (w == 0) | (w == 1)).all()):
            raise ValueError(f"unsupported BitNet layout: {name}.weight is {w.dtype} but not ternary (values other "
                             f"than -1, 0, 1)")
        codes = (w.to(torch.int8) + 1).to(torch.uint8)
    ws = mod.weight_scale.reshape(1, 1).to(torch.float32)
    if not bool(torch.isfinite(ws).all()) or float(ws) == 0.0:
        raise ValueError(f"{name}.weight_scale={float(ws)!r} is not a finite non-zero scale")
    scale = 1.0 / ws if linear_class == "bitlinear" else ws
    bias = mod.bias
    if bias is not None and linear_class == "autobitlinear":
        bias = (bias.float() * ws.reshape(())).to(bias.dtype)  # AutoBitLinear scales (x W^T + b) by weight_scale
    out_dtype = dtype if dtype is not None else (bias.dtype if bias is not None and bias.is_floating_point()
                                                 else torch.float32)
    return PackedLinear.from_quantized(codes, scale, None, None if bias is None else bias.to(out_dtype),
                                       BITNET_SPEC, dtype=out_dtype, act_spec=BITNET_ACT)


def from_bitnet(pretrained_model_name_or_path, model_class=None, **kwargs):
    """Load an HF BitNet checkpoint straight into pyquant's packed layers (see the module doc).

    model_class: the transformers class to build (default ``AutoModelForCausalLM``); ``kwargs`` go to its
    ``from_pretrained`` (``dtype``, ``device_map``, ``low_cpu_mem_usage``, ``revision`` ...), except
    ``quantization_config`` (the checkpoint's own BitNet config is read and converted).
    """
    from transformers import AutoConfig
    from .hf import PyquantConfig
    if "quantization_config" in kwargs:
        raise ValueError("from_bitnet reads the checkpoint's own BitNet quantization_config; do not pass "
                         "quantization_config")
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code",
                                  "subfolder") if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
    bitnet = check_bitnet_config(getattr(config, "quantization_config", None))
    config.quantization_config = PyquantConfig(weight=BITNET_SPEC, activation=BITNET_ACT, state="packed",
                                               modules=[], bitnet=bitnet).to_dict()
    return model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)

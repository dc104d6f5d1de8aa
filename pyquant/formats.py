"""Quantization formats: the specs, and the 2-bit packed layout, in one place.

Every weight format in pyquant stores a weight as a 2-bit *code* ``c`` in {0, 1, 2, 3} plus a per-group scale ``s``
(and, for asymmetric formats, a per-group float zero point ``z``).  The effective (dequantized) weight is always

    w_hat = (c - z) * s

where ``z`` is the format's constant *code offset* for symmetric formats:

=====================  ========  ===========  ==================================
method                 levels    code offset  values of (c - z)
=====================  ========  ===========  ==================================
``twn``                3         1            {-1, 0, +1}
``absmean``            3         1            {-1, 0, +1}
``seq`` (levels=3)     3         1            {-1, 0, +1}   (s = 2/3 * alpha)
``seq`` (levels=4)     4         1.5          {-1.5, -0.5, 0.5, 1.5} (s = alpha / 2)
``uniform`` sym        4         2            {-2, -1, 0, 1}
``uniform`` asym       4         per group    {0, 1, 2, 3} - z
=====================  ========  ===========  ==================================

so one dequantization rule serves every kernel.

Packed layout (the one and only definition; kernels in ``kernels/`` and ``csrc/`` rely on it)
------------------------------------------------------------------------------------------
For a weight ``W`` of shape ``[N, K]`` (``nn.Linear`` convention: out_features x in_features):

* ``qweight``: ``torch.uint8`` of shape ``[N, packed_cols(K)]`` with ``packed_cols(K) = ceil(K / 64) * 16``, so every
  row is a whole number of 16-byte vectors (the CUDA kernel reads rows with 16-byte loads).  Weight ``W[n, k]`` lives
  in byte ``qweight[n, k // 4]`` at bits ``2 * (k % 4)`` and ``2 * (k % 4) + 1`` (little-endian within the byte:
  k % 4 == 0 is the lowest pair).  Bytes past ``K`` are zero; kernels never read codes past ``K``
  (they mask x there).
* ``scale``: shape ``[N, K // group_size]`` in the spec's ``scale_dtype``.  Per-channel and per-tensor formats use
  ``group_size = K`` (shape ``[N, 1]``; per-tensor repeats one value), so kernels only know about groups.
* ``zero_point``: same shape and dtype as ``scale`` for asymmetric formats, else absent (the constant code offset
  above is used).

Rounding is "half up" (``floor(v + 0.5)``) everywhere, in the reference and in every kernel, so codes agree exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = [
    "WeightQuantConfig",
    "ActivationQuantConfig",
    "PackedWeight",
    "packed_cols",
    "group_size_of",
    "validate_packed",
    "pack_codes",
    "unpack_codes",
    "WEIGHT_METHODS",
    "GRANULARITIES",
    "SCALE_DTYPES",
]

WEIGHT_METHODS = ("twn", "absmean", "uniform", "seq")
GRANULARITIES = ("tensor", "channel", "group")
GROUP_SIZES = (32, 64, 128, 256)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCALE_GRADS = ("lsq", "pact")


def _fail(cls: str, name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: expected {expected}")


class _SpecMixin:
    """dict/JSON round trip shared by the specs (fields are plain JSON types)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class WeightQuantConfig(_SpecMixin):
    """How a weight matrix ``[N, K]`` is quantized to 2-bit codes.

    method:
        ``"twn"``: ternary weight networks, per group Delta = 0.7 * mean|W|, alpha = mean(|W| where |W| > Delta),
        w_hat = alpha * sign(W) * [|W| > Delta]  (as in the TernaryBERT / EMNLP'22 KD-QAT code).
        ``"absmean"``: BitNet b1.58, s = mean|W|, w_hat = s * clamp(round(W / s), -1, 1).
        ``"uniform"``: 2-bit uniform, min-max init.  symmetric: s = max|W| / 1.5, q = clamp(round(W/s), -2, 1);
        asymmetric: s = (max - min) / 3, z = -min / s, c = clamp(round(W/s + z), 0, 3), with the [min, max] range
        extended to include 0 (so z lies in [0, 3] and stays finite in a 16-bit scale_dtype).
        ``"seq"``: ParetoQ's stretched elastic quant, alpha = max|W| at init; levels=4 -> alpha*{+-1/4, +-3/4},
        levels=3 -> alpha*{-2/3, 0, 2/3}.
    bits: storage bits per weight; pyquant stores every format in 2 bits (ternary is 1.58-bit in a 2-bit code).
    levels: 3 (ternary) or 4 (2-bit).  Derived from the method when None; only ``seq`` offers both.
    symmetric: only ``uniform`` may be asymmetric (float zero point per group).
    granularity: ``"tensor"``, ``"channel"`` (one scale per output row) or ``"group"`` (``group_size`` along K).
    clip: optional weight clipping to [-clip, clip] before quantization (the EMNLP'22 code uses 2.5); gradients
        are zero outside the clip range.
    learnable_scale: keep the scale as a trainable parameter (initialised by the method's rule).  With a learnable
        scale every method quantizes as c = clamp(round(W/s + z), 0, levels-1) (TWN's threshold becomes s/2).
    scale_grad: ``"lsq"`` (LSQ gradient with the 1/sqrt(N*Q_P) gradient scale) or ``"pact"`` (only clipped
        weights contribute, as PACT's clip-value gradient).
    scale_dtype: dtype of stored scales (and zero points).  Fake-quant rounds scales through it too, so the QAT
        model sees exactly the weights the packed model will use.
    """

    method: str = "twn"
    bits: int = 2
    levels: Optional[int] = None
    symmetric: bool = True
    granularity: str = "channel"
    group_size: Optional[int] = None
    clip: Optional[float] = None
    learnable_scale: bool = False
    scale_grad: str = "lsq"
    scale_dtype: str = "float16"

    def __post_init__(self):
        n = type(self).__name__
        if not isinstance(self.method, str) or self.method not in WEIGHT_METHODS:
            _fail(n, "method", self.method, f"one of {WEIGHT_METHODS}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            _fail(n, "bits", self.bits, "an int")
        if self.method in ("twn", "absmean") and self.bits != 2:
            _fail(n, "bits", self.bits, f"2 for ternary method {self.method!r} (ternary values are stored in 2 bits)")
        if self.bits != 2:
            _fail(n, "bits", self.bits, "2 (pyquant packs 2 bits per weight)")
        allowed_levels = {"twn": (3,), "absmean": (3,), "uniform": (4,), "seq": (3, 4)}[self.method]
        if self.levels is None:
            object.__setattr__(self, "levels", allowed_levels[-1])
        elif isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels not in allowed_levels:
            _fail(n, "levels", self.levels, f"one of {allowed_levels} for method {self.method!r}")
        if not isinstance(self.symmetric, bool):
            _fail(n, "symmetric", self.symmetric, "a bool")
        if not self.symmetric and self.method != "uniform":
            _fail(n, "symmetric", self.symmetric, f"True for method {self.method!r} (only 'uniform' is asymmetric)")
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            _fail(n, "granularity", self.granularity, f"one of {GRANULARITIES}")
        if self.granularity == "group":
            if self.group_size is None:
                object.__setattr__(self, "group_size", 128)
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                    or self.group_size not in GROUP_SIZES:
                _fail(n, "group_size", self.group_size, f"one of {GROUP_SIZES} for granularity='group'")
        elif self.group_size is not None:
            _fail(n, "group_size", self.group_size, f"None for granularity={self.granularity!r}")
        if self.clip is not None:
            if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (self.clip > 0) \
                    or not math.isfinite(self.clip):
                _fail(n, "clip", self.clip, "None or a finite float > 0")
            object.__setattr__(self, "clip", float(self.clip))
        if not isinstance(self.learnable_scale, bool):
            _fail(n, "learnable_scale", self.learnable_scale, "a bool")
        if not isinstance(self.scale_grad, str) or self.scale_grad not in SCALE_GRADS:
            _fail(n, "scale_grad", self.scale_grad, f"one of {SCALE_GRADS}")
        if not isinstance(self.scale_dtype, str) or self.scale_dtype not in SCALE_DTYPES:
            _fail(n, "scale_dtype", self.scale_dtype, f"one of {tuple(SCALE_DTYPES)}")

    # ---- derived properties used by kernels and modules -------------------------------------------------------
    @property
    def ternary(self) -> bool:
        return self.levels == 3

    @property
    def max_code(self) -> int:
        return self.levels - 1

    @property
    def code_offset(self) -> Optional[float]:
        """Constant z of symmetric formats (None for asymmetric: z is stored per group)."""
        if not self.symmetric:
            return None
        if self.levels == 3:
            return 1.0
        return 1.5 if self.method == "seq" else 2.0

    @property
    def qn(self) -> float:
        """Magnitude of the most negative level in units of s (LSQ's Q_N)."""
        return self.code_offset if self.symmetric else 0.0

    @property
    def qp(self) -> float:
        """Most positive level in units of s (LSQ's Q_P)."""
        return self.max_code - self.code_offset if self.symmetric else float(self.max_code)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def resolve_group_size(self, in_features: int) -> int:
        """The group size along K that kernels use (K itself for per-tensor / per-channel)."""
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features={in_features!r} is invalid: expected a positive int")
        if self.granularity != "group":
            return in_features
        if in_features % self.group_size:
            raise ValueError(
                f"in_features={in_features} is not divisible by {type(self).__name__}.group_size={self.group_size}"
            )
        return self.group_size

    def describe(self) -> str:
        name = {"twn": "ternary-TWN", "absmean": "ternary-absmean", "uniform": "int2", "seq": "SEQ"}[self.method]
        if self.method == "seq":
            name += "-ternary" if self.ternary else "-2bit"
        if self.method == "uniform":
            name += "-sym" if self.symmetric else "-asym"
        gran = f"group{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
        return f"{name}, {gran}"


@dataclass(frozen=True)
class ActivationQuantConfig(_SpecMixin):
    """Dynamic activation fake-quant (W2A8 setting): min-max per tensor or per token, recomputed every call.

    symmetric: s = max|x| / 127, q = clamp(round(x/s), -127, 127).
    asymmetric: s = (max - min) / 255, z = round(-min / s), q = clamp(round(x/s) + z, 0, 255), x_hat = (q - z) s,
    with the [min, max] range extended to include 0 (so z lies in [0, 255] and no value is clipped).
    The backward pass is the straight-through estimator (nothing is clipped by a dynamic min-max range).

    clip: optional clipping of x to [-clip, clip] *before* the min-max range is taken (the EMNLP'22 KD-QAT setting
    uses ``ActivationQuantConfig(clip=2.5, granularity="tensor")``: MarsJacobs/kd-qat-large-enc
    ``transformer/utils_quant.py`` lines 28-29 clip, 32 max|x| of the clipped tensor, 43-44 s = 127 / max,
    round(x * s) / s; pyquant's s = max / 127 and q = round_half_up(x / s) are the same grid (``torch.round`` ties
    to even there, pyquant rounds ties up: they differ only on exact .5 ties).  The straight-through gradient is
    then zero where the *unclipped* x has ``|x| >= clip`` (lines 57-58 use ``ge`` / ``le``: at exactly +-clip the
    gradient is zero too).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "token"
    clip: Optional[float] = None

    def __post_init__(self):
        n = type(self).__name__
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits != 8:
            _fail(n, "bits", self.bits, "8")
        if not isinstance(self.symmetric, bool):
            _fail(n, "symmetric", self.symmetric, "a bool")
        if not isinstance(self.granularity, str) or self.granularity not in ("tensor", "token"):
            _fail(n, "granularity", self.granularity, "'tensor' or 'token'")
        if self.clip is not None:
            if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (self.clip > 0) \
                    or not math.isfinite(self.clip):
                _fail(n, "clip", self.clip, "None or a finite float > 0")
            object.__setattr__(self, "clip", float(self.clip))


def packed_cols(in_features: int) -> int:
    """Bytes per packed row: ceil(K / 64) * 16 (rows are whole 16-byte vectors)."""
    return -(-in_features // 64) * 16


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in {0..3} of shape [N, K] into uint8 [N, packed_cols(K)] (layout in the module doc)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 3):
        raise ValueError("codes must lie in [0, 3]")
    n, k = codes.shape
    kp = packed_cols(k) * 4
    c = torch.zeros(n, kp, dtype=torch.uint8, device=codes.device)
    c[:, :k] = codes.to(torch.uint8)
    c = c.view(n, kp // 4, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [N, packed_cols(K)] -> uint8 codes [N, K]."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D torch.uint8 tensor, got {_desc(packed)}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
        raise ValueError(f"in_features={in_features!r} is invalid: expected a positive int")
    if packed.shape[1] != packed_cols(in_features):
        raise ValueError(
            f"packed has {packed.shape[1]} columns but in_features={in_features} needs packed_cols={packed_cols(in_features)}"
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(packed.shape[0], -1)[:, :in_features].contiguous()


@dataclass
class PackedWeight:
    """A packed 2-bit weight: what ``PackedLinear`` stores and what packed-matmul kernels consume."""

    qweight: torch.Tensor  # uint8 [N, packed_cols(K)]
    scale: torch.Tensor  # [N, K // group_size]
    zero_point: Optional[torch.Tensor]  # like scale, asymmetric only
    in_features: int
    group_size: int
    spec: WeightQuantConfig = field(repr=False)

    def __post_init__(self):
        validate_packed(self.qweight, self.scale, self.zero_point, self.in_features, self.group_size)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def code_offset(self) -> Optional[float]:
        return self.spec.code_offset

    def nbytes(self) -> int:
        n = self.qweight.numel() + self.scale.numel() * self.scale.element_size()
        if self.zero_point is not None:
            n += self.zero_point.numel() * self.zero_point.element_size()
        return n


def validate_packed(qweight, scale, zero_point, in_features: int, group_size: int) -> None:
    """Check a packed weight's tensors against each other; raise ValueError/TypeError naming the argument."""
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be a 2-D torch.uint8 tensor, got {_desc(qweight)}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
        raise ValueError(f"in_features={in_features!r} is invalid: expected a positive int")
    if qweight.shape[1] != packed_cols(in_features):
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)}; in_features={in_features} needs [N, {packed_cols(in_features)}]"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing in_features={in_features}")
    want = (qweight.shape[0], in_features // group_size)
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != want or scale.dtype not in SCALE_DTYPES.values():
        raise ValueError(f"scale must be a float16/bfloat16/float32 tensor of shape {want}, got {_desc(scale)}")
    if scale.device != qweight.device:
        raise ValueError(f"scale is on {scale.device} but qweight is on {qweight.device}")
    if zero_point is not None:
        if not isinstance(zero_point, torch.Tensor) or tuple(zero_point.shape) != want \
                or zero_point.dtype != scale.dtype or zero_point.device != qweight.device:
            raise ValueError(
                f"zero_point must match scale (shape {want}, {scale.dtype}, {qweight.device}), got {_desc(zero_point)}"
            )


def group_size_of(scale, in_features: int) -> int:
    """The group size implied by a scale tensor [N, K // group_size]; ValueError if it implies none."""
    if not isinstance(scale, torch.Tensor) or scale.dim() != 2 or scale.shape[1] == 0 \
            or in_features % scale.shape[1]:
        raise ValueError(f"scale must be 2-D [N, K // group_size] with K={in_features}, got {_desc(scale)}")
    return in_features // scale.shape[1]


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return type(t).__name__

"""Quantized word embeddings: ``QATEmbedding`` (fake-quant for QAT) and ``PackedEmbedding`` (2-bit codes; gather +
dequantize).

The EMNLP'22 KD-QAT setting quantizes the word embeddings with TWN *per row* (one alpha and threshold per token
vector): MarsJacobs/kd-qat-large-enc ``transformer/utils_quant.py`` lines 285-316 (``QuantizeEmbedding``,
``layerwise=False``) and lines 144-152 (row-wise branch of ``TwnQuantizer``).  A weight ``[V, D]`` is one ``[N, K]``
matrix in pyquant's convention (``pyquant/formats.py``), so per row = ``granularity="channel"``; the math is the
weight fake-quant op (``pyquant.ops.fake_quant_weight``, STE, zero gradient outside the weight clip).

``PackedEmbedding`` stores the codes in the packed layout of ``pyquant/formats.py`` ([V, packed_cols(D)] uint8) and
the per-row scales; its forward gathers the rows of the looked-up ids and dequantizes them
(``(code - 1) * scale``), so its output equals the QAT embedding's bit for bit (same codes and scales) while it holds
2 bits per weight plus one scale per row.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import WeightQuantConfig, pack_codes, packed_cols, unpack_codes
from ..ops import fake_quant_weight, quantize_weight
from .packed_linear import apply_keeping_dtypes

__all__ = ["QATEmbedding", "PackedEmbedding", "check_embedding_spec"]


def check_embedding_spec(spec) -> WeightQuantConfig:
    if not isinstance(spec, WeightQuantConfig):
        raise TypeError(f"embedding spec must be a WeightQuantConfig, got {type(spec).__name__}")
    if spec.granularity != "channel" or not spec.symmetric or spec.learnable_scale:
        raise ValueError(f"embedding spec {spec.describe()} is not supported: embeddings are quantized per row "
                         "(granularity='channel', symmetric, no learnable scale), e.g. WeightQuantConfig("
                         "method='twn', granularity='channel', clip=2.5)")
    return spec


class QATEmbedding(nn.Module):
    """``nn.Embedding`` with per-row weight fake-quant; shares the wrapped embedding's weight Parameter."""

    def __init__(self, emb: nn.Embedding, spec: WeightQuantConfig):
        super().__init__()
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"QATEmbedding wraps an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("QATEmbedding: embeddings with max_norm or sparse=True are not supported")
        self.spec = check_embedding_spec(spec)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.scale_grad_by_freq = emb.scale_grad_by_freq
        self.weight = emb.weight
        self.fake_quant_weight_enabled = True

    def fake_quant_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.spec)

    @torch.no_grad()
    def quantized_weight(self):
        """(codes uint8 [V, D], scale fp32 [V, 1]) by the op the forward uses."""
        codes, s, _ = quantize_weight(self.weight.detach(), self.spec)
        return codes, s

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant_weight() if self.fake_quant_weight_enabled else self.weight
        return F.embedding(ids, w, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.spec.describe()} (per row)"


class PackedEmbedding(nn.Module):
    """2-bit packed embedding table: ``qweight`` uint8 [V, packed_cols(D)] + ``scale`` [V, 1]; forward = gather the
    looked-up rows, unpack, ``(code - code_offset) * scale``, in ``dtype``."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, embedding_dim: int, spec: WeightQuantConfig,
                 padding_idx: Optional[int] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = check_embedding_spec(spec)
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2 \
                or qweight.shape[1] != packed_cols(embedding_dim):
            raise ValueError(f"qweight must be uint8 [V, {packed_cols(embedding_dim)}], got "
                             f"{getattr(qweight, 'shape', type(qweight).__name__)}")
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (qweight.shape[0], 1):
            raise ValueError(f"scale must be [{qweight.shape[0]}, 1], got {getattr(scale, 'shape', scale)}")
        self.num_embeddings, self.embedding_dim = qweight.shape[0], int(embedding_dim)
        self.padding_idx, self.dtype = padding_idx, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.to(spec.torch_scale_dtype))

    @classmethod
    @torch.no_grad()
    def from_qat(cls, q: QATEmbedding) -> "PackedEmbedding":
        codes, s = q.quantized_weight()
        return cls(pack_codes(codes), s, q.embedding_dim, q.spec, q.padding_idx, dtype=q.weight.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half(): the output dtype follows (probed on an empty tensor of the current output
        # dtype), the per-row scales keep the format's dtype and only change device
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.scale.device))
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return apply_keeping_dtypes(self, fn, recurse, ("scale",), super()._apply)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * self.scale.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an int64/int32 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        flat = ids.reshape(-1)
        codes = unpack_codes(self.qweight.index_select(0, flat), self.embedding_dim).float()
        s = self.scale.index_select(0, flat).float()
        out = (codes - self.spec.code_offset) * s
        return out.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, weight={self.spec.describe()} (per row), "
                f"{self.nbytes():,} bytes")

"""Thin modules: parameters and buffers, the math lives in ``pyquant.ops``."""
from .embedding import PackedEmbedding, QATEmbedding
from .packed_linear import PackedLinear
from .qat_linear import QATLinear

__all__ = ["PackedEmbedding", "PackedLinear", "QATEmbedding", "QATLinear"]

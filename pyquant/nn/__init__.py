"""Thin modules: parameters and buffers, the math lives in ``pyquant.ops``."""
from .experts import PackedExpertsMixin, QATExpertsMixin
from .packed_linear import PackedLinear
from .qat_linear import QATLinear

__all__ = ["PackedLinear", "QATLinear", "QATExpertsMixin", "PackedExpertsMixin"]

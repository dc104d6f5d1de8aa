"""Thin modules: parameters and buffers, the math lives in ``pyquant.ops``."""
from .packed_linear import PackedLinear

__all__ = ["PackedLinear"]

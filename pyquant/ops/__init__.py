"""pyquant ops: each defined once with ``torch.library`` (custom op + fake), implemented per backend.

See ``_dispatch`` for backend selection (``use_backend``, ``PYQUANT_BACKEND``).  Importing this package defines the
ops; it imports no kernel module and never initializes CUDA (kernels load on the first call that needs them).
"""
from ._dispatch import BACKENDS, backend_order, backend_status, last_backend, register, registered, use_backend
from .packed_matmul import packed_matmul

__all__ = [
    "BACKENDS",
    "backend_order",
    "backend_status",
    "last_backend",
    "register",
    "registered",
    "use_backend",
    "packed_matmul",
]

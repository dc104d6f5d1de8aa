"""pyquant ops: each defined once with ``torch.library`` (custom op + fake), implemented per backend.

See ``_dispatch`` for backend selection (``use_backend``, ``PYQUANT_BACKEND``).  Importing this package defines the
ops; it imports no kernel module and never initializes CUDA (kernels load on the first call that needs them).
"""
from ._dispatch import BACKENDS, backend_order, backend_status, last_backend, register, registered, use_backend
from .packed_matmul import packed_matmul, packed_matmul_a8  # noqa: F401  (W2A8 entry)
from .attention_kd import attention_map_kl  # noqa: F401  (listed in __all__ below)
from .fake_quant import fake_quant_activation, fake_quant_weight, fake_quant_weight_backward, quantize_weight
from .grouped_packed_matmul import grouped_packed_matmul  # noqa: F401  (MoE experts)

__all__ = [
    "BACKENDS",
    "backend_order",
    "backend_status",
    "last_backend",
    "register",
    "registered",
    "use_backend",
    "packed_matmul",
    "grouped_packed_matmul",
    "attention_map_kl",
    "quantize_weight",
    "fake_quant_weight",
    "fake_quant_weight_backward",
    "fake_quant_activation",
]

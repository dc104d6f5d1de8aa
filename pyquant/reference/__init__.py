"""Pure-PyTorch ground truth of every pyquant op; also the CPU fallback backend.

One module per family, re-exported here so ``pyquant.reference.<op>`` is the single name to look for:
``quant`` (quantize / dequantize / fake-quant + STE backward), ``matmul`` (packed matmul),
``attention`` (attention-map KL, attention-output MSE, score MSE), ``distill`` (logit KD, TSLD, hidden MSE),
``grouped`` (the grouped packed matmul of MoE experts).
"""
from .attention import *  # noqa: F401,F403
from .distill import *  # noqa: F401,F403
from .matmul import *  # noqa: F401,F403
from .grouped import *  # noqa: F401,F403
from .quant import *  # noqa: F401,F403

"""``packed_matmul``: y = x @ dequant(Wq).T + b with W at 2 bits/weight (layout: ``pyquant/formats.py``).

Defined once as the torch.library op ``pyquant::packed_matmul`` (traceable by ``torch.compile`` through its fake
implementation); backends register below.  The public wrapper validates arguments and flattens x to 2-D.

``pyquant::packed_matmul_a8`` is the W2A8 entry (the setting of the EMNLP'22 KD-QAT paper and BitNet): x is
quantized per token to int8 (dynamic symmetric min-max, ``pyquant.reference.packed_matmul_a8``) before the product.

Backends: ``cuda`` (``pyquant._C.packed_gemv``, decode M = 1..8, fp16/bf16 x), ``triton`` (``kernels/packed_matmul.py``:
split-K GEMV for 16-bit x with M <= 3 and W2A8 with M <= 8, tl.dot GEMM above) and ``reference``.  The backward
pass (gradient w.r.t. x and bias; the packed weight is frozen) dequantizes once in PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..formats import group_size_of, validate_packed
from ._dispatch import call, dispatch_state, kernel_module, note_backend, register, resolve_bound

__all__ = ["packed_matmul", "packed_matmul_a8", "check_packed_matmul_args", "check_packed_weight_args",
           "PackedMatmulPlan"]

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("pyquant::packed_matmul", mutates_args=())
def _packed_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    code_offset: Optional[float],
) -> torch.Tensor:
    return call("packed_matmul", x, qweight, scale, zero_point, bias, in_features, code_offset)


@_packed_matmul_op.register_fake
def _(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, zero_point, bias, in_features, code_offset = inputs
    ctx.save_for_backward(qweight, scale, zero_point)
    ctx.in_features, ctx.code_offset, ctx.x_dtype = in_features, code_offset, x.dtype
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # Gradient w.r.t. x only (the packed weight is frozen): dequantize once, in x's dtype.
    qweight, scale, zero_point = ctx.saved_tensors
    w = reference.dequantize_packed(qweight, scale, zero_point, ctx.in_features, ctx.code_offset)
    gx = (grad.float() @ w).to(ctx.x_dtype)
    gb = grad.float().sum(0).to(ctx.bias_dtype) if ctx.bias_grad else None
    return gx, None, None, None, gb, None, None


_packed_matmul_op.register_autograd(_backward, setup_context=_setup_context)


@register("packed_matmul", "reference")
def _reference_impl(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return reference.packed_matmul(x, qweight, scale, zero_point, bias, in_features, code_offset)


# ---- W2A8: int8 per-token activations --------------------------------------------------------------------------
@torch.library.custom_op("pyquant::packed_matmul_a8", mutates_args=())
def _packed_matmul_a8_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    in_features: int,
    code_offset: Optional[float],
) -> torch.Tensor:
    return call("packed_matmul_a8", x, qweight, scale, zero_point, bias, in_features, code_offset)


@_packed_matmul_a8_op.register_fake
def _(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return x.new_empty(x.shape[0], qweight.shape[0])


# Dynamic min-max activation quantization clips nothing, so its straight-through gradient is the identity and the
# backward is the one of packed_matmul.
_packed_matmul_a8_op.register_autograd(_backward, setup_context=_setup_context)


@register("packed_matmul_a8", "reference")
def _reference_a8_impl(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return reference.packed_matmul_a8(x, qweight, scale, zero_point, bias, in_features, code_offset)


# ---- triton backend (kernels imported lazily, on the first call that selects it) -------------------------------
def _kernels():
    return kernel_module("packed_matmul")


def _triton_supports(x, qweight, scale, zero_point, bias, in_features, code_offset):
    gs = in_features // scale.shape[1]
    if scale.shape[1] > 1 and gs % 16:
        return False, f"group_size={gs} (the Triton kernels need a multiple of 16, or one group per row)"
    if x.stride(-1) != 1:
        return False, "x is not contiguous along K"
    return True, "ok"


def _all_contiguous(*ts) -> bool:
    return all(t is None or t.is_contiguous() for t in ts)


def _bind_triton(a8: bool):
    """``bind`` of the Triton backends (see ``_dispatch.register``): contiguous weight tensors get the kernel
    module's ``BoundPackedMatmul`` (checked once, then output allocation + launch per call); others keep the checked
    per-call path with its ``.contiguous()`` copies (a copy made once here would go stale when the buffer is
    modified in place)."""
    def bind(x, qweight, scale, zero_point, bias, in_features, code_offset):
        if not _all_contiguous(qweight, scale, zero_point, bias):
            impl = _triton_a8_impl if a8 else _triton_impl
            return lambda x2: impl(x2, qweight, scale, zero_point, bias, in_features, code_offset)
        km = _kernels()
        # checks, kernel choice, constexprs and the argument tuple worked out once for this weight and x shape
        return km.BoundPackedMatmul(x, qweight, scale, zero_point, bias, in_features, code_offset, a8=a8).run

    return bind


@register("packed_matmul", "triton", supports=_triton_supports, bind=_bind_triton(False))
def _triton_impl(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return _kernels().packed_matmul(x, qweight.contiguous(), scale.contiguous(), None if zero_point is None else
                                    zero_point.contiguous(), None if bias is None else bias.contiguous(),
                                    in_features, code_offset)


@register("packed_matmul_a8", "triton", supports=_triton_supports, bind=_bind_triton(True))
def _triton_a8_impl(x, qweight, scale, zero_point, bias, in_features, code_offset):
    return _kernels().packed_matmul_a8(x, qweight.contiguous(), scale.contiguous(), None if zero_point is None else
                                       zero_point.contiguous(), None if bias is None else bias.contiguous(),
                                       in_features, code_offset)


# ---- cuda backend: pyquant._C.packed_gemv (decode, M = 1..8) ----------------------------------------------------
CUDA_GEMV_MAX_M = 8


def _cuda_supports(x, qweight, scale, zero_point, bias, in_features, code_offset):
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"x dtype {x.dtype} (the CUDA GEMV takes float16/bfloat16)"
    if not 1 <= x.shape[0] <= CUDA_GEMV_MAX_M:
        return False, f"M={x.shape[0]} rows (the CUDA GEMV takes 1..{CUDA_GEMV_MAX_M}; larger M runs the GEMM)"
    gs = in_features // scale.shape[1]
    if scale.shape[1] > 1 and gs % 32:
        return False, f"group_size={gs} (the CUDA GEMV needs a multiple of 32, or one group per row)"
    if bias is not None and bias.dtype != x.dtype:
        return False, f"bias dtype {bias.dtype} differs from x dtype {x.dtype}"
    if not x.is_contiguous() or not qweight.is_contiguous() or qweight.data_ptr() % 16:
        return False, "x and qweight must be contiguous and qweight 16-byte aligned"
    return True, "ok"


def _bind_cuda(x, qweight, scale, zero_point, bias, in_features, code_offset):
    """``bind`` of the CUDA backend: ``pyquant._C.packed_gemv`` with its launch plan, split-K workspace need, group
    size and code offset fixed for this weight and M (``_cuda_ext.BoundGemv``); per call it only looks up the current
    stream when the plan splits K."""
    from .. import _cuda_ext

    if not _all_contiguous(scale, zero_point, bias):
        return lambda x2: _cuda_impl(x2, qweight, scale, zero_point, bias, in_features, code_offset)
    return _cuda_ext.BoundGemv(x.shape[0], qweight, scale, zero_point, bias, in_features // scale.shape[1],
                               0.0 if code_offset is None else float(code_offset))


@register("packed_matmul", "cuda", supports=_cuda_supports, bind=_bind_cuda)
def _cuda_impl(x, qweight, scale, zero_point, bias, in_features, code_offset):
    from .. import _cuda_ext

    # the wrapper adds the split-K workspace of this device and stream (zeroed once, re-armed by the kernel)
    return _cuda_ext.packed_gemv(x, qweight, scale.contiguous(),
                                 None if zero_point is None else zero_point.contiguous(),
                                 None if bias is None else bias.contiguous(), in_features // scale.shape[1],
                                 0.0 if code_offset is None else float(code_offset))


def check_packed_weight_args(qweight, scale, zero_point, bias, in_features, code_offset) -> None:
    """The x-independent half of :func:`check_packed_matmul_args` (what a layer validates once)."""
    validate_packed(qweight, scale, zero_point, in_features, group_size_of(scale, in_features))
    if zero_point is None and code_offset is None:
        raise ValueError("code_offset must be given (a float) when zero_point is None")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (qweight.shape[0],) \
                or not bias.dtype.is_floating_point or bias.device != qweight.device:
            raise ValueError(f"bias must be a float tensor of shape ({qweight.shape[0]},) on {qweight.device}, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
                             f"{f' on {bias.device}' if isinstance(bias, torch.Tensor) else ''}")


def _check_x(x, in_features) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be in_features={in_features}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): expected at least one row")


def check_packed_matmul_args(x, qweight, scale, zero_point, bias, in_features, code_offset) -> None:
    """Raise TypeError/ValueError naming the offending argument; nothing reaches a kernel unchecked."""
    _check_x(x, in_features)
    check_packed_weight_args(qweight, scale, zero_point, bias, in_features, code_offset)
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qweight is on {qweight.device}")


def packed_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    in_features: int,
    code_offset: Optional[float] = None,
) -> torch.Tensor:
    """y[..., N] = x[..., K] @ ((codes - z) * scale).T + bias, output in x's dtype.

    qweight: uint8 [N, packed_cols(K)]; scale: [N, K // group_size]; zero_point: like scale (asymmetric formats)
    or None with ``code_offset`` (the format's constant z).  Any leading shape and strides of x are accepted.
    """
    check_packed_matmul_args(x, qweight, scale, zero_point, bias, in_features, code_offset)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _packed_matmul_op(x2, qweight, scale, zero_point, bias, in_features,
                          None if code_offset is None else float(code_offset))
    return y.reshape(*lead, qweight.shape[0])


def packed_matmul_a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    in_features: int,
    code_offset: Optional[float] = None,
) -> torch.Tensor:
    """W2A8: like :func:`packed_matmul`, with x quantized per token to int8 (dynamic, symmetric) first."""
    check_packed_matmul_args(x, qweight, scale, zero_point, bias, in_features, code_offset)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = _packed_matmul_a8_op(x2, qweight, scale, zero_point, bias, in_features,
                             None if code_offset is None else float(code_offset))
    return y.reshape(*lead, qweight.shape[0])


# ---- the fast path of a validated layer (PackedLinear.forward) ----------------------------------------------------
_compiling = torch.compiler.is_compiling


class _Launch:
    """One cached launch plan of :class:`PackedMatmulPlan`: for one x shape (and dtype, device, dispatch state),
    the rows M, the output shape and the backend's bound launch (``_dispatch.resolve_bound``)."""

    __slots__ = ("backend", "M", "out_shape", "flat", "fn")

    def __init__(self, backend, M, out_shape, flat, fn):
        self.backend, self.M, self.out_shape, self.flat, self.fn = backend, M, out_shape, flat, fn


class PackedMatmulPlan:
    """``packed_matmul`` (or ``packed_matmul_a8``) bound to one validated packed weight: the decode-time fast path.

    Built once (the weight tensors are checked here, with the same messages as the checked path).  Per call it
    looks up a launch plan keyed by (x shape, x dtype, x device, ``_dispatch.dispatch_state()`` -- the backend order
    and TRITON_INTERPRET, the only other inputs of backend selection); a miss checks x (anything the checked path
    would refuse goes there and raises its error), resolves the backend and lets it bind what depends only on the
    weight and M (``_dispatch.register(bind=...)``: the CUDA GEMV's launch plan and split-K workspace, the Triton
    launcher looked up once).  A hit costs two views and the launch: no argument checks, no allocation besides the
    kernel's output, no custom-op layer.  At most :attr:`MAX_PLANS` shapes are kept (prefill lengths vary; a miss
    costs ~20 us, nothing next to a prefill).

    The custom op (``torch.ops.pyquant.packed_matmul``) is still used whenever it matters: under ``torch.compile``
    / export (``torch.compiler.is_compiling()``), for tensor subclasses (fake / functional tensors of tracing), and
    when autograd must record the call (grad mode on and x or the bias requires grad) -- so compile, autograd and
    ``opcheck`` see the op exactly as before.  CUDA-graph capture works on both paths (same kernels, no host sync;
    the bound CUDA launch picks the capture stream's workspace).

    :meth:`matches` tells whether the tensors it was built for are still the ones given (same objects, same
    storage); the owner rebuilds the plan when they are not.
    """

    MAX_PLANS = 64

    __slots__ = ("qweight", "scale", "zero_point", "bias", "in_features", "out_features", "code_offset", "device",
                 "op", "_checked", "_ptrs", "_cache")

    def __init__(self, qweight, scale, zero_point, bias, in_features: int, code_offset, a8: bool = False):
        check_packed_weight_args(qweight, scale, zero_point, bias, in_features, code_offset)
        self.qweight, self.scale, self.zero_point, self.bias = qweight, scale, zero_point, bias
        self.in_features, self.out_features = int(in_features), int(qweight.shape[0])
        self.code_offset = None if code_offset is None else float(code_offset)
        self.device = qweight.device
        self.op = "packed_matmul_a8" if a8 else "packed_matmul"
        self._checked = packed_matmul_a8 if a8 else packed_matmul
        self._ptrs = self._pointers(qweight, scale, zero_point, bias)
        self._cache = {}

    @staticmethod
    def _pointers(q, s, z, b):
        return (q.data_ptr(), s.data_ptr(), None if z is None else z.data_ptr(), None if b is None else b.data_ptr())

    def matches(self, qweight, scale, zero_point, bias) -> bool:
        """True when these are the very tensors (objects and storage) the plan was validated for.  (A dtype or
        shape change of the same object replaces its storage: ``Module.to`` / ``.data =`` allocate anew.)"""
        return (qweight is self.qweight and scale is self.scale and zero_point is self.zero_point
                and bias is self.bias and self._pointers(qweight, scale, zero_point, bias) == self._ptrs)

    def checked(self, x: torch.Tensor) -> torch.Tensor:
        """The fully checked public op (custom op included)."""
        return self._checked(x, self.qweight, self.scale, self.zero_point, self.bias, in_features=self.in_features,
                             code_offset=self.code_offset)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (type(x) is not torch.Tensor or _compiling()
                or (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None
                                                                     and self.bias.requires_grad)))):
            return self.checked(x)
        key = (x.shape, x.dtype, x.device, dispatch_state())
        plan = self._cache.get(key)
        if plan is None:
            plan = self._plan(x, key)
            if plan is None:
                return self.checked(x)  # raises the checked path's error
        note_backend(self.op, plan.backend)
        if x.is_contiguous():
            y = plan.fn(x.view(plan.M, self.in_features) if plan.flat else x)
        else:
            y = plan.fn(x.reshape(plan.M, self.in_features).contiguous())
        return y.view(plan.out_shape) if plan.flat else y

    def _plan(self, x, key):
        """Check x and build its launch plan (None: x is not something the fast path runs; the checked path
        raises the error)."""
        K = self.in_features
        if x.dtype not in X_DTYPES or x.device != self.device or x.dim() < 1 or x.shape[-1] != K \
                or x.numel() == 0:
            return None
        M = x.numel() // K
        x2 = x.reshape(M, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        backend, fn = resolve_bound(self.op, x2, self.qweight, self.scale, self.zero_point, self.bias, K,
                                    self.code_offset)
        plan = _Launch(backend, M, (*x.shape[:-1], self.out_features), x.dim() != 2, fn)
        if len(self._cache) >= self.MAX_PLANS:
            self._cache.clear()
        self._cache[key] = plan
        return plan

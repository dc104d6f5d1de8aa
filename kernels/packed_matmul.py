"""Fused 2-bit packed matmul: ``y = x @ dequant(Wq).T (+ bias)``; the full-precision weight is never materialized.

Packed layout (defined in ``pyquant/formats.py``): ``qweight`` uint8 ``[N, ceil(K/64)*16]``, K-contiguous; weight
``(n, k)`` is byte ``k // 4`` of row ``n``, bits ``2*(k % 4)``.  Dequantization ``w = (c - z) * s`` with ``s`` (and
``z`` for asymmetric formats) per ``(n, k // group_size)``; symmetric formats use the constant ``code_offset`` as z.

How a tile is dequantized (both kernels)
----------------------------------------
A K tile's packed bytes are loaded once, as a contiguous [BLOCK_N, BLOCK_K // 4] uint8 block (16-byte vector
loads where the compiler can prove alignment: rows are whole 16-byte vectors), and unpacked in registers by four
shifts and a reshape (``_load_codes``).  Every K tile lies inside ONE scale group: the launcher only uses
``BLOCK_K`` values that divide ``group_size`` (or the weight has a single group per row, per-channel / per-tensor),
so the scale and zero point are one value per output column per tile and are applied to the tile's partial sum,
not to every weight:

* symmetric:   ``acc += dot(x, c - z) * s``           (``c - z`` is exact in fp16/bf16: z in {1, 1.5, 2})
* asymmetric:  ``acc += (dot(x, c) - sum_k(x) * z) * s``  (codes exact; z is a float per group)

so the products are exact and the only rounding is the fp32 accumulation, as in the fp32 reference.

Paths
-----
* ``_packed_gemv_kernel`` (M <= 8, decode): CUDA-core FMAs on a [BLOCK_M, BLOCK_N, BLOCK_K] broadcast, one program
  per (N tile, K split).  Split-K (``SPLIT_K > 1``) fills all SMs when N / BLOCK_N alone would not: partial sums are
  ``atomic_add``-ed into a zeroed fp32 workspace and cast to the output dtype afterwards.  fp32 atomics make the
  summation order, and so the last bits of the result, vary from run to run (nondeterministic); ``SPLIT_K == 1``
  configs are deterministic.
* ``_packed_matmul_kernel`` (M > 8): tensor-core ``tl.dot`` on the dequantized tiles, grouped program order for L2
  reuse, fp32 accumulators; for M <= 16 (``BLOCK_M = 16``) it may split K the same way.

Autotuning is keyed on a bucketed M (next power of two, capped at 4096 for the GEMM; BLOCK_M for the GEMV) plus N
and K, so a new batch size does not retune.  Configs are pruned to the group size and, on a GPU, to the device's
shared memory (queried at the first launch, never at import).  Under ``TRITON_INTERPRET=1`` a single config is used.

W2A8 (``packed_matmul_a8``): ``_packed_matmul_a8_quant_kernel`` quantizes x per token to int8 (symmetric dynamic
min-max, s = max|x| / 127, q = floor(x / s + 0.5) with IEEE division), then the same kernels run with int8 x
(exact in fp16) and multiply each row by its scale at the end.

Limits (known, not hidden): the W2A8 entry runs fp16 tensor-core MMAs on the int8 values (exact) rather than int8
MMAs; group sizes that are not a multiple of 16 are declined (``supports``) and run on the reference; the first
call for a new (M bucket, N, K) autotunes, so run a layer once before capturing it in a CUDA graph.  No timing in
this file or its tests was measured on a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

__all__ = ["packed_matmul", "packed_matmul_a8", "quantize_rows_int8", "GEMV_MAX_M"]

GEMV_MAX_M = 8  # rows handled by the FMA GEMV kernel; larger M uses tl.dot
_M_BUCKET_CAP = 4096
_FP32_TINY = torch.finfo(torch.float32).tiny


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


# ---- shared device helpers -----------------------------------------------------------------------------------
@triton.jit
def _tile_group_params(scale_ptr, zero_ptr, offs_n, n_mask, g, G, HAS_ZERO: tl.constexpr):
    """Scale and zero point ([BLOCK_N] fp32) of scale group ``g`` for the tile's output columns."""
    s = tl.load(scale_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
    else:
        z = s * 0.0
    return s, z


@triton.jit
def _load_codes(w_rows, n_mask, t, row_bytes, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes [BLOCK_N, BLOCK_K] (int32) of K tile ``t``: one contiguous [BLOCK_N, BLOCK_K // 4] byte load per tile
    (vectorizable, each byte read once), unpacked in registers by four shifts and a row-major reshape
    (byte j, pair i) -> k = 4 j + i, which is exactly the layout's "k // 4, bits 2 (k % 4)".  Bytes of a row past
    ``K`` are zero by the layout; reads past ``row_bytes`` are masked."""
    offs_b = t * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
    b = tl.load(w_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < row_bytes), other=0)
    shifts = tl.arange(0, 4) * 2
    c3 = (b.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 3
    return tl.reshape(c3, (BLOCK_N, BLOCK_K))


@triton.jit
def _dot(a, b):
    """fp32 accumulation; fp32 operands use exact IEEE products (TF32 would round x), 16-bit ones the tensor cores."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ---- GEMV: M <= 8, CUDA-core FMAs, split-K ------------------------------------------------------------------
@triton.jit
def _packed_gemv_kernel(
    x_ptr, xs_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, G, group_size, code_offset,
    stride_xm, stride_qn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, X_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = qw_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_k = t * BLOCK_K + rk
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0).to(tl.float32)
        c = _load_codes(w_rows, n_mask, t, stride_qn, BLOCK_N, BLOCK_K).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        s, z = _tile_group_params(scale_ptr, zero_ptr, offs_n, n_mask, (t * BLOCK_K) // group_size, G, HAS_ZERO)
        if HAS_ZERO:
            cz = c - z[:, None]
        else:
            cz = c - code_offset
        part = tl.sum(x[:, None, :] * cz[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
        acc += part * s[None, :]
    if X_INT8:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        acc = acc * xs[:, None]
    if HAS_BIAS:  # added once: by the first K split
        bias = tl.load(bias_ptr + offs_n, mask=n_mask & ((offs_n * 0 + pid_k) == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=out_mask)


# ---- GEMM: tl.dot on dequantized tiles (split-K allowed for BLOCK_M = 16) ---------------------------------------
@triton.jit
def _packed_matmul_kernel(
    x_ptr, xs_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, G, group_size, code_offset, M_BUCKET,
    stride_xm, stride_qn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, X_INT8: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles walk the N tiles together so the packed weight tiles stay in L2
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_m)
    pid_n = (pid % num_pid_in_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = qw_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_k = t * BLOCK_K + rk
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        if X_INT8:
            x = x.to(tl.float16)  # |q| <= 127: exact
        if DOT_F32:  # interpreter only: its tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584)
            x = x.to(tl.float32)
        c = tl.trans(_load_codes(w_rows, n_mask, t, stride_qn, BLOCK_N, BLOCK_K))  # W^T tile [BLOCK_K, BLOCK_N]
        s, z = _tile_group_params(scale_ptr, zero_ptr, offs_n, n_mask, (t * BLOCK_K) // group_size, G, HAS_ZERO)
        if HAS_ZERO:
            part = _dot(x, c.to(x.dtype))
            xsum = tl.sum(x.to(tl.float32), axis=1)
            part = part - xsum[:, None] * z[None, :]
        else:
            part = _dot(x, (c.to(tl.float32) - code_offset).to(x.dtype))
        acc += part * s[None, :]
    if X_INT8:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        acc = acc * xs[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask & ((offs_n * 0 + pid_k) == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=out_mask)


# ---- W2A8: per-token int8 quantization of x ---------------------------------------------------------------------
@triton.jit
def _packed_matmul_a8_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, TINY, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 127.0), TINY)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + rk < K
        v = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=mask, other=0.0).to(tl.float32)
        q = tl.floor(tl.math.div_rn(v, s) + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + k0 + rk, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, s)


# ---- configs, pruning, autotuning ------------------------------------------------------------------------------
def _zero_ws(nargs) -> None:
    nargs["ws_ptr"].zero_()


def _cfg(split_k: int, num_warps: int, num_stages: int, **kw) -> triton.Config:
    kw["SPLIT_K"] = split_k
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_zero_ws if split_k > 1 else None)


# (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages); the first entry that survives pruning is the interpreter's config.
_GEMV_CONFIGS = [_cfg(sk, w, st, BLOCK_N=bn, BLOCK_K=bk) for bn, bk, sk, w, st in [
    (32, 64, 2, 4, 2),
    (32, 128, 1, 4, 2), (64, 128, 1, 4, 2), (128, 64, 1, 4, 2), (32, 256, 1, 4, 2), (16, 256, 1, 2, 2),
    (32, 128, 4, 4, 2), (64, 128, 4, 4, 2), (64, 64, 8, 4, 2), (16, 128, 8, 2, 2), (32, 256, 8, 4, 2),
    (16, 64, 4, 2, 2), (32, 64, 8, 4, 2), (16, 128, 1, 2, 2),
    # BLOCK_K = 32 for group size 32
    (64, 32, 1, 4, 2), (128, 32, 1, 4, 2), (64, 32, 4, 4, 2), (32, 32, 8, 2, 2),
]]
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages)
_GEMM_CONFIGS = [_cfg(sk, w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8) for bm, bn, bk, sk, w, st in [
    (16, 64, 64, 2, 4, 2),  # interpreter config for M <= 16
    (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 64, 64, 1, 4, 4), (16, 64, 128, 4, 4, 4),
    (16, 32, 128, 8, 4, 4), (16, 128, 64, 2, 4, 4), (16, 64, 256, 4, 4, 3),
    (32, 64, 64, 1, 4, 4),  # interpreter config for M > 16
    (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 4), (128, 64, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3),
    (64, 256, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (256, 128, 64, 1, 8, 3),
    (32, 128, 128, 1, 4, 4), (64, 128, 128, 1, 4, 3), (32, 128, 64, 1, 4, 4), (32, 256, 64, 1, 8, 3),
    # BLOCK_K = 32 for group size 32
    (16, 64, 32, 1, 4, 4), (16, 128, 32, 2, 4, 4), (16, 64, 32, 4, 4, 4),
    (32, 64, 32, 1, 4, 4), (32, 128, 32, 1, 4, 4), (32, 256, 32, 1, 8, 4),
    (64, 128, 32, 1, 4, 4), (128, 64, 32, 1, 4, 4), (128, 128, 32, 1, 8, 4), (128, 256, 32, 1, 8, 4),
]]
_GEMV_MAX_ELEMS = 16384  # BLOCK_M * BLOCK_N * BLOCK_K of the FMA broadcast (register budget)


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(props["max_shared_mem"])


def _k_fits(bk: int, K: int, G: int, group_size: int) -> bool:
    """Every K tile must lie in one scale group: one group per row, or BLOCK_K dividing the group size."""
    return G == 1 or group_size % bk == 0


def _fallback_bk(group_size: int) -> int:
    bk = 16
    while bk * 2 <= 256 and group_size % (bk * 2) == 0:
        bk *= 2
    return bk


def _prune_gemv(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    K, G, gs = named_args["K"], named_args["G"], named_args["group_size"]
    bm = kwargs["BLOCK_M"]
    keep = [c for c in configs if _k_fits(c.kwargs["BLOCK_K"], K, G, gs)
            and bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _GEMV_MAX_ELEMS]
    if not keep:
        keep = [_cfg(1, 2, 2, BLOCK_N=16, BLOCK_K=min(_fallback_bk(gs), _GEMV_MAX_ELEMS // (16 * bm)))]
    return keep[:1] if _interpret() else keep


def _prune_gemm(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    K, G, gs, mb = named_args["K"], named_args["G"], named_args["group_size"], named_args["M_BUCKET"]
    x = named_args["x_ptr"]
    keep = []
    smem = None if _interpret() or not x.is_cuda else _max_shared_mem(x.device.index or 0)
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if not _k_fits(bk, K, G, gs):
            continue
        if mb <= 16 and bm != 16:
            continue
        if mb > 16 and (bm == 16 or bm > max(32, mb) or sk != 1):
            continue
        if smem is not None:
            # pipelined x and packed-byte tiles, plus the dequantized [BK, BN] operand staged for the MMA
            need = c.num_stages * (bm * bk * x.element_size() + bk * bn) + bk * bn * 2
            if need > smem:
                continue
        keep.append(c)
    if not keep:
        keep = [_cfg(1, 4, 2, BLOCK_M=16 if mb <= 16 else 32, BLOCK_N=32, BLOCK_K=_fallback_bk(gs), GROUP_M=8)]
    return keep[:1] if _interpret() else keep


_gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["BLOCK_M", "N", "K", "G", "HAS_ZERO", "X_INT8"],
                        prune_configs_by={"early_config_prune": _prune_gemv})(_packed_gemv_kernel)
_gemm = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "G", "HAS_ZERO", "X_INT8"],
                        prune_configs_by={"early_config_prune": _prune_gemm})(_packed_matmul_kernel)


# ---- launchers: check constraints, allocate, launch ---------------------------------------------------------------
def _check(x, qweight, scale, zero_point, bias, in_features, code_offset, x_scale=None):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x).__name__)}")
    want = (torch.int8,) if x_scale is not None else (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in want:
        raise ValueError(f"x must have dtype in {want}, got {x.dtype}")
    M, K = x.shape
    if K != in_features or M == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [M >= 1, in_features={in_features}]")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K (stride(1) == 1), got strides {x.stride()}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2 \
            or qweight.shape[1] != -(-K // 64) * 16 or not qweight.is_contiguous():
        raise ValueError(f"qweight must be a contiguous uint8 tensor [N, {-(-K // 64) * 16}], got "
                         f"{getattr(qweight, 'shape', None)} {getattr(qweight, 'dtype', None)}")
    N = qweight.shape[0]
    if not isinstance(scale, torch.Tensor) or scale.dim() != 2 or scale.shape[0] != N or scale.shape[1] == 0 \
            or K % scale.shape[1] or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous tensor [N={N}, K // group_size], "
                         f"got {getattr(scale, 'shape', None)}")
    G = scale.shape[1]
    gs = K // G
    if G > 1 and gs % 16:
        raise ValueError(f"group_size={gs} must be a multiple of 16 (or one group per row) for the Triton kernels")
    if zero_point is not None and (zero_point.shape != scale.shape or not zero_point.is_contiguous()):
        raise ValueError(f"zero_point must be a contiguous tensor of shape {tuple(scale.shape)}")
    if zero_point is None and code_offset is None:
        raise ValueError("code_offset must be a float when zero_point is None")
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous tensor of shape ({N},)")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero_point", zero_point), ("bias", bias),
                    ("x_scale", x_scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return M, N, K, G, gs


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Output and workspace allocation (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
            config: Optional[Dict] = None) -> torch.Tensor:
    y = _alloc((M, N), out_dtype, x.device)
    if N == 0:
        return y
    skinny = M <= 16
    ws = _alloc((M, N), torch.float32, x.device) if skinny else None
    common = dict(HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None, X_INT8=x_scale is not None)
    co = 0.0 if code_offset is None else float(code_offset)
    if M <= GEMV_MAX_M:
        kernel, block_m = _gemv, _next_pow2(M)
        args = (x, x_scale, qweight, scale, zero_point, bias, y, ws, M, N, K, G, gs, co,
                x.stride(0), qweight.stride(0), y.stride(0))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        common["BLOCK_M"] = block_m
    else:
        kernel = _gemm
        # the interpreter's tl.dot is wrong for bf16 (triton-lang/triton#11584): there, bf16 tiles are multiplied in
        # fp32, which gives the same result (bf16 x and small codes have exact fp32 products)
        common["DOT_F32"] = x_scale is None and x.dtype == torch.bfloat16 and _interpret()
        m_bucket = min(_next_pow2(M), _M_BUCKET_CAP)
        args = (x, x_scale, qweight, scale, zero_point, bias, y, ws, M, N, K, G, gs, co, m_bucket,
                x.stride(0), qweight.stride(0), y.stride(0))
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
    if config is not None:  # explicit meta-parameters (tests, benchmarks): bypass the autotuner
        meta = dict(config)
        num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 2)
        split = meta.get("SPLIT_K", 1)
        if split > 1:
            if ws is None:
                raise ValueError("SPLIT_K > 1 is only used for M <= 16")
            ws.zero_()
        kernel.fn[grid({**common, **meta})](*args, **common, **meta, num_warps=num_warps, num_stages=num_stages)
    else:
        kernel[grid](*args, **common)
        split = kernel.best_config.kwargs["SPLIT_K"]
    if split > 1:
        y.copy_(ws)
    return y


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], in_features: int, code_offset: Optional[float],
                  config: Optional[Dict] = None) -> torch.Tensor:
    """y [M, N] (x's dtype) = x [M, K] @ dequant(qweight).T + bias.  ``config`` pins the kernel meta-parameters."""
    M, N, K, G, gs = _check(x, qweight, scale, zero_point, bias, in_features, code_offset)
    return _launch(x, None, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, x.dtype, config)


def quantize_rows_int8(x: torch.Tensor):
    """x [M, K] float -> (q int8 [M, K], s fp32 [M]) with x ~ q * s[:, None] (symmetric, per row)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        raise ValueError("x must be a 2-D float16/bfloat16/float32 tensor")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K (stride(1) == 1), got strides {x.stride()}")
    M, K = x.shape
    q = _alloc((M, K), torch.int8, x.device)
    s = _alloc((M,), torch.float32, x.device)
    block_k = min(1024, max(16, _next_pow2(K)))
    _packed_matmul_a8_quant_kernel[(M,)](x, q, s, K, x.stride(0), _FP32_TINY, BLOCK_K=block_k)
    return q, s


def packed_matmul_a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_features: int,
                     code_offset: Optional[float], config: Optional[Dict] = None) -> torch.Tensor:
    """W2A8: x quantized per token to int8 (dynamic, symmetric), then the packed matmul; output in x's dtype."""
    M, N, K, G, gs = _check(x, qweight, scale, zero_point, bias, in_features, code_offset)
    q, s = quantize_rows_int8(x)
    return _launch(q, s, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, x.dtype, config)


# ---- static-analysis launch descriptors (`pyquant bench static`) -------------------------------------------------
# (format name -> HAS_ZERO); symmetric formats pass their code offset as a runtime float, so only HAS_ZERO changes
# the compiled code.  Names as in the tests; kept here because kernels do not import pyquant.formats.
_STATIC_FORMATS = {"twn": False, "absmean": False, "int2-sym": False, "seq3": False, "seq4": False,
                   "int2-asym": True}
_STATIC_SMEM = 232448  # sm_90 opt-in shared memory per block (227 KiB): what _prune_gemm reads from an H200
_STATIC_X = {"bf16": ("*bf16", 2), "fp16": ("*fp16", 2), "int8": ("*i8", 1)}


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int], x_dtype: str = "bf16") -> List[Dict]:
    """Every call ``packed_matmul`` (``x_dtype`` bf16/fp16) or ``packed_matmul_a8`` (``x_dtype="int8"``, W2A8) could
    make for x [M, K] and a packed weight [N, K] of format ``fmt`` with ``group_size`` (None: per-channel): one dict
    per config the autotuner can choose after the launcher's pruning (the interpreter's single-config shortcut is
    not applied), in the schema of ``pyquant.bench.static`` (plain data; nothing is compiled or launched here).
    Scales and zero points are fp16, y is bf16 (fp16 for fp16 x); a split-K call lists its workspace memset and
    cast-copy (torch kernels) as ``builtin`` launches."""
    for name, v in (("M", M), ("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if fmt not in _STATIC_FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {sorted(_STATIC_FORMATS)}")
    if x_dtype not in _STATIC_X:
        raise ValueError(f"x_dtype={x_dtype!r}: expected one of {sorted(_STATIC_X)}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1 or K % group_size):
        raise ValueError(f"group_size={group_size!r} must be None or a positive divisor of K={K}")
    gs = K if group_size is None else group_size
    G = K // gs
    if G > 1 and gs % 16:
        return []  # declined: runs on the reference
    has_zero = _STATIC_FORMATS[fmt]
    x_int8 = x_dtype == "int8"
    xt, xb = _STATIC_X[x_dtype]
    yt = "*fp16" if x_dtype == "fp16" else "*bf16"
    row_bytes = -(-K // 64) * 16
    skinny = M <= 16
    sig = dict(x_ptr=xt, xs_ptr="*fp32", qw_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16", bias_ptr=yt, y_ptr=yt,
               ws_ptr="*fp32", M="i32", N="i32", K="i32", G="i32", group_size="i32", code_offset="fp32",
               M_BUCKET="i32", stride_xm="i32", stride_qn="i32", stride_ym="i32")
    const = dict(HAS_ZERO=has_zero, HAS_BIAS=False, X_INT8=x_int8, bias_ptr=None)
    if not has_zero:
        const["zero_ptr"] = None
    if not x_int8:
        const["xs_ptr"] = None
    if not skinny:
        const["ws_ptr"] = None
    spec_vals = dict(M=M, N=N, K=K, G=G, group_size=gs, stride_xm=K, stride_qn=row_bytes, stride_ym=N)
    w_bytes = N * row_bytes + N * G * 2 * (2 if has_zero else 1)
    pre = []
    if x_int8:
        bk_q = min(1024, max(16, _next_pow2(K)))
        qfn = _packed_matmul_a8_quant_kernel
        pre.append(dict(
            name="quantize_rows_int8",
            triton=dict(fn=qfn, signature=dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*fp32", K="i32", stride_xm="i32",
                                               TINY="fp32", BLOCK_K="constexpr"),
                        constexprs=dict(BLOCK_K=bk_q), specialize=dict(K=K, stride_xm=K), num_warps=4, num_stages=3,
                        weight_arg=None),
            grid=[M, 1, 1], threads_per_cta=128, loop_trips=[triton.cdiv(K, bk_q)] * 2, weights=0,
            bytes=2 * M * K * 2 + M * K + 4 * M, mma_flops=0))

    def call(kernel, fn, cfg, grid, trips, mma, extra_const, extra_spec, label):
        kw = dict(cfg.kwargs)
        split = kw["SPLIT_K"]
        out = M * N * (4 if split > 1 else 2)
        main = dict(name=kernel, triton=dict(fn=fn, signature={a: ("constexpr" if a in {**const, **kw, **extra_const}
                                                                   else sig[a]) for a in fn.arg_names},
                                             constexprs={**const, **extra_const, **kw},
                                             specialize={**spec_vals, **extra_spec}, num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages, weight_arg="qw_ptr"),
                    grid=list(grid), threads_per_cta=32 * cfg.num_warps, loop_trips=trips, weights=N * K,
                    bytes=w_bytes + M * K * xb + out, mma_flops=mma)
        launches = list(pre)
        if split > 1:
            launches.append(dict(name="workspace zero_ (pre_hook)", builtin="memset",
                                 grid=[max(1, M * N // 4096), 1, 1], threads_per_cta=128, loop_trips=0, weights=0,
                                 bytes=4 * M * N, mma_flops=0))
        launches.append(main)
        if split > 1:
            launches.append(dict(name="y.copy_(ws)", builtin="copy", grid=[max(1, M * N // 4096), 1, 1],
                                 threads_per_cta=128, loop_trips=0, weights=0, bytes=6 * M * N, mma_flops=0))
        return dict(kernel=kernel, backend="triton", config=label, launches=launches)

    n_tiles = lambda bk: triton.cdiv(K, bk)  # noqa: E731
    calls = []
    if M <= GEMV_MAX_M:
        bm = _next_pow2(M)
        keep = [c for c in _GEMV_CONFIGS if _k_fits(c.kwargs["BLOCK_K"], K, G, gs)
                and bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= _GEMV_MAX_ELEMS]
        if not keep:
            keep = [_cfg(1, 2, 2, BLOCK_N=16, BLOCK_K=min(_fallback_bk(gs), _GEMV_MAX_ELEMS // (16 * bm)))]
        for c in keep:
            bn, bk, sk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
            calls.append(call("packed_gemv", _packed_gemv_kernel, c, (triton.cdiv(N, bn), sk, 1), n_tiles(bk) / sk, 0,
                              dict(BLOCK_M=bm), {}, f"BM={bm} BN={bn} BK={bk} SK={sk} w{c.num_warps} s{c.num_stages}"))
        return calls
    mb = min(_next_pow2(M), _M_BUCKET_CAP)
    keep = []
    for c in _GEMM_CONFIGS:
        bm, bn, bk, sk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if not _k_fits(bk, K, G, gs) or (mb <= 16 and bm != 16) or \
                (mb > 16 and (bm == 16 or bm > max(32, mb) or sk != 1)):
            continue
        if c.num_stages * (bm * bk * xb + bk * bn) + bk * bn * 2 > _STATIC_SMEM:
            continue
        keep.append(c)
    if not keep:
        keep = [_cfg(1, 4, 2, BLOCK_M=16 if mb <= 16 else 32, BLOCK_N=32, BLOCK_K=_fallback_bk(gs), GROUP_M=8)]
    for c in keep:
        bm, bn, bk, sk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        tiles_m, tiles_n = triton.cdiv(M, bm), triton.cdiv(N, bn)
        mma = 2 * tiles_m * bm * tiles_n * bn * n_tiles(bk) * bk
        calls.append(call("packed_matmul", _packed_matmul_kernel, c, (tiles_m * tiles_n, sk, 1), n_tiles(bk) / sk,
                          mma, dict(DOT_F32=False), dict(M_BUCKET=mb),
                          f"BM={bm} BN={bn} BK={bk} SK={sk} G{c.kwargs['GROUP_M']} w{c.num_warps} s{c.num_stages}"))
    return calls

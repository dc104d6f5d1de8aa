"""Grouped 2-bit packed matmul for mixture-of-experts layers: every expert's rows in ONE launch.

``y[r] = x[r] @ dequant(Wq[e]).T (+ bias[e])`` where the input rows are sorted by expert and expert ``e`` owns rows
``offsets[e-1] : offsets[e]`` (layout of ``qweight [E, N, packed K]`` / ``scale [E, N, G]``: ``pyquant/formats.py``,
"Packed experts": the 2-D packed layout of ``PackedLinear`` per expert).

Work decomposition
------------------
The launcher cuts every expert's segment into row tiles of ``BLOCK_M`` rows and lists them (``tile_expert``,
``tile_row0``; experts with no token get no tile, so an idle expert costs nothing and its weights are never read).
The grid is ``(cdiv(N, BLOCK_N), number of row tiles)``: each program owns one (row tile, N tile) pair of one expert
and streams that expert's packed weight tile by tile along K.

* ``USE_DOT`` (prefill: many rows per expert): tensor-core ``tl.dot`` on ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]``.
* otherwise (decode: 1..8 rows per expert): CUDA-core FMAs on a ``[BLOCK_M, BLOCK_N, BLOCK_K]`` broadcast, with
  ``BLOCK_M`` the next power of two of the largest segment, so a decode step does not pad every expert to 16 rows.

Every K tile lies inside one scale group (the launcher picks ``BLOCK_K`` dividing the group size, or the weight has
one group per row), so the scale is applied once per tile to the partial sum and the products are exact:
symmetric ``acc += dot(x, c - z) * s`` (``c - z`` is exact in fp16/bf16), asymmetric
``acc += (dot(x, c) - rowsum(x) * z) * s``; fp32 accumulation.

Limits (known): the tile list is built on the host from the segment sizes, which costs one device->host sync per
call (not CUDA-graph capturable; the decode path of a serving engine would keep routing on device); this kernel
does not use the magic-number dequantization or split-K of the dense kernels yet.  No timing of this file was
measured on a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["grouped_packed_matmul", "static_launches", "DECODE_MAX_ROWS"]

DECODE_MAX_ROWS = 8  # segments up to this many rows take the FMA (decode) path


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@triton.jit
def _grouped_packed_matmul_kernel(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, tile_e_ptr, tile_r0_ptr, ends_ptr,
    N, K, G, group_size, code_offset,
    stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_be, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_t).to(tl.int64)
    r0 = tl.load(tile_r0_ptr + pid_t)
    r_end = tl.load(ends_ptr + e)
    rows = r0 + tl.arange(0, BLOCK_M)
    rmask = rows < r_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    w_rows = qw_ptr + e * stride_qe + offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = scale_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    z_rows = zero_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        # each packed byte is loaded once ([BLOCK_N, BLOCK_K // 4] contiguous bytes per row: vector loads) and
        # split into its 4 codes in registers (shift + mask, then the [.., 4] axis folds into K)
        kb = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        byte = tl.load(w_rows + kb[None, :], mask=nmask[:, None] & (kb < (K + 3) // 4)[None, :], other=0)
        codes = (byte.to(tl.int32)[:, :, None] >> (tl.arange(0, 4) * 2)[None, None, :]) & 3
        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))  # exact small ints; x is 0 past K, so no K mask needed
        g = k0 // group_size
        s = tl.load(s_rows + g, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_rows + g, mask=nmask, other=0.0).to(tl.float32)
            wc = codes.to(tl.float32)
        else:
            wc = codes.to(tl.float32) - code_offset
        if USE_DOT:
            if DOT_F32:
                part = tl.dot(xt.to(tl.float32), tl.trans(wc), input_precision="ieee")
            else:
                part = tl.dot(xt, tl.trans(wc.to(xt.dtype)))
        else:
            part = tl.sum(xt.to(tl.float32)[:, None, :] * wc[None, :, :], axis=2)
        if HAS_ZERO:
            part = part - tl.sum(xt.to(tl.float32), axis=1)[:, None] * z[None, :]
        acc += part * s[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + e * stride_be + offs_n, mask=nmask, other=0.0).to(tl.float32)
        acc += b[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _block_k(K: int, G: int) -> int:
    if G == 1:
        return 64
    gs = K // G
    return 64 if gs % 64 == 0 else 32 if gs % 32 == 0 else 16


def _tiles(offsets: torch.Tensor, block_m: int):
    """Row tiles of every non-empty expert segment: (tile_expert int32 [T], tile_row0 int32 [T])."""
    ends = offsets.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    counts = ends - starts
    per = (counts + block_m - 1) // block_m
    experts = torch.repeat_interleave(torch.arange(ends.numel(), device=ends.device), per)
    first = torch.cumsum(per, 0) - per  # index of each expert's first tile
    within = torch.arange(experts.numel(), device=ends.device) - first[experts]
    return experts.to(torch.int32), (starts[experts] + within * block_m).to(torch.int32)


def _plan(max_rows: int, x_dtype: torch.dtype):
    """(USE_DOT, BLOCK_M, BLOCK_N, num_warps) for the largest segment size."""
    if max_rows <= DECODE_MAX_ROWS:
        return False, _next_pow2(max(1, max_rows)), 64, 4
    bm = 16 if max_rows <= 16 else 32
    return True, bm, 64, 4


def grouped_packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor], offsets: torch.Tensor,
                          in_features: int, code_offset: Optional[float]) -> torch.Tensor:
    """Arguments as :func:`pyquant.reference.grouped_packed_matmul` (validated by ``pyquant.ops``)."""
    S, K = x.shape
    E, N = qweight.shape[0], qweight.shape[1]
    G = scale.shape[2]
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if S == 0:
        return y
    ends = offsets.to(torch.int32).contiguous()
    counts = torch.diff(ends.to(torch.int64), prepend=ends.new_zeros(1).to(torch.int64))
    max_rows = int(counts.max())  # host sync: sizes the tiles (see Limits)
    use_dot, bm, bn, warps = _plan(max_rows, x.dtype)
    tile_e, tile_r0 = _tiles(ends, bm)
    if tile_e.numel() == 0:
        return y
    bk = _block_k(K, G)
    dot_f32 = _interpret() or x.dtype == torch.float32
    zp = zero_point if zero_point is not None else scale  # never read when HAS_ZERO is False
    bp = bias if bias is not None else scale
    grid = (triton.cdiv(N, bn), tile_e.numel())
    _grouped_packed_matmul_kernel[grid](
        x, qweight, scale, zp, bp, y, tile_e, tile_r0, ends,
        N, K, G, K // G, 0.0 if code_offset is None else float(code_offset),
        x.stride(0), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
        0 if bias is None else bias.stride(0), y.stride(0),
        HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None, USE_DOT=use_dot, DOT_F32=dot_f32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=2)
    return y


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int], x_dtype: str = "bf16",
                    experts: int = 8, rows_per_expert: Optional[int] = None) -> list:
    """Launch descriptors for the static roofline tool (schema: the kernel-efficiency issue / BRIEF): ``M`` routed
    rows spread evenly over ``experts`` active experts (``rows_per_expert`` overrides), N x K per expert."""
    rows = rows_per_expert or max(1, M // experts)
    use_dot, bm, bn, warps = _plan(rows, torch.bfloat16)
    G = 1 if group_size is None else K // group_size
    bk = _block_k(K, G)
    has_zero = fmt in ("int2-asym", "uniform-asym")
    tiles = experts * triton.cdiv(rows, bm)
    ty = {"bf16": "*bf16", "fp16": "*fp16"}.get(x_dtype, "*bf16")
    sig = dict(x_ptr=ty, qw_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16", bias_ptr="*fp16", y_ptr=ty,
               tile_e_ptr="*i32", tile_r0_ptr="*i32", ends_ptr="*i32", N="i32", K="i32", G="i32",
               group_size="i32", code_offset="fp32", stride_xm="i32", stride_qe="i32", stride_qn="i32",
               stride_se="i32", stride_sn="i32", stride_be="i32", stride_ym="i32")
    consts = dict(HAS_ZERO=has_zero, HAS_BIAS=False, USE_DOT=use_dot, DOT_F32=False, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk)
    for c in consts:
        sig[c] = "constexpr"
    w_bytes = experts * N * ((K + 63) // 64) * 16
    s_bytes = experts * N * G * 2 * (2 if has_zero else 1)
    launch = {"name": "_grouped_packed_matmul_kernel",
              "triton": {"fn": _grouped_packed_matmul_kernel, "signature": sig, "constexprs": consts,
                         "num_warps": warps, "num_stages": 2},
              "grid": [triton.cdiv(N, bn), tiles, 1], "threads_per_cta": 32 * warps,
              "loop_trips": triton.cdiv(K, bk), "weights": experts * N * K,
              "bytes": w_bytes * triton.cdiv(rows, bm) + s_bytes + experts * rows * (K + N) * 2,
              "mma_flops": 2 * tiles * bm * N * K if use_dot else 0}
    return [{"kernel": "grouped_packed_matmul", "backend": "triton",
             "config": f"BM={bm},BN={bn},BK={bk},{'dot' if use_dot else 'fma'},warps={warps}",
             "launches": [launch]}]

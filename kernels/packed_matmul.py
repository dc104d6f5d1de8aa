"""Fused 2-bit packed matmul: ``y = x @ dequant(Wq).T (+ bias)``; the full-precision weight is never materialized.

Packed layout (defined in ``pyquant/formats.py``): ``qweight`` uint8 ``[N, ceil(K/64)*16]``, K-contiguous; weight
``(n, k)`` is byte ``k // 4`` of row ``n``, bits ``2*(k % 4)``.  Dequantization ``w = (c - z) * s`` with ``s`` (and
``z`` for asymmetric formats) per ``(n, k // group_size)``; symmetric formats use the constant ``code_offset`` as z.

How a tile is dequantized (the GEMM; the GEMV is described at ``_packed_gemv_kernel``)
----------------------------------------------------------------------------------
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
* ``_packed_gemv_kernel`` (M <= 8 with fp16/bf16 x, decode): K kept in each thread's registers, magic-number
  dequantization of two rows' codes per 32-bit LOP3 + HFMA2, packed half2 products reused for all M rows, 16-bit
  partial sums flushed to fp32 every 16 products (accuracy stated at the kernel), scales once per group.  One
  program per (N tile, K split); split-K (``SPLIT_K > 1``, fills the SMs when N / BLOCK_N alone would not) is
  reduced inside the kernel by the last program of each N tile, in split order: deterministic, no memset or cast
  kernel, a persistent workspace (``_gemv_workspace``) that is only allocated when a split-K config may run.
  fp32 x at M <= 8 takes the GEMM.
* ``_packed_matmul_kernel`` (M > 8, and fp32 x): tensor-core ``tl.dot`` on the dequantized tiles, grouped program order for L2
  reuse, fp32 accumulators; for M <= 16 (``BLOCK_M = 16``) it may split K the same way.

Autotuning is keyed on a bucketed M (next power of two, capped at 4096 for the GEMM; BLOCK_M for the GEMV) plus N
and K, so a new batch size does not retune.  Configs are pruned to the group size and, on a GPU, to the device's
shared memory (queried at the first launch, never at import).  Under ``TRITON_INTERPRET=1`` a single config is used.

W2A8 (``packed_matmul_a8``): ``_packed_matmul_a8_quant_kernel`` quantizes x per token to int8 (symmetric dynamic
min-max, s = max|x| / 127, q = floor(x / s + 0.5) with IEEE division), then the same kernels run with int8 x
(exact in fp16) and multiply each row by its scale at the end.  For M <= 8 the quantizer writes q as fp16 integers
(exact) and the fp16 GEMV runs on them.

Limits (known, not hidden): the W2A8 entry runs fp16 tensor-core MMAs on the int8 values (exact) rather than int8
MMAs; the GEMV's 16-bit partial sums round more often than an fp32 accumulation (bounded at the kernel) and, for
fp16 x, overflow if |x| > 2047 (LANE_RUN = 8 configs raise that to 4094); split-K GEMV launches share one
workspace per device, so they must not run concurrently on two streams; M = 5..8 does not reach 4x cuBLAS bf16
(predicted): the CUDA-core products cost M/2 instructions per weight, which tensor cores would remove; group sizes that are not a multiple of 16 are declined (``supports``) and run on the reference; the first
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


# ---- GEMV: M <= 8, packed half2 math on CUDA cores, K in registers, fused split-K ---------------------------------
# Why this shape (judged by the sm_90 SASS: benchmarks/sass_gemv.py counts it):
# * K stays inside a thread.  A thread owns BLOCK_N / (64 * num_warps) pairs of output rows and walks its K range
#   16 * WORDS weights per row per iteration (one or two 16-byte vectors per row); no lane ever exchanges data with
#   another inside the loop (the old kernel reduced a [BM, BN, BK] broadcast across lanes every K step: 1.5-7
#   shuffles per weight).  The K split is over programs, reduced once at the end (below).
# * Magic-number dequantization, two weights per 32-bit op.  Rows n and n + BLOCK_N/2 are paired: a PRMT / LOP3
#   merge puts 8 codes of row A in the low 16 bits and the same 8 k of row B in the high 16 bits; then per code
#   position ``((comb >> sh) & (3 << 2e) * 0x10001) | magic`` is ONE LOP3 (the magic constant is a kernel argument,
#   so it sits in a register and the mask is the only immediate) and yields the fp16x2 / bf16x2 pair
#   ``magic + c * 4^e``; one HFMA2 ``v * 4^-e - (magic * 4^-e + OFF)`` gives ``c - OFF`` exactly for both rows
#   (every constant is exact: the fp16 magic 1024 / bf16 magic 128 have ulp 1, and so do the scaled ones).  No
#   per-weight convert.
# * Products are packed half2 FMAs with x broadcast from one register half (``.H0_H0`` / ``.H1_H1``): one HFMA2 per
#   two weights per row of x, so a dequantized pair is reused for all M rows of x in registers.
# * Accuracy: a 16-bit lane accumulates LANE_RUN (16) products x * (c - OFF), |c - OFF| <= 2, then is flushed into
#   an fp32 accumulator (the group scale rides in the same FFMA).  Emulated at K = 4096 against the fp32 reference
#   (tests/test_packed_matmul.py::test_gemv_half2_accumulation_error): worst error 0.62x (fp16) / 0.43x (bf16) of
#   the tests' tolerances.  An fp16 lane cannot overflow unless |x| > 65504 / (2 * LANE_RUN) = 2047 (LANE_RUN = 8
#   is available as a config for larger activations).  Codes are centred on OFF (1 for ternary formats, 2
#   otherwise); the remaining ``(OFF - z) * sum(x)`` (asymmetric formats, and seq 2-bit with z = 1.5) is added once
#   per scale group in fp32 from a 16-bit sum of x.
# * Scales once per group (in the flush FFMA); per-channel scales once in the epilogue.
# * Split-K is fused: each program writes its fp32 partial to a persistent workspace, bumps a per-N-tile counter
#   (acq_rel atomic after a CTA barrier), and the last program of the tile sums the partials in split order
#   (deterministic), adds the bias, stores y and re-arms the counter to 0.  No memset or cast kernel per call, and no
#   workspace at all when SPLIT_K == 1.
@triton.jit
def _gemv_load_words(ptrs, H: tl.constexpr, EVEN_K: tl.constexpr, w0, stride_w):
    """One 16-byte vector per row ([H, 4] uint32, a whole row segment per thread, so the compiler keeps it in one
    thread) -> tuple of its 4 words as [H] tensors (register-only splits of the in-thread dimension)."""
    if EVEN_K:
        w = tl.load(ptrs + w0)
    else:
        w = tl.load(ptrs + w0, mask=(w0 + tl.arange(0, 4) < stride_w)[None, :], other=0)
    a, b = tl.split(tl.reshape(w, (H, 2, 2)))  # words (0, 2), (1, 3)
    w0_, w2_ = tl.split(a)
    w1_, w3_ = tl.split(b)
    return (w0_, w1_, w2_, w3_)


@triton.jit
def _gemv_dequant_pair(comb, p: tl.constexpr, magic, OFF: tl.constexpr, X_BF16: tl.constexpr,
                       MATH_F32: tl.constexpr):
    """Codes at position ``p`` (bits 2p and 16 + 2p) of ``comb`` -> [H, 2] (c - OFF) for (row A, row B), exact.

    fp16: magic 1024 (ulp 1) holds ``c * 4^e`` for e <= 4: positions 0..4 unshifted, 5..7 after one shift by 10.
    bf16: magic 128 holds e <= 2: positions 0..2, 3..5 (shift 6), 6..7 (shift 12).
    MATH_F32 (interpreter, bf16 only: it cannot do bf16 arithmetic) takes the same exact values to fp32 first."""
    if X_BF16:
        sh: tl.constexpr = (p // 3) * 6
        dt: tl.constexpr = tl.bfloat16
        mag: tl.constexpr = 128.0
    else:
        sh: tl.constexpr = (p // 5) * 10
        dt: tl.constexpr = tl.float16
        mag: tl.constexpr = 1024.0
    e: tl.constexpr = p - sh // 2
    mask: tl.constexpr = (3 << (2 * e)) * 0x10001
    scl: tl.constexpr = 1.0 / (1 << (2 * e))
    bias: tl.constexpr = -(mag * scl) - OFF
    if sh == 0:
        v = (comb & mask) | magic
    else:
        v = ((comb >> sh) & mask) | magic
    lo = (v & 0xFFFF).to(tl.uint16).to(dt, bitcast=True)
    hi = (v >> 16).to(tl.uint16).to(dt, bitcast=True)
    vv = tl.join(lo, hi)
    if MATH_F32:
        vv = vv.to(tl.float32)
    return tl.fma(vv, scl, bias)


@triton.jit
def _gemv_x8(x_tile, rel: tl.constexpr, k0, K, EVEN_K: tl.constexpr, MATH_F32: tl.constexpr):
    """x[k0 + rel : k0 + rel + 8] of one row (one 16-byte load, whole in every thread; ``x_tile`` points at k0, so
    the constant ``rel`` folds into the load's immediate offset) -> (tuple of 8 scalars, [8] vector).  The splits
    only name register halves."""
    offs = rel + tl.arange(0, 8)
    if EVEN_K:
        v = tl.load(x_tile + offs)
    else:
        v = tl.load(x_tile + offs, mask=k0 + offs < K, other=0.0)
    if MATH_F32:
        v = v.to(tl.float32)
    a, b = tl.split(tl.reshape(v, (4, 2)))  # (0, 2, 4, 6), (1, 3, 5, 7)
    a0, a1 = tl.split(tl.reshape(a, (2, 2)))  # (0, 4), (2, 6)
    b0, b1 = tl.split(tl.reshape(b, (2, 2)))  # (1, 5), (3, 7)
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return (x0, x1, x2, x3, x4, x5, x6, x7), v


@triton.jit
def _gemv_vsum8(v):
    """Sum of an [8] 16-bit vector: pairwise in 16 bits (packed adds), the last add in fp32."""
    a, b = tl.split(tl.reshape(v, (4, 2)))
    a, b = tl.split(tl.reshape(a + b, (2, 2)))
    a, b = tl.split(a + b)
    return a.to(tl.float32) + b.to(tl.float32)


@triton.jit
def _gemv_group_params(scale_ptr, zero_ptr, rows, rmask, g, G, HAS_ZERO: tl.constexpr, zc):
    """fp32 [H, 2] scale s and offset factor s * (OFF - z) of scale group g for the row pairs."""
    ra, rb = tl.split(rows)
    ma, mb = tl.split(rmask)
    sa = tl.load(scale_ptr + ra * G + g, mask=ma, other=0.0).to(tl.float32)
    sb = tl.load(scale_ptr + rb * G + g, mask=mb, other=0.0).to(tl.float32)
    s = tl.join(sa, sb)
    if HAS_ZERO:
        za = tl.load(zero_ptr + ra * G + g, mask=ma, other=0.0).to(tl.float32)
        zb = tl.load(zero_ptr + rb * G + g, mask=mb, other=0.0).to(tl.float32)
        t = s * (zc - tl.join(za, zb))  # zc = OFF here
    else:
        t = s * zc  # zc = OFF - z (0 unless seq 2-bit)
    return s, t


@triton.jit
def _packed_gemv_kernel(
    x_ptr, xs_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    N, K, G, zc, magic,
    stride_xm, stride_qn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_ZC: tl.constexpr, HAS_BIAS: tl.constexpr, X_SCALED: tl.constexpr,
    X_BF16: tl.constexpr, OFF: tl.constexpr, PER_CHANNEL: tl.constexpr, GS16: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
    LANE_RUN: tl.constexpr, SPLIT_K: tl.constexpr, MATH_F32: tl.constexpr,
):
    """y[:M, n0:n0+BLOCK_N] for M = BLOCK_M rows of x (fp16/bf16, K-contiguous rows; W2A8: fp16 integers, X_SCALED).

    Tile = WORDS 32-bit words (16 codes each) per row; rows n0 + i and n0 + BLOCK_N/2 + i share a half2 lane pair.
    GS16 = group_size // 16.  Scales are applied per block of GROUP_WORDS words that lies inside one group."""
    H: tl.constexpr = BLOCK_N // 2
    # words per scale block: the whole tile (per-channel, or the tile inside one group), whole groups per tile, or
    # one word (a group size such as 48 that neither divides nor is divided by the tile)
    GROUP_WORDS: tl.constexpr = WORDS if (PER_CHANNEL or GS16 % WORDS == 0) else (
        GS16 if WORDS % GS16 == 0 else 1)
    NEED_X: tl.constexpr = HAS_ZERO or HAS_ZC
    PDT: tl.constexpr = tl.float32 if MATH_F32 else (tl.bfloat16 if X_BF16 else tl.float16)  # partial sums
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ri = pid_n * BLOCK_N + tl.arange(0, H)
    rows = tl.join(ri, ri + H)  # [H, 2]: (row A, row B)
    rmask = rows < N
    ra, rb = tl.split(rows)
    stride_w = tl.multiple_of(stride_qn // 4, 4)  # words per packed row: whole 16-byte vectors by the layout
    magic = magic.to(tl.uint32)  # a runtime value, so it lives in a register and each dequant is one LOP3
    qw = qw_ptr.to(tl.pointer_type(tl.uint32))
    rw = tl.arange(0, 4)
    # rows past N read row N - 1 instead of being masked (no zero-fill per load); their results are never stored
    wa_ptrs = qw + tl.minimum(ra, N - 1).to(tl.int64)[:, None] * stride_w + rw[None, :]
    wb_ptrs = qw + tl.minimum(rb, N - 1).to(tl.int64)[:, None] * stride_w + rw[None, :]
    n_tiles = tl.cdiv(K, 16 * WORDS)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    acc = ()
    xsum = ()
    for m in tl.static_range(BLOCK_M):
        acc = acc + (tl.zeros((H, 2), dtype=tl.float32),)
        xsum = xsum + (0.0,)
    for t in range(t_begin, t_end):
        w0 = t * WORDS
        kt = w0 * 16
        x_tiles = ()  # one base pointer per row of x and K tile: every x load below is base + constant
        for m in tl.static_range(BLOCK_M):
            x_tiles = x_tiles + (x_ptr + m * stride_xm + kt,)
        wa_w = ()
        wb_w = ()
        for v in tl.static_range(WORDS // 4):  # 16-byte vectors per row
            wa_w = wa_w + _gemv_load_words(wa_ptrs, H, EVEN_K, w0 + 4 * v, stride_w)
            wb_w = wb_w + _gemv_load_words(wb_ptrs, H, EVEN_K, w0 + 4 * v, stride_w)
        for gi in tl.static_range(WORDS // GROUP_WORDS):
            if not PER_CHANNEL:
                s, tz = _gemv_group_params(scale_ptr, zero_ptr, rows, rmask,
                                           (w0 + gi * GROUP_WORDS) // GS16, G, HAS_ZERO, zc)
            gx = ()
            for m in tl.static_range(BLOCK_M):
                gx = gx + (0.0,)
            for q in tl.static_range(GROUP_WORDS):
                wa_q = wa_w[gi * GROUP_WORDS + q]
                wb_q = wb_w[gi * GROUP_WORDS + q]
                # x of this word (two 16-byte loads per row of x), reused by every row pair of the thread
                xs8 = ()
                xv = ()
                for m in tl.static_range(BLOCK_M):
                    lo8, vlo = _gemv_x8(x_tiles[m], (gi * GROUP_WORDS + q) * 16, kt, K, EVEN_K, MATH_F32)
                    hi8, vhi = _gemv_x8(x_tiles[m], (gi * GROUP_WORDS + q) * 16 + 8, kt, K, EVEN_K, MATH_F32)
                    xs8 = xs8 + (lo8 + hi8,)
                    xv = xv + (vlo + vhi,)
                part = ()  # 16-bit partial sums, one [H, 2] per row of x
                for hf in tl.static_range(2):
                    if hf == 0:
                        comb = (wa_q & 0xFFFF) | (wb_q << 16)
                    else:
                        comb = (wa_q >> 16) | (wb_q & 0xFFFF0000)
                    for p in tl.static_range(8):
                        c = _gemv_dequant_pair(comb, p, magic, OFF, X_BF16, MATH_F32)
                        new = ()
                        for m in tl.static_range(BLOCK_M):
                            if p == 0 and (hf == 0 or LANE_RUN == 8):  # a run starts with a product, not 0 + ...
                                new = new + (c * xs8[m][hf * 8 + p],)
                            else:
                                new = new + (tl.fma(c, xs8[m][hf * 8 + p], part[m]),)
                        part = new
                    if LANE_RUN == 8 or hf == 1:  # flush the 16-bit partials into fp32 (scale in the same FFMA)
                        new = ()
                        for m in tl.static_range(BLOCK_M):
                            if PER_CHANNEL:
                                new = new + (acc[m] + part[m].to(tl.float32),)
                            else:
                                new = new + (tl.fma(part[m].to(tl.float32), s, acc[m]),)
                        acc = new
                if NEED_X:  # sum of this word's 16 x per row of x
                    new = ()
                    for m in tl.static_range(BLOCK_M):
                        new = new + (gx[m] + _gemv_vsum8(xv[m]),)
                    gx = new
            if NEED_X:
                if PER_CHANNEL:
                    new = ()
                    for m in tl.static_range(BLOCK_M):
                        new = new + (xsum[m] + gx[m],)
                    xsum = new
                else:
                    new = ()
                    for m in tl.static_range(BLOCK_M):
                        new = new + (acc[m] + tz * gx[m],)
                    acc = new

    # epilogue: per-channel scale and offset, x scale (W2A8), then store or the fused split-K reduction
    if PER_CHANNEL:
        s, tz = _gemv_group_params(scale_ptr, zero_ptr, rows, rmask, 0, 1, HAS_ZERO, zc)
    res = ()
    for m in tl.static_range(BLOCK_M):
        r = acc[m]
        if PER_CHANNEL:
            r = r * s
            if NEED_X:
                r = r + tz * xsum[m]
        if X_SCALED:
            r = r * tl.load(xs_ptr + m)
        res = res + (r,)
    if SPLIT_K == 1:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            r = res[m]
            if HAS_BIAS:
                r = r + bias
            tl.store(y_ptr + m * stride_ym + rows, r.to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        ws_tile = ws_ptr + pid_n * (SPLIT_K * BLOCK_M * BLOCK_N)
        lin = tl.join(tl.arange(0, H), tl.arange(0, H) + H)
        for m in tl.static_range(BLOCK_M):
            tl.store(ws_tile + (pid_k * BLOCK_M + m) * BLOCK_N + lin, res[m])
        tl.debug_barrier()  # every thread's partial is written before the (release) counter bump
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last program of this N tile: reduce in split order, store, re-arm
            if HAS_BIAS:
                bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                r = tl.zeros((H, 2), dtype=tl.float32)
                for sk in range(SPLIT_K):
                    r += tl.load(ws_tile + (sk * BLOCK_M + m) * BLOCK_N + lin, cache_modifier=".cg")
                if HAS_BIAS:
                    r = r + bias
                tl.store(y_ptr + m * stride_ym + rows, r.to(y_ptr.dtype.element_ty), mask=rmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")


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
        tl.store(q_ptr + row * K + k0 + rk, q.to(q_ptr.dtype.element_ty), mask=mask)  # int8, or fp16 (exact)
    tl.store(s_ptr + row, s)


# ---- configs, pruning, autotuning ------------------------------------------------------------------------------
def _zero_ws(nargs) -> None:
    nargs["ws_ptr"].zero_()


def _cfg(split_k: int, num_warps: int, num_stages: int, **kw) -> triton.Config:
    kw["SPLIT_K"] = split_k
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_zero_ws if split_k > 1 else None)


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


_gemm = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "G", "HAS_ZERO", "X_INT8"],
                        prune_configs_by={"early_config_prune": _prune_gemm})(_packed_matmul_kernel)


# ---- GEMV configs, pruning, autotuning, workspace ------------------------------------------------------------------
_GEMV_MAGIC = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}  # 1024.0 / 128.0 in both 16-bit halves


_GEMV_LANE_RUN = 16  # products per 16-bit lane before the fp32 flush (accuracy: see the kernel's comment)


def _gemv_cfg(block_n: int, words: int, warps: int, split_k: int, lane_run: int = _GEMV_LANE_RUN) -> triton.Config:
    return triton.Config(dict(BLOCK_N=block_n, WORDS=words, SPLIT_K=split_k, LANE_RUN=lane_run),
                         num_warps=warps, num_stages=1)


# (BLOCK_N, WORDS, warps, SPLIT_K).  BLOCK_N = 2 rows x 32 lanes x warps x ROWS_PER_THREAD; a thread loads WORDS
# 32-bit words (16 or 32 bytes) per row per K tile.  The first entry that survives pruning is the interpreter's.
_GEMV_CONFIGS = [_gemv_cfg(*c) for c in [
    (64, 4, 1, 1),
    (64, 8, 1, 1), (64, 8, 1, 4), (64, 8, 1, 8), (64, 8, 1, 16), (128, 8, 2, 4), (128, 8, 2, 8), (128, 4, 2, 8),
    (256, 8, 1, 1), (256, 8, 1, 2), (256, 8, 1, 4), (256, 8, 1, 8), (256, 8, 1, 16), (256, 8, 1, 32),
    (128, 8, 1, 1), (128, 8, 1, 2), (128, 8, 1, 4), (128, 8, 1, 8), (128, 8, 1, 16), (128, 8, 1, 32),
    (512, 8, 2, 1), (512, 8, 2, 4), (512, 8, 2, 8), (256, 8, 2, 4), (256, 8, 2, 8),
    (256, 4, 1, 1), (256, 4, 1, 2), (256, 4, 1, 4), (256, 4, 1, 8), (256, 4, 1, 16), (256, 4, 1, 32),
    (512, 4, 1, 8), (512, 4, 1, 16), (128, 4, 1, 1), (128, 4, 1, 4), (128, 4, 1, 8), (128, 4, 1, 16), (128, 4, 1, 32),
]]
_GEMV_MAX_REGS = 160  # estimated 32-bit registers per thread a config may keep live (ptxas spills above ~255)


def _gemv_regs(block_m: int, block_n: int, words: int, warps: int) -> int:
    """Live registers per thread: packed words, fp32 accumulators and 16-bit partials per row pair, x pairs."""
    pairs = block_n // (64 * warps)
    return pairs * (2 * words + block_m * 3) + 8 * block_m + 24


_GEMV_WARPS = (256, 4096)  # grid sizes (warps) worth timing: enough loads in flight on 132 SMs, not a tail of waves


def _prune_gemv(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    K, N, bm = named_args["K"], named_args.get("N"), kwargs["BLOCK_M"]
    keep = []
    for c in configs:
        bn, words, sk = c.kwargs["BLOCK_N"], c.kwargs["WORDS"], c.kwargs["SPLIT_K"]
        if _gemv_regs(bm, bn, words, c.num_warps) > _GEMV_MAX_REGS:
            continue
        if sk > 1 and triton.cdiv(K, 16 * words) < 2 * sk:  # each split gets >= 2 K tiles
            continue
        keep.append(c)
    if N is not None and keep:  # time only grids that fill the GPU (else the widest ones): fewer compiles
        warps = {id(c): triton.cdiv(N, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] * c.num_warps for c in keep}
        fit = [c for c in keep if _GEMV_WARPS[0] <= warps[id(c)] <= _GEMV_WARPS[1]]
        keep = fit or sorted(keep, key=lambda c: -warps[id(c)])[:4]
    if not keep:
        keep = [_GEMV_CONFIGS[0]]
    return keep[:1] if _interpret() else keep


_gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["BLOCK_M", "N", "K", "G", "HAS_ZERO", "X_BF16", "X_SCALED"],
                        prune_configs_by={"early_config_prune": _prune_gemv})(_packed_gemv_kernel)

_GEMV_WS: Dict = {}  # device -> (fp32 partials, int32 counters): persistent, grown on demand, never per call


def _gemv_workspace(device, n_floats: int, n_counters: int):
    """Split-K scratch for the fused reduction.  The counters start at 0 and every launch leaves them at 0 (the last
    program of an N tile re-arms its counter), so they are zeroed once, here, and never again.  One workspace per
    device: GEMV launches that split K must not run concurrently on two streams of one device."""
    ws, cnt = _GEMV_WS.get(device, (None, None))
    if ws is None or ws.numel() < n_floats:
        ws = torch.empty(max(n_floats, 1 << 16), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_counters:
        cnt = torch.zeros(max(n_counters, 1024), dtype=torch.int32, device=device)
    _GEMV_WS[device] = (ws, cnt)
    return ws, cnt


def _gemv_meta(x_dtype, zero_point, code_offset, G: int, gs: int) -> Dict:
    """The constexprs a GEMV launch derives from its operands (shared with ``static_launches``)."""
    if zero_point is not None:
        off, zc = 2, 2.0
    else:
        off = 1 if float(code_offset) <= 1.0 else 2  # centre the codes: |c - OFF| <= 2 keeps 16-bit partials small
        zc = off - float(code_offset)
    return dict(HAS_ZERO=zero_point is not None, HAS_ZC=zero_point is None and zc != 0.0,
                X_BF16=x_dtype == torch.bfloat16, OFF=off, PER_CHANNEL=G == 1, GS16=0 if G == 1 else gs // 16,
                zc=float(zc))


def _launch_gemv(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
                 config: Optional[Dict] = None) -> torch.Tensor:
    y = _alloc((M, N), out_dtype, x.device)
    if N == 0:
        return y
    meta = _gemv_meta(x.dtype, zero_point, code_offset, G, gs)
    zc = meta.pop("zc")
    # the interpreter cannot do bf16 arithmetic (it operates on the bit patterns); there the bf16 kernel takes its
    # exact dequantized values and x to fp32 (the 16-bit rounding of the GPU path is covered by
    # tests/test_packed_matmul.py::test_gemv_half2_accumulation_error)
    common = dict(meta, HAS_BIAS=bias is not None, X_SCALED=x_scale is not None, EVEN_K=K % 128 == 0, BLOCK_M=M,
                  MATH_F32=meta["X_BF16"] and _interpret())
    if config is not None:
        cfgs = [_gemv_cfg(config["BLOCK_N"], config.get("WORDS", 8), config.get("num_warps", 1),
                          config.get("SPLIT_K", 1), config.get("LANE_RUN", _GEMV_LANE_RUN))]
    else:
        cfgs = _GEMV_CONFIGS
    # workspace for the largest split any candidate config may use (none when no candidate splits K)
    need_f = max((triton.cdiv(N, c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_N"] * c.kwargs["SPLIT_K"] * M
                  for c in cfgs if c.kwargs["SPLIT_K"] > 1), default=0)
    need_c = max((triton.cdiv(N, c.kwargs["BLOCK_N"]) for c in cfgs if c.kwargs["SPLIT_K"] > 1), default=0)
    ws, cnt = _gemv_workspace(x.device, need_f, need_c) if need_f else (None, None)
    if ws is None:  # typed placeholders: SPLIT_K == 1 programs never touch them
        ws, cnt = y, y
    args = (x, x_scale, qweight, scale, zero_point, bias, y, ws, cnt, N, K, G, zc, _GEMV_MAGIC[x.dtype],
            x.stride(0), qweight.stride(0), y.stride(0))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    if config is not None:
        c = cfgs[0]
        _packed_gemv_kernel[grid({**common, **c.kwargs})](*args, **common, **c.kwargs, num_warps=c.num_warps,
                                                         num_stages=c.num_stages)
    else:
        _gemv[grid](*args, **common)
    return y


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
    if M <= GEMV_MAX_M and x.dtype in _GEMV_MAGIC:  # decode: the half2 GEMV (fp32 x takes the GEMM below)
        return _launch_gemv(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
                            config)
    y = _alloc((M, N), out_dtype, x.device)
    if N == 0:
        return y
    skinny = M <= 16
    ws = _alloc((M, N), torch.float32, x.device) if skinny else None
    common = dict(HAS_ZERO=zero_point is not None, HAS_BIAS=bias is not None, X_INT8=x_scale is not None)
    co = 0.0 if code_offset is None else float(code_offset)
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


def quantize_rows_int8(x: torch.Tensor, out_dtype: torch.dtype = torch.int8):
    """x [M, K] float -> (q [M, K], s fp32 [M]) with x ~ q * s[:, None] (symmetric, per row).  q holds integers in
    [-127, 127]: int8, or float16 (exact) for the GEMV, which takes 16-bit x."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        raise ValueError("x must be a 2-D float16/bfloat16/float32 tensor")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K (stride(1) == 1), got strides {x.stride()}")
    M, K = x.shape
    q = _alloc((M, K), out_dtype, x.device)
    s = _alloc((M,), torch.float32, x.device)
    block_k = min(1024, max(16, _next_pow2(K)))
    _packed_matmul_a8_quant_kernel[(M,)](x, q, s, K, x.stride(0), _FP32_TINY, BLOCK_K=block_k)
    return q, s


def packed_matmul_a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_features: int,
                     code_offset: Optional[float], config: Optional[Dict] = None) -> torch.Tensor:
    """W2A8: x quantized per token to int8 (dynamic, symmetric), then the packed matmul; output in x's dtype."""
    M, N, K, G, gs = _check(x, qweight, scale, zero_point, bias, in_features, code_offset)
    q, s = quantize_rows_int8(x, torch.float16 if M <= GEMV_MAX_M else torch.int8)
    return _launch(q, s, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, x.dtype, config)


# ---- static-analysis launch descriptors (schema: the static roofline tool, pyquant/bench/static.py) ----------------
# symmetric formats' constant code offset; None = asymmetric (float zero point per group)
_FMT_CODE_OFFSET = {"twn": 1.0, "absmean": 1.0, "seq3": 1.0, "ternary": 1.0, "int2-sym": 2.0, "int2": 2.0,
                    "seq4": 1.5, "seq": 1.5, "int2-asym": None}
_STATIC_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _static_launches_gemv(M: int, N: int, K: int, fmt: str, group_size: Optional[int], x_dtype: str) -> List[Dict]:
    """One candidate call per GEMV config the autotuner may choose for this shape (same pruning as at run time).
    W2A8 (``x_dtype="int8"``) calls are the per-token quantization kernel (fp16 q) followed by the fp16 GEMV.
    Besides the schema's keys, ``triton["divisible_by_16"]`` names the arguments Triton's JIT specializes as
    multiples of 16 (16-byte aligned pointers, ints divisible by 16) for these shapes, as it would at run time."""
    if fmt not in _FMT_CODE_OFFSET:
        raise ValueError(f"fmt={fmt!r}: expected one of {sorted(_FMT_CODE_OFFSET)}")
    if x_dtype not in ("bf16", "fp16", "int8"):
        raise ValueError(f"x_dtype={x_dtype!r}: the GEMV takes 'bf16', 'fp16' or 'int8' (W2A8)")
    co = _FMT_CODE_OFFSET[fmt]
    gs = K if group_size is None else int(group_size)
    if K % gs or (gs != K and gs % 16):
        raise ValueError(f"group_size={group_size} must divide K={K} and be a multiple of 16")
    G = K // gs
    a8 = x_dtype == "int8"
    xt = torch.float16 if a8 else _STATIC_DTYPES[x_dtype]
    tname = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    meta = _gemv_meta(xt, None if co is not None else True, co, G, gs)
    zc = meta.pop("zc")
    consts = dict(meta, HAS_BIAS=False, bias_ptr=None, X_SCALED=a8, EVEN_K=K % 128 == 0, BLOCK_M=M, MATH_F32=False)
    if not a8:
        consts["xs_ptr"] = None
    if not meta["HAS_ZERO"]:
        consts["zero_ptr"] = None
    types = dict(x_ptr="*" + tname[xt], xs_ptr="*fp32", qw_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16",
                 bias_ptr="*" + tname[xt], y_ptr="*bf16" if a8 else "*" + tname[xt], ws_ptr="*fp32",
                 cnt_ptr="*i32", N="i32", K="i32", G="i32", zc="fp32", magic="i32", stride_xm="i32",
                 stride_qn="i32", stride_ym="i32")
    ints = dict(N=N, K=K, G=G, magic=_GEMV_MAGIC[xt], stride_xm=K, stride_qn=-(-K // 64) * 16, stride_ym=N)
    div16 = ["x_ptr", "xs_ptr", "qw_ptr", "scale_ptr", "zero_ptr", "y_ptr", "ws_ptr", "cnt_ptr"] + \
        [n for n, v in ints.items() if v % 16 == 0]
    pre = []
    if a8:  # per-token int8 quantization written as fp16 integers: reads x twice, writes q and the row scales
        bk = min(1024, max(16, _next_pow2(K)))
        qfn = _packed_matmul_a8_quant_kernel
        pre = [{"name": "quantize_rows_int8(fp16 q)",
                "triton": {"fn": qfn, "signature": {"x_ptr": "*bf16", "q_ptr": "*fp16", "s_ptr": "*fp32", "K": "i32",
                                                    "stride_xm": "i32", "TINY": "fp32", "BLOCK_K": "constexpr"},
                           "constexprs": {"BLOCK_K": bk}, "num_warps": 4, "num_stages": 2,
                           "divisible_by_16": ["x_ptr", "q_ptr", "s_ptr"] + (["K", "stride_xm"] if K % 16 == 0
                                                                            else [])},
                "grid": [M, 1, 1], "threads_per_cta": 128, "loop_trips": float(triton.cdiv(K, bk)), "weights": 0,
                "bytes": M * K * 2 * 2 + M * K * 2 + M * 4, "mma_flops": 0}]
    sbytes = N * G * 2 * (2 if meta["HAS_ZERO"] else 1)
    calls = []
    for c in _prune_gemv(_GEMV_CONFIGS, dict(K=K, N=N), BLOCK_M=M):
        bn, words, sk, lane = (c.kwargs[k] for k in ("BLOCK_N", "WORDS", "SPLIT_K", "LANE_RUN"))
        ct = dict(consts, BLOCK_N=bn, WORDS=words, SPLIT_K=sk, LANE_RUN=lane)
        sig = {n: ("constexpr" if n in ct else types[n]) for n in _packed_gemv_kernel.arg_names}
        n_tiles = triton.cdiv(K, 16 * words)
        ws_bytes = 2 * sk * M * N * 4 if sk > 1 else 0  # partials written once and read once by the last program
        launch = {"name": "packed_gemv",
                  "triton": {"fn": _packed_gemv_kernel, "signature": sig, "constexprs": ct, "num_warps": c.num_warps,
                             "num_stages": c.num_stages, "divisible_by_16": [n for n in div16 if sig[n] != "constexpr"]},
                  "grid": [triton.cdiv(N, bn), sk, 1], "threads_per_cta": 32 * c.num_warps,
                  "loop_trips": n_tiles / sk, "weights": N * K,
                  "bytes": N * (-(-K // 64) * 16) + sbytes + M * K * 2 + M * N * 2 + ws_bytes, "mma_flops": 0}
        calls.append({"kernel": "packed_gemv", "backend": "triton",
                      "config": f"BLOCK_N={bn} WORDS={words} SPLIT_K={sk} warps={c.num_warps} LANE_RUN={lane}",
                      "launches": pre + [launch]})
    return calls


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int], x_dtype: str = "bf16") -> List[Dict]:
    """Plain-Python descriptors of what the launcher may launch for this call (see the static roofline tool):
    one dict per candidate config.  M <= GEMV_MAX_M with 16-bit or int8 (W2A8) x: the GEMV."""
    if M <= GEMV_MAX_M and x_dtype in ("bf16", "fp16", "int8"):
        return _static_launches_gemv(M, N, K, fmt, group_size, x_dtype)
    return []

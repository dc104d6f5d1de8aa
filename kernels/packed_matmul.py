"""Fused 2-bit packed matmul: ``y = x @ dequant(Wq).T (+ bias)``; the full-precision weight is never materialized.

Packed layout (defined in ``pyquant/formats.py``): ``qweight`` uint8 ``[N, ceil(K/64)*16]``, K-contiguous; weight
``(n, k)`` is byte ``k // 4`` of row ``n``, bits ``2*(k % 4)``.  Dequantization ``w = (c - z) * s`` with ``s`` (and
``z`` for asymmetric formats) per ``(n, k // group_size)``; symmetric formats use the constant ``code_offset`` as z.

How a tile is dequantized (the GEMV at ``_packed_gemv_kernel``; the GEMM's magic-number path: "GEMM" below)
-------------------------------------------------------------------------------------------------------
Both kernels read the packed weight as 32-bit words (16 codes; 16-byte vector loads: rows are whole 16-byte
vectors) and turn codes into 16-bit floats with the magic-number trick (one LOP3 + one HFMA2 per two weights; see
each kernel's comment).  Every K tile lies inside ONE scale group: the launcher only uses
``BLOCK_K`` values that divide ``group_size`` (or the weight has a single group per row, per-channel / per-tensor),
so the scale and zero point are one value per output column per tile and are applied to the tile's partial sum,
not to every weight:

* symmetric:   ``acc += dot(x, c - z) * s``           (``c - z`` is exact in fp16/bf16: z in {1, 1.5, 2})
* asymmetric:  ``acc += (dot(x, c) - sum_k(x) * z) * s``  (codes exact; z is a float per group)

so the products are exact and the only rounding is the fp32 accumulation, as in the fp32 reference.

Paths
-----
* ``_packed_gemv_kernel`` (M <= 8 with fp16/bf16 x, decode): each thread owns 2-16 output rows and K chunks dealt
  round-robin to the 32 lanes of its warp (the K parallelism that fills the SMs at N = 4096 comes from the lanes);
  partial sums stay in registers, ONE cross-lane reduction at the end (no split-K over programs: no workspace, no
  counters, one kernel, deterministic).  Magic-number dequantization of two rows' codes per 32-bit LOP3 + HFMA2,
  packed half2 products reused for all M rows, 16-bit partial sums flushed to fp32 every 32 (bf16) / 16 (fp16)
  products (accuracy stated at the kernel), scales once per group (per-channel: once in the epilogue).
  Runs 16-bit x with M = 1..3 and W2A8 with M <= 8; fp32 x takes the GEMM.
* ``_packed_matmul_kernel`` (16-bit x with M >= 4, W2A8 with M > 8, fp32 x): tensor-core ``tl.dot`` on
  magic-number-dequantized tiles (M = 4..16 run BLOCK_M = 16, rows past M masked; mma.sync for
  ``BLOCK_M = 16``, wgmma for 64+ on Hopper), grouped program order for L2 reuse, fp32 accumulators; split-K for
  M <= 64 with the reduction fused into the kernel (deterministic).  Large M: see "GEMM" below.

Autotuning is keyed on a bucketed M (next power of two, capped at 4096 for the GEMM; BLOCK_M for the GEMV) plus N
and K, so a new batch size does not retune.  Configs are pruned to the group size and, on a GPU, to the device's
shared memory (queried at the first launch, never at import).  Under ``TRITON_INTERPRET=1`` a single config is used.

GEMM (M >= 4), why it is built this way
---------------------------------------
Judged by SASS compiled for sm_90 (Triton's AOT compiler; ``_static_launches_gemm`` lists every config it can pick)
and the static model predicted time = max(bytes / 4.0e12 B/s, thread-instructions / 3.3e13 /s, MMA flops / 989e12
(int8: 1979e12)), against cuBLAS bf16 bounded the same way:

* weights are read as int32 words (16 codes; 16-byte loads per row for BLOCK_K >= 64) and dequantized by the
  magic-number trick (``_gemm_magic_pair``): ``(word >> shift) & mask | magic`` puts one code into the mantissa of
  each half of a bf16x2 / fp16x2 pair (ONE LOP3 for two weights, the magic a kernel argument so it stays in a
  register), one HFMA2 subtracts the bias (and z for symmetric formats): ``c - z`` exact, 2 values per 32-bit op,
  no per-weight int->float converts.  bf16 x skips the HFMA2 (``OFFSET_SUM``) per channel (16 rows, or zero
  points) and per group at 16 rows x 64+ columns: each code position gets its own magic so a weight enters the MMA
  as ``offset + c`` exactly, and ``sum_k x_k (offset_k + z)`` is subtracted once per output (per group: per output
  and tile) from row sums of x.
* the two halves of each dequantized register must be NEIGHBOURING weights (k, k + 1): that is the pairing of the
  MMA operand fragments and of the 16-byte shared-memory stores that stage the operand.  ``_gemm_dequant_pairs``
  builds, per word, two selects (``w`` low half | ``w << 14`` high half, and the same for the upper bytes: ONE
  LOP3 each, the select mask a runtime argument so LLVM cannot split it) in which code k sits in the low half and
  code k + 1 at the same bits of the high half; per 16 weights 5 shifts + 2 selects + 8 LOP3 + 8 HFMA2, K in
  natural order, so x streams with 16-byte ``cp.async`` (pipelined, no masks per element).  It replaced (predicted,
  sm_90): at BLOCK_M = 16 a K permutation whose x was gathered 2 bytes at a time (~67 of 350 loop instructions per
  thread; 311 now), at BLOCK_M >= 64 ~1 PRMT per weight re-pairing (k, k + 8) registers (445 -> 334 per thread at
  M = 4096).  Its p = 0 field needs ``M + z`` exact, so seq's z = 1.5 (bf16) keeps the K-permuted
  ``_gemm_dequant`` (``PAIRS``, chosen by ``_gemm_pairs``).
* per-channel: scale (and zero point) applied ONCE in the epilogue, the MMA accumulating straight into ``acc``;
  per group: one FFMA per output per group (``BLOCK_K`` divides the group size; configs use BLOCK_K = group size
  where they can).  Asymmetric formats dequantize the raw code and subtract ``z * sum_k(x)``; the row sums come
  from the tensor cores (``x @ ones[BLOCK_K, 16]``) for 64+ rows per channel, or, on weights of more than 2^24
  elements, from a pre-pass once per call (``_gemm_row_sums_kernel``; those tiles are MMA-bound); 16 rows, and 16-bit x with per-group
  scales at any BLOCK_M, sum x elementwise (the extra bf16 MMAs would make those tiles tensor-bound).
* split-K (M <= 64, so that N / BLOCK_N tiles fill 132 SMs at N = 1024..4096): each split writes its fp32 partial
  tile to its own workspace slice, the last split to arrive (per-tile arrival counter, ``atomic_add`` acq_rel)
  sums the slices in fixed order, adds the bias, writes y and resets the counter.  No memset or cast kernel per
  call; the counters are zeroed once per device (``_split_locks``).
* W2A8: int8 x int8 -> int32 MMA on the unsigned codes (``_gemm_codes_i8``: 4 codes per shift + AND, each
  32-bit result used as is as 4 int8 operand values), z applied through the (int32, exact) row sums of x
  (BLOCK_M = 16 per group: ``x @ ones[BLOCK_K, BLOCK_N]`` on the int8 tensor cores, broadcast in the accumulator's
  layout; per channel elementwise -- a [16, 16] x @ ones MMA made every warp issue the whole tile), per-token scale
  at the end.  The operand order is K-permuted inside each 16-group (dot position 16c + 4p + b = weight 16c + 4b + p)
  and the int8 quantizer writes x in that order (rows padded with zeros to a multiple of 16), so no byte permutes
  regroup the codes: at M = 16, g128, 3.9 -> 2.8-3.1 SASS instructions per weight, the GEMM alone predicted 3.5x
  -> 4.7-4.8x (14336 x 4096) and 3.9x -> 5.2-5.3x (4096 x 14336).  The quantizer runs S programs per row at
  small M (``_quant_grid``; each finds the row's max and quantizes 1/S of it), keeps the IEEE division (the QAT
  fake-quant's exact rounding rule) and is ~0.9 us of the W2A8 call at M = 16, K = 14336: the whole call
  predicts 5.0-5.3x cuBLAS bf16 at M = 16 on the two large shapes.
* large M (M >= 1024): the fused wgmma kernel predicts MMA-bound (0.97-1.00x cuBLAS, dequant issue time hidden
  behind the MMA) in every 16-bit format, per-group zero points included (0.76x before the pair dequantization:
  its byte permutes did not hide), so only fp32 x dispatches to dequantize-to-x's-dtype
  (``_packed_dequant_kernel``, memory-bound, ~7% of the GEMM) + cuBLAS (``torch.matmul``); that path predicts
  0.95x for the others and stays documented as "measured later" (``_dequant_dispatch`` is the one switch).

Predicted (sm_90 SASS, NOT measured) speedups over cuBLAS bf16, best config per shape: the README's benchmark
table, printed from ``benchmarks/results/static-sm90-*.json`` by ``pyquant bench static`` (kept there only, so no
copy here goes stale).  The model counts the whole kernel (loop x trips + the rest once per thread) and scales
bandwidth and issue rate by min(1, CTAs / 132).

W2A8 (``packed_matmul_a8``): ``_packed_matmul_a8_quant_kernel`` quantizes x per token to int8 (symmetric dynamic
min-max, s = max|x| / 127, q = floor(x / s + 0.5) with IEEE division), then the kernels run on the quantized x and
multiply each row by its scale at the end: for M <= 8 the quantizer writes q as fp16 integers (exact) and the fp16
GEMV runs on them; the GEMM uses int8 MMA.

Limits (known, not hidden): the GEMM's ``OFFSET_SUM`` path (bf16 x) accumulates the magic offsets
with the signal (up to 128x it) before subtracting them, so its fp32 accumulation error is ~2^-17 of sum |x|
instead of ~2^-24 (bounded on the host by ``test_gemm_offset_sum_accuracy_at_large_k``; the tensor cores' own
accumulation order needs the GPU test); the GEMV's 16-bit partial sums round more often than an fp32 accumulation (bounded at
the kernel) and, for fp16 x, overflow if |x| > 2047 (a pinned LANE_RUN = 8 raises that to 4094); W2A8 at M = 4..8 stays on
the fp16 GEMV (its CUDA-core products cost ~M/2 instructions per weight; the int8 GEMM is not yet scored there);
at N = 1024 the GEMM is capped near 2.4x (M = 16) by ~500 instructions per thread outside the K loop (prologue,
fused split-K reduction) over ~256 weights per thread, with 0.5 us launch overhead the model's cap is ~3.4x; group
sizes that are not a multiple of 16 are declined (``supports``) and run on the reference;
the first call for a new (M bucket, N, K) autotunes, so run a layer once before capturing it in a CUDA graph;
split-K GEMMs share arrival counters, so concurrent streams of one device must not run them at the same time; under the interpreter bf16 arithmetic and bf16 dots are wrong
(triton-lang/triton#11584), so bf16 tiles are dequantized and multiplied in fp32 there (same bit patterns; compiled
code stays bf16), and its fp32 -> bf16 casts truncate.  The split-K memory ordering (release/acquire through the
counters), the GEMV's bf16 16-bit arithmetic and the wgmma paths have no CPU test of their own; they need the GPU
tests.  No timing in this file or its tests was measured on a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["packed_matmul", "packed_matmul_a8", "quantize_rows_int8", "BoundPackedMatmul", "GEMV_MAX_M"]

GEMV_MAX_M = 8  # W2A8 rows handled by the FMA GEMV kernel (fp16-integer x); larger M uses tl.dot
# 16-bit x with M >= _GEMM_MIN_M runs the tensor-core GEMM (BLOCK_M = 16, rows past M masked): predicted (sm_90
# SASS, not measured) faster than the CUDA-core GEMV from M = 4 on at every benchmark shape (the GEMV's products
# cost ~M/2 instructions per weight; the MMA's cost is the same for 1..16 rows); M = 1..3 keeps the GEMV
_GEMM_MIN_M = 4
_M_BUCKET_CAP = 4096
_FP32_TINY = torch.finfo(torch.float32).tiny


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division: ``triton.cdiv`` is a ConstexprFunction in recent Triton and costs microseconds per
    call, which the per-call launch path (grids, workspace sizes) paid several times."""
    return -(-a // b)


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


# ---- GEMV: M <= 8, packed half2 math on CUDA cores, K split over the lanes of a warp ---------------------------------
# Why this shape (judged by the sm_90 SASS that ``pyquant bench static`` counts).  Predicted (NOT measured), bf16 x,
# best config per shape, SASS instructions per weight / speedup over cuBLAS bf16 (all 0 spills, 16-byte loads):
#
#   M  N x K          twn        twn g128   int2-asym  asym g128   (before: split-K over programs, best config)
#   1  4096 x 14336   2.05 7.1x  2.13 6.8x  2.23 6.6x  2.45 6.1x   (2.32 6.4x, 2.43 6.1x, 2.51 5.9x, 2.65 5.7x)
#   1  14336 x 4096   2.14 6.8x  2.24 6.6x  2.30 6.4x  2.46 6.0x   (2.32 6.4x, 2.43 6.1x, 2.53 5.9x, 2.65 5.7x)
#   2  4096 x 14336   2.68 5.6x                        3.26 4.7x   (2.86 5.3x, 2.93 5.2x, 3.54 4.3x)
#   2  14336 x 4096   2.91 5.2x                        3.27 4.7x
#   4  4096 x 14336   3.99 3.9x  4.17 3.7x  4.81 3.2x  5.01 3.1x
#   4  14336 x 4096   4.43 3.5x  4.57 3.4x  5.35 2.9x  5.43 2.9x
#   8  4096 x 14336   6.75 2.4x                        12.9 1.3x   (asym g128: 8 bytes spilled)
#   8  14336 x 4096   7.69 2.1x                        13.7 1.2x   (asym g128: 40 bytes spilled)
#
# M = 4..8 miss 4x: the products alone are M/2 per weight, and the final reduction (10 instructions per row and row
# of x per thread) and x (16-byte loads and sums per row of x and lane, shared by only 2-8 rows) grow with M; with
# zero points per group M = 8 runs out of registers (the previous kernel predicted 10.3 / 1.56x there: worse now).
# N = 1024 x K = 4096, M = 1: twn 2.93 / 3.0x, int2-asym g128 3.45 / 2.75x with 2 rows per thread (512 warps;
# previous 1.86x / 1.77x); the physical cap there is ~3.4x.
# The M = 1 loop body is ~1.98 per weight (bf16: 8 LOP3 + 8 HFMA2 dequant + 8 HFMA2 products + 2 shifts + the merge
# per 16 weights, the fp32 flush, loads); the rest is the prologue and the final 5-round shuffle reduction, ~0.1 per
# weight at ~3.5k weights per thread (what 132 SMs x 4 warps leave each thread at these shapes).
# * A thread owns 2R output rows (R row pairs) and K chunks ``ks, ks + KSPLIT, ks + 2 KSPLIT, ...`` of 16 * WORDS
#   weights (one 16-byte vector per row and WORDS // 4); the KSPLIT lanes of one row group walk K side by side (the
#   warp's loads of one row are contiguous: coalesced) and each keeps its partial sums in registers.  Nothing is
#   exchanged inside the K loop; ONE cross-lane reduction (``tl.sum`` over the lane axis: log2(KSPLIT) shuffle
#   rounds) at the very end.  So no split-K over programs, no workspace, no counters, no second kernel: the grid is
#   N / BLOCK_N programs and the K parallelism that fills 132 SMs at N = 4096 comes from the lanes.  (The previous
#   kernel split K over programs and reduced through a workspace: the reduction code, counted once per thread, and
#   the epilogue cost 0.2-0.3 instructions per weight at the shapes of issue #10.)
# * The rows a thread owns share its x: x is loaded once per chunk per thread (16-byte loads) and reused for 2R rows
#   and, per dequantized weight pair, for all M rows of x.
# * Magic-number dequantization, two weights per 32-bit op.  Rows n and n + BLOCK_N/2 are paired: a merge puts 8
#   codes of row A in the low 16 bits and the same 8 k of row B in the high 16 bits; then per code position
#   ``((comb >> sh) & (3 << 2e) * 0x10001) | magic`` is ONE LOP3 (the magic constant is a kernel argument, so it
#   sits in a register and the mask is the only immediate) and yields the fp16x2 / bf16x2 pair ``magic + c * 4^e``;
#   one HFMA2 ``v * 4^-e - (magic * 4^-e + OFF)`` gives ``c - OFF`` exactly for both rows (every constant is exact:
#   the fp16 magic 1024 / bf16 magic 128 have ulp 1, and so do the scaled ones).  No per-weight convert.  The
#   4^-e factor rides in that HFMA2 for free, so x needs no pre-scaled copies.  Per 16 weights: 8 LOP3 + 8 HFMA2
#   + 2 (bf16) / 1 (fp16) shifts + the merge: one byte permute (``prmt.b32`` 0x5410 / 0x7632, inline PTX) per
#   16 weights; a shift and a LOP3 in the plain form, which the interpreter runs (bit-identical).  The PRMT cut the
#   best M = 1 config (twn per-channel 4096x14336) from 1,011 to 960 loop instructions per 512 weights.
# * Keeping the compiler on that plan (Triton emits scalar 16-bit ops; LLVM's SLP vectorizer re-pairs them into
#   half2 ops and pairs whatever is isomorphic): two words are stacked per step so every op covers 2 words x the
#   thread's row pairs, and the merge mask is a runtime value; with either missing the SASS showed byte permutes
#   (PRMT) re-pairing halves (~0.1-0.6 per weight).  Pairing k with k + 8 of one row instead of two rows made the
#   vectorizer pair rows anyway, with a PRMT per pair.
# * Products are packed half2 FMAs with x broadcast from one register half (``.H0_H0`` / ``.H1_H1``): one HFMA2 per
#   two weights per row of x.  The pairing of rows (not of k) is what keeps the broadcast free: pairing k and k + 8
#   of one row would need a byte permute per x pair.
# * Accuracy: a 16-bit lane accumulates LANE_RUN products x * (c - OFF), |c - OFF| <= 2, then is flushed into an
#   fp32 accumulator (the group scale rides in the same FFMA).  Emulated at K = 4096 against the fp32 reference
#   (tests/test_packed_matmul.py::test_gemv_half2_accumulation_error).  An fp16 lane cannot overflow unless
#   |x| > 65504 / (2 * LANE_RUN) (fp16 runs 16: 2047; a pinned LANE_RUN = 8 doubles it).  Codes are centred
#   on OFF (1 for ternary formats, 2 otherwise); the remaining ``(OFF - z) * sum(x)`` (asymmetric formats, and seq
#   2-bit with z = 1.5) is added once per scale group in fp32 from a 16-bit sum of x.
# * Scales once per group (in the flush FFMA); per-channel scales once in the epilogue, after the reduction.
@triton.jit
def _gemv_load_words(ptrs, H: tl.constexpr, KS: tl.constexpr, EVEN_K: tl.constexpr, woff, stride_w):
    """One 16-byte vector per row and lane ([H, KS, 4] uint32; the last axis whole in one thread) -> its 4 words
    as [H, KS] tensors (register-only splits of the in-thread axis).  ``woff`` [1, KS, 4]: word offsets in the row."""
    if EVEN_K:
        w = tl.load(ptrs + woff)
    else:
        w = tl.load(ptrs + woff, mask=woff < stride_w, other=0)
    a, b = tl.split(tl.reshape(w, (H, KS, 2, 2)))  # words (0, 2), (1, 3)
    w0_, w2_ = tl.split(a)
    w1_, w3_ = tl.split(b)
    return (w0_, w1_, w2_, w3_)


@triton.jit
def _gemv_dequant_pair(comb, p: tl.constexpr, magic, OFF: tl.constexpr, X_BF16: tl.constexpr,
                       MATH_F32: tl.constexpr):
    """Codes at position ``p`` (bits 2p and 16 + 2p) of ``comb`` -> [..., 2] (c - OFF) for (row A, row B), exact.

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
def _gemv_merge(wa, wb, hf: tl.constexpr, PRMT: tl.constexpr, lo_mask, hi_mask):
    """Half ``hf`` of every word of row A (low 16 bits of the result) and of row B (high 16 bits).  PRMT (compiled
    kernels): one byte permute, where the shift-and-select form is two instructions (a shift, then a LOP3); the
    interpreter, which cannot run inline PTX, takes that form (bit-identical)."""
    if PRMT:
        if hf == 0:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [wa, wb], dtype=tl.uint32,
                                          is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [wa, wb], dtype=tl.uint32,
                                          is_pure=True, pack=1)
    else:
        if hf == 0:
            r = (wa & lo_mask) | (wb << 16)
        else:
            r = (wa >> 16) | (wb & hi_mask)
    return r


@triton.jit
def _gemv_x8(x_tile, rel: tl.constexpr, kl, K, EVEN_K: tl.constexpr, MATH_F32: tl.constexpr):
    """x[k : k + 8] of one row of x for every lane, ``k = kl + rel`` ([KS] first k of each lane's chunk; one
    16-byte load per lane; ``x_tile`` [KS] points at each lane's chunk, so ``rel`` folds into the immediate offset)
    -> (tuple of 8 [KS] tensors, [KS, 8] vector).  The splits only name register halves."""
    offs = rel + tl.arange(0, 8)
    if EVEN_K:
        v = tl.load(x_tile[:, None] + offs[None, :])
    else:
        v = tl.load(x_tile[:, None] + offs[None, :], mask=(kl[:, None] + offs[None, :]) < K, other=0.0)
    if MATH_F32:
        v = v.to(tl.float32)
    KS: tl.constexpr = v.shape[0]
    a, b = tl.split(tl.reshape(v, (KS, 4, 2)))  # (0, 2, 4, 6), (1, 3, 5, 7)
    a0, a1 = tl.split(tl.reshape(a, (KS, 2, 2)))  # (0, 4), (2, 6)
    b0, b1 = tl.split(tl.reshape(b, (KS, 2, 2)))  # (1, 5), (3, 7)
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return (x0, x1, x2, x3, x4, x5, x6, x7), v


@triton.jit
def _gemv_vsum8(v):
    """Sum over the last axis of a [KS, 8] 16-bit tensor: pairwise in 16 bits (packed adds), the last add in fp32."""
    KS: tl.constexpr = v.shape[0]
    a, b = tl.split(tl.reshape(v, (KS, 4, 2)))
    a, b = tl.split(tl.reshape(a + b, (KS, 2, 2)))
    a, b = tl.split(a + b)
    return a.to(tl.float32) + b.to(tl.float32)


@triton.jit
def _gemv_group_params(scale_ptr, zero_ptr, ra, rb, ma, mb, g, G, HAS_ZERO: tl.constexpr, zc,
                       MASKED: tl.constexpr = True):
    """fp32 (scale s, offset factor s * (OFF - z)) of scale group(s) ``g`` for the row pairs, joined (row A, row B)
    on a new last axis.  ``ra``/``rb``/``ma``/``mb``/``g``: broadcast-compatible row indices, row masks, groups.
    MASKED=False (EVEN_K, rows clamped to N - 1 by the caller): every group is < G and every row real, so the loads
    take no mask (no compare and no predicate per row and group in the K loop)."""
    if MASKED:
        # a K chunk may reach past the last group (K not a multiple of the chunk): those groups hold no weight and x
        # is 0 there, but their scale must not be read from past the row (the last row's would be past the tensor)
        ma = ma & (g < G)
        mb = mb & (g < G)
        sa = tl.load(scale_ptr + ra * G + g, mask=ma, other=0.0).to(tl.float32)
        sb = tl.load(scale_ptr + rb * G + g, mask=mb, other=0.0).to(tl.float32)
    else:
        sa = tl.load(scale_ptr + ra * G + g).to(tl.float32)
        sb = tl.load(scale_ptr + rb * G + g).to(tl.float32)
    s = tl.join(sa, sb)
    if HAS_ZERO:
        if MASKED:
            za = tl.load(zero_ptr + ra * G + g, mask=ma, other=0.0).to(tl.float32)
            zb = tl.load(zero_ptr + rb * G + g, mask=mb, other=0.0).to(tl.float32)
        else:
            za = tl.load(zero_ptr + ra * G + g).to(tl.float32)
            zb = tl.load(zero_ptr + rb * G + g).to(tl.float32)
        t = s * (zc - tl.join(za, zb))  # zc = OFF here
    else:
        t = s * zc  # zc = OFF - z (0 unless seq 2-bit)
    return s, t


@triton.jit
def _packed_gemv_kernel(
    x_ptr, xs_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    N, K, G, zc, magic, lo_mask,
    stride_xm, stride_qn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_ZC: tl.constexpr, HAS_BIAS: tl.constexpr, X_SCALED: tl.constexpr,
    X_BF16: tl.constexpr, OFF: tl.constexpr, PER_CHANNEL: tl.constexpr, GS16: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KSPLIT: tl.constexpr,
    WORDS: tl.constexpr, LANE_RUN: tl.constexpr, MATH_F32: tl.constexpr, PRMT: tl.constexpr,
):
    """y[:M, n0:n0+BLOCK_N] for M = BLOCK_M rows of x (fp16/bf16, K-contiguous rows; W2A8: fp16 integers, X_SCALED).

    Chunk = WORDS 32-bit words (16 codes each) per row; lane ks of a row group takes chunks ks + KSPLIT * t; rows
    n0 + i and n0 + BLOCK_N/2 + i share a half2 lane pair.  GS16 = group_size // 16.  EVEN_K: every lane's every
    chunk lies inside K (K a multiple of 16 * WORDS * KSPLIT): no masks.  Scales are applied per block of
    GROUP_WORDS words that lies inside one group."""
    H: tl.constexpr = BLOCK_N // 2
    KS: tl.constexpr = KSPLIT
    # words per scale block: the whole chunk (per-channel, or the chunk inside one group), whole groups per chunk,
    # or one word (a group size such as 48 that neither divides nor is divided by the chunk)
    GROUP_WORDS: tl.constexpr = WORDS if (PER_CHANNEL or GS16 % WORDS == 0) else (
        GS16 if WORDS % GS16 == 0 else 1)
    NEED_X: tl.constexpr = HAS_ZERO or HAS_ZC
    # words stacked per step (two when the scale block allows): each op then covers 2 words x the thread's row
    # pairs, which is what keeps LLVM's vectorizer pairing the (row A, row B) halves (fewer rows: byte permutes)
    QS: tl.constexpr = 2 if GROUP_WORDS % 2 == 0 else 1
    # 16-bit products per lane before the fp32 flush: a run covers one or more whole steps (16 products per lane)
    RUN_STEPS: tl.constexpr = LANE_RUN // 16 if LANE_RUN >= 16 else 1
    pid_n = tl.program_id(0)
    ri = pid_n * BLOCK_N + tl.arange(0, H)
    ks = tl.arange(0, KS)
    rows = tl.join(ri, ri + H)  # [H, 2]: (row A, row B)
    rmask = rows < N
    ra, rb = tl.split(rows)
    ma, mb = tl.split(rmask)
    stride_w = tl.multiple_of(stride_qn // 4, 4)  # words per packed row: whole 16-byte vectors by the layout
    magic = magic.to(tl.uint32)  # a runtime value, so it lives in a register and each dequant is one LOP3
    # 0x0000FFFF, but a runtime value: with a constant, LLVM pushes each code position's shift and mask through the
    # row-pair merge below and re-joins the two 16-bit halves with a byte permute per pair (seen in the SASS)
    lo_mask = lo_mask.to(tl.uint32)
    hi_mask = ~lo_mask
    qw = qw_ptr.to(tl.pointer_type(tl.uint32))
    rw = tl.arange(0, 4)
    # rows past N read row N - 1 instead of being masked (no zero-fill per load); their results are never stored
    # 32-bit row offsets (one IMAD each; the launcher checks the packed weight has < 2^31 words)
    rac = tl.minimum(ra, N - 1)
    rbc = tl.minimum(rb, N - 1)
    wa_ptrs = qw + (rac * stride_w)[:, None, None]
    wb_ptrs = qw + (rbc * stride_w)[:, None, None]
    lane_w = (ks * WORDS)[None, :, None] + rw[None, None, :]  # [1, KS, 4]: a lane's first word in its chunk
    n_chunks = tl.cdiv(K, 16 * WORDS)
    n_trips = tl.cdiv(n_chunks, KS)

    acc = ()
    xsum = ()
    for m in tl.static_range(BLOCK_M):
        acc = acc + (tl.zeros((H, KS, QS, 2), dtype=tl.float32),)
        xsum = xsum + (tl.zeros((KS,), dtype=tl.float32),)
    for t in range(0, n_trips):
        w0 = t * (KS * WORDS)  # first word of this trip's chunk of lane 0
        kl = (w0 + ks * WORDS) * 16  # [KS]: first k of each lane's chunk
        x_tiles = ()  # one pointer per lane per row of x: every x load below is that + a constant
        for m in tl.static_range(BLOCK_M):
            x_tiles = x_tiles + (x_ptr + m * stride_xm + kl,)
        wa_w = ()
        wb_w = ()
        for v in tl.static_range(WORDS // 4):  # 16-byte vectors per row
            wa_w = wa_w + _gemv_load_words(wa_ptrs, H, KS, EVEN_K, lane_w + (w0 + 4 * v), stride_w)
            wb_w = wb_w + _gemv_load_words(wb_ptrs, H, KS, EVEN_K, lane_w + (w0 + 4 * v), stride_w)
        for gi in tl.static_range(WORDS // GROUP_WORDS):
            if not PER_CHANNEL:
                g = ((w0 + ks * WORDS + gi * GROUP_WORDS) // GS16)[None, :]  # [1, KS]: each lane's group
                # EVEN_K: rows past N read row N - 1's scales, like its weights (never stored), unmasked
                s, tz = _gemv_group_params(scale_ptr, zero_ptr, (rac if EVEN_K else ra)[:, None],
                                           (rbc if EVEN_K else rb)[:, None], ma[:, None], mb[:, None], g, G,
                                           HAS_ZERO, zc, not EVEN_K)
                s = s[:, :, None, :]
                # added to each of the QS stacked word slots of acc, which the epilogue sums: 1 / QS of it each
                # (exact: a power of two)
                tz = tz[:, :, None, :] * (1.0 / QS)
            gx = ()
            for m in tl.static_range(BLOCK_M):
                gx = gx + (tl.zeros((KS,), dtype=tl.float32),)
            for qq in tl.static_range(GROUP_WORDS // QS):
                # the QS words of the step (first: gi * GROUP_WORDS + qq * QS), stacked on a new axis: [H, KS, QS]
                if QS == 2:
                    wa_q = tl.join(wa_w[gi * GROUP_WORDS + qq * QS], wa_w[gi * GROUP_WORDS + qq * QS + 1])
                    wb_q = tl.join(wb_w[gi * GROUP_WORDS + qq * QS], wb_w[gi * GROUP_WORDS + qq * QS + 1])
                else:
                    wa_q = wa_w[gi * GROUP_WORDS + qq * QS][:, :, None]
                    wb_q = wb_w[gi * GROUP_WORDS + qq * QS][:, :, None]
                # x of these words (two 16-byte loads per word, lane and row of x), reused by every row pair
                xs8 = ()
                new = ()
                for m in tl.static_range(BLOCK_M):
                    xw = ()
                    gxm = gx[m]
                    for j in tl.static_range(QS):
                        lo8, vlo = _gemv_x8(x_tiles[m], (gi * GROUP_WORDS + qq * QS + j) * 16, kl, K, EVEN_K,
                                            MATH_F32)
                        hi8, vhi = _gemv_x8(x_tiles[m], (gi * GROUP_WORDS + qq * QS + j) * 16 + 8, kl, K, EVEN_K,
                                            MATH_F32)
                        xw = xw + (lo8 + hi8,)
                        if NEED_X:  # sum of this word's 16 x per lane and row of x
                            gxm = gxm + _gemv_vsum8(vlo + vhi)
                    xs8 = xs8 + (xw,)
                    new = new + (gxm,)
                gx = new
                for hf in tl.static_range(2):
                    comb = _gemv_merge(wa_q, wb_q, hf, PRMT, lo_mask, hi_mask)
                    for p in tl.static_range(8):
                        c = _gemv_dequant_pair(comb, p, magic, OFF, X_BF16, MATH_F32)  # [H, KS, QS, 2]
                        new = ()
                        for m in tl.static_range(BLOCK_M):
                            if QS == 2:
                                xk = tl.join(xs8[m][0][hf * 8 + p], xs8[m][1][hf * 8 + p])[None, :, :, None]
                            else:
                                xk = xs8[m][0][hf * 8 + p][None, :, None, None]
                            # a run starts with a product (not 0 + ...): first step of a run, or every half
                            if p == 0 and ((hf == 0 and qq % RUN_STEPS == 0) or LANE_RUN == 8):
                                new = new + (c * xk,)
                            else:
                                new = new + (tl.fma(c, xk, part[m]),)
                        part = new
                    if LANE_RUN == 8 or (hf == 1 and (qq % RUN_STEPS == RUN_STEPS - 1 or
                                                      qq == GROUP_WORDS // QS - 1)):
                        # flush the 16-bit partials into fp32 (end of a run, or of a scale block)
                        new = ()
                        for m in tl.static_range(BLOCK_M):
                            if PER_CHANNEL:
                                new = new + (acc[m] + part[m].to(tl.float32),)
                            else:
                                new = new + (tl.fma(part[m].to(tl.float32), s, acc[m]),)
                        acc = new
            if NEED_X:
                if PER_CHANNEL:
                    new = ()
                    for m in tl.static_range(BLOCK_M):
                        new = new + (xsum[m] + gx[m],)
                    xsum = new
                else:
                    new = ()
                    for m in tl.static_range(BLOCK_M):
                        new = new + (acc[m] + tz * gx[m][None, :, None, None],)
                    acc = new

    # epilogue: the one cross-lane reduction, per-channel scale and offset, x scale (W2A8), bias, store
    if PER_CHANNEL:
        s, tz = _gemv_group_params(scale_ptr, zero_ptr, ra, rb, ma, mb, 0, 1, HAS_ZERO, zc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    for m in tl.static_range(BLOCK_M):
        r = tl.sum(tl.sum(acc[m], axis=2), axis=1)  # [H, 2]: the stacked words, then the lanes
        if PER_CHANNEL:
            r = r * s
            if NEED_X:
                r = r + tz * tl.sum(xsum[m], axis=0)
        if X_SCALED:
            r = r * tl.load(xs_ptr + m)
        if HAS_BIAS:
            r = r + bias
        tl.store(y_ptr + m * stride_ym + rows, r.to(y_ptr.dtype.element_ty), mask=rmask)


# ---- GEMM: M > 8, tensor cores on magic-number-dequantized tiles; fused split-K --------------------------------
# The packed weight is read as int32 words (16 codes each, K-contiguous; rows are whole 16-byte vectors, so a K tile
# of BLOCK_K >= 64 is one 16-byte load per row and thread).  Code e (0..7) of each 16-bit half of a word sits at bits
# 2e; weight k of the word is half k // 8, code k % 8.
_HMASK = -65536  # 0xFFFF0000 as int32: the high-half select mask of _gemm_dequant_pairs (a runtime argument)
_BF16_MAGIC = 0x43004300  # bf16x2 (128, 128): ulp 1, 7 mantissa bits; code bits 2-5 stay inside the mantissa
_FP16_MAGIC = 0x64006400  # fp16x2 (1024, 1024): ulp 1, 10 mantissa bits; code bits 2-9 stay inside the mantissa


@triton.jit
def _gemm_magic_pair(S, mask: tl.constexpr, mul: tl.constexpr, add, magic, DT: tl.constexpr,
                     F32_MATH: tl.constexpr, RAW: tl.constexpr = False):
    """One code per 16-bit half of ``S`` (selected by ``mask``, a 2-bit field at bits 2..9) -> [..., 2] values
    ``c - z``.  Why this shape: ``(S & mask) | magic`` is ONE LOP3 per two weights (mask immediate, magic in a
    register: it is a kernel argument, so the compiler cannot rematerialize it), and it yields two 16-bit floats
    ``M + c * 4**p`` exactly (the code lands in the mantissa; M = 128 for bf16, 1024 for fp16).  One packed FMA
    (HFMA2) then computes ``v * 4**-p + add`` with ``add = -(M * 4**-p + z)``: both terms are exact, so the result
    ``c - z`` is exact (z in {0, 1, 1.5, 2}; ``M * 4**-p + z`` is representable because p >= 1).  No per-weight
    int->float convert and no byte permutes.  ``F32_MATH`` (interpreter, bf16 only: its bf16 arithmetic is broken)
    does the same FMA in fp32 on the same bit patterns.

    ``RAW`` (``OFFSET_SUM`` in the GEMM): ``add`` is this position's OWN magic, ``M * 4**-p`` (the exponent
    lowered by 2p), and the pair ``M * 4**-p + c`` is returned as is -- the LOP3 alone; the caller subtracts
    ``sum_k x_k (M * 4**-p(k) + z)`` once per output instead of the FMA per two weights."""
    u = (S & mask) | (add if RAW else magic)
    v = tl.join(u.to(tl.int16), (u >> 16).to(tl.int16)).to(DT, bitcast=True)
    if RAW:
        r = v.to(tl.float32) if F32_MATH else v
    elif F32_MATH:
        r = tl.fma(v.to(tl.float32), mul, add)
    else:
        r = tl.fma(v, tl.full(v.shape, mul, DT), add)
    return r


@triton.jit
def _gemm_dequant(w, magic, a_4, a_16, a_64, a_256, DT: tl.constexpr, F32_MATH: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KPERM: tl.constexpr = False, RAW: tl.constexpr = False):
    """int32 words [BLOCK_N, BLOCK_K // 16] -> ``c - z`` [BLOCK_N, BLOCK_K] (DT, exact), natural K order.

    Each code is first moved to bits 2..9 of its half by one shift per word shared by several codes (bf16 has room
    for 2 codes per shift, fp16 for 4), so per 16 weights: 4 (bf16) / 2 (fp16) shifts + 8 LOP3 + 8 HFMA2."""
    if DT == tl.bfloat16:
        s0 = w << 2
        s1 = w >> 2
        s2 = w >> 6
        s3 = w >> 10
        v0 = _gemm_magic_pair(s0, 0x000C000C, 0.25, a_4, magic, DT, F32_MATH, RAW)
        v1 = _gemm_magic_pair(s0, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
        v2 = _gemm_magic_pair(s1, 0x000C000C, 0.25, a_4, magic, DT, F32_MATH, RAW)
        v3 = _gemm_magic_pair(s1, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
        v4 = _gemm_magic_pair(s2, 0x000C000C, 0.25, a_4, magic, DT, F32_MATH, RAW)
        v5 = _gemm_magic_pair(s2, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
        v6 = _gemm_magic_pair(s3, 0x000C000C, 0.25, a_4, magic, DT, F32_MATH, RAW)
        v7 = _gemm_magic_pair(s3, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
    else:
        s0 = w << 2
        s1 = w >> 6
        v0 = _gemm_magic_pair(s0, 0x000C000C, 0.25, a_4, magic, DT, F32_MATH, RAW)
        v1 = _gemm_magic_pair(s0, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
        v2 = _gemm_magic_pair(s0, 0x00C000C0, 0.015625, a_64, magic, DT, F32_MATH, RAW)
        v3 = _gemm_magic_pair(s0, 0x03000300, 0.00390625, a_256, magic, DT, F32_MATH, RAW)
        v4 = _gemm_magic_pair(s1, 0x000C000C, 0.25, a_4, magic, DT, F32_MATH, RAW)
        v5 = _gemm_magic_pair(s1, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
        v6 = _gemm_magic_pair(s1, 0x00C000C0, 0.015625, a_64, magic, DT, F32_MATH, RAW)
        v7 = _gemm_magic_pair(s1, 0x03000300, 0.00390625, a_256, magic, DT, F32_MATH, RAW)
    # v_e: [BN, W, 2 (half)]; each join appends a last axis, so this tree's axes are (half, e & 4, e & 2, e & 1)
    # after the word axis and the reshape reads k = 16 word + 8 half + e: the layout's order, no permutation of x
    c = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    if KPERM:
        # dot-K order k' = 16 word + 2 e + half instead: a register's two halves (k, k + 8) become neighbours
        # (k', k' + 1), which is the pairing the MMA operand and its 16-byte shared-memory stores want -- no byte
        # permutes to re-pair them (the caller loads x in the same permuted order)
        c = tl.permute(c, (0, 1, 3, 4, 5, 2))
    return tl.reshape(c, (BLOCK_N, BLOCK_K))


@triton.jit
def _gemm_dequant_pairs(w, magic, hmask, a_1, a_16, DT: tl.constexpr, F32_MATH: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, RAW: tl.constexpr = False):
    """int32 words [BLOCK_N, BLOCK_K // 16] -> ``c - z`` [BLOCK_N, BLOCK_K] (DT, exact), natural K order, with the
    two halves of every 32-bit register holding NEIGHBOURING weights (k, k + 1) -- the pairing the MMA operand
    fragments and the 16-byte shared-memory stores want, so x needs no permutation and no PRMT re-pairs weights.

    Byte j of a word holds codes 4j .. 4j+3 (bits 0-1, 2-3, 4-5, 6-7).  With ``t = w >> 2`` (one shift per word),
    ``d_j = byte j of w | byte j of t << 16`` is ONE byte permute (PRMT) and has code 4j / 4j+1 at bits 0-1 of its
    low / high half and 4j+2 / 4j+3 at bits 4-5: two magic-number pairs (one LOP3 + one HFMA2 each, see
    ``_gemm_magic_pair``; the bit 0-1 field has p = 0, so z must make ``M + z`` exact: z in {0, 1, 2}, the caller's
    ``PAIRS`` condition).  Per 16 weights: 1 SHF + 4 PRMT + 8 LOP3 + 8 HFMA2 (the K-permuted ``_gemm_dequant``:
    4 shifts + 8 LOP3 + 8 HFMA2, plus a 2-byte gather per x element)."""
    # s_lo: codes 0..7 (low half) | codes 1..8 (high half); s_hi: codes 8..15 | codes 9..16 (no 16th: unread)
    # the bit-select ((a ^ b) & m) ^ b = a & m | b & ~m with m = hmask = 0xFFFF0000 a kernel ARGUMENT: ptxas fuses
    # it into ONE LOP3; with a literal m, LLVM rewrites it into and/or of complementary masks, which compiles to two.
    # The arithmetic shifts' sign copies land in bits no mask reads.
    w16 = w >> 16
    s_lo = (((w << 14) ^ w) & hmask) ^ w
    s_hi = (((w >> 2) ^ w16) & hmask) ^ w16
    d0 = s_lo
    d1 = s_lo >> 8
    d2 = s_hi
    d3 = s_hi >> 8
    v00 = _gemm_magic_pair(d0, 0x00030003, 1.0, a_1, magic, DT, F32_MATH, RAW)
    v01 = _gemm_magic_pair(d0, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
    v10 = _gemm_magic_pair(d1, 0x00030003, 1.0, a_1, magic, DT, F32_MATH, RAW)
    v11 = _gemm_magic_pair(d1, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
    v20 = _gemm_magic_pair(d2, 0x00030003, 1.0, a_1, magic, DT, F32_MATH, RAW)
    v21 = _gemm_magic_pair(d2, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
    v30 = _gemm_magic_pair(d3, 0x00030003, 1.0, a_1, magic, DT, F32_MATH, RAW)
    v31 = _gemm_magic_pair(d3, 0x00300030, 0.0625, a_16, magic, DT, F32_MATH, RAW)
    # v_jh: [BN, W, 2 (half l)] = weights k = 4j + 2h + l.  The joins append axes (h, j & 1, j >> 1) after l; the
    # permute puts them in k order (j >> 1, j & 1, h, l) -- register renaming only, every axis is inside a thread
    c = tl.join(tl.join(tl.join(v00, v01), tl.join(v10, v11)), tl.join(tl.join(v20, v21), tl.join(v30, v31)))
    c = tl.permute(c, (0, 1, 5, 4, 3, 2))
    return tl.reshape(c, (BLOCK_N, BLOCK_K))


@triton.jit
def _gemm_codes_i8(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K // 16] -> unsigned codes [BLOCK_N, BLOCK_K] as int8 (W2A8's int8 MMA operand;
    the code offset is applied through the row sums of x), in the GEMM's permuted K order: ``q_p = (w >> 2p) &
    0x03030303`` holds codes p, 4 + p, 8 + p, 12 + p of the word in its bytes 0..3, and is used AS IS as the 4
    int8 values at dot positions 4p .. 4p + 3 (k' = 16 word + 4 p + byte).  So per 16 weights: 3 shifts + 4 LOP3
    and no byte permutes -- the natural order (k = 16 word + 4 byte + p) would need a 4x4 byte transpose (~8 PRMT)
    or per-byte extracts (the SASS of that version: ~1 PRMT + ~0.9 SHF per weight).  x is stored in the same order
    by the int8 quantizer (``_packed_matmul_a8_quant_kernel`` KPERM); sums over K do not care about the order."""
    q0 = (w & 0x03030303)
    q1 = ((w >> 2) & 0x03030303)
    q2 = ((w >> 4) & 0x03030303)
    q3 = ((w >> 6) & 0x03030303)
    # bytes of each q_p: join(join(B0, B2), join(B1, B3)) has axes (byte >> 1, byte & 1) -> flat index = byte
    b0 = tl.join(tl.join(q0.to(tl.int8), (q0 >> 16).to(tl.int8)), tl.join((q0 >> 8).to(tl.int8),
                                                                        (q0 >> 24).to(tl.int8)))
    b1 = tl.join(tl.join(q1.to(tl.int8), (q1 >> 16).to(tl.int8)), tl.join((q1 >> 8).to(tl.int8),
                                                                        (q1 >> 24).to(tl.int8)))
    b2 = tl.join(tl.join(q2.to(tl.int8), (q2 >> 16).to(tl.int8)), tl.join((q2 >> 8).to(tl.int8),
                                                                        (q2 >> 24).to(tl.int8)))
    b3 = tl.join(tl.join(q3.to(tl.int8), (q3 >> 16).to(tl.int8)), tl.join((q3 >> 8).to(tl.int8),
                                                                        (q3 >> 24).to(tl.int8)))
    # axes after the word: (byte >> 1, byte & 1, p >> 1, p & 1); the permute puts p before the byte -- register
    # renaming only (every axis is inside a thread): k' = 16 word + 4 p + byte
    c = tl.join(tl.join(b0, b2), tl.join(b1, b3))
    c = tl.permute(c, (0, 1, 4, 5, 2, 3))
    return tl.reshape(c, (BLOCK_N, BLOCK_K))


@triton.jit
def _gemm_dot(a, b, acc):
    """``acc + a @ b`` with fp32 (or int32 for int8 operands) accumulation in the tensor cores; fp32 operands use
    exact IEEE products (TF32 would round x)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _packed_matmul_kernel(
    x_ptr, xs_ptr, qw_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr, rs_ptr,
    M, N, K, G, group_size: tl.constexpr, code_offset, magic, hmask, M_BUCKET,
    stride_xm, stride_qn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, X_INT8: tl.constexpr, DOT_F32: tl.constexpr,
    PER_CHANNEL: tl.constexpr, PAIRS: tl.constexpr, OFFSET_SUM_OK: tl.constexpr, GROUP_SUM_MMA: tl.constexpr,
    K256: tl.constexpr, ROW_SUMS: tl.constexpr, RS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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

    WORDS: tl.constexpr = BLOCK_K // 16
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, WORDS)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    row_words = stride_qn // 4
    # rows past M / N load row M - 1 / N - 1 instead of being masked (their results are never stored), and K a
    # multiple of 256 (K256, the launcher's; every config's BLOCK_K divides 256) needs no K mask either: the tile
    # loads are then unpredicated cp.async copies, no per-tile address-range selects (predicted M = 4 int2-asym g128
    # 4096 x 4096: see the README's table)
    NO_K_MASK: tl.constexpr = K256 and 256 % BLOCK_K == 0
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm
    w_rows = qw_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] \
        * row_words
    # dequantized operand dtype: x's 16-bit type (fp16 for fp32 x: c - z is exact in fp16, then widened)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        DT: tl.constexpr = tl.bfloat16
        MB: tl.constexpr = 128.0
    else:
        DT: tl.constexpr = tl.float16
        MB: tl.constexpr = 1024.0
    # FMA addends -(M 4**-p + z): symmetric formats fold z = code_offset in; asymmetric ones dequantize the raw
    # code c (z = 0 here) and subtract z * sum_k(x) per group (exact: codes are exact, z is one float per group)
    zc = 0.0 if HAS_ZERO else code_offset
    # OFFSET_SUM (bf16 x, per-channel scales): the dequantization is the LOP3 alone.  Each code position p gets its
    # own magic 128 * 4**-p (the bf16 exponent lowered by 2p: -p * 0x0100 in each half), so a weight enters the MMA
    # as 128 * 4**-p + c, exactly (8 significant bits, exact bf16 x bf16 products in the fp32 accumulator), and the
    # offsets leave as ONE term per output row, sum_k x_k (128 * 4**-p(k) + z), from the row sums of x that the
    # zero-point formats already take (two classes of columns in x @ B[BLOCK_K, 16] with 64+ rows, an elementwise
    # [16, BLOCK_K] accumulator weighted once after the loop with 16).  Saves the HFMA2 per two weights (1/2 per
    # weight); costs the cancellation of the offsets in fp32: |offset| / |c - z| <= 128, so the accumulation error
    # is ~2^-17 of sum |x| -- far below bf16's rounding of the output.  Where: 16 rows (issue-bound; predicted
    # M = 16 twn 4096 x 14336 5.99x -> 6.29x, int2-asym 14336 x 4096 4.71x -> 5.62x), and 64+ rows with zero points,
    # which pay the x @ B MMAs anyway.  Not: 64+ rows of a symmetric format -- there the extra MMAs (1/8-1/4 of
    # the tile's) would make the tile tensor-bound (predicted M = 64 twn 14336 x 4096 2.84x -> 2.39x); symmetric
    # formats on small weights (OFFSET_SUM_OK, ``_gemm_offset_sum``: the once-per-program reduction of the
    # [16, BLOCK_K] sums outweighs the few tiles a split-K program runs, 2.40x -> 2.17x at 1024 x 4096); fp16 x --
    # its magic 1024 makes the error 8x larger, next to fp16's 8x finer output; per-group scales -- the offset term
    # would be one more subtraction per output and tile.
    # Per group (OFFSET_SUM_G): 16 rows and 64+ columns, where the tile's row sums come from one narrow MMA (see the
    # loop): x @ B[BLOCK_K, 32] yields per row both sum x and sum x * offset, so the offsets and z leave as one
    # subtraction per output and tile, against the HFMA2 per two weights (predicted M = 16 int2-asym g128
    # 4096 x 4096: see the README's table)
    OFFSET_SUM_G: tl.constexpr = OFFSET_SUM_OK and not PER_CHANNEL and x_ptr.dtype.element_ty == tl.bfloat16 and (
        BLOCK_M == 16 and BLOCK_N >= 64)
    # PRE_SUMS (ROW_SUMS, the launcher's ``_gemm_row_sums``: 16-bit x, per channel, zero points, 17+ rows, large
    # weights): sum_k x per row comes precomputed (``_gemm_row_sums_kernel``, RS_SPLIT partials per
    # row) instead of from x @ ones[BLOCK_K, 16] in every tile of every column block -- 1/8-1/4 more MMAs where the
    # MMAs are the bound.  Without OFFSET_SUM: its 128x offsets need the in-tile sums, whose fp32 rounding cancels
    # against the accumulator's (a whole-row sum does not: K = 4096 with biased x broke the accuracy bound), so
    # these tiles dequantize with the HFMA2 again (cheap where the tiles are MMA-bound)
    PRE_SUMS: tl.constexpr = ROW_SUMS and PER_CHANNEL and not X_INT8 and BLOCK_M > 16 and HAS_ZERO
    OFFSET_SUM: tl.constexpr = OFFSET_SUM_G or (OFFSET_SUM_OK and PER_CHANNEL and not PRE_SUMS and
                                                x_ptr.dtype.element_ty == tl.bfloat16 and (BLOCK_M == 16 or HAS_ZERO))
    if OFFSET_SUM:
        a_1 = magic
        a_4 = magic - 0x01000100
        a_16 = magic - 0x02000200
        a_64 = a_16  # fp16 positions: unused with bf16
        a_256 = a_16
    elif DOT_F32:
        a_1 = -(MB + zc)
        a_4 = -(MB * 0.25 + zc)
        a_16 = -(MB * 0.0625 + zc)
        a_64 = -(MB * 0.015625 + zc)
        a_256 = -(MB * 0.00390625 + zc)
    else:
        a_1 = (-(MB + zc)).to(DT)
        a_4 = (-(MB * 0.25 + zc)).to(DT)
        a_16 = (-(MB * 0.0625 + zc)).to(DT)
        a_64 = (-(MB * 0.015625 + zc)).to(DT)
        a_256 = (-(MB * 0.00390625 + zc)).to(DT)
    if X_INT8 and PER_CHANNEL:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # row sums of x (for z * sum_k x): with 64+ rows they come from the tensor cores, x @ ones[BLOCK_K, 16] (a few
    # extra MMAs per tile instead of BLOCK_M * BLOCK_K adds: all 16 columns are equal, max reads one).  With 16
    # rows a [16, 16] x @ ones dot made Triton lay the shared x operand out with all 4 warps along M (every warp
    # issued the whole tile's MMAs and epilogue: 4x the work), so there: per channel, one add per element into a
    # [16, BLOCK_K] accumulator, reduced once after the loop; per group with int8 x, x @ ones[BLOCK_K, BLOCK_N] --
    # as many MMAs as the tile's own (int8 MMAs run at twice the bf16 rate: the tensor cores have the room at
    # M = 16), and the sums arrive already broadcast in the accumulator's layout, where tl.sum + a layout
    # conversion through shared memory cost ~86 instructions per thread and tile (predicted W2A8 g128 M = 16:
    # 4.2-4.5x -> 5.0-5.3x); per group with 16-bit x, x @ ones[BLOCK_K, 32] per tile at BLOCK_N >= 64 (see the
    # loop; the doubled bf16 MMAs would be the bound), else tl.sum per tile
    # (16-bit x with per-group scales and 64+ rows: x @ ones[BLOCK_K, 16] only where the launcher says the weight
    # is small and M below 1024 (GROUP_SUM_MMA, ``_gemm_group_sum_mma``): the MMAs, 1/8 more tensor work, make the
    # mma.sync tiles of the large weights (and the MMA-bound tiles of large M) tensor-bound -- predicted M = 64 int2-asym g128 14336 x 4096 2.33x with them, 2.58x
    # elementwise -- while 4096 x 4096 goes the other way, 2.31x elementwise, 2.51x with them)
    XSUM_MMA: tl.constexpr = BLOCK_M > 16 and (X_INT8 or (PER_CHANNEL and not PRE_SUMS) or GROUP_SUM_MMA)
    if X_INT8:
        ones = tl.full((BLOCK_K, 16), 1, dtype=tl.int8)
        xs_acc = tl.zeros((BLOCK_M, 16), dtype=tl.int32)
    elif DOT_F32 or x_ptr.dtype.element_ty == tl.float32:
        ones = tl.full((BLOCK_K, 16), 1.0, dtype=tl.float32)
        xs_acc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    else:
        ones = tl.full((BLOCK_K, 16), 1.0, dtype=DT)
        xs_acc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    if X_INT8 and PER_CHANNEL and not XSUM_MMA:  # exact int32 row sums of int8 x (z = code offset too)
        xacc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
    elif (HAS_ZERO or OFFSET_SUM) and PER_CHANNEL and not XSUM_MMA and not PRE_SUMS:
        xacc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        xacc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)  # unused
    # BLOCK_M = 16: permute K inside each 16-group (see _gemm_dequant) and load x in that order; the x tile is small
    # next to the weight tile there (16 rows), so its 2-byte gathers cost less than re-pairing every weight.  With
    # more rows (wgmma) the gathers cost more than they save, so K stays in order.
    KPERM: tl.constexpr = BLOCK_M == 16 and not X_INT8 and not PAIRS
    if KPERM:
        rkx = (rk // 16) * 16 + (rk % 2) * 8 + (rk % 16) // 2
    else:
        rkx = rk
    if OFFSET_SUM:
        # the magic offset 128 * 4**-p of each dot position: _gemm_dequant_pairs puts weights 4j + l at p = 0 and
        # 4j + 2 + l at p = 2; _gemm_dequant code e of a half at p = 1 + e % 2 (dot order e = k % 8, or with
        # KPERM e = (k' % 16) // 2)
        if PAIRS:
            pos = tl.where((rk % 4) < 2, 0, 2)
        elif KPERM:
            pos = 1 + ((rk % 16) // 2) % 2
        else:
            pos = 1 + (rk % 8) % 2
        wmag = tl.where(pos == 0, 128.0, tl.where(pos == 1, 32.0, 8.0))
        if XSUM_MMA:  # columns 0-7: sum x; 8-15: sum x * offset
            ones = tl.where(tl.arange(0, 16)[None, :] < 8, 1.0, wmag[:, None]).to(ones.dtype)
        if OFFSET_SUM_G:  # per block of 8 columns (one warp's): columns 0-3 sum x, 4-7 sum x * offset
            gsum = tl.where((tl.arange(0, 32) % 8)[None, :] < 4, 1.0, wmag[:, None]).to(
                tl.float32 if DOT_F32 else DT)
    # int8 x comes from the quantizer in _gemm_codes_i8's K order, rows padded with zeros to a multiple of 16
    k_lim = tl.cdiv(K, 16) * 16 if X_INT8 else K
    for t in range(t_begin, t_end):
        offs_k = t * BLOCK_K + rkx
        offs_w = t * WORDS + rw
        if NO_K_MASK:
            x = tl.load(x_rows + offs_k[None, :])
            w = tl.load(w_rows + offs_w[None, :])
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_k < k_lim)[None, :], other=0)
            w = tl.load(w_rows + offs_w[None, :], mask=(offs_w < row_words)[None, :], other=0)
        if X_INT8:
            # int8 x int8 -> int32 tensor-core MMA on the unsigned codes (0..3 fit int8 exactly)
            c = tl.trans(_gemm_codes_i8(w, BLOCK_N, BLOCK_K))
            if PER_CHANNEL:
                acc = tl.dot(x, c, acc, out_dtype=tl.int32)
                if XSUM_MMA:
                    xs_acc = tl.dot(x, ones, xs_acc, out_dtype=tl.int32)
                else:
                    xacc += x.to(tl.int32)
            else:
                part = tl.dot(x, c, out_dtype=tl.int32).to(tl.float32)
                s, z = _tile_group_params(scale_ptr, zero_ptr, offs_n, n_mask, (t * BLOCK_K) // group_size, G,
                                          HAS_ZERO)
                if XSUM_MMA:
                    xs_t = tl.max(tl.dot(x, ones, tl.zeros((BLOCK_M, 16), dtype=tl.int32), out_dtype=tl.int32),
                                  axis=1).to(tl.float32)[:, None]
                else:  # 16 rows: x @ ones[BLOCK_K, BLOCK_N], in the accumulator's layout (see the row-sum note above)
                    xs_t = tl.dot(x, tl.full((BLOCK_K, BLOCK_N), 1, dtype=tl.int8),
                                  tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), out_dtype=tl.int32).to(tl.float32)
                if HAS_ZERO:
                    part = part - xs_t * z[None, :]
                else:
                    part = part - xs_t * code_offset
                acc += part * s[None, :]
        else:
            if PAIRS:
                c = _gemm_dequant_pairs(w, magic, hmask, a_1, a_16, DT, DOT_F32, BLOCK_N, BLOCK_K, OFFSET_SUM)
            else:
                c = _gemm_dequant(w, magic, a_4, a_16, a_64, a_256, DT, DOT_F32, BLOCK_N, BLOCK_K, KPERM,
                                  OFFSET_SUM)
            if DOT_F32 or x.dtype == tl.float32:  # interpreter bf16 (triton-lang/triton#11584) or fp32 x
                x = x.to(tl.float32)
                c = c.to(tl.float32)
            c = tl.trans(c)  # W^T tile [BLOCK_K, BLOCK_N]
            if PER_CHANNEL:
                acc = _gemm_dot(x, c, acc)
                if (HAS_ZERO or OFFSET_SUM) and not PRE_SUMS:
                    if XSUM_MMA:
                        xs_acc = _gemm_dot(x, ones, xs_acc)
                    else:
                        xacc += x.to(tl.float32)
            else:
                # one scale group per tile (BLOCK_K divides group_size): scale applied once per tile
                part = _gemm_dot(x, c, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
                s, z = _tile_group_params(scale_ptr, zero_ptr, offs_n, n_mask, (t * BLOCK_K) // group_size, G,
                                          HAS_ZERO)
                if OFFSET_SUM_G:
                    # the two column classes of x @ gsum, max over each class's 4 equal columns (inside a warp),
                    # broadcast onto the [16, 4, BLOCK_N / 4] view as in the zero-point branch below
                    NWB: tl.constexpr = 4
                    r = _gemm_dot(x, gsum, tl.zeros((BLOCK_M, NWB * 8), dtype=tl.float32))
                    xw, xo = tl.split(tl.max(tl.reshape(r, (BLOCK_M, NWB, 2, 4)), axis=3))  # [16, NWB] each
                    p3 = tl.reshape(part, (BLOCK_M, NWB, BLOCK_N // NWB))
                    if HAS_ZERO:
                        z3 = tl.reshape(z, (NWB, BLOCK_N // NWB))
                        off = xo[:, :, None] + xw[:, :, None] * z3[None, :, :]
                    else:
                        off = (xo + xw * code_offset)[:, :, None]
                    part = tl.reshape(p3 - off, (BLOCK_M, BLOCK_N))
                elif HAS_ZERO:
                    if XSUM_MMA:
                        xs_t = tl.max(_gemm_dot(x, ones, tl.zeros((BLOCK_M, 16), dtype=tl.float32)), axis=1)
                        part = part - xs_t[:, None] * z[None, :]
                    else:
                        # 16 rows, 64+ columns: x @ ones[BLOCK_K, 32], 1/4 more MMAs at BLOCK_N = 128 (the full
                        # x @ ones[BLOCK_K, BLOCK_N] of int8 x would double them: tensor-bound), one sum per block of
                        # BLOCK_N / 4 columns -- the 4 warps' column blocks of the tile, so max over the 8 columns
                        # of a block stays inside a warp and the [16, 4] sums broadcast onto the tile's
                        # [16, 4, BLOCK_N / 4] view.  Was tl.sum + a layout conversion through shared memory per
                        # tile: predicted M = 16 int2-asym g128 3.47 -> 3.20 SASS per weight at 14336 x 4096,
                        # 3.91x -> 4.21x.  Fewer columns: summed elementwise
                        if BLOCK_M == 16 and BLOCK_N >= 64:
                            NWB: tl.constexpr = 4
                            r = _gemm_dot(x, tl.full((BLOCK_K, NWB * 8), 1.0, dtype=c.dtype),
                                          tl.zeros((BLOCK_M, NWB * 8), dtype=tl.float32))
                            xw = tl.max(tl.reshape(r, (BLOCK_M, NWB, 8)), axis=2)  # [16, NWB]
                            p3 = tl.reshape(part, (BLOCK_M, NWB, BLOCK_N // NWB))
                            z3 = tl.reshape(z, (NWB, BLOCK_N // NWB))
                            part = tl.reshape(p3 - xw[:, :, None] * z3[None, :, :], (BLOCK_M, BLOCK_N))
                        else:
                            xs_t = tl.sum(x.to(tl.float32), axis=1)
                            part = part - xs_t[:, None] * z[None, :]
                acc += part * s[None, :]
    if PER_CHANNEL:  # the per-channel scale (and zero point) applied ONCE, here, not per K step
        s, z = _tile_group_params(scale_ptr, zero_ptr, offs_n, n_mask, 0, G, HAS_ZERO)
        if X_INT8:
            if XSUM_MMA:
                xsum = tl.max(xs_acc, axis=1).to(tl.float32)
            else:
                xsum = tl.sum(xacc, axis=1).to(tl.float32)
            if HAS_ZERO:
                out = acc.to(tl.float32) - xsum[:, None] * z[None, :]
            else:
                out = acc.to(tl.float32) - xsum[:, None] * code_offset
        elif PRE_SUMS:
            # whole-row sums: subtracted by the first split only (the splits' partial tiles add up)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if pid_k == 0:
                for i in tl.static_range(RS_SPLIT):
                    xsum += tl.load(rs_ptr + offs_m * RS_SPLIT + i, mask=m_mask, other=0.0)
            out = acc - xsum[:, None] * z[None, :]
        elif OFFSET_SUM:
            if XSUM_MMA:  # all columns of a class are equal: max reads one
                cls = tl.arange(0, 16)[None, :] < 8
                xsum = tl.max(tl.where(cls, xs_acc, -3.0e38), axis=1)
                xmag = tl.max(tl.where(cls, -3.0e38, xs_acc), axis=1)
            else:
                xsum = tl.sum(xacc, axis=1)
                xmag = tl.sum(xacc * wmag[None, :], axis=1)
            if HAS_ZERO:
                out = acc - xmag[:, None] - xsum[:, None] * z[None, :]
            else:
                out = acc - (xmag + xsum * code_offset)[:, None]
        elif HAS_ZERO:
            if XSUM_MMA:
                out = acc - tl.max(xs_acc, axis=1)[:, None] * z[None, :]
            else:
                out = acc - tl.sum(xacc, axis=1)[:, None] * z[None, :]
        else:
            out = acc
        out = out * s[None, :]
    else:
        out = acc
    if X_INT8:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        out = out * xs[:, None]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tile_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K > 1:
        # fused split-K: every split stores its fp32 partial tile to its own workspace slice (no zeroing needed),
        # then bumps the tile's arrival counter; the last split to arrive sums the slices, adds the bias, writes
        # y and resets the counter to 0 for the next call.  No memset or cast kernel per call; the sum order is
        # fixed (slice 0, 1, ...), so the result is deterministic.
        MN = M.to(tl.int64) * N
        tl.store(ws_ptr + pid_k * MN + tile_off, out, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(SPLIT_K):
                out += tl.load(ws_ptr + i * MN + tile_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
            tl.store(y, out.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid, 0)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemm_row_sums_kernel(x_ptr, rs_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """Program (m, i) of (M, S): the fp32 sum of row m of x over its i-th share of the K blocks -> rs[m, i]
    (the GEMM's epilogue adds the S partials)."""
    m = tl.program_id(0)
    i = tl.program_id(1)
    S = tl.num_programs(1)
    rk = tl.arange(0, BLOCK_K)
    a = tl.zeros((BLOCK_K,), dtype=tl.float32)
    row = x_ptr + m.to(tl.int64) * stride_xm
    for b in range(i, tl.cdiv(K, BLOCK_K), S):
        offs = b * BLOCK_K + rk
        a += tl.load(row + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(rs_ptr + m * S + i, tl.sum(a, axis=0))


# ---- large M: dequantize once to x's dtype, then cuBLAS (torch.matmul) -----------------------------------------
@triton.jit
def _packed_dequant_kernel(qw_ptr, scale_ptr, zero_ptr, w_ptr, N, K, G, group_size, code_offset, magic, stride_qn,
                           HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w [N, K] (w_ptr's dtype) = (c - z) * s, rounded once from fp32; codes by the magic-number trick (fp16, so
    ``magic`` is the fp16 one); memory-bound (2-byte writes per weight dominate)."""
    WORDS: tl.constexpr = BLOCK_K // 16
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_w = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    n_mask = offs_n < N
    row_words = stride_qn // 4
    w_rows = qw_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + offs_n.to(tl.int64)[:, None] * row_words
    w = tl.load(w_rows + offs_w[None, :], mask=n_mask[:, None] & (offs_w < row_words)[None, :], other=0)
    c = _gemm_dequant(w, magic, tl.cast(-256.0, tl.float16), tl.cast(-64.0, tl.float16), tl.cast(-16.0, tl.float16),
                      tl.cast(-4.0, tl.float16), tl.float16, False, BLOCK_N, BLOCK_K).to(tl.float32)
    g = offs_k // group_size
    mask = n_mask[:, None] & (offs_k < K)[None, :]
    s = tl.load(scale_ptr + offs_n[:, None] * G + g[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero_ptr + offs_n[:, None] * G + g[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        z = code_offset
    out = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out, ((c - z) * s).to(w_ptr.dtype.element_ty), mask=mask)


# ---- W2A8: per-token int8 quantization of x ---------------------------------------------------------------------
@triton.jit
def _packed_matmul_a8_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, TINY, BLOCK_K: tl.constexpr,
                                   KPERM: tl.constexpr = False, FAST_DIV: tl.constexpr = False):
    """One row of x -> int8 (or fp16-integer) codes and its fp32 scale.  KPERM (the int8 GEMM's operand): the row
    is written padded to ``Kp = 16 * ceil(K / 16)`` (zeros past K) in the GEMM's K order, position
    ``16 c + 4 p + b`` holding x[16 c + 4 b + p] (``_gemm_codes_i8``); the permutation is its own inverse.

    Grid (M, S): the S programs of a row each find the row's max (the whole row: cheap next to the divisions) and
    quantize 1/S of its BLOCK_K blocks, so a few rows still spread over the SMs (``_quant_grid``); program 0 writes
    the scale.  Every program computes the same scale, so S does not change the result.

    FAST_DIV (compiled kernels): ``x / s`` through ptxas's own ``div.rn.f32`` fast path with the reciprocal hoisted
    out of the loop.  Once per row: c = 2^-e for s = m 2^e (m in [1, 2)), sc = s c = m, ``r = r0 + r0 (1 - sc r0)``
    (r0 = ``rcp.approx``); per element: ``xc = x c`` (exact), ``q0 = xc r``, ``q = q0 + r (xc - sc q0)`` (two
    FMAs): the operations ptxas emits per element minus the per-element reciprocal, its refinement and the range
    check (FCHK) with its slow-path branch, which the scaling makes unnecessary (sc in [1, 2), |xc| < 256: every
    operand and intermediate a normal float far from overflow, the fast path's condition for the correctly
    rounded quotient of xc / sc, which is x / s).  Checked on the host against exact rational arithmetic (1.08M
    quotients next to rounding midpoints, r0 off by -1 / 0 / +1 ulp: no mismatch).  A row holding inf (s = inf)
    gives codes of -127 where ``div_rn`` gives 0 (its outputs are inf / NaN either way, times s).  The interpreter,
    which cannot run inline PTX, divides with ``div_rn``."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    rk = tl.arange(0, BLOCK_K)
    # the max in x's own dtype (exact in any format; bf16 / fp16: packed 2-wide max and abs)
    amax = tl.zeros((BLOCK_K,), dtype=x_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0).to(tl.float32), 127.0), TINY)
    if FAST_DIV:
        # c = 2^-e for s = m 2^e (m in [1, 2); s is normal: >= TINY, and <= 2^121 as |x| <= 2^128): x c / (s c) is
        # x / s exactly, and sc = s c = m puts every operand of the fast path in a tame range
        c = ((254 - (s.to(tl.uint32, bitcast=True) >> 23)) << 23).to(tl.float32, bitcast=True)
        sc = s * c
        r0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [sc], dtype=tl.float32, is_pure=True,
                                       pack=1)
        r = tl.fma(r0, tl.fma(-sc, r0, 1.0), r0)
    Kq = tl.cdiv(K, 16) * 16 if KPERM else K
    per = tl.cdiv(tl.cdiv(Kq, BLOCK_K), n_parts)  # blocks per program
    for b in range(part * per, tl.minimum((part + 1) * per, tl.cdiv(Kq, BLOCK_K))):
        k0 = b * BLOCK_K
        v = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        if FAST_DIV:
            vc = v * c  # exact: c is a power of two (a result below the normal range means |x / s| < 2^-125: q = 0)
            q0 = vc * r
            q = tl.floor(tl.fma(r, tl.fma(-sc, q0, vc), q0) + 0.5)
        else:
            q = tl.floor(tl.math.div_rn(v, s) + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(q_ptr.dtype.element_ty)  # int8 / fp16
        if KPERM:
            # x loaded in order (16-byte loads), the codes permuted as the 4 x 4 transpose of each 16-group
            # ([c, b, p] -> [c, p, b]) on the way out: was 2-byte gathers of x in the permuted order
            q = tl.reshape(tl.permute(tl.reshape(q, (BLOCK_K // 16, 4, 4)), (0, 2, 1)), (BLOCK_K,))
        tl.store(q_ptr + row * Kq + k0 + rk, q, mask=k0 + rk < Kq)
    if part == 0:
        tl.store(s_ptr + row, s)


# ---- configs, pruning, autotuning ------------------------------------------------------------------------------
def _gemm_cfg(bm: int, bn: int, bk: int, split_k: int, num_warps: int, num_stages: int) -> triton.Config:
    """GEMM configs carry no pre-hook: split-K reduces inside the kernel (no workspace memset)."""
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=split_k),
                         num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages).  The first entry of each M class that survives pruning is
# the interpreter's config.  M <= 16 and M <= 64 split K (fused reduction) so that N / BLOCK_N tiles fill the GPU
# for N = 1024..4096; large M does not need to.
_GEMM_CONFIGS = [_gemm_cfg(*c) for c in [
    # M <= 16 (BLOCK_M = 16, mma.sync m16n8k16)
    (16, 32, 64, 2, 4, 2),  # interpreter config for M <= 16
    (16, 64, 128, 1, 4, 3), (16, 128, 128, 1, 4, 3), (16, 32, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3),
    (16, 64, 128, 2, 4, 3), (16, 128, 128, 2, 4, 3), (16, 64, 128, 4, 4, 3), (16, 128, 128, 4, 4, 3),
    (16, 32, 128, 4, 4, 3), (16, 64, 256, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 256, 2, 4, 3),
    (16, 128, 256, 4, 4, 3), (16, 128, 64, 4, 4, 4), (16, 64, 64, 4, 4, 4), (16, 64, 32, 2, 4, 4),
    (16, 128, 32, 4, 4, 4), (16, 64, 32, 4, 4, 4),
    # small N (1024): 128+ CTAs from split-K, BLOCK_K = 256 halves the per-iteration overhead of 2-tile splits
    (16, 64, 256, 8, 4, 2), (16, 32, 256, 4, 4, 2),
    # 16 < M <= 64 (BLOCK_M = 64: wgmma; BLOCK_N = 128 with BLOCK_K < 128 does not compile for sm_90 in Triton 3.9)
    (32, 32, 64, 1, 4, 2),  # interpreter config for M > 16
    (64, 64, 128, 1, 4, 3), (64, 128, 128, 1, 4, 3), (64, 128, 128, 2, 4, 3), (64, 64, 128, 2, 4, 3),
    (64, 64, 128, 4, 4, 3), (64, 128, 128, 4, 4, 3), (64, 64, 128, 8, 4, 3), (64, 128, 256, 2, 4, 3),
    (64, 128, 256, 4, 4, 3), (32, 128, 128, 1, 4, 3), (32, 128, 128, 2, 4, 3), (64, 64, 64, 4, 4, 4),
    (64, 64, 32, 4, 4, 4), (64, 64, 32, 2, 4, 4), (64, 64, 32, 1, 4, 4), (32, 64, 32, 2, 4, 4),
    (32, 64, 32, 1, 4, 4), (32, 32, 32, 2, 4, 4),
    (64, 32, 128, 4, 4, 2),  # small N (1024): 128 CTAs with half the split-K workspace of SPLIT_K = 8
    # M > 64 (wgmma on Hopper; 128 x 256 x 64 does not compile for sm_90 in Triton 3.9)
    (128, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (64, 256, 64, 1, 4, 4),
    (128, 64, 128, 1, 4, 3), (256, 128, 64, 1, 8, 3), (128, 128, 32, 1, 8, 4), (128, 64, 32, 1, 4, 4),
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


def _gemm_m_class(m_bucket: int) -> int:
    return 0 if m_bucket <= 16 else (1 if m_bucket <= 64 else 2)


def _gemm_block_m_ok(bm: int, m_bucket: int) -> bool:
    cls = _gemm_m_class(m_bucket)
    if cls == 0:
        return bm == 16
    if cls == 1:
        return 16 < bm <= max(32, m_bucket)
    return bm >= 64


def _gemm_candidates(configs: List[triton.Config], K: int, G: int, gs: int, mb: int, x_bytes: int,
                     smem: Optional[int]) -> List[triton.Config]:
    """The configs the GEMM autotuner may choose for (K, group layout, M bucket), given the device's shared memory
    (None: unknown, no limit)."""
    keep = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if not _k_fits(bk, K, G, gs) or not _gemm_block_m_ok(bm, mb):
            continue
        if sk > 1 and (_gemm_m_class(mb) == 2 or -(-K // bk) < 2 * sk):  # every split gets >= 2 K tiles
            continue
        if smem is not None:
            # pipelined x and packed-word tiles, plus the dequantized [BK, BN] operand staged for the MMA
            need = c.num_stages * (bm * bk * x_bytes + bk * bn // 4) + bk * bn * 2
            if need > smem:
                continue
        keep.append(c)
    if not keep:
        keep = [_gemm_cfg(16 if mb <= 16 else 32, 32, _fallback_bk(gs), 1, 4, 2)]
    return keep


def _prune_gemm(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    x = named_args["x_ptr"]
    smem = None if _interpret() or not x.is_cuda else _max_shared_mem(x.device.index or 0)
    keep = _gemm_candidates(configs, named_args["K"], named_args["G"], named_args["group_size"],
                            named_args["M_BUCKET"], x.element_size(), smem)
    return keep[:1] if _interpret() else keep


_gemm = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "G", "HAS_ZERO", "X_INT8", "DOT_F32"],
                        prune_configs_by={"early_config_prune": _prune_gemm})(_packed_matmul_kernel)


# ---- GEMV configs, pruning, autotuning -----------------------------------------------------------------------------
_GEMV_MAGIC = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}  # 1024.0 / 128.0 in both 16-bit halves


# products per 16-bit lane before the fp32 flush (accuracy: see the kernel's comment).  fp16 x keeps 16 so that a
# lane cannot overflow below |x| = 65504 / (2 * 16) = 2047 (activation outliers); bf16 (fp32's range) and W2A8's
# integer x (|q| <= 127) take 32, halving the flush cost.
_GEMV_LANE_RUN = {torch.bfloat16: 32, torch.float16: 16, "int8": 32}


def _gemv_cfg(block_n: int, ksplit: int, words: int, warps: int, even_k: bool = False) -> triton.Config:
    return triton.Config(dict(BLOCK_N=block_n, KSPLIT=ksplit, WORDS=words, EVEN_K=even_k), num_warps=warps,
                         num_stages=1)


def _gemv_rows(block_n: int, ksplit: int, warps: int) -> int:
    """Output rows per thread (2 per row pair): BLOCK_N = rows x (lanes on rows) x (warps on rows)."""
    lanes_k = min(ksplit, 32)
    warps_k = max(1, ksplit // 32)
    return max(2, block_n // ((32 // lanes_k) * max(1, warps // warps_k)))


# (BLOCK_N, KSPLIT, WORDS, warps).  The 32 lanes of a one-warp program split K (KSPLIT = 32) over the BLOCK_N rows
# every thread owns, loading WORDS 32-bit words (16 or 32 bytes) per row per chunk.  Why these: 8 rows per thread
# amortize x, the prologue and the final reduction and keep LLVM's vectorizer pairing the (row A, row B) halves
# (2-4 rows: for M = 4..8, registers); 16 rows for wide N (N / 16 warps still fill 132 SMs at N >= 8192; not with
# 8 words: 255 registers and spills with scale groups).  WORDS = 4
# where 8 words per lane would leave lanes idle (K = 14336: 112 chunks of 128 over 32 lanes).  KSPLIT < 32 (lanes
# on rows) and more warps work but are not listed: x is then loaded in a layout that the compiler redistributes with
# shuffles inside the loop (seen in the SASS).  Each comes twice: EVEN_K (K a multiple of 16 * WORDS * KSPLIT, no
# masks) and not; pruning keeps the one K needs.  The first entry that survives pruning is the interpreter's.
_GEMV_CONFIGS = [_gemv_cfg(*c, even_k=e) for e in (False, True) for c in [
    (8, 32, 4, 1), (8, 32, 8, 1), (16, 32, 4, 1), (4, 32, 4, 1), (4, 32, 8, 1), (2, 32, 4, 1), (2, 32, 8, 1),
]]


def _gemv_even_k(K: int, c: Dict) -> bool:
    """Every lane's every chunk lies inside K: the kernel needs no masks."""
    return K % (16 * c["WORDS"] * c["KSPLIT"]) == 0


_GEMV_MAX_REGS = 272  # estimated 32-bit registers per thread a config may keep live (ptxas spills above ~255)


def _gemv_regs(block_m: int, block_n: int, ksplit: int, words: int, warps: int, group_zeros: bool = False) -> int:
    """Live registers per thread, fitted to ptxas' sm_90 counts so that the configs that spilled are out (M = 1:
    8 rows 96-168 by format, 16 rows x 4 words 168-254, 16 rows x 8 words 255 + spills with scale groups; M = 2:
    16 rows x 4 words spills; M = 4: 8 rows x 4 words 254, x 8 words spills; M = 8: 4 rows x 4 words 255): packed
    words (twice: the loaded vectors and their merges), ~4 per row and row of x (accumulators, partials), x; zero
    points per group add the group's x sums (M = 8, 4 rows spilled)."""
    rows = _gemv_rows(block_n, ksplit, warps)
    return rows * (2 * words + 4 * block_m) + 8 * block_m + 24 + (4 * block_m if group_zeros else 0)


_GEMV_WARPS = (480, 8192)  # grid sizes (warps) worth timing: >= ~4 warps on each of 132 SMs, not a tail of waves


def _prune_gemv(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
    K, N, bm = named_args["K"], named_args.get("N"), kwargs["BLOCK_M"]
    keep = []
    for c in configs:
        bn, ksp, words = c.kwargs["BLOCK_N"], c.kwargs["KSPLIT"], c.kwargs["WORDS"]
        group_zeros = bool(kwargs.get("HAS_ZERO")) and not kwargs.get("PER_CHANNEL", True)
        if _gemv_regs(bm, bn, ksp, words, c.num_warps, group_zeros) > _GEMV_MAX_REGS:
            continue
        if _cdiv(K, 16 * words) < ksp:  # every lane gets a chunk
            continue
        if c.kwargs["EVEN_K"] != _gemv_even_k(K, c.kwargs):
            continue
        keep.append(c)
    even = [c for c in keep if c.kwargs["EVEN_K"]]
    keep = even or keep  # lanes that run out of chunks early idle: time the configs that split K evenly
    if N is not None and keep:  # time only grids that fill the GPU (else the widest ones): fewer compiles
        warps = {id(c): _cdiv(N, c.kwargs["BLOCK_N"]) * c.num_warps for c in keep}
        fit = [c for c in keep if _GEMV_WARPS[0] <= warps[id(c)] <= _GEMV_WARPS[1]]
        keep = fit or sorted(keep, key=lambda c: -warps[id(c)])[:4]
    # among those, 8-32 (row, row of x) outputs per thread: fewer leave x loads and the vectorizer's pairing
    # unamortized (byte permutes in the SASS at 4 rows, M = 1), more run out of registers -- unless only fewer rows
    # fill the GPU (N = 1024: 2 rows per thread, 512 warps, predict 3.0x where 8 rows and 128 warps predict 1.6x)
    keep = [c for c in keep if 8 <= _gemv_rows(c.kwargs["BLOCK_N"], c.kwargs["KSPLIT"], c.num_warps) * bm <= 32] \
        or keep
    if not keep:
        keep = [_GEMV_CONFIGS[0]]
    return keep[:1] if _interpret() else keep


_gemv = triton.autotune(configs=_GEMV_CONFIGS, key=["BLOCK_M", "N", "K", "G", "HAS_ZERO", "X_BF16", "X_SCALED"],
                        prune_configs_by={"early_config_prune": _prune_gemv})(_packed_gemv_kernel)


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


def _gemv_constexprs(x_dtype, zero_point, code_offset, G: int, gs: int, M: int, has_bias: bool,
                     x_scaled: bool) -> Tuple[Dict, float]:
    """(constexprs, zc) of a GEMV launch: shared by the checked launcher and ``BoundPackedMatmul``.  The
    interpreter cannot do bf16 arithmetic (it operates on the bit patterns); there the bf16 kernel takes its exact
    dequantized values and x to fp32 (the 16-bit rounding of the GPU path is covered by
    tests/test_packed_matmul.py::test_gemv_half2_accumulation_error)."""
    meta = _gemv_meta(x_dtype, zero_point, code_offset, G, gs)
    zc = meta.pop("zc")
    return dict(meta, HAS_BIAS=has_bias, X_SCALED=x_scaled, BLOCK_M=M, MATH_F32=meta["X_BF16"] and _interpret(),
                PRMT=not _interpret(),
                LANE_RUN=_GEMV_LANE_RUN["int8" if x_scaled else x_dtype]), zc


def _launch_gemv(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
                 config: Optional[Dict] = None) -> torch.Tensor:
    y = _alloc((M, N), out_dtype, x.device)
    if N == 0:
        return y
    common, zc = _gemv_constexprs(x.dtype, zero_point, code_offset, G, gs, M, bias is not None, x_scale is not None)
    args = (x, x_scale, qweight, scale, zero_point, bias, y, N, K, G, zc, _GEMV_MAGIC[x.dtype], 0xFFFF,
            x.stride(0), qweight.stride(0), y.stride(0))
    if config is not None:
        kw = dict(BLOCK_N=config["BLOCK_N"], KSPLIT=config.get("KSPLIT", 32), WORDS=config.get("WORDS", 4))
        c = _gemv_cfg(kw["BLOCK_N"], kw["KSPLIT"], kw["WORDS"], config.get("num_warps", 1), _gemv_even_k(K, kw))
        common["LANE_RUN"] = config.get("LANE_RUN", common["LANE_RUN"])
        _packed_gemv_kernel[(_cdiv(N, c.kwargs["BLOCK_N"]),)](*args, **common, **c.kwargs,
                                                                   num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        _gemv[lambda meta: (_cdiv(N, meta["BLOCK_N"]),)](*args, **common)
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


_DEQUANT_MATMUL_MIN_M = 1024  # from here on, some calls dequantize once + cuBLAS: see _dequant_dispatch


def _dequant_dispatch(M: int, x_dtype: torch.dtype, has_zero: bool, G: int) -> bool:
    """Large M: fused kernel or dequantize + cuBLAS, whichever the static model predicts faster (module docstring):
    with the pair dequantization (``_gemm_dequant_pairs``) the fused kernel is MMA-bound in every 16-bit format,
    per-group zero points included (0.97-0.99x cuBLAS; dequantize + cuBLAS: 0.95x), so only fp32 x (no fp32
    tensor-core path worth fusing) dequantizes; W2A8 (int8 x) always fuses (int8 MMA).  ``has_zero`` and ``G``
    stay in the signature: the switch to flip if a GPU measures otherwise."""
    if M < _DEQUANT_MATMUL_MIN_M or x_dtype == torch.int8:
        return False
    return x_dtype == torch.float32
_split_k_locks: Dict[str, torch.Tensor] = {}


def _split_locks(device: torch.device, n: int) -> torch.Tensor:
    """Per-device arrival counters of the fused split-K reduction: zeroed ONCE when first needed (not per call);
    every reducing program leaves its counter at 0 again.  Calls on concurrent streams of one device would share
    them: run split-K GEMMs of one device on one stream (as eager and CUDA-graph inference do)."""
    key = str(device)
    buf = _split_k_locks.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _split_k_locks[key] = buf
    return buf


def _gemm_pairs(has_zero: bool, code_offset: float, x_int8: bool) -> bool:
    """Whether the GEMM dequantizes with ``_gemm_dequant_pairs`` (natural K order, neighbouring weights per
    register): 16-bit x and a zero point folded exactly into the magic bias (asymmetric formats fold none; seq's
    z = 1.5 is not exact next to M = 128 in bf16, so it keeps the K-permuted ``_gemm_dequant``)."""
    return not x_int8 and (has_zero or float(code_offset) in (0.0, 1.0, 2.0))


def _gemm_offset_sum(has_zero: bool, N: int, K: int) -> bool:
    """Whether bf16 per-channel GEMM tiles may drop the dequantization FMA (``OFFSET_SUM`` in the kernel): always
    with zero points (their row sums are computed anyway), for symmetric formats only on weights of 2^24+ elements
    (on smaller ones a split-K program runs too few tiles to repay the row-sum reduction; predicted, sm_90)."""
    return has_zero or N * K >= 1 << 24


def _gemm_group_sum_mma(M: int, N: int, K: int) -> bool:
    """Whether 16-bit x with per-group zero points and 64+ rows takes each tile's row sums of x from the tensor
    cores (x @ ones[BLOCK_K, 16]) rather than elementwise: below 1024 rows on weights of at most 2^24 elements,
    where the tiles are issue-bound; on larger weights, and at large M (MMA-bound tiles: int2-asym g128 M = 4096
    4096 x 4096 0.96x -> 0.86x with them), the extra MMAs would be the bound (predicted, sm_90; see the kernel)."""
    return M < 1024 and N * K <= 1 << 24


def _gemm_row_sums(x_int8: bool, has_zero: bool, G: int, M: int, N: int, K: int) -> bool:
    """Whether a GEMM call precomputes the row sums of x (``_gemm_row_sums_kernel``, one small launch) instead of
    taking them from extra MMAs in every tile: 16-bit x, per-channel zero points, 17+ rows (where every config
    has BLOCK_M > 16; 16 rows sum elementwise at no MMA cost), on weights of more than 2^24 elements, where the
    tiles are MMA-bound.  On smaller weights the launch and its second read of x cost more than the MMAs it saves
    (predicted, sm_90: M = 64 int2-asym 14336 x 4096 2.39x -> 2.79x, M = 4096 0.91x -> 0.98x; 4096 x 4096 at
    M = 64 would lose the launch's 0.6 us of 3.7, 1024 x 4096 at M = 4096 0.91x -> 0.81x from x read twice)."""
    return not x_int8 and has_zero and G == 1 and M > 16 and N * K > 1 << 24


def _gemm_row_sums_split(M: int) -> int:
    """Programs per row of the row-sum pre-pass (partials the GEMM's epilogue adds): enough rows x splits to
    occupy the SMs at M = 17..64, one per row beyond (a power of two, so that few variants compile)."""
    return 4 if M <= 32 else (2 if M <= 64 else 1)


def _gemm_row_sums_launch(x: torch.Tensor, M: int, K: int) -> torch.Tensor:
    S = _gemm_row_sums_split(M)
    rs = _alloc((M, S), torch.float32, x.device)
    _gemm_row_sums_kernel[(M, S)](x, rs, K, x.stride(0), BLOCK_K=_quant_block_k(K))
    return rs


def _gemm_magic(x_dtype: torch.dtype) -> int:
    return _BF16_MAGIC if x_dtype == torch.bfloat16 else _FP16_MAGIC


def _gemm_constexprs(x_dtype, has_zero: bool, has_bias: bool, x_int8: bool, G: int, co: float, M: int, N: int,
                     K: int) -> Dict:
    """The constexprs of a GEMM launch (the checked launcher and ``BoundPackedMatmul``).  The interpreter's
    tl.dot is wrong for bf16 (triton-lang/triton#11584), and so is its bf16 arithmetic: there, bf16 tiles are
    dequantized and multiplied in fp32 (same bits, exact products); compiled code stays bf16."""
    return dict(HAS_ZERO=has_zero, HAS_BIAS=has_bias, X_INT8=x_int8,
                DOT_F32=not x_int8 and x_dtype == torch.bfloat16 and _interpret(), PER_CHANNEL=G == 1,
                PAIRS=_gemm_pairs(has_zero, co, x_int8), OFFSET_SUM_OK=_gemm_offset_sum(has_zero, N, K),
                GROUP_SUM_MMA=_gemm_group_sum_mma(M, N, K), K256=K % 256 == 0,
                ROW_SUMS=_gemm_row_sums(x_int8, has_zero, G, M, N, K), RS_SPLIT=_gemm_row_sums_split(M))


def _gemm_grid(M: int, N: int):
    return lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])


def _dequant_matmul(x, qweight, scale, zero_point, bias, co, N, K, G, gs) -> torch.Tensor:
    """Large M: one small kernel writes W = dequant(Wq) in x's dtype (N*K*2 bytes, ~8% of a bf16 GEMM's time at
    M = 4096), then cuBLAS runs at its bf16 tensor-core rate.  Chosen over the fused kernel by prediction (see the
    module docstring); rounding W once to x's dtype is the only difference from the fused path."""
    w = _alloc((N, K), x.dtype, x.device)
    block_n, block_k = 32, 256
    grid = (_cdiv(N, block_n), _cdiv(K, block_k))
    _packed_dequant_kernel[grid](qweight, scale, zero_point, w, N, K, G, gs, co, _FP16_MAGIC, qweight.stride(0),
                                 HAS_ZERO=zero_point is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    if bias is None:
        return torch.matmul(x, w.t())
    return torch.addmm(bias.to(x.dtype), x, w.t())


@functools.lru_cache(maxsize=None)
def _gemm_max_split(m_bucket: int) -> int:
    """The largest SPLIT_K any GEMM config of this M bucket may run (sizes the split-K workspace; cached, it was
    recomputed on every call)."""
    return max(c.kwargs["SPLIT_K"] for c in _GEMM_CONFIGS if _gemm_block_m_ok(c.kwargs["BLOCK_M"], m_bucket))


def _launch_gemm(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
                 config: Optional[Dict] = None) -> torch.Tensor:
    co = 0.0 if code_offset is None else float(code_offset)
    if x_scale is None and config is None and N > 0 and _dequant_dispatch(M, x.dtype, zero_point is not None, G):
        return _dequant_matmul(x, qweight, scale, zero_point, bias, co, N, K, G, gs)
    y = _alloc((M, N), out_dtype, x.device)
    if N == 0:
        return y
    common = _gemm_constexprs(x.dtype, zero_point is not None, bias is not None, x_scale is not None, G, co, M, N, K)
    m_bucket = min(_next_pow2(M), _M_BUCKET_CAP)
    if config is not None:
        max_split = config.get("SPLIT_K", 1)
    else:
        max_split = _gemm_max_split(m_bucket)
    # split-K workspace: one fp32 slice per split, every element written before it is read (never zeroed)
    ws = _alloc((max_split, M, N), torch.float32, x.device) if max_split > 1 else None
    locks = _split_locks(x.device, _cdiv(M, 16) * _cdiv(N, 16)) if max_split > 1 else None
    # group_size is a constexpr (the tile's group index is a shift, not a runtime division, in the K loop); per
    # channel it is unused and passed as 0, so per-channel layers of different K share one compiled kernel
    rs = _gemm_row_sums_launch(x, M, K) if common["ROW_SUMS"] else None
    args = (x, x_scale, qweight, scale, zero_point, bias, y, ws, locks, rs, M, N, K, G, gs if G > 1 else 0, co,
            _gemm_magic(x.dtype), _HMASK,
            m_bucket,
            x.stride(0), qweight.stride(0), y.stride(0))
    grid = _gemm_grid(M, N)
    if config is not None:  # explicit meta-parameters (tests, benchmarks): bypass the autotuner
        meta = dict(config)
        num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 2)
        _packed_matmul_kernel[grid({**common, **meta})](*args, **common, **meta, num_warps=num_warps,
                                                         num_stages=num_stages)
    else:
        _gemm[grid](*args, **common)
    return y


def _use_gemv(M: int, x_dtype: torch.dtype, w2a8: bool, config: Optional[Dict] = None) -> bool:
    """The GEMV / GEMM boundary: 16-bit x with M < _GEMM_MIN_M, and W2A8 (fp16-integer x) with M <= GEMV_MAX_M,
    take the half2 GEMV; fp32 x always takes the GEMM.  A pinned ``config`` names its kernel by its keys
    (``BLOCK_M``: the GEMM), so tests and benchmarks can still run the GEMV at M = 4..8."""
    if x_dtype not in _GEMV_MAGIC or M > GEMV_MAX_M:
        return False
    if w2a8:  # x holds fp16 integers here (packed_matmul_a8 quantizes for the GEMV at M <= GEMV_MAX_M)
        return True
    if config is not None:
        return "BLOCK_M" not in config
    return M < _GEMM_MIN_M


_GEMV_MAX_WEIGHT_BYTES = 2 ** 33  # 2^31 words: the GEMV's row offsets are 32-bit; larger packed weights take the GEMM


def _a8_gemv(M: int, qweight: torch.Tensor, config: Optional[Dict] = None) -> bool:
    """Whether W2A8 runs the GEMV (x quantized to fp16 integers) rather than the int8 GEMM (K-permuted int8 x)."""
    return _use_gemv(M, torch.float16, True, config) and qweight.numel() < _GEMV_MAX_WEIGHT_BYTES


def _launch(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
            config: Optional[Dict] = None) -> torch.Tensor:
    # decode: the half2 GEMV (a packed weight of 2^31+ words takes the GEMM: the GEMV's row offsets are 32-bit)
    if _use_gemv(M, x.dtype, x_scale is not None, config) and qweight.numel() < _GEMV_MAX_WEIGHT_BYTES:
        return _launch_gemv(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
                            config)
    return _launch_gemm(x, x_scale, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, out_dtype,
                        config)


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], in_features: int, code_offset: Optional[float],
                  config: Optional[Dict] = None) -> torch.Tensor:
    """y [M, N] (x's dtype) = x [M, K] @ dequant(qweight).T + bias.  ``config`` pins the kernel meta-parameters."""
    M, N, K, G, gs = _check(x, qweight, scale, zero_point, bias, in_features, code_offset)
    return _launch(x, None, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, x.dtype, config)


def quantize_rows_int8(x: torch.Tensor, out_dtype: torch.dtype = torch.int8, k_permuted: bool = False):
    """x [M, K] float -> (q [M, K], s fp32 [M]) with x ~ q * s[:, None] (symmetric, per row).  q holds integers in
    [-127, 127]: int8, or float16 (exact) for the GEMV, which takes 16-bit x.  ``k_permuted`` (int8 only): q is
    [M, 16 * ceil(K / 16)] in the int8 GEMM's K order (see ``_packed_matmul_a8_quant_kernel``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        raise ValueError("x must be a 2-D float16/bfloat16/float32 tensor")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along K (stride(1) == 1), got strides {x.stride()}")
    if k_permuted and out_dtype != torch.int8:
        raise ValueError(f"k_permuted=True is the int8 GEMM's operand: out_dtype must be torch.int8, got {out_dtype}")
    M, K = x.shape
    q = _alloc((M, _cdiv(K, 16) * 16 if k_permuted else K), out_dtype, x.device)
    s = _alloc((M,), torch.float32, x.device)
    bk = _quant_block_k(K)
    _packed_matmul_a8_quant_kernel[_quant_grid(M, K, bk)](x, q, s, K, x.stride(0), _FP32_TINY, BLOCK_K=bk,
                                                          KPERM=k_permuted, FAST_DIV=not _interpret())
    return q, s


def _quant_block_k(K: int) -> int:
    return min(1024, max(16, _next_pow2(K)))


_QUANT_MIN_CTAS = 132  # the quantizer's grid aims at >= one program per H100/H200 SM


def _quant_grid(M: int, K: int, bk: int) -> Tuple[int, int]:
    """(M, S): S programs per row when M rows alone leave SMs idle (M = 16, K = 14336: 8 per row, 128 programs
    instead of 16), at most one per BLOCK_K block."""
    return (M, max(1, min(_cdiv(K, bk), _QUANT_MIN_CTAS // max(M, 1))))


def packed_matmul_a8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_features: int,
                     code_offset: Optional[float], config: Optional[Dict] = None) -> torch.Tensor:
    """W2A8: x quantized per token to int8 (dynamic, symmetric), then the packed matmul; output in x's dtype."""
    M, N, K, G, gs = _check(x, qweight, scale, zero_point, bias, in_features, code_offset)
    gemv = _a8_gemv(M, qweight, config)
    q, s = quantize_rows_int8(x, torch.float16 if gemv else torch.int8, k_permuted=not gemv)
    return _launch(q, s, qweight, scale, zero_point, bias, code_offset, M, N, K, G, gs, x.dtype, config)


class BoundPackedMatmul:
    """``packed_matmul`` (``a8=False``) or ``packed_matmul_a8`` for one weight and one x shape ``[M, K]`` / dtype /
    device, with everything but x worked out once: the argument checks (``_check`` on the example x), the GEMV/GEMM
    choice, the constexprs, the interpreter flags and the argument tuple.  A call allocates the output (and the
    split-K workspace, or W2A8's quantized x) and launches -- the decode-time host path of ``PackedLinear``.

    Contract (``PackedMatmulPlan`` keeps it): every x has the example's shape, dtype and device and is contiguous,
    and the weight tensors are not replaced (in-place updates are fine: the kernels read them at launch).  x's row
    stride is passed as K: for contiguous x with M > 1 it is K, and at M = 1 no row stride is read -- a fixed value
    also keeps Triton's integer specialization (and so its compiled kernel) the same for every call.
    Large-M calls that dequantize + cuBLAS (``_dequant_dispatch``) just call the checked function."""

    __slots__ = ("run", "M", "N", "out_dtype", "device", "_kern", "_grid", "_args", "_common", "_a8", "_q_dtype",
                 "_ws", "_locks", "_qk", "_y_at")

    def __init__(self, x, qweight, scale, zero_point, bias, in_features, code_offset, a8: bool = False):
        M, N, K, G, gs = _check(x, qweight, scale, zero_point, bias, in_features, code_offset)
        self.M, self.N, self.device, self.out_dtype, self._a8 = M, N, x.device, x.dtype, a8
        self._q_dtype = (torch.float16 if _a8_gemv(M, qweight) else torch.int8) if a8 else None
        self._ws = self._locks = self._qk = None
        xd = self._q_dtype if a8 else x.dtype
        if N == 0 or (not a8 and _dequant_dispatch(M, xd, zero_point is not None, G)):
            fn = packed_matmul_a8 if a8 else packed_matmul
            self.run = lambda x2: fn(x2, qweight, scale, zero_point, bias, in_features, code_offset)
            return
        x_scaled = a8
        gemv = _use_gemv(M, xd, x_scaled) and qweight.numel() < _GEMV_MAX_WEIGHT_BYTES
        kq = K if gemv or not a8 else _cdiv(K, 16) * 16  # the int8 GEMM's x: K-permuted rows padded to 16
        if a8:
            self._qk = (K, kq, _quant_block_k(K), not gemv)
        if gemv:
            self._common, zc = _gemv_constexprs(xd, zero_point, code_offset, G, gs, M, bias is not None, x_scaled)
            # (x, x_scale, ..., y, ...): slots 0, 1 and 6 are filled per call
            self._args = [None, None, qweight, scale, zero_point, bias, None, N, K, G, zc, _GEMV_MAGIC[xd], 0xFFFF,
                          K, qweight.stride(0), N]
            self._kern, self._grid = _gemv, (lambda meta: (_cdiv(N, meta["BLOCK_N"]),))
        else:
            co = 0.0 if code_offset is None else float(code_offset)
            self._common = _gemm_constexprs(xd, zero_point is not None, bias is not None, x_scaled, G, co, M, N, K)
            m_bucket = min(_next_pow2(M), _M_BUCKET_CAP)
            max_split = _gemm_max_split(m_bucket)
            if max_split > 1:
                self._ws = (max_split, M, N)
                self._locks = _split_locks(x.device, _cdiv(M, 16) * _cdiv(N, 16))  # zeroed once, re-armed by use
            self._args = [None, None, qweight, scale, zero_point, bias, None, None, self._locks, None, M, N, K, G,
                          gs if G > 1 else 0, co, _gemm_magic(xd), _HMASK, m_bucket, kq, qweight.stride(0), N]
            self._kern, self._grid = _gemm, _gemm_grid(M, N)
        self.run = self._launch

    def _launch(self, x):
        args = self._args.copy()
        if self._a8:
            K, kq, bk, kperm = self._qk
            q = _alloc((self.M, kq), self._q_dtype, self.device)
            s = _alloc((self.M,), torch.float32, self.device)
            _packed_matmul_a8_quant_kernel[_quant_grid(self.M, K, bk)](x, q, s, K, K, _FP32_TINY, BLOCK_K=bk,
                                                                        KPERM=kperm, FAST_DIV=not _interpret())
            args[0], args[1] = q, s
        else:
            args[0] = x
        args[6] = y = _alloc((self.M, self.N), self.out_dtype, self.device)
        if self._ws is not None:  # one fp32 slice per split, every element written before it is read
            args[7] = _alloc(self._ws, torch.float32, self.device)
        if self._common.get("ROW_SUMS"):
            args[9] = _gemm_row_sums_launch(x, self.M, self._args[12])
        self._kern[self._grid](*args, **self._common)
        return y

    def __call__(self, x):
        return self.run(x)


# ---- static-analysis launch descriptors (issue #10: pyquant.bench.static compiles and counts these) -------------
_STATIC_FORMATS = {"twn": 1.0, "absmean": 1.0, "seq3": 1.0, "seq4": 1.5, "int2-sym": 2.0, "int2-asym": None}
_STATIC_X = {"bf16": (torch.bfloat16, "*bf16", 2), "fp16": (torch.float16, "*fp16", 2), "int8": (torch.int8, "*i8", 1)}
_SM90_SMEM = 232448  # sm_90 opt-in shared memory per block (bytes): the pruning limit the GPU would apply


def _static_quant_launch(M: int, K: int, kperm: bool) -> Dict:
    """W2A8's per-token quantizer as a launch descriptor: reads each bf16 row of x twice (max, then quantize),
    writes q (fp16 integers for the GEMV; ``kperm``: int8 in the GEMM's K order, rows padded to 16) and the row
    scales."""
    bk = _quant_block_k(K)
    kq = _cdiv(K, 16) * 16 if kperm else K
    q_ty, q_bytes = ("*i8", 1) if kperm else ("*fp16", 2)
    S = _quant_grid(M, K, bk)[1]
    return {"name": f"quantize_rows_int8({'int8 K-permuted' if kperm else 'fp16'} q)",
            "triton": {"fn": _packed_matmul_a8_quant_kernel,
                       "signature": {"x_ptr": "*bf16", "q_ptr": q_ty, "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                                     "TINY": "fp32", "BLOCK_K": "constexpr", "KPERM": "constexpr",
                                     "FAST_DIV": "constexpr"},
                       "constexprs": {"BLOCK_K": bk, "KPERM": kperm, "FAST_DIV": True}, "num_warps": 4,
                       "num_stages": 2,
                       "divisible_by_16": ["x_ptr", "q_ptr", "s_ptr"] + (["K", "stride_xm"] if K % 16 == 0 else [])},
            # pass 1 (the row's max) walks the whole row in each of the S programs of a row, pass 2 its 1/S share
            "grid": [M, S, 1], "threads_per_cta": 128,
            "loop_trips": [float(_cdiv(K, bk)), float(_cdiv(_cdiv(kq, bk), S))], "weights": 0,
            # both passes load BLOCK_K bf16 per iteration over 128 threads; LLVM unrolls the max pass 4x and peels
            # its remainder, which this lets the tool see (it counted each 4x-unrolled trip as one iteration)
            "trip_load_bytes": bk * 2 / 128,
            # x counted once (unique HBM bytes, as everywhere): the second pass and the other programs of a row
            # re-read a row of <= 28 KB that was read microseconds before, from L2
            "bytes": M * K * 2 + M * kq * q_bytes + M * 4, "mma_flops": 0}


def _static_row_sums_launch(M: int, K: int, x_ty: str, x_bytes: int) -> Dict:
    """The GEMM's row-sum pre-pass (``_gemm_row_sums_kernel``) as a launch descriptor."""
    bk = _quant_block_k(K)
    S = _gemm_row_sums_split(M)
    return {"name": "gemm_row_sums",
            "triton": {"fn": _gemm_row_sums_kernel,
                       "signature": {"x_ptr": x_ty, "rs_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                                     "BLOCK_K": "constexpr"},
                       "constexprs": {"BLOCK_K": bk}, "num_warps": 4, "num_stages": 2,
                       "divisible_by_16": ["x_ptr", "rs_ptr"] + (["K", "stride_xm"] if K % 16 == 0 else [])},
            "grid": [M, S, 1], "threads_per_cta": 128, "loop_trips": float(_cdiv(_cdiv(K, bk), S)), "weights": 0,
            "trip_load_bytes": bk * x_bytes / 128, "bytes": M * K * x_bytes + M * S * 4, "mma_flops": 0}


def _static_gemm_mma_flops(M, N, K, G, has_zero, x_int8, bm, bn, x_bf16: bool = False) -> int:
    """Tensor-core flops of one GEMM launch: the product on padded row tiles, plus the row sums of x that the
    zero-point / int8 code-offset terms need (``_packed_matmul_kernel``): x @ ones[BLOCK_K, 16] per tile with
    more than 16 rows (int8 x, per channel, or per group on a small weight below 1024 rows), x @ ones[BLOCK_K,
    BLOCK_N] (as many as the product's own) with 16 rows, int8 x and per-group scales, x @ ones[BLOCK_K, 32] with
    16 rows, 16-bit x, per-group zero points and BLOCK_N >= 64 (bf16 x: x @ B[BLOCK_K, 32] of OFFSET_SUM per group,
    symmetric formats too, where ``_gemm_offset_sum`` allows it); 16-bit x, per-channel zero points and 17+ rows on
    large weights: precomputed (``_gemm_row_sums``, no MMA); otherwise the sums are elementwise (no MMA)."""
    rows = _cdiv(M, bm) * bm
    main = 2 * rows * N * K
    if G > 1 and bm == 16 and bn >= 64 and x_bf16 and _gemm_offset_sum(has_zero, N, K):  # OFFSET_SUM per group
        return main + 2 * rows * 32 * _cdiv(N, bn) * K
    if not (has_zero or x_int8):
        return main
    if _gemm_row_sums(x_int8, has_zero, G, M, N, K):
        return main
    if bm > 16 and (x_int8 or G == 1 or _gemm_group_sum_mma(M, N, K)):
        return main + 2 * rows * 16 * _cdiv(N, bn) * K
    if bm > 16:
        return main
    if G > 1 and not x_int8 and bn >= 64:  # 16 rows, 16-bit x, zero points: x @ ones[BLOCK_K, 32] per tile
        return main + 2 * rows * 32 * _cdiv(N, bn) * K
    return 2 * main if x_int8 and G > 1 else main


def _static_gemm_call(M, N, K, G, gs, has_zero, co, x_dtype, c) -> Dict:
    torch_dt, x_ty, x_bytes = _STATIC_X[x_dtype]
    x_int8 = x_dtype == "int8"
    y_ty = "*bf16" if x_int8 else x_ty
    kw = dict(c.kwargs)
    bm, bn, bk, sk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"]
    consts = dict(HAS_ZERO=has_zero, HAS_BIAS=False, X_INT8=x_int8, DOT_F32=False, PER_CHANNEL=G == 1,
                  PAIRS=_gemm_pairs(has_zero, 0.0 if co is None else co, x_int8),
                  OFFSET_SUM_OK=_gemm_offset_sum(has_zero, N, K), GROUP_SUM_MMA=_gemm_group_sum_mma(M, N, K),
                  K256=K % 256 == 0, ROW_SUMS=_gemm_row_sums(x_int8, has_zero, G, M, N, K),
                  RS_SPLIT=_gemm_row_sums_split(M), **kw,
                  bias_ptr=None,
                  group_size=gs if G > 1 else 0)
    if not has_zero:
        consts["zero_ptr"] = None
    if not x_int8:
        consts["xs_ptr"] = None
    if sk == 1:
        consts["ws_ptr"] = None
        consts["lock_ptr"] = None
    if not consts["ROW_SUMS"]:
        consts["rs_ptr"] = None
    types = dict(x_ptr=x_ty, xs_ptr="*fp32", qw_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16", bias_ptr=y_ty,
                 y_ptr=y_ty, ws_ptr="*fp32", lock_ptr="*i32", rs_ptr="*fp32", M="i32", N="i32", K="i32", G="i32", group_size="i32",
                 code_offset="fp32", magic="i32", hmask="i32",
                 M_BUCKET="i32", stride_xm="i32", stride_qn="i32", stride_ym="i32")
    fn = _packed_matmul_kernel
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    # what the JIT specializes at run time for these shapes: 16-byte aligned pointers, ints divisible by 16
    ints = dict(M=M, N=N, K=K, G=G, M_BUCKET=min(_next_pow2(M), _M_BUCKET_CAP), stride_xm=K,
                stride_qn=-(-K // 64) * 16, stride_ym=N, magic=_gemm_magic(torch_dt),
                hmask=_HMASK)
    div16 = [a for a in fn.arg_names if sig[a] != "constexpr" and (sig[a].startswith("*") or
                                                                   (a in ints and ints[a] % 16 == 0))]
    grid = [_cdiv(M, bm) * _cdiv(N, bn), sk, 1]
    n_tiles = _cdiv(K, bk)
    nbytes = (N * (-(-K // 64) * 16) + N * G * 2 * (2 if has_zero else 1) + M * K * x_bytes + M * N * 2
              + (M * 4 if x_int8 else 0))
    if sk > 1:
        # the fp32 partial slices: written once to DRAM (write-back, eventually), read back from L2 -- the last
        # split of a tile reads them microseconds after they were written, and they are SPLIT_K * M * N * 4
        # bytes (<= 8.4 MB at the benchmark shapes, M <= 64) next to H200's 50 MB L2; plus the arrival counters
        nbytes += sk * M * N * 4 + grid[0] * 8
    launch = dict(name="packed_matmul_gemm",
                  triton=dict(fn=fn, signature=sig, constexprs={k: v for k, v in consts.items()},
                              num_warps=c.num_warps, num_stages=c.num_stages, divisibility=div16),
                  grid=grid, threads_per_cta=32 * c.num_warps, loop_trips=n_tiles / sk, weights=N * K,
                  bytes=nbytes,
                  mma_flops=_static_gemm_mma_flops(M, N, K, G, has_zero, x_int8, bm, bn, x_dtype == "bf16"),
                  mma_dtype="int8" if x_int8 else "bf16")
    cfg = f"BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={bk} SPLIT_K={sk} warps={c.num_warps} stages={c.num_stages}"
    pre = [_static_quant_launch(M, K, kperm=True)] if x_int8 else []  # W2A8: the op quantizes x first
    if consts["ROW_SUMS"]:
        pre.append(_static_row_sums_launch(M, K, x_ty, x_bytes))
    return dict(kernel="packed_matmul_gemm", backend="triton", config=cfg, launches=pre + [launch])


def _static_dequant_call(M, N, K, G, gs, has_zero, co, x_dtype) -> Dict:
    _, x_ty, x_bytes = _STATIC_X[x_dtype]
    fn = _packed_dequant_kernel
    consts = dict(HAS_ZERO=has_zero, BLOCK_N=32, BLOCK_K=256)
    if not has_zero:
        consts["zero_ptr"] = None
    types = dict(qw_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16", w_ptr=x_ty, N="i32", K="i32", G="i32",
                 group_size="i32", code_offset="fp32", magic="i32", stride_qn="i32")
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    ints = dict(N=N, K=K, G=G, group_size=gs, stride_qn=-(-K // 64) * 16, magic=_FP16_MAGIC)
    div16 = [a for a in fn.arg_names if sig[a] != "constexpr" and (sig[a].startswith("*") or
                                                                   (a in ints and ints[a] % 16 == 0))]
    dequant = dict(name="packed_dequant",
                   triton=dict(fn=fn, signature=sig, constexprs=consts, num_warps=4, num_stages=2, divisibility=div16),
                   grid=[_cdiv(N, 32), _cdiv(K, 256), 1], threads_per_cta=128, loop_trips=0.0,
                   weights=N * K, bytes=N * (-(-K // 64) * 16) + N * G * 2 * (2 if has_zero else 1) + N * K * x_bytes,
                   mma_flops=0)
    # cuBLAS itself: no source to compile; the static tool bounds it like its cuBLAS baseline (bytes, MMA rate)
    gemm = dict(name="cublas_gemm", library=dict(name="cublas", op="gemm", M=M, N=N, K=K, dtype=x_dtype),
                grid=None, threads_per_cta=None, loop_trips=0.0, weights=N * K,
                bytes=N * K * x_bytes + M * K * x_bytes + M * N * x_bytes, mma_flops=2 * M * N * K, mma_dtype=x_dtype)
    return dict(kernel="packed_dequant+cublas", backend="triton", config="dequant BLOCK_N=32 BLOCK_K=256; cuBLAS",
                launches=[dequant, gemm])


def _static_launches_gemm(M: int, N: int, K: int, fmt: str, group_size: Optional[int], x_dtype: str = "bf16",
                          path: Optional[str] = None) -> List[Dict]:
    """Descriptors (schema: issue #10's static tool) of every call the launcher could make with the GEMM (16-bit x:
    M >= _GEMM_MIN_M; W2A8: M > GEMV_MAX_M; fp32 x: any M): each GEMM
    config the autotuner may choose after pruning on an sm_90 GPU, or the dequantize + cuBLAS pair where
    ``_dequant_dispatch`` picks it.  ``path="fused"`` / ``"dequant+cublas"`` forces one path (the comparison the
    module docstring reports)."""
    if fmt not in _STATIC_FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {sorted(_STATIC_FORMATS)}")
    if x_dtype not in _STATIC_X:
        raise ValueError(f"x_dtype={x_dtype!r}: expected one of {sorted(_STATIC_X)}")
    if x_dtype != "int8" and M < _GEMM_MIN_M:  # fp32 x is not one of _STATIC_X
        raise ValueError(f"M={M}: with {x_dtype} x the GEMM handles M >= {_GEMM_MIN_M}")
    if x_dtype == "int8" and M <= GEMV_MAX_M:
        raise ValueError(f"M={M}: W2A8 runs the GEMM for M > {GEMV_MAX_M}")
    if group_size is not None and (K % group_size or group_size % 16):
        raise ValueError(f"group_size={group_size} must divide K={K} and be a multiple of 16")
    co = _STATIC_FORMATS[fmt]
    has_zero = co is None
    G = 1 if group_size is None else K // group_size
    gs = K if group_size is None else group_size
    if path is None:
        path = "dequant+cublas" if _dequant_dispatch(M, _STATIC_X[x_dtype][0], has_zero, G) else "fused"
    if path == "dequant+cublas":
        if x_dtype == "int8":
            raise ValueError("W2A8 (x_dtype='int8') always runs the fused int8 kernel")
        return [_static_dequant_call(M, N, K, G, gs, has_zero, co, x_dtype)]
    if path != "fused":
        raise ValueError(f"path={path!r}: expected None, 'fused' or 'dequant+cublas'")
    cands = _gemm_candidates(_GEMM_CONFIGS, K, G, gs, min(_next_pow2(M), _M_BUCKET_CAP), _STATIC_X[x_dtype][2],
                             _SM90_SMEM)
    return [_static_gemm_call(M, N, K, G, gs, has_zero, co, x_dtype, c) for c in cands]


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
    consts = dict(meta, HAS_BIAS=False, bias_ptr=None, X_SCALED=a8, BLOCK_M=M, MATH_F32=False, PRMT=True)
    if not a8:
        consts["xs_ptr"] = None
    if not meta["HAS_ZERO"]:
        consts["zero_ptr"] = None
    types = dict(x_ptr="*" + tname[xt], xs_ptr="*fp32", qw_ptr="*u8", scale_ptr="*fp16", zero_ptr="*fp16",
                 bias_ptr="*" + tname[xt], y_ptr="*bf16" if a8 else "*" + tname[xt],
                 N="i32", K="i32", G="i32", zc="fp32", magic="i32", lo_mask="i32", stride_xm="i32",
                 stride_qn="i32", stride_ym="i32")
    ints = dict(N=N, K=K, G=G, magic=_GEMV_MAGIC[xt], lo_mask=0xFFFF, stride_xm=K, stride_qn=-(-K // 64) * 16, stride_ym=N)
    div16 = ["x_ptr", "xs_ptr", "qw_ptr", "scale_ptr", "zero_ptr", "y_ptr"] + \
        [n for n, v in ints.items() if v % 16 == 0]
    pre = [_static_quant_launch(M, K, kperm=False)] if a8 else []
    sbytes = N * G * 2 * (2 if meta["HAS_ZERO"] else 1)
    calls = []
    for c in _prune_gemv(_GEMV_CONFIGS, dict(K=K, N=N), BLOCK_M=M, HAS_ZERO=meta["HAS_ZERO"],
                         PER_CHANNEL=meta["PER_CHANNEL"]):
        bn, ksp, words = (c.kwargs[k] for k in ("BLOCK_N", "KSPLIT", "WORDS"))
        lane = _GEMV_LANE_RUN["int8" if a8 else xt]
        ct = dict(consts, **c.kwargs, LANE_RUN=lane)
        sig = {n: ("constexpr" if n in ct else types[n]) for n in _packed_gemv_kernel.arg_names}
        trips = _cdiv(_cdiv(K, 16 * words), ksp)  # K-loop trips: chunks per lane
        launch = {"name": "packed_gemv",
                  "triton": {"fn": _packed_gemv_kernel, "signature": sig, "constexprs": ct, "num_warps": c.num_warps,
                             "num_stages": c.num_stages, "divisible_by_16": [n for n in div16 if sig[n] != "constexpr"]},
                  "grid": [_cdiv(N, bn), 1, 1], "threads_per_cta": 32 * c.num_warps,
                  "loop_trips": float(trips), "weights": N * K,
                  "bytes": N * (-(-K // 64) * 16) + sbytes + M * K * 2 + M * N * 2, "mma_flops": 0}
        calls.append({"kernel": "packed_gemv", "backend": "triton",
                      "config": f"BLOCK_N={bn} KSPLIT={ksp} WORDS={words} warps={c.num_warps} LANE_RUN={lane}"
                                f" rows/thread={_gemv_rows(bn, ksp, c.num_warps)}",
                      "launches": pre + [launch]})
    return calls


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int], x_dtype: str = "bf16") -> List[Dict]:
    """Plain-Python descriptors of what the launcher may launch for this call (see the static roofline tool):
    one dict per candidate config.  16-bit x: the GEMV for M < _GEMM_MIN_M, the GEMM from there on; W2A8 (int8 x):
    the GEMV for M <= GEMV_MAX_M.  For 16-bit x with _GEMM_MIN_M <= M <= GEMV_MAX_M the GEMV's configs are listed
    too (after the GEMM's, their config marked "not dispatched"), so the report scores the two kernels side by side;
    the launcher runs the GEMM there (``_use_gemv``)."""
    if M <= GEMV_MAX_M and x_dtype in ("bf16", "fp16", "int8"):
        if x_dtype == "int8" or M < _GEMM_MIN_M:
            return _static_launches_gemv(M, N, K, fmt, group_size, x_dtype)
        gemv = _static_launches_gemv(M, N, K, fmt, group_size, x_dtype)
        for call in gemv:
            call["config"] += f" (not dispatched: M >= {_GEMM_MIN_M} runs the GEMM)"
        return _static_launches_gemm(M, N, K, fmt, group_size, x_dtype) + gemv
    return _static_launches_gemm(M, N, K, fmt, group_size, x_dtype)

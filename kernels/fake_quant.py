"""Triton fake-quant kernels: weight quantize -> dequantize (statistics fused), its straight-through backward with the
learnable-scale gradient reduced in-kernel, and 8-bit dynamic activation fake-quant.

The math is ``pyquant/reference/quant.py`` exactly: fp32 arithmetic, divisions whose result is rounded to codes use
``tl.math.div_rn`` (IEEE round-to-nearest, like the reference's torch division), rounding is ``floor(v + 0.5)``, and
scales are rounded through the spec's ``scale_dtype`` before use.  Codes therefore agree bit for bit whenever the
scales agree; scales computed from sums (TWN, absmean) can differ from torch's in the last fp32 bit because the
summation order differs (max/min-based scales are exact).

Work decomposition: the weight [N, K] is contiguous, and the elements sharing one scale (a "segment": one group of
a row, one row, or the whole tensor) are a contiguous range ``[pid * L, (pid + 1) * L)`` of the flat weight, because
``row * K + g * group_size == (row * G + g) * group_size``.  Per-channel: one program per row, looping over it in
BLOCK-sized chunks: pass 1 reduces the statistics (sum|w|, max|w|, min, max), TWN's pass 2 reduces the mean of |w|
above Delta, and the last pass writes codes and/or w_hat (the re-reads of one row hit L1/L2).  Per-group (group size
32..256, a power of two): one program takes GROUP_TILE elements as a [groups, group_size] tile held in registers and
reduces along its rows, so the weight is read once.  The backward is one pass: grad_w is written and the
scale/zero-point gradient is accumulated in registers and stored once per scale -- no full-size fp32 temporaries,
no atomics.

Per-tensor specs split the flat weight into TENSOR_CHUNK-element programs instead: a stats kernel writes per-chunk
partials (sum|w|, max|w|, min, max; TWN's second pass: sum and count above Delta), the launcher reduces them and applies
the reference's own final torch ops (so the scale is rounded exactly as the reference rounds it), then the quantize
pass runs over the chunks; the backward writes per-chunk partial scale gradients that the launcher sums.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["fake_quant_weight_fwd", "fake_quant_weight_bwd", "fake_quant_activation"]

# method ids (constexpr)
_TWN, _ABSMEAN, _UNIFORM, _SEQ = 0, 1, 2, 3
_METHOD_ID = {"twn": _TWN, "absmean": _ABSMEAN, "uniform": _UNIFORM, "seq": _SEQ}
_TL_SCALE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TWN_DELTA_RATIO = 0.7
UNIFORM_SYM_DIVISOR = 1.5


@triton.jit
def _to_sdt(s, SDT: tl.constexpr):
    """Round fp32 through the storage dtype (round-to-nearest-even, like torch's .to()) and back to fp32.

    bfloat16 is rounded with integer arithmetic on the fp32 bits (add 0x7FFF plus the kept LSB, clear the low half):
    the same on every Triton backend, whereas the interpreter's float->bf16 cast truncates.  Scales are finite."""
    if SDT == tl.bfloat16:
        b = s.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return s.to(SDT).to(tl.float32)


@triton.jit
def _cast(x, DT: tl.constexpr):
    """fp32 -> the output dtype, round-to-nearest-even like torch's .to() (bf16 pre-rounded on the bits, see above)."""
    if DT == tl.bfloat16:
        return _to_sdt(x, tl.bfloat16).to(tl.bfloat16)
    else:
        return x.to(DT)


@triton.jit
def _round_scale(s, TINY: tl.constexpr, SDT: tl.constexpr):
    # clamp to the storage dtype's smallest normal, round through it, back to fp32
    s = tl.maximum(s, TINY)
    return _to_sdt(s, SDT)


@triton.jit
def _fake_quant_weight_kernel(
    W, OUT, CODES, S_IN, Z_IN, DELTA_IN, S_OUT, Z_OUT,
    L, L_f, NUMEL, clip,
    METHOD: tl.constexpr, LEARNABLE: tl.constexpr, STATS: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_CLIP: tl.constexpr,
    TERNARY: tl.constexpr, MAX_CODE: tl.constexpr, CODE_OFFSET: tl.constexpr,
    SDT: tl.constexpr, TINY: tl.constexpr, PER_TENSOR_IN: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_CODES: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * L
    offs0 = tl.arange(0, BLOCK)

    delta = 0.0
    if LEARNABLE:
        sidx = 0 if PER_TENSOR_IN else pid
        s = _round_scale(tl.load(S_IN + sidx).to(tl.float32), TINY, SDT)
        if SYMMETRIC:
            z = CODE_OFFSET
        else:
            z = _to_sdt(tl.load(Z_IN + sidx).to(tl.float32), SDT)
    elif not STATS:
        # per-tensor, split over programs: the statistics were reduced by _fake_quant_weight_stats_kernel and
        # turned into the (already rounded) scale, zero point and TWN threshold by the launcher
        s = tl.load(S_IN)
        if SYMMETRIC:
            z = CODE_OFFSET
        else:
            z = tl.load(Z_IN)
        if METHOD == 0:
            delta = tl.load(DELTA_IN)
    else:
        # pass 1: statistics of the (clipped) segment
        acc_sum = tl.zeros([BLOCK], dtype=tl.float32)
        acc_amax = tl.zeros([BLOCK], dtype=tl.float32)
        acc_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for start in range(0, L, BLOCK):
            offs = start + offs0
            m = offs < L
            w = tl.load(W + base + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_CLIP:
                w = tl.minimum(tl.maximum(w, -clip), clip)
            a = tl.abs(w)
            acc_sum += a
            acc_amax = tl.maximum(acc_amax, a)
            acc_min = tl.minimum(acc_min, tl.where(m, w, float("inf")))
            acc_max = tl.maximum(acc_max, tl.where(m, w, float("-inf")))
        mean_abs = tl.math.div_rn(tl.sum(acc_sum, axis=0), L_f)
        amax = tl.max(acc_amax, axis=0)
        z = CODE_OFFSET
        if METHOD == 0:  # twn: alpha = mean(|w| where |w| > Delta), Delta = 0.7 * mean|w|
            delta = 0.7 * mean_abs
            acc_s = tl.zeros([BLOCK], dtype=tl.float32)
            acc_n = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, L, BLOCK):
                offs = start + offs0
                m = offs < L
                w = tl.load(W + base + offs, mask=m, other=0.0).to(tl.float32)
                if HAS_CLIP:
                    w = tl.minimum(tl.maximum(w, -clip), clip)
                a = tl.abs(w)
                keep = (a > delta) & m
                acc_s += tl.where(keep, a, 0.0)
                acc_n += keep.to(tl.int32)
            cnt = tl.sum(acc_n, axis=0)
            tot = tl.sum(acc_s, axis=0)
            s = tl.where(cnt > 0, tl.math.div_rn(tot, tl.maximum(cnt, 1).to(tl.float32)), 0.0)
            s = _round_scale(s, TINY, SDT)
        elif METHOD == 1:  # absmean
            s = _round_scale(mean_abs, TINY, SDT)
        elif METHOD == 3:  # seq: alpha = max|w|
            if TERNARY:
                s = _round_scale(amax * (2.0 / 3.0), TINY, SDT)
            else:
                s = _round_scale(amax * 0.5, TINY, SDT)
        else:  # uniform
            if SYMMETRIC:
                s = _round_scale(tl.math.div_rn(amax, 1.5), TINY, SDT)
            else:
                mn = tl.minimum(tl.min(acc_min, axis=0), 0.0)  # range includes 0, as the reference
                mx = tl.maximum(tl.max(acc_max, axis=0), 0.0)
                s = _round_scale(tl.math.div_rn(mx - mn, MAX_CODE * 1.0), TINY, SDT)
                z = _to_sdt(tl.math.div_rn(-mn, s), SDT)
        tl.store(S_OUT + pid, s)
        if not SYMMETRIC:
            tl.store(Z_OUT + pid, z)

    # last pass: codes and w_hat = (c - z) * s
    for start in range(0, L, BLOCK):
        offs = start + offs0
        m = (offs < L) & (base + offs < NUMEL)
        w = tl.load(W + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_CLIP:
            w = tl.minimum(tl.maximum(w, -clip), clip)
        if METHOD == 0 and not LEARNABLE:  # TWN's own threshold
            sgn = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
            c = 1.0 + tl.where(tl.abs(w) > delta, sgn, 0.0)
        else:
            v = tl.math.div_rn(w, s)
            c = tl.floor((v + z) + 0.5)
            c = tl.minimum(tl.maximum(c, 0.0), MAX_CODE * 1.0)
        if WRITE_CODES:
            tl.store(CODES + base + offs, c.to(tl.uint8), mask=m)
        if WRITE_OUT:
            tl.store(OUT + base + offs, _cast((c - z) * s, OUT.dtype.element_ty), mask=m)


@triton.jit
def _fake_quant_weight_groups_kernel(
    W, OUT, CODES, S_IN, Z_IN, S_OUT, Z_OUT,
    NSEG, clip,
    METHOD: tl.constexpr, LEARNABLE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_CLIP: tl.constexpr,
    TERNARY: tl.constexpr, MAX_CODE: tl.constexpr, CODE_OFFSET: tl.constexpr,
    SDT: tl.constexpr, TINY: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_CODES: tl.constexpr,
    GS: tl.constexpr, GPP: tl.constexpr,
):
    """Per-group specs (group size GS, a power of two <= 256): one program quantizes GPP consecutive groups as a
    [GPP, GS] tile of the flat weight (groups are contiguous), statistics reduced along axis 1 -- the same math as
    _fake_quant_weight_kernel, whose one-program-per-group grid would give tiny programs here."""
    pid = tl.program_id(0)
    seg = pid * GPP + tl.arange(0, GPP)
    segm = seg < NSEG
    cols = tl.arange(0, GS)
    offs = seg.to(tl.int64)[:, None] * GS + cols[None, :]
    m = segm[:, None] & (cols[None, :] < GS)
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_CLIP:
        w = tl.minimum(tl.maximum(w, -clip), clip)
    a = tl.abs(w)
    delta = tl.zeros([GPP], dtype=tl.float32)
    if LEARNABLE:
        s = _round_scale(tl.load(S_IN + seg, mask=segm, other=1.0).to(tl.float32), TINY, SDT)
        if SYMMETRIC:
            z = tl.full([GPP], CODE_OFFSET, dtype=tl.float32)
        else:
            z = _to_sdt(tl.load(Z_IN + seg, mask=segm, other=0.0).to(tl.float32), SDT)
    else:
        mean_abs = tl.math.div_rn(tl.sum(a, axis=1), tl.full([GPP], GS, dtype=tl.float32))
        amax = tl.max(a, axis=1)
        z = tl.full([GPP], CODE_OFFSET, dtype=tl.float32)
        if METHOD == 0:  # twn
            delta = 0.7 * mean_abs
            keep = a > delta[:, None]
            cnt = tl.sum(keep.to(tl.int32), axis=1)
            tot = tl.sum(tl.where(keep, a, 0.0), axis=1)
            s = tl.where(cnt > 0, tl.math.div_rn(tot, tl.maximum(cnt, 1).to(tl.float32)), 0.0)
            s = _round_scale(s, TINY, SDT)
        elif METHOD == 1:  # absmean
            s = _round_scale(mean_abs, TINY, SDT)
        elif METHOD == 3:  # seq
            if TERNARY:
                s = _round_scale(amax * (2.0 / 3.0), TINY, SDT)
            else:
                s = _round_scale(amax * 0.5, TINY, SDT)
        else:  # uniform
            if SYMMETRIC:
                s = _round_scale(tl.math.div_rn(amax, tl.full([GPP], 1.5, dtype=tl.float32)), TINY, SDT)
            else:
                mn = tl.minimum(tl.min(w, axis=1), 0.0)  # range includes 0, as the reference
                mx = tl.maximum(tl.max(w, axis=1), 0.0)
                s = _round_scale(tl.math.div_rn(mx - mn, tl.full([GPP], MAX_CODE, dtype=tl.float32)), TINY, SDT)
                z = _to_sdt(tl.math.div_rn(-mn, s), SDT)
        tl.store(S_OUT + seg, s, mask=segm)
        if not SYMMETRIC:
            tl.store(Z_OUT + seg, z, mask=segm)
    s2 = s[:, None]
    z2 = z[:, None]
    if METHOD == 0 and not LEARNABLE:  # TWN's own threshold
        sgn = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
        c = 1.0 + tl.where(a > delta[:, None], sgn, 0.0)
    else:
        v = tl.math.div_rn(w, tl.broadcast_to(s2, [GPP, GS]))
        c = tl.floor((v + z2) + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), MAX_CODE * 1.0)
    if WRITE_CODES:
        tl.store(CODES + offs, c.to(tl.uint8), mask=m)
    if WRITE_OUT:
        tl.store(OUT + offs, _cast((c - z2) * s2, OUT.dtype.element_ty), mask=m)


@triton.jit
def _fake_quant_weight_groups_bwd_kernel(
    G, W, GW, S_IN, Z_IN, GS_OUT, GZ_OUT,
    NSEG, clip, gscale,
    LEARNABLE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_CLIP: tl.constexpr, LSQ: tl.constexpr,
    MAX_CODE: tl.constexpr, CODE_OFFSET: tl.constexpr, SDT: tl.constexpr, TINY: tl.constexpr,
    GS: tl.constexpr, GPP: tl.constexpr,
):
    """Backward of _fake_quant_weight_groups_kernel: grad_w, and the per-group scale/zero-point gradients reduced
    along axis 1 of the [GPP, GS] tile (same math as _fake_quant_weight_bwd_kernel)."""
    pid = tl.program_id(0)
    seg = pid * GPP + tl.arange(0, GPP)
    segm = seg < NSEG
    cols = tl.arange(0, GS)
    offs = seg.to(tl.int64)[:, None] * GS + cols[None, :]
    m = segm[:, None] & (cols[None, :] < GS)
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    keep = m
    if HAS_CLIP:
        keep = keep & (tl.abs(w) <= clip)
        w = tl.minimum(tl.maximum(w, -clip), clip)
    if LEARNABLE:
        s = _round_scale(tl.load(S_IN + seg, mask=segm, other=1.0).to(tl.float32), TINY, SDT)
        if SYMMETRIC:
            z = tl.full([GPP], CODE_OFFSET, dtype=tl.float32)
        else:
            z = _to_sdt(tl.load(Z_IN + seg, mask=segm, other=0.0).to(tl.float32), SDT)
        s2 = s[:, None]
        v = tl.math.div_rn(w, tl.broadcast_to(s2, [GPP, GS]))
        vz = v + z[:, None]
        inside = (vz >= 0.0) & (vz <= MAX_CODE * 1.0)
        c = tl.minimum(tl.maximum(tl.floor(vz + 0.5), 0.0), MAX_CODE * 1.0)
        q = c - z[:, None]
        if LSQ:
            ds = q - tl.where(inside, v, 0.0)
        else:
            ds = tl.where(inside, 0.0, q)
        tl.store(GS_OUT + seg, tl.sum(tl.where(m, g * ds, 0.0), axis=1) * gscale, mask=segm)
        if not SYMMETRIC:
            gz = tl.sum(tl.where(m & (~inside), g * (-s2), 0.0), axis=1) * gscale
            tl.store(GZ_OUT + seg, gz, mask=segm)
        keep = keep & inside
    tl.store(GW + offs, tl.where(keep, g, 0.0).to(GW.dtype.element_ty), mask=m)


@triton.jit
def _fake_quant_weight_stats_kernel(W, PART, CNT, DELTA_IN, NUMEL, clip, TWN_PASS: tl.constexpr,
                                    HAS_CLIP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per-tensor statistics, split over programs: each reduces CHUNK elements into PART[pid, 0:4] =
    (sum|w|, max|w|, min w, max w), or with TWN_PASS into PART[pid, 0] = sum(|w| > Delta), CNT[pid] = count."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * CHUNK
    offs0 = tl.arange(0, BLOCK)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    acc_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    if TWN_PASS:
        delta = tl.load(DELTA_IN)
    for start in range(0, CHUNK, BLOCK):
        offs = base + start + offs0
        m = offs < NUMEL
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_CLIP:
            w = tl.minimum(tl.maximum(w, -clip), clip)
        a = tl.abs(w)
        if TWN_PASS:
            keep = (a > delta) & m
            acc_a += tl.where(keep, a, 0.0)
            acc_n += keep.to(tl.int32)
        else:
            acc_a += a
            acc_b = tl.maximum(acc_b, a)
            acc_min = tl.minimum(acc_min, tl.where(m, w, float("inf")))
            acc_max = tl.maximum(acc_max, tl.where(m, w, float("-inf")))
    tl.store(PART + pid * 4, tl.sum(acc_a, axis=0))
    if TWN_PASS:
        tl.store(CNT + pid, tl.sum(acc_n, axis=0))
    else:
        tl.store(PART + pid * 4 + 1, tl.max(acc_b, axis=0))
        tl.store(PART + pid * 4 + 2, tl.min(acc_min, axis=0))
        tl.store(PART + pid * 4 + 3, tl.max(acc_max, axis=0))


@triton.jit
def _fake_quant_weight_bwd_kernel(
    G, W, GW, S_IN, Z_IN, GS, GZ,
    L, NUMEL, clip, gscale,
    LEARNABLE: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_CLIP: tl.constexpr, LSQ: tl.constexpr,
    MAX_CODE: tl.constexpr, CODE_OFFSET: tl.constexpr, SDT: tl.constexpr, TINY: tl.constexpr,
    PER_TENSOR_IN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * L
    offs0 = tl.arange(0, BLOCK)
    if LEARNABLE:
        sidx = 0 if PER_TENSOR_IN else pid
        s = _round_scale(tl.load(S_IN + sidx).to(tl.float32), TINY, SDT)
        if SYMMETRIC:
            z = CODE_OFFSET
        else:
            z = _to_sdt(tl.load(Z_IN + sidx).to(tl.float32), SDT)
        acc_s = tl.zeros([BLOCK], dtype=tl.float32)
        acc_z = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, L, BLOCK):
        offs = start + offs0
        m = (offs < L) & (base + offs < NUMEL)
        g = tl.load(G + base + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + base + offs, mask=m, other=0.0).to(tl.float32)
        keep = m
        if HAS_CLIP:
            keep = keep & (tl.abs(w) <= clip)
            w = tl.minimum(tl.maximum(w, -clip), clip)
        if LEARNABLE:
            v = tl.math.div_rn(w, s)
            vz = v + z
            inside = (vz >= 0.0) & (vz <= MAX_CODE * 1.0)
            c = tl.minimum(tl.maximum(tl.floor(vz + 0.5), 0.0), MAX_CODE * 1.0)
            q = c - z
            if LSQ:
                ds = q - tl.where(inside, v, 0.0)
            else:
                ds = tl.where(inside, 0.0, q)
            acc_s += tl.where(m, g * ds, 0.0)
            if not SYMMETRIC:
                acc_z += tl.where(m & (~inside), g * (-s), 0.0)
            keep = keep & inside
        tl.store(GW + base + offs, tl.where(keep, g, 0.0).to(GW.dtype.element_ty), mask=m)
    if LEARNABLE:
        tl.store(GS + pid, tl.sum(acc_s, axis=0) * gscale)
        if not SYMMETRIC:
            tl.store(GZ + pid, tl.sum(acc_z, axis=0) * gscale)


@triton.jit
def _row_range(X, base, D, clip, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """(max|x|, min x, max x) of the D values at X + base (clipped to [-clip, clip] when HAS_CLIP), streamed in
    BLOCK-wide chunks, in fp32."""
    offs0 = tl.arange(0, BLOCK)
    acc_amax = tl.zeros([BLOCK], dtype=tl.float32)
    acc_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(0, D, BLOCK):
        offs = start + offs0
        m = offs < D
        x = tl.load(X + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_CLIP:
            x = tl.minimum(tl.maximum(x, -clip), clip)
        acc_amax = tl.maximum(acc_amax, tl.abs(x))
        acc_min = tl.minimum(acc_min, tl.where(m, x, float("inf")))
        acc_max = tl.maximum(acc_max, tl.where(m, x, float("-inf")))
    return tl.max(acc_amax, axis=0), tl.min(acc_min, axis=0), tl.max(acc_max, axis=0)


@triton.jit
def _fake_quant_activation_stats_kernel(X, AMAX, MN, MX, D, clip, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    amax, row_min, row_max = _row_range(X, base, D, clip, HAS_CLIP, BLOCK)
    tl.store(AMAX + row, amax)
    tl.store(MN + row, row_min)
    tl.store(MX + row, row_max)


@triton.jit
def _fake_quant_activation_kernel(X, OUT, AMAX, MN, MX, D, clip, PER_TOKEN: tl.constexpr, SYMMETRIC: tl.constexpr,
                                  HAS_CLIP: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * D
    offs0 = tl.arange(0, BLOCK)
    if PER_TOKEN:  # the row's own range, reduced here (the second pass re-reads the row from L1/L2)
        amax, row_min, row_max = _row_range(X, base, D, clip, HAS_CLIP, BLOCK)
    else:  # the tensor's range, reduced by the stats kernel and the launcher
        amax = tl.load(AMAX)
        row_min = tl.load(MN)
        row_max = tl.load(MX)
    if SYMMETRIC:
        s = tl.maximum(tl.math.div_rn(amax, 127.0), TINY)
        z = 0.0
    else:
        mn = tl.minimum(row_min, 0.0)  # range includes 0, as the reference
        mx = tl.maximum(row_max, 0.0)
        s = tl.maximum(tl.math.div_rn(mx - mn, 255.0), TINY)
        z = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(-mn, s) + 0.5), 0.0), 255.0)
    for start in range(0, D, BLOCK):
        offs = start + offs0
        m = offs < D
        x = tl.load(X + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_CLIP:
            x = tl.minimum(tl.maximum(x, -clip), clip)
        r = tl.floor(tl.math.div_rn(x, s) + 0.5)
        if SYMMETRIC:
            q = tl.minimum(tl.maximum(r, -127.0), 127.0)
        else:
            q = tl.minimum(tl.maximum(r + z, 0.0), 255.0)
        tl.store(OUT + base + offs, _cast((q - z) * s, OUT.dtype.element_ty), mask=m)


# ---- launchers: check constraints, allocate outputs, launch ------------------------------------------------------
def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests swap in a NaN/0xFF-filled version to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block(n: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(n)))


def _warps(block: int) -> int:
    """Small segments (per-group, 32..256 elements) get one warp each so many programs share an SM; 1024-wide
    blocks get four (eight elements per thread)."""
    return max(1, min(4, block // 256))


# Per-group specs: elements per program of the [groups, group_size] tile kernels (read at call time; tests lower it).
GROUP_TILE = 2048


def _groups_per_program(gs: int) -> int:
    return max(1, GROUP_TILE // gs)


# Per-tensor specs split the flat weight into chunks of this many elements, one program each (statistics are reduced
# per chunk, then across chunks by the launcher).  Read at call time; tests lower it to exercise several chunks.
TENSOR_CHUNK = 8192


def _segment(spec, w: torch.Tensor) -> Tuple[int, int, int]:
    """(number of programs, elements per program L, G).  Per-channel/group: one program per scale; per-tensor: one
    per TENSOR_CHUNK elements (the last one partial)."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return -(-(n * k) // TENSOR_CHUNK), TENSOR_CHUNK, 1
    gs = spec.resolve_group_size(k)
    return n * (k // gs), gs, k // gs


def _tensor_stats(w: torch.Tensor, spec, nprog: int, chunk: int):
    """Per-tensor scale (and zero point, TWN threshold) from chunk partials; the last steps are the reference's own
    torch ops on the reduced values (same divisions, same rounding through scale_dtype)."""
    numel = w.numel()
    clip = float(spec.clip) if spec.clip is not None else 0.0
    part = _empty((nprog, 4), torch.float32, w.device)
    cnt = _empty((nprog,), torch.int32, w.device)
    blk = _block(chunk)
    _fake_quant_weight_stats_kernel[(nprog,)](w, part, cnt, part, numel, clip, TWN_PASS=False,
                                              HAS_CLIP=spec.clip is not None, CHUNK=chunk, BLOCK=blk,
                                              num_warps=_warps(blk))
    mean = part[:, 0].sum() / numel
    amax = part[:, 1].amax()
    dt = spec.torch_scale_dtype

    def rnd(v):
        return v.clamp_min(torch.finfo(dt).tiny).to(dt).float()

    z = None
    delta = torch.zeros((), dtype=torch.float32, device=w.device)
    if spec.method == "twn":
        delta = TWN_DELTA_RATIO * mean
        _fake_quant_weight_stats_kernel[(nprog,)](w, part, cnt, delta.reshape(1), numel, clip, TWN_PASS=True,
                                                  HAS_CLIP=spec.clip is not None, CHUNK=chunk, BLOCK=blk,
                                              num_warps=_warps(blk))
        c = cnt.sum()
        s = torch.where(c > 0, part[:, 0].sum() / c.clamp_min(1), torch.zeros_like(mean))
    elif spec.method == "absmean":
        s = mean
    elif spec.method == "seq":
        s = amax * (2.0 / 3.0) if spec.ternary else amax / 2.0
    elif spec.symmetric:
        s = amax / UNIFORM_SYM_DIVISOR
    else:
        mn, mx = part[:, 2].amin().clamp_max(0.0), part[:, 3].amax().clamp_min(0.0)
        s = rnd((mx - mn) / spec.max_code)
        z = (-mn / s).to(dt).float().reshape(1, 1)
    return rnd(s).reshape(1, 1), z, delta.reshape(1)


def _check_w(w: torch.Tensor, spec, scale, zero_point) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_contiguous() or w.dtype not in _W_DTYPES:
        raise ValueError(f"w must be a contiguous 2-D float32/bfloat16/float16 tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    if w.numel() >= 2**31:
        raise ValueError(f"w has {w.numel()} elements; the kernels index segments with int32 (< 2**31)")
    nseg, _, g = _segment(spec, w)
    want = (1, 1) if spec.granularity == "tensor" else (w.shape[0], g)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and (tuple(t.shape) != want or t.device != w.device):
            raise ValueError(f"{name} must have shape {want} on {w.device}, got {tuple(t.shape)} on {t.device}")
    if scale is not None and not spec.symmetric and zero_point is None:
        raise ValueError("zero_point is required with a given scale for an asymmetric spec")


def _consts(spec):
    sdt = spec.torch_scale_dtype
    return dict(SDT=_TL_SCALE[sdt], TINY=float(torch.finfo(sdt).tiny), MAX_CODE=spec.max_code,
                CODE_OFFSET=float(spec.code_offset) if spec.symmetric else 0.0,
                SYMMETRIC=spec.symmetric, HAS_CLIP=spec.clip is not None)


def fake_quant_weight_fwd(w: torch.Tensor, spec, scale: Optional[torch.Tensor] = None,
                          zero_point: Optional[torch.Tensor] = None, want_out: bool = True,
                          want_codes: bool = False):
    """-> (w_hat | None, codes uint8 | None, scale fp32 [R, G], zero_point fp32 [R, G] | None)."""
    _check_w(w, spec, scale, zero_point)
    n, k = w.shape
    nseg, seg_len, g = _segment(spec, w)
    r = 1 if spec.granularity == "tensor" else n
    learnable = scale is not None
    out = _empty(w.shape, w.dtype, w.device) if want_out else None
    codes = _empty((n, k), torch.uint8, w.device) if want_codes else None
    if learnable:
        # the scales used are the given ones rounded through scale_dtype (tiny [R, G] tensors: plain torch)
        dt = spec.torch_scale_dtype
        s_out = scale.detach().float().clamp_min(torch.finfo(dt).tiny).to(dt).float()
        z_out = None if spec.symmetric else zero_point.detach().float().to(dt).float()
        s_in = scale.detach().float().contiguous()
        z_in = None if spec.symmetric else zero_point.detach().float().contiguous()
    elif spec.granularity == "tensor":  # statistics reduced over all programs first
        s_out, z_out, delta = _tensor_stats(w, spec, nseg, seg_len)
        s_in, z_in = s_out, z_out
    else:  # statistics fused into the one program per scale
        s_out = _empty((r, g), torch.float32, w.device)
        z_out = None if spec.symmetric else _empty((r, g), torch.float32, w.device)
        s_in = z_in = None
    dummy = w  # never dereferenced when its constexpr flag is off
    if spec.granularity == "group":
        gpp = _groups_per_program(seg_len)
        _fake_quant_weight_groups_kernel[(triton.cdiv(nseg, gpp),)](
            w, out if out is not None else dummy, codes if codes is not None else dummy,
            s_in if s_in is not None else dummy, z_in if z_in is not None else dummy,
            s_out, z_out if z_out is not None else s_out,
            nseg, float(spec.clip) if spec.clip is not None else 0.0,
            METHOD=_METHOD_ID[spec.method], LEARNABLE=learnable, TERNARY=spec.ternary,
            WRITE_OUT=want_out, WRITE_CODES=want_codes, GS=seg_len, GPP=gpp, num_warps=4, **_consts(spec),
        )
        return out, codes, s_out, z_out
    stats_in_kernel = not learnable and spec.granularity != "tensor"
    _fake_quant_weight_kernel[(nseg,)](
        w, out if out is not None else dummy, codes if codes is not None else dummy,
        s_in if s_in is not None else dummy, z_in if z_in is not None else dummy,
        delta if not learnable and spec.granularity == "tensor" else dummy,
        s_out, z_out if z_out is not None else s_out,
        seg_len, float(seg_len), w.numel(), float(spec.clip) if spec.clip is not None else 0.0,
        METHOD=_METHOD_ID[spec.method], LEARNABLE=learnable, STATS=stats_in_kernel, TERNARY=spec.ternary,
        PER_TENSOR_IN=spec.granularity == "tensor",
        WRITE_OUT=want_out, WRITE_CODES=want_codes, BLOCK=_block(seg_len), num_warps=_warps(_block(seg_len)),
        **_consts(spec),
    )
    return out, codes, s_out, z_out


def fake_quant_weight_bwd(grad: torch.Tensor, w: torch.Tensor, spec, scale: Optional[torch.Tensor] = None,
                          zero_point: Optional[torch.Tensor] = None):
    """-> (grad_w in w's dtype, grad_scale in scale's dtype | None, grad_zero_point | None)."""
    _check_w(w, spec, scale, zero_point)
    if not isinstance(grad, torch.Tensor) or grad.shape != w.shape or not grad.is_contiguous() \
            or grad.device != w.device:
        raise ValueError(f"grad must be a contiguous tensor of w's shape {tuple(w.shape)} on {w.device}")
    n, k = w.shape
    nseg, seg_len, _ = _segment(spec, w)
    learnable = scale is not None
    gw = _empty(w.shape, w.dtype, w.device)
    gs_seg = _empty((nseg,), torch.float32, w.device) if learnable else None
    gz_seg = _empty((nseg,), torch.float32, w.device) if learnable and not spec.symmetric else None
    if learnable:
        s_in = scale.detach().float().contiguous()
        z_in = None if spec.symmetric else zero_point.detach().float().contiguous()
        if spec.scale_grad == "lsq":
            per = n * k if spec.granularity == "tensor" else seg_len
            gscale = 1.0 / math.sqrt(per * spec.qp)
        else:
            gscale = 1.0
    else:
        s_in = z_in = None
        gscale = 1.0
    dummy = gw
    if spec.granularity == "group":
        gpp = _groups_per_program(seg_len)
        _fake_quant_weight_groups_bwd_kernel[(triton.cdiv(nseg, gpp),)](
            grad, w, gw, s_in if s_in is not None else dummy, z_in if z_in is not None else dummy,
            gs_seg if gs_seg is not None else dummy, gz_seg if gz_seg is not None else dummy,
            nseg, float(spec.clip) if spec.clip is not None else 0.0, gscale,
            LEARNABLE=learnable, LSQ=spec.scale_grad == "lsq", GS=seg_len, GPP=gpp, num_warps=4,
            **_consts(spec),
        )
    else:
        _fake_quant_weight_bwd_kernel[(nseg,)](
            grad, w, gw, s_in if s_in is not None else dummy, z_in if z_in is not None else dummy,
            gs_seg if gs_seg is not None else dummy, gz_seg if gz_seg is not None else dummy,
            seg_len, w.numel(), float(spec.clip) if spec.clip is not None else 0.0, gscale,
            LEARNABLE=learnable, LSQ=spec.scale_grad == "lsq", PER_TENSOR_IN=spec.granularity == "tensor",
            BLOCK=_block(seg_len), num_warps=_warps(_block(seg_len)), **_consts(spec),
        )
    if spec.granularity == "tensor" and learnable:  # per-chunk partial sums -> the one scale's gradient
        gs_seg = gs_seg.sum()
        gz_seg = None if gz_seg is None else gz_seg.sum()
    gs = gs_seg.reshape(scale.shape).to(scale.dtype) if learnable else None
    gz = gz_seg.reshape(zero_point.shape).to(zero_point.dtype) if gz_seg is not None else None
    return gw, gs, gz


def fake_quant_activation(x: torch.Tensor, symmetric: bool, per_token: bool,
                          clip: Optional[float] = None) -> torch.Tensor:
    """Dynamic 8-bit min-max fake-quant of x [..., D] (row = token), after clipping to [-clip, clip] when a clip is
    given; output in x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_contiguous() or x.dtype not in _W_DTYPES \
            or x.numel() == 0:
        raise ValueError("x must be a non-empty contiguous float32/bfloat16/float16 tensor [..., D]")
    if clip is not None and not (isinstance(clip, float) and clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip={clip!r} is invalid: expected None or a finite float > 0")
    has_clip = clip is not None
    cv = float(clip) if has_clip else 0.0
    d = x.shape[-1]
    rows = x.numel() // d
    out = _empty(x.shape, x.dtype, x.device)
    blk = _block(d)
    if per_token:  # one fused kernel: each program reduces its row's range, then quantizes the row
        amax = mn = mx = out  # unused
    else:
        amax = _empty((rows,), torch.float32, x.device)
        mn = _empty((rows,), torch.float32, x.device)
        mx = _empty((rows,), torch.float32, x.device)
        _fake_quant_activation_stats_kernel[(rows,)](x, amax, mn, mx, d, cv, HAS_CLIP=has_clip, BLOCK=blk,
                                                     num_warps=_warps(blk))
        # max/min are order-independent: reducing the per-row results is exact
        amax, mn, mx = amax.amax().reshape(1), mn.amin().reshape(1), mx.amax().reshape(1)
    _fake_quant_activation_kernel[(rows,)](x, out, amax, mn, mx, d, cv, PER_TOKEN=per_token, SYMMETRIC=symmetric,
                                           HAS_CLIP=has_clip, TINY=float(torch.finfo(torch.float32).tiny),
                                           BLOCK=blk, num_warps=_warps(blk))
    return out

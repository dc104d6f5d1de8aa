"""Streaming attention-map KL distillation: KL(P_T || P_S) per query row without materializing L_q x L_k.

Notation (per query row i; kept keys j only): raw dots x_T[j] = q_T . k_T[j], x_S[j] = q_S . k_S[j]; effective scores
t_j = c_T x_T[j], s_j = c_S x_S[j] with c = softmax scale / temperature; P_T = softmax(t), P_S = softmax(s).

    KL_i = sum_j P_T[j] (log P_T[j] - log P_S[j]) = sum_j P_T[j] (t_j - s_j) - lse(t) + lse(s)

Forward in ONE online pass (``_attention_kd_fwd_kernel``, one program per (query block, batch x head), one stream
over the key blocks, 2 QK dots per tile pair).  Running per row, updated tile by tile (flash-attention style):

    m_T = max_j x_T[j],  l_T = sum_j exp(c_T (x_T[j] - m_T)),  A = sum_j exp(c_T (x_T[j] - m_T)) * D_j,
    m_S = max_j x_S[j],  l_S = sum_j exp(c_S (x_S[j] - m_S)),  D_j = r x_T[j] - x_S[j],  r = c_T / c_S,

so that c_S D_j = t_j - s_j.  When a tile raises m_T to m_T', every term of l_T and A carries the factor
exp(c_T (m_T - m_T')), so both are rescaled by it (l_S likewise with m_S); A, like l_T, is a sum of
exp(t_j - c_T m_T) weights, which is why one rescale serves both.  At the end P_T[j] = exp(c_T (x_T[j] - m_T)) / l_T,
lse(t) = c_T m_T + log l_T, and

    KL_i = c_S A / l_T + (c_S m_S - c_T m_T) + (log l_S - log l_T).

Exact zero when teacher == student: then x_T == x_S bit for bit, r == 1 (``SAME_SCALE``: D_j = x_T - x_S, no
multiply), so every D_j is 0 exactly and A == 0; m, l are computed by the same instructions on the same values, so
m_S == m_T and l_S == l_T and the two differences are exactly 0: KL = 0.0, not a rounding residue.  (D_j comes from
the raw dots, never from an FMA of a product against a rounded product, which would leave the rounding error.)
The differences are also taken before adding large log-sum-exps, so a small KL keeps its relative accuracy.
Exponentials run as exp2 with c * log2(e) folded into one FFMA per element (``exp2(x * c2 - m * c2)``).
The row log-sum-exps lse_S, lse_T are stored for the backward.  Memory: three fp32 values per row.

Masking without fp32 overhead in the main loop.  The launcher reduces the key-padding mask to, per example, the
kept range [lo, hi) and whether every key in it is kept ("contiguous": right/left padding).  The key loop then runs
  * unmasked over tiles that lie inside [lo, hi) of a contiguous mask and, when ``causal``, are visible to every query
    row of the block (no select, compare or mask load at all; K loads without row masks), and
  * masked over the at most one leading partial tile, the trailing boundary tiles (L_k edge, padding edge, the causal
    diagonal band) and, for a non-contiguous mask, every tile in [lo, hi).
Tiles beyond hi (padding) and beyond the causal band are skipped.  Masked scores become a finite sentinel NEG
(-2**100, raw units) in both maps, which makes exp(...) exactly 0 and D_j exactly 0 there; a row that has seen only
masked keys has m = NEG and is reset by the exp(c (NEG - m')) = 0 rescale once a kept key arrives; a row that never
sees a kept key returns KL = 0, lse = 0 (and zero gradients).  Query rows past L_q are computed on zero Q and never
stored, so rows need no mask.  |c| * 2**100 must stay finite in fp32: the launcher rejects scales > 2**26.
Backward in ONE fused pass (``_attention_kd_bwd_kernel``, one program per (query block, batch x head), the same
  key-tile plan as the forward): recompute P_S and P_T once per tile pair from the saved lse's
  (P = exp2(x c2 - lse log2 e)); dS = g_i * (P_S - P_T) * c_S, rounded once to the input dtype; dQ_S += dS @ K_S in
  registers; dS^T @ Q_S is added with relaxed fp32 atomics (``red.global.add.f32``; the workspace pointer is
  typed fp32: a 16-bit atomic add is a CAS loop) into a zeroed fp32 dK workspace [B, H_kv, L_k, d], which also sums
  the query heads of a GQA group.  4 dots per tile pair (2 QK recomputations, dS @ K, dS^T @ Q) instead of 6 in the
  earlier dq + dk kernel pair, which recomputed both maps twice.  The last of a key head's cdiv(L_q, BLOCK_M) x G_S
  programs to finish (an acq_rel ticket per key head) rounds its fp32 workspace into dK (16-bit dK: no cast
  kernel; fp32 dK is the workspace).  Boundary tiles send the atomics of keys past L_k to row L_k - 1, where they add
  exact zeros (their dS is exactly 0), so the atomics need no row predicate.  The query blocks of a head run
  side by side (grid axis 0 is fastest), so the atomics of concurrent programs hit the same few dK rows, which stay
  in L2.  dK is NOT bitwise deterministic (fp32 atomic order varies from run to run, ~1 ulp of fp32 before the
  rounding to the output dtype); dQ is.  When teacher == student every dS is exactly 0, so dQ = dK = 0 exactly.
  The teacher gets no gradient.

Tiles (``_blocks``) were chosen from the sm_90 SASS (no GPU has run these kernels yet): at d = 128, 8 warps and 128
query rows (one 64-row wgmma tile per warpgroup) x 64 keys; every dot is wgmma (HGMMA, no mma.sync); registers
169 (fwd) / 254 (bwd), no spills.  Predicted with H200 constants for B=8, H=32, L=2048, d=128 bf16 with a
key-padding mask (``pyquant bench static``): fwd 717 us, dK zeroing 68 us, bwd 1434 us (both kernels tensor-core
bound: 2 and 4 dots per tile pair; issue 610 / 786 us), 2218 us in all = 12.2x the eager materialized loss
(27164 us).  Before: fwd 1380 us and the dq + dk pair 1075 + 1177 us = 3632 us (7.5x); part of that was the
descriptor giving every loop of a kernel the main loop's trips (the masked boundary loop, which runs 0 times when
every key is kept, and dk's outer head loop), which the tool's list form of ``loop_trips`` now avoids.

Masking semantics: key-padding mask [B, L_k] (nonzero = keep) and ``causal`` (key j visible to query i iff
j <= i + L_k - L_q).  GQA/MQA: query head h reads key head h // (H / H_kv) (``transformers``' repeat_kv grouping),
separately for teacher and student; K is never repeated in memory.  Head dims are padded to a power of two in
registers (any d <= 256).  ``ALIGN`` (constexpr): when the launcher has checked that every base pointer is 16-byte
aligned and every row/head/batch stride a multiple of 16 bytes, the kernels state it (``tl.multiple_of``), so the
compiled loads are 16-byte vectors whether the kernel is JIT-launched or compiled ahead of time (static analysis).

``static_launches(B, H, L, d, dtype)`` (end of file) describes what the launchers run, for ``pyquant bench static``.
"""
from __future__ import annotations

import os
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["attention_kd_fwd", "attention_kd_bwd", "static_launches", "MAX_HEAD_DIM", "MAX_SCALE", "SUPPORTED_DTYPES"]

MAX_HEAD_DIM = 256
MAX_SCALE = float(2 ** 26)  # NEG * scale * log2(e) must stay finite in fp32 (module docstring)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NEG = tl.constexpr(-1.2676506002282294e30)  # -2**100: masked raw dot
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _astride(s, ALIGN: tl.constexpr):
    """A stride the launcher checked to be a multiple of ALIGN elements, rewritten so the compiler can see it."""
    if ALIGN > 1:
        s = (s // ALIGN) * ALIGN
    return s


@triton.jit
def _load_rows(base, offs_r, row_stride, n_rows, offs_d, d, ALIGN: tl.constexpr, ROW_MASK: tl.constexpr,
               EVEN_D: tl.constexpr):
    """[R, BLOCK_D] tile of a [rows, d] matrix with unit column stride; rows >= n_rows (when ROW_MASK) and head-dim
    padding read as 0.  No column mask when d is a power of two, so the load stays a 16-byte vector."""
    ptrs = base + offs_r[:, None] * row_stride + offs_d[None, :]
    if ALIGN > 1:  # rows start on 16-byte boundaries (launcher-checked); the hint must sit where ptrs is made
        ptrs = tl.multiple_of(ptrs, [1, 16])
    if ROW_MASK:
        if EVEN_D:
            t = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            t = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < d), other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < d, other=0.0)
    return t


@triton.jit
def _qk(q, k, IEEE: tl.constexpr):
    """Raw x[BM, BN] = q @ k^T, fp32 accumulate, no scale."""
    if IEEE:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _keep_tile(offs_m, offs_n, kpm_ptr, stride_kpm, lq, lk, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr):
    """bool [BM, BN] (or [1, BN]): key j kept for query i.  Rows past L_q are not masked (never stored)."""
    if HAS_KPM:
        kp = tl.load(kpm_ptr + offs_n * stride_kpm, mask=offs_n < lk, other=0)
        keep = (kp != 0)[None, :]
    else:
        keep = (offs_n < lk)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (lk - lq))
    return keep


@triton.jit
def _score_tiles(q_s, q_t, k_s, k_t, kpm_base, offs_m, offs_n, skpm_n, LQ, LK,
                 MASKED: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """Raw dots of both maps for one (query block, key tile); masked keys set to NEG when MASKED."""
    x_s = _qk(q_s, k_s, IEEE)
    x_t = _qk(q_t, k_t, IEEE)
    if MASKED:
        keep = _keep_tile(offs_m, offs_n, kpm_base, skpm_n, LQ, LK, HAS_KPM, CAUSAL)
        x_s = tl.where(keep, x_s, NEG)
        x_t = tl.where(keep, x_t, NEG)
    return x_s, x_t


@triton.jit
def _key_range(kinfo_ptr, b, m0, LQ, LK, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile plan of one query block [m0, m0 + BLOCK_M): (t_lo, n_head, f_lo, f_hi, n_tail).

    masked head tiles t_lo + i * BLOCK_N (i < n_head <= 1), unmasked tiles [f_lo, f_hi), masked tail tiles
    f_hi + i * BLOCK_N (i < n_tail)."""
    if HAS_KPM:
        lo = tl.load(kinfo_ptr + b * 3)
        hi = tl.load(kinfo_ptr + b * 3 + 1)
        contig = tl.load(kinfo_ptr + b * 3 + 2)
    else:
        lo = 0
        hi = LK
        contig = 1
    end = hi
    full = hi
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(m0 + BLOCK_M + (LK - LQ), 0))  # no row of the block sees keys >= end
        full = tl.minimum(full, tl.maximum(m0 + 1 + (LK - LQ), 0))  # every row of the block sees keys < full
    t_lo = (lo // BLOCK_N) * BLOCK_N
    if contig != 0:
        f_lo = ((lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        f_hi = tl.maximum((full // BLOCK_N) * BLOCK_N, f_lo)
    else:
        f_lo = t_lo
        f_hi = t_lo
    n_head = tl.where((f_lo > t_lo) & (end > t_lo), 1, 0)  # the partial tile holding lo, if anything in it is seen
    n_tail = tl.maximum(end - f_hi + BLOCK_N - 1, 0) // BLOCK_N
    return t_lo, n_head, f_lo, f_hi, n_tail




@triton.jit
def _query_block(qs_ptr, ks_ptr, qt_ptr, kt_ptr, b, h, offs_m, offs_ds, offs_dt, sqs_b, sqs_h, sqs_m, sks_b, sks_h,
                 sks_n, sqt_b, sqt_h, sqt_m, skt_b, skt_h, skt_n, G_S, G_T, LQ, DS, DT, ALIGN: tl.constexpr,
                 EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr):
    """Prologue of a query-block program: both Q tiles, both K bases (GQA head), the K row strides."""
    qs_base = qs_ptr + b * _astride(sqs_b, ALIGN) + h * _astride(sqs_h, ALIGN)
    qt_base = qt_ptr + b * _astride(sqt_b, ALIGN) + h * _astride(sqt_h, ALIGN)
    q_s = _load_rows(qs_base, offs_m, _astride(sqs_m, ALIGN), LQ, offs_ds, DS, ALIGN, True, EVEN_DS)
    q_t = _load_rows(qt_base, offs_m, _astride(sqt_m, ALIGN), LQ, offs_dt, DT, ALIGN, True, EVEN_DT)
    ks_base = ks_ptr + b * _astride(sks_b, ALIGN) + (h // G_S) * _astride(sks_h, ALIGN)
    kt_base = kt_ptr + b * _astride(skt_b, ALIGN) + (h // G_T) * _astride(skt_h, ALIGN)
    return q_s, q_t, ks_base, kt_base, _astride(sks_n, ALIGN), _astride(skt_n, ALIGN)


@triton.jit
def _fwd_tile(q_s, q_t, ks_base, kt_base, kpm_base, offs_m, offs_n, offs_ds, offs_dt, sks_n, skt_n, skpm_n,
              m_s, m_t, l_s, l_t, acc, LQ, LK, DS, DT, c2_s, c2_t, r_ts,
              MASKED: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, SAME_SCALE: tl.constexpr,
              EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr):
    """One key tile of the online pass (module docstring): returns the updated (m_s, m_t, l_s, l_t, A)."""
    k_s = _load_rows(ks_base, offs_n, sks_n, LK, offs_ds, DS, ALIGN, MASKED, EVEN_DS)
    k_t = _load_rows(kt_base, offs_n, skt_n, LK, offs_dt, DT, ALIGN, MASKED, EVEN_DT)
    x_s, x_t = _score_tiles(q_s, q_t, k_s, k_t, kpm_base, offs_m, offs_n, skpm_n, LQ, LK, MASKED, HAS_KPM, CAUSAL,
                            IEEE)
    mn_s = tl.maximum(m_s, tl.max(x_s, 1))
    mn_t = tl.maximum(m_t, tl.max(x_t, 1))
    e_s = tl.exp2(x_s * c2_s - (mn_s * c2_s)[:, None])
    e_t = tl.exp2(x_t * c2_t - (mn_t * c2_t)[:, None])
    if SAME_SCALE:
        dd = x_t - x_s
    else:
        dd = x_t * r_ts - x_s
    al_s = tl.exp2((m_s - mn_s) * c2_s)
    al_t = tl.exp2((m_t - mn_t) * c2_t)
    l_s = l_s * al_s + tl.sum(e_s, 1)
    l_t = l_t * al_t + tl.sum(e_t, 1)
    acc = acc * al_t + tl.sum(e_t * dd, 1)
    return mn_s, mn_t, l_s, l_t, acc


@triton.jit
def _attention_kd_fwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, kinfo_ptr, kl_ptr, lses_ptr, lset_ptr,
    sqs_b, sqs_h, sqs_m,
    sks_b, sks_h, sks_n,
    sqt_b, sqt_h, sqt_m,
    skt_b, skt_h, skt_n,
    skpm_b, skpm_n,
    H, G_S, G_T, LQ, LK, DS, DT, sc_s, sc_t,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, SAME_SCALE: tl.constexpr,
    ALIGN: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    offs_nb = tl.arange(0, BLOCK_N)
    q_s, q_t, ks_base, kt_base, sks_n, skt_n = _query_block(
        qs_ptr, ks_ptr, qt_ptr, kt_ptr, b, h, offs_m, offs_ds, offs_dt, sqs_b, sqs_h, sqs_m, sks_b, sks_h, sks_n,
        sqt_b, sqt_h, sqt_m, skt_b, skt_h, skt_n, G_S, G_T, LQ, DS, DT, ALIGN, EVEN_DS, EVEN_DT)
    kpm_base = kpm_ptr + b * skpm_b
    c2_s = sc_s * LOG2E
    c2_t = sc_t * LOG2E
    r_ts = sc_t / sc_s

    t_lo, n_head, f_lo, f_hi, n_tail = _key_range(kinfo_ptr, b, m0, LQ, LK, HAS_KPM, CAUSAL, BLOCK_M, BLOCK_N)
    m_s = tl.full([BLOCK_M], NEG, tl.float32)
    m_t = tl.full([BLOCK_M], NEG, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    # main loop: interior tiles, no masking of any kind
    for start_n in range(f_lo, f_hi, BLOCK_N):
        m_s, m_t, l_s, l_t, acc = _fwd_tile(
            q_s, q_t, ks_base, kt_base, kpm_base, offs_m, start_n + offs_nb, offs_ds, offs_dt, sks_n, skt_n, skpm_n,
            m_s, m_t, l_s, l_t, acc, LQ, LK, DS, DT, c2_s, c2_t, r_ts,
            False, HAS_KPM, CAUSAL, SAME_SCALE, EVEN_DS, EVEN_DT, IEEE, ALIGN)
    # boundary tiles: leading partial tile, trailing L_k / padding edge, causal diagonal band, non-contiguous masks
    for i in range(0, n_head + n_tail):
        start_n = tl.where(i < n_head, t_lo, f_hi + (i - n_head) * BLOCK_N)
        m_s, m_t, l_s, l_t, acc = _fwd_tile(
            q_s, q_t, ks_base, kt_base, kpm_base, offs_m, start_n + offs_nb, offs_ds, offs_dt, sks_n, skt_n, skpm_n,
            m_s, m_t, l_s, l_t, acc, LQ, LK, DS, DT, c2_s, c2_t, r_ts,
            True, HAS_KPM, CAUSAL, SAME_SCALE, EVEN_DS, EVEN_DT, IEEE, ALIGN)

    row_ok = m_t > 0.5 * NEG  # some kept key was seen (the masks of both maps are the same)
    l_s1 = tl.where(row_ok, l_s, 1.0)
    l_t1 = tl.where(row_ok, l_t, 1.0)
    log_ls = tl.log2(l_s1)
    log_lt = tl.log2(l_t1)
    ms2 = m_s * c2_s
    mt2 = m_t * c2_t
    kl = sc_s * acc / l_t1 + LN2 * ((ms2 - mt2) + (log_ls - log_lt))
    kl = tl.where(row_ok, kl, 0.0)
    lse_s = tl.where(row_ok, LN2 * (ms2 + log_ls), 0.0)
    lse_t = tl.where(row_ok, LN2 * (mt2 + log_lt), 0.0)

    out = bh * LQ + offs_m
    tl.store(kl_ptr + out, kl, mask=offs_m < LQ)
    tl.store(lses_ptr + out, lse_s, mask=offs_m < LQ)
    tl.store(lset_ptr + out, lse_t, mask=offs_m < LQ)


@triton.jit
def _ds_from_scores(x_s, x_t, lse2_s, lse2_t, gs, c2_s, c2_t):
    """dS[BM, BN] = g * c_S * (P_S - P_T), fp32 (gs = g * c_S per row; lse2 = lse * log2(e))."""
    p_s = tl.exp2(x_s * c2_s - lse2_s[:, None])
    p_t = tl.exp2(x_t * c2_t - lse2_t[:, None])
    return gs[:, None] * (p_s - p_t)


@triton.jit
def _bwd_step(dq, q_s, q_t, ks_base, kt_base, kpm_base, dkw_base, offs_m, offs_n, offs_ds, offs_dt,
              sks_n, skt_n, skpm_n, lse2_s, lse2_t, gs, LQ, LK, DS, DT, c2_s, c2_t,
              MASKED: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr):
    """One key tile of the fused backward: recompute dS once, dq += dS @ K_S (registers), and dS^T @ Q_S added
    atomically (relaxed fp32 adds) to the key tile's rows of the fp32 dK workspace."""
    k_s = _load_rows(ks_base, offs_n, sks_n, LK, offs_ds, DS, ALIGN, MASKED, EVEN_DS)
    k_t = _load_rows(kt_base, offs_n, skt_n, LK, offs_dt, DT, ALIGN, MASKED, EVEN_DT)
    x_s, x_t = _score_tiles(q_s, q_t, k_s, k_t, kpm_base, offs_m, offs_n, skpm_n, LQ, LK, MASKED, HAS_KPM, CAUSAL,
                            IEEE)
    ds = _ds_from_scores(x_s, x_t, lse2_s, lse2_t, gs, c2_s, c2_t).to(k_s.dtype)  # rounded once, as before
    if IEEE:
        dsf = ds.to(tl.float32)
        dq += tl.dot(dsf, k_s.to(tl.float32), input_precision="ieee")
        dk = tl.dot(tl.trans(dsf), q_s.to(tl.float32), input_precision="ieee")
    else:
        dq += tl.dot(ds, k_s)
        dk = tl.dot(tl.trans(ds), q_s)
    if MASKED:
        # keys past L_k add to row L_k - 1 instead of being masked out: their dS column is exactly 0 (NEG score,
        # P_S = P_T = 0), so they add exact zeros, and the atomics need no row predicate (a predicated atomic is
        # a branch per element: 64 bytes of spills around this loop)
        offs_n = tl.minimum(offs_n, LK - 1)
    ptrs = dkw_base + offs_n[:, None] * DS + offs_ds[None, :]
    if EVEN_DS:
        tl.atomic_add(ptrs, dk, sem="relaxed")
    else:
        tl.atomic_add(ptrs, dk, mask=offs_ds[None, :] < DS, sem="relaxed")
    return dq


@triton.jit
def _attention_kd_bwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, kinfo_ptr, lses_ptr, lset_ptr, g_ptr, dq_ptr, dkw_ptr, dk_ptr, cnt_ptr,
    sqs_b, sqs_h, sqs_m,
    sks_b, sks_h, sks_n,
    sqt_b, sqt_h, sqt_m,
    skt_b, skt_h, skt_n,
    skpm_b, skpm_n,
    H, HK, G_S, G_T, LQ, LK, DS, DT, sc_s, sc_t,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    CONVERT: tl.constexpr, ALIGN: tl.constexpr, EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    offs_nb = tl.arange(0, BLOCK_N)
    mrow = offs_m < LQ
    q_s, q_t, ks_base, kt_base, sks_n, skt_n = _query_block(
        qs_ptr, ks_ptr, qt_ptr, kt_ptr, b, h, offs_m, offs_ds, offs_dt, sqs_b, sqs_h, sqs_m, sks_b, sks_h, sks_n,
        sqt_b, sqt_h, sqt_m, skt_b, skt_h, skt_n, G_S, G_T, LQ, DS, DT, ALIGN, EVEN_DS, EVEN_DT)
    row = bh * LQ + offs_m
    lse2_s = tl.load(lses_ptr + row, mask=mrow, other=0.0) * LOG2E
    lse2_t = tl.load(lset_ptr + row, mask=mrow, other=0.0) * LOG2E
    gs = tl.load(g_ptr + row, mask=mrow, other=0.0) * sc_s  # rows past L_q: g = 0, so they add nothing to dK
    kpm_base = kpm_ptr + b * skpm_b
    khead = b * HK + h // G_S  # this program's key head (its dK workspace and conversion ticket)
    dkw_base = dkw_ptr + khead * LK * DS
    c2_s = sc_s * LOG2E
    c2_t = sc_t * LOG2E

    t_lo, n_head, f_lo, f_hi, n_tail = _key_range(kinfo_ptr, b, m0, LQ, LK, HAS_KPM, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(f_lo, f_hi, BLOCK_N):
        dq = _bwd_step(dq, q_s, q_t, ks_base, kt_base, kpm_base, dkw_base, offs_m, start_n + offs_nb, offs_ds,
                       offs_dt, sks_n, skt_n, skpm_n, lse2_s, lse2_t, gs, LQ, LK, DS, DT, c2_s, c2_t,
                       False, HAS_KPM, CAUSAL, EVEN_DS, EVEN_DT, IEEE, ALIGN)
    for i in range(0, n_head + n_tail):
        start_n = tl.where(i < n_head, t_lo, f_hi + (i - n_head) * BLOCK_N)
        dq = _bwd_step(dq, q_s, q_t, ks_base, kt_base, kpm_base, dkw_base, offs_m, start_n + offs_nb, offs_ds,
                       offs_dt, sks_n, skt_n, skpm_n, lse2_s, lse2_t, gs, LQ, LK, DS, DT, c2_s, c2_t,
                       True, HAS_KPM, CAUSAL, EVEN_DS, EVEN_DT, IEEE, ALIGN)
    tl.store(dq_ptr + bh * LQ * DS + offs_m[:, None] * DS + offs_ds[None, :], dq,
             mask=mrow[:, None] & (offs_ds[None, :] < DS))
    if CONVERT:
        # The last of the key head's cdiv(L_q, BLOCK_M) * G_S programs to finish rounds its fp32 dK workspace into
        # dk (no separate cast kernel reading and writing it through HBM again).  Ordering (the pattern of CUTLASS's
        # split-K semaphore): the barrier puts every thread's dK atomics before thread 0's acq_rel ticket (release,
        # cumulative); the winner's acquire and the barrier that broadcasts the ticket put its loads after every other
        # program's released atomics; the loads bypass L1 (.cg), which never held these lines anyway.
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + khead, 1, sem="acq_rel")
        if ticket == tl.cdiv(LQ, BLOCK_M) * G_S - 1:
            dk_base = dk_ptr + khead * LK * DS
            for r0 in range(0, LK * DS, BLOCK_N * BLOCK_DS):  # flat: 16-byte vectors, one bounds mask
                off = r0 + tl.arange(0, BLOCK_N * BLOCK_DS)
                v = tl.load(dkw_base + off, mask=off < LK * DS, other=0.0, cache_modifier=".cg")
                tl.store(dk_base + off, v.to(dk_ptr.dtype.element_ty), mask=off < LK * DS)


# ---- launchers --------------------------------------------------------------------------------------------------
def _check(q_s, k_s, q_t, k_t, key_padding_mask, scale_s, scale_t) -> None:
    for name, t in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, L, d]")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q_s.device:
            raise ValueError(f"{name} is on {t.device}, expected {q_s.device} (like q_s)")
    b, h, lq, ds = q_s.shape
    if k_s.shape[0] != b or h % k_s.shape[1] or k_s.shape[3] != ds:
        raise ValueError(f"k_s has shape {tuple(k_s.shape)}: expected [{b}, H_kv dividing {h}, L_k, {ds}]")
    lk = k_s.shape[2]
    if tuple(q_t.shape[:3]) != (b, h, lq):
        raise ValueError(f"q_t has shape {tuple(q_t.shape)}: expected [{b}, {h}, {lq}, d_t]")
    if k_t.shape[0] != b or h % k_t.shape[1] or k_t.shape[2] != lk or k_t.shape[3] != q_t.shape[3]:
        raise ValueError(f"k_t has shape {tuple(k_t.shape)}: expected [{b}, H_kv dividing {h}, {lk}, {q_t.shape[3]}]")
    if max(ds, q_t.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head dim {max(ds, q_t.shape[3])} exceeds the kernel's maximum {MAX_HEAD_DIM}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}: expected ({b}, {lk})")
    for name, v in (("scale_s", scale_s), ("scale_t", scale_t)):
        if not 0.0 < float(v) <= MAX_SCALE:
            raise ValueError(f"{name}={v!r} is outside the kernel's range (0, {MAX_SCALE:g}] (masking sentinel)")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _same_dtype(q_s, k_s, q_t, k_t):
    """One dtype for all four (tl.dot needs equal operand types): the widest of them, so a fp32 teacher is not
    rounded to a bf16 student's precision.  The kernels address the head dim with unit stride."""
    dt = q_s.dtype
    for t in (k_s, q_t, k_t):
        dt = torch.promote_types(dt, t.dtype)
    out = []
    for t in (q_s, k_s, q_t, k_t):
        t = t if t.dtype == dt else t.to(dt)
        out.append(t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous())
    return tuple(out)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def _key_info(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 [B, 3]: per example the kept range [lo, hi) of the key-padding mask and 1 if every key in it is kept."""
    kp = key_padding_mask != 0
    lk = kp.shape[1]
    idx = torch.arange(lk, device=kp.device, dtype=torch.int32)
    hi = torch.where(kp, idx + 1, torch.zeros_like(idx)).amax(1)
    lo = torch.minimum(torch.where(kp, idx, torch.full_like(idx, lk)).amin(1), hi)  # nothing kept: [0, 0)
    contig = kp.sum(1, dtype=torch.int32) == hi - lo
    return torch.stack([lo, hi, contig.to(torch.int32)], 1).to(torch.int32).contiguous()


def _align(tensors) -> int:
    """ALIGN constexpr: elements per 16 bytes if every base pointer is 16-byte aligned and every stride but the
    (unit) head-dim stride a multiple of 16 bytes, else 1 (no hint)."""
    es = tensors[0].element_size()
    for t in tensors:
        if t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:3]):
            return 1
    return 16 // es


def _common(q_s, k_s, q_t, k_t, key_padding_mask):
    b, h, lq, ds = q_s.shape
    lk, dt = k_s.shape[2], q_t.shape[3]
    if key_padding_mask is None:
        kpm = torch.ones(1, 1, dtype=torch.int8, device=q_s.device)
        kinfo = torch.zeros(1, 3, dtype=torch.int32, device=q_s.device)
        kpm_strides = (0, 0)
    else:
        kpm = (key_padding_mask != 0).to(torch.int8)
        kinfo = _key_info(kpm)
        kpm_strides = kpm.stride()
    # IEEE: dots on fp32 operands without TF32.  Used for fp32 inputs (to match the fp32 reference) and, under the
    # interpreter, for bf16 inputs: Triton's interpreter (3.9) returns garbage from tl.dot on bf16 operands.  Operands
    # are still loaded in bf16 and dS is still rounded to bf16 before its dots, as on the GPU; the products of bf16
    # values are exact in fp32, so only the accumulation order differs from the tensor-core path.
    ieee = q_s.dtype == torch.float32 or (q_s.dtype == torch.bfloat16 and _interpreting())
    blk_ds = max(16, triton.next_power_of_2(ds))
    blk_dt = max(16, triton.next_power_of_2(dt))
    strides = (*q_s.stride()[:3], *k_s.stride()[:3], *q_t.stride()[:3], *k_t.stride()[:3], *kpm_strides)
    meta = dict(HAS_KPM=key_padding_mask is not None, IEEE=ieee, ALIGN=_align((q_s, k_s, q_t, k_t)),
                EVEN_DS=blk_ds == ds, EVEN_DT=blk_dt == dt, BLOCK_DS=blk_ds, BLOCK_DT=blk_dt)
    return b, h, lq, lk, ds, dt, kpm, kinfo, strides, meta


def _blocks(kind: str, lq: int, lk: int, d_max: int, elem_bytes: int = 2) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ``kind`` ("fwd", "bwd").

    Chosen from sm_90 SASS (no GPU measured yet): from d = 128 the kernels run 8 warps = two warpgroups, and the
    programs take 128 query rows, one 64-row wgmma tile per warpgroup.  With 64 rows and 8 warps Triton splits
    the tile's columns over the warpgroups, and whatever feeds a second dot or a row reduction is then computed
    twice or reduced through shared memory (26.9 instructions per score element in the forward loop instead of
    17.6).  The fused backward uses the same 128 x 64 tile (254 registers, no spill; 255 when causal): with 32
    keys it has 240 registers, but its dS^T @ Q dot (M = 32 rows) falls back to mma.sync (HMMA); 64 x 64 on 4
    warps spills 312 bytes.  fp32 inputs (IEEE dots on the FMA pipe, not the fast path) keep 64-row tiles and 2
    stages so that their tiles fit in 227 KB of shared memory."""
    bm = 64 if lq > 32 else max(16, triton.next_power_of_2(lq))
    bn = 64 if lk > 32 else max(16, triton.next_power_of_2(lk))
    if d_max > 128:
        return min(bm, 32), min(bn, 32), 8, 2
    if d_max < 128:
        return bm, bn, 4, 2
    if elem_bytes > 2:
        return bm, bn, 8, 2
    if lq > 64:
        bm = 128
    return bm, bn, 8, 3


def attention_kd_fwd(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], causal: bool, scale_s: float, scale_t: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, lse_s, lse_t), each fp32 [B, H, L_q]; scale_* are effective (softmax scale / temperature)."""
    _check(q_s, k_s, q_t, k_t, key_padding_mask, scale_s, scale_t)
    q_s, k_s, q_t, k_t = _same_dtype(q_s, k_s, q_t, k_t)
    b, h, lq, lk, ds, dt, kpm, kinfo, strides, meta = _common(q_s, k_s, q_t, k_t, key_padding_mask)
    kl = torch.empty(b, h, lq, dtype=torch.float32, device=q_s.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    if kl.numel() == 0:
        return kl.zero_(), lse_s.zero_(), lse_t.zero_()
    bm, bn, nw, ns = _blocks("fwd", lq, lk, max(ds, dt), q_s.element_size())
    grid = (triton.cdiv(lq, bm), b * h)
    _attention_kd_fwd_kernel[grid](
        q_s, k_s, q_t, k_t, kpm, kinfo, kl, lse_s, lse_t, *strides,
        h, h // k_s.shape[1], h // k_t.shape[1], lq, lk, ds, dt, float(scale_s), float(scale_t),
        CAUSAL=bool(causal), SAME_SCALE=_f32(scale_s) == _f32(scale_t), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        num_stages=ns, **meta,
    )
    return kl, lse_s, lse_t


def attention_kd_bwd(
    grad_rows: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], causal: bool, scale_s: float, scale_t: float,
    lse_s: torch.Tensor, lse_t: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dq_s, dk_s) in the dtypes of q_s and k_s for the upstream gradient ``grad_rows`` [B, H, L_q] on the KL rows."""
    _check(q_s, k_s, q_t, k_t, key_padding_mask, scale_s, scale_t)
    b, h, lq = q_s.shape[:3]
    for name, t in (("grad_rows", grad_rows), ("lse_s", lse_s), ("lse_t", lse_t)):
        if tuple(t.shape) != (b, h, lq):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected ({b}, {h}, {lq})")
    out_dtypes = (q_s.dtype, k_s.dtype)
    q_s, k_s, q_t, k_t = _same_dtype(q_s, k_s, q_t, k_t)
    b, h, lq, lk, ds, dt, kpm, kinfo, strides, meta = _common(q_s, k_s, q_t, k_t, key_padding_mask)
    hk = k_s.shape[1]
    g = grad_rows.float().contiguous()
    lse_s = lse_s.float().contiguous()
    lse_t = lse_t.float().contiguous()
    # dQ in the caller's dtype (fp32 registers, rounded once on store); dK is summed over the query blocks (and the
    # query heads sharing a key head) by fp32 atomics into a zeroed fp32 workspace, rounded once at the end
    dq = torch.empty(b, h, lq, ds, dtype=out_dtypes[0], device=q_s.device)
    convert = out_dtypes[1] != torch.float32
    # one zeroing kernel for the workspace and the per-key-head tickets of the in-kernel conversion
    n_ws = b * hk * lk * ds
    buf = torch.zeros(n_ws + b * hk, dtype=torch.float32, device=q_s.device)
    dkw, cnt = buf[:n_ws].view(b, hk, lk, ds), buf[n_ws:].view(torch.int32)
    dk = torch.empty(b, hk, lk, ds, dtype=out_dtypes[1], device=q_s.device) if convert else dkw
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_()
    bm, bn, nw, ns = _blocks("bwd", lq, lk, max(ds, dt), q_s.element_size())
    _attention_kd_bwd_kernel[(triton.cdiv(lq, bm), b * h)](
        q_s, k_s, q_t, k_t, kpm, kinfo, lse_s, lse_t, g, dq, dkw, dk, cnt, *strides, h, hk, h // hk,
        h // k_t.shape[1], lq, lk, ds, dt, float(scale_s), float(scale_t),
        CAUSAL=bool(causal), CONVERT=convert, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns, **meta,
    )
    return dq, dk


# ---- static-analysis launch descriptors (pyquant bench static; schema in the issue-#10 shared interface) --------
_PTR_TYPES = {"kpm_ptr": "*i8", "kinfo_ptr": "*i32", "kl_ptr": "*fp32", "lses_ptr": "*fp32", "lset_ptr": "*fp32",
              "g_ptr": "*fp32", "dkw_ptr": "*fp32",
              "cnt_ptr": "*i32"}
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _key_plan(lq: int, lk: int, bm: int, bn: int, causal: bool, lo: int, hi: int, contig: bool):
    """Host mirror of ``_key_range``: (unmasked, masked) key-tile counts of every query block."""
    plans = []
    for m0 in range(0, lq, bm):
        end, full = hi, hi
        if causal:
            end = min(end, max(m0 + bm + lk - lq, 0))
            full = min(full, max(m0 + 1 + lk - lq, 0))
        t_lo = (lo // bn) * bn
        if contig:
            f_lo = -(-lo // bn) * bn
            f_hi = max((full // bn) * bn, f_lo)
        else:
            f_lo = f_hi = t_lo
        n_head = 1 if f_lo > t_lo and end > t_lo else 0
        n_tail = max(end - f_hi + bn - 1, 0) // bn
        plans.append((max(f_hi - f_lo, 0) // bn, n_head + n_tail))
    return plans


def _signature(fn, constexprs: dict, elem: str) -> dict:
    sig = {}
    for n in fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = _PTR_TYPES.get(n, f"*{elem}")
        elif n in ("sc_s", "sc_t"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def static_launches(B: int, H: int, L: int, d: int, dtype: str = "bf16", *, causal: bool = False,
                    key_padding: bool = True, kv_heads: Optional[int] = None) -> list:
    """What ``attention_kd_fwd`` + ``attention_kd_bwd`` launch for teacher and student of equal shape
    (q [B, H, L, d], k [B, kv_heads or H, L, d]) with a key-padding mask that keeps every key (as the benchmark).

    One candidate call (the launchers have one config per shape, no autotuning) with three launches: fwd, bwd dq,
    bwd dk.  ``weights`` = score elements of one map (B * H * L * L), so the tool's "instructions per weight" reads
    "per score element".  ``bytes`` = DRAM traffic with K re-read from L2 by the query blocks of a head: Q and K of
    both models once, the mask, the row statistics and the outputs.  ``mma_flops`` = tensor-core flops of the dots
    at the padded tile shapes (2 QK dots per tile pair in the forward; 2 QK dots + one dS dot in each backward
    kernel); 0 for fp32 inputs (IEEE fp32 dots run on the FMA pipe).  ``loop_trips`` = unmasked main-loop iterations
    per program, averaged (the masked boundary loop's trips are in ``boundary_trips``)."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {tuple(_DTYPE_BYTES)}")
    for name, v in (("B", B), ("H", H), ("L", L), ("d", d)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: expected an int >= 1")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"d={d} exceeds the kernel's maximum head dim {MAX_HEAD_DIM}")
    hk = H if kv_heads is None else kv_heads
    if H % hk:
        raise ValueError(f"kv_heads={kv_heads!r} must divide H={H}")
    es = _DTYPE_BYTES[dtype]
    blk_d = max(16, triton.next_power_of_2(d))
    ieee = dtype == "fp32"
    common = dict(HAS_KPM=key_padding, CAUSAL=causal, IEEE=ieee, ALIGN=16 // es if (d * es) % 16 == 0 else 1,
                  EVEN_DS=blk_d == d, EVEN_DT=blk_d == d, BLOCK_DS=blk_d, BLOCK_DT=blk_d)
    if key_padding:
        common["skpm_n"] = 1  # the JIT specializes an int argument equal to 1 to a constant
    score = B * H * L * L
    qk_bytes = 2 * (B * H * L * d + B * hk * L * d) * es
    mask_bytes = (B * L + B * 12) if key_padding else 0
    rows = B * H * L * 4
    launches = []
    plan = None
    for kind, fn in (("fwd", _attention_kd_fwd_kernel), ("bwd", _attention_kd_bwd_kernel)):
        bm, bn, nw, ns = _blocks(kind, L, L, d, es)
        cx = dict(common, BLOCK_M=bm, BLOCK_N=bn)
        if kind == "fwd":
            cx["SAME_SCALE"] = True
        else:
            cx["CONVERT"] = es != 4
        cx = {k: v for k, v in cx.items() if k in fn.arg_names}
        grid = [triton.cdiv(L, bm), B * H, 1]
        plan = _key_plan(L, L, bm, bn, causal, 0, L, True)
        trips = sum(p[0] for p in plan) / len(plan)
        boundary = sum(p[1] for p in plan) / len(plan)
        tiles = sum(p[0] + p[1] for p in plan) * B * H
        # fwd: 2 QK dots per tile pair; bwd: 2 QK recomputations + dS @ K_S + dS^T @ Q_S
        dots = 2 if kind == "fwd" else 4
        ws = B * hk * L * d * 4  # the fp32 dK workspace
        trip_list = [float(trips), float(boundary)]
        if kind == "fwd":
            nbytes = qk_bytes + mask_bytes + 3 * rows
        else:  # + 3 row vectors in, dQ out, the dK workspace written back once (its atomics resolve in L2)
            nbytes = qk_bytes + mask_bytes + 3 * rows + B * H * L * d * es + ws
            if es != 4:  # the in-kernel conversion: one program per key head reads the workspace, writes dK
                nbytes += ws + ws // 4 * es
                # the conversion loop (L / BLOCK_N trips per key head, in one program of each), averaged over the
                # programs: the third main loop.  (Until the tool retargeted branches to NOPs, the masked loop's
                # exit edge was lost and this loop looked like its alternative; its trips were then added to the
                # masked loop's, an upper bound.)
                trip_list.append(triton.cdiv(L, bn) * B * hk / (grid[0] * grid[1]))
        launches.append({
            "name": kind,
            "triton": {"fn": fn, "signature": _signature(fn, cx, dtype), "constexprs": cx, "num_warps": nw,
                       "num_stages": ns},
            # main loops in address order: the unmasked interior loop, the masked boundary loop (bwd with 16-bit dK:
            # then the workspace -> dK conversion loop)
            "grid": grid, "threads_per_cta": 32 * nw, "loop_trips": trip_list,
            "boundary_trips": float(boundary),
            "weights": score, "bytes": nbytes,
            "mma_flops": 0 if ieee else int(tiles * dots * 2 * bm * bn * blk_d),
        })
    # the zeroing of the fp32 dK workspace (and the conversion tickets): torch.zeros, before the backward
    ws = B * hk * L * d * 4 + B * hk * 4
    launches.insert(1, {"name": "dk_zero", "builtin": "torch.zeros", "grid": [max(1, ws // 4096), 1, 1],
                        "threads_per_cta": 128, "loop_trips": 0.0, "weights": 0, "bytes": ws, "mma_flops": 0})
    cfg = ", ".join(f"{x['name']} {x['triton']['constexprs']['BLOCK_M']}x{x['triton']['constexprs']['BLOCK_N']} "
                    f"w{x['triton']['num_warps']} s{x['triton']['num_stages']}" for x in launches if "triton" in x)
    tags = [dtype, "causal" if causal else "bidirectional", "key-padding" if key_padding else "no mask"]
    if hk != H:
        tags.append(f"kv_heads={hk}")
    return [{"kernel": "attention_kd", "backend": "triton", "config": f"{cfg} ({', '.join(tags)})",
             "launches": launches}]

"""Streaming attention-map KL distillation: KL(P_T || P_S) per query row without materializing L_q x L_k.

Math (per query row i, effective scores s = q.k * scale / temperature, kept keys j only):

    KL_i = sum_j P_T[i,j] * (s_T[i,j] - s_S[i,j]) - lse_T[i] + lse_S[i]

Forward (``_attention_kd_fwd_kernel``), one program per (query block, batch x head):
  pass 1 streams over key blocks and keeps only the online-softmax statistics (running max m, running sum l) of both
  maps, giving lse_T and lse_S; pass 2 streams again and accumulates sum_j exp(s_T - lse_T) * (s_T - s_S) with the
  *final* lse_T.  The two-pass form is exact (no running rescale of the KL accumulator), so KL ~ 0 stays ~ 0: when
  teacher == student every term cancels bit for bit.  Memory: three fp32 values per row (KL, lse_S, lse_T).
Backward (``_attention_kd_bwd_dq_kernel`` and ``_attention_kd_bwd_dk_kernel``): recompute P_S and P_T tile by tile from
  the saved lse's; dS = g_i * (P_S - P_T) * scale_s; dQ_S = dS @ K_S (one program per query block, loop over keys);
  dK_S = sum over the query heads sharing the key head of dS^T @ Q_S (one program per key block and key head, loop
  over its query heads and query blocks; no atomics, deterministic).  The teacher gets no gradient.

Masking: key-padding mask [B, L_k] (nonzero = keep) and ``causal`` (key j visible to query i iff
j <= i + L_k - L_q).  Masked scores are replaced by a finite -1e30 and their probabilities by an explicit 0 (tl.where),
so no inf - inf appears; a row with no kept key has l = 0 and returns KL = 0, lse = 0 and zero gradients.

GQA/MQA: query head h reads key head h // (H / H_kv) (``transformers``' repeat_kv grouping), separately for teacher and
student; K is never repeated in memory.  Head dims are padded to a power of two in registers (any d <= 256).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["attention_kd_fwd", "attention_kd_bwd", "MAX_HEAD_DIM", "SUPPORTED_DTYPES"]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _scores_tile(q, k_ptr, offs_n, offs_d, stride_kn, stride_kd, lk, d, sc, IEEE: tl.constexpr):
    """s[BM, BN] = q @ k_tile^T * sc (fp32 accumulate)."""
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < lk) & (offs_d[None, :] < d), other=0.0)
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * sc, k


@triton.jit
def _keep_tile(offs_m, offs_n, kpm_ptr, stride_kpm, lq, lk, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr):
    keep = (offs_m[:, None] < lq) & (offs_n[None, :] < lk)
    if HAS_KPM:
        kp = tl.load(kpm_ptr + offs_n * stride_kpm, mask=offs_n < lk, other=0)
        keep = keep & (kp != 0)[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (lk - lq))
    return keep


@triton.jit
def _attention_kd_fwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, kl_ptr, lses_ptr, lset_ptr,
    sqs_b, sqs_h, sqs_m, sqs_d,
    sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_m, sqt_d,
    skt_b, skt_h, skt_n, skt_d,
    skpm_b, skpm_n,
    H, G_S, G_T, LQ, LK, DS, DT, sc_s, sc_t,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    offs_nb = tl.arange(0, BLOCK_N)

    q_s = tl.load(qs_ptr + b * sqs_b + h * sqs_h + offs_m[:, None] * sqs_m + offs_ds[None, :] * sqs_d,
                  mask=(offs_m[:, None] < LQ) & (offs_ds[None, :] < DS), other=0.0)
    q_t = tl.load(qt_ptr + b * sqt_b + h * sqt_h + offs_m[:, None] * sqt_m + offs_dt[None, :] * sqt_d,
                  mask=(offs_m[:, None] < LQ) & (offs_dt[None, :] < DT), other=0.0)
    ks_base = ks_ptr + b * sks_b + (h // G_S) * sks_h
    kt_base = kt_ptr + b * skt_b + (h // G_T) * skt_h
    kpm_base = kpm_ptr + b * skpm_b

    # causal: keys beyond the last query of this block (+ offset) are never visible
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, tl.maximum(pid_m * BLOCK_M + BLOCK_M + (LK - LQ), 0))

    m_s = tl.full([BLOCK_M], -1.0e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    # pass 1: online softmax statistics of both maps
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        keep = _keep_tile(offs_m, offs_n, kpm_base, skpm_n, LQ, LK, HAS_KPM, CAUSAL)
        s_s, _ = _scores_tile(q_s, ks_base, offs_n, offs_ds, sks_n, sks_d, LK, DS, sc_s, IEEE)
        s_t, _ = _scores_tile(q_t, kt_base, offs_n, offs_dt, skt_n, skt_d, LK, DT, sc_t, IEEE)
        s_s = tl.where(keep, s_s, -1.0e30)
        s_t = tl.where(keep, s_t, -1.0e30)
        mn_s = tl.maximum(m_s, tl.max(s_s, 1))
        mn_t = tl.maximum(m_t, tl.max(s_t, 1))
        l_s = l_s * tl.exp(m_s - mn_s) + tl.sum(tl.where(keep, tl.exp(s_s - mn_s[:, None]), 0.0), 1)
        l_t = l_t * tl.exp(m_t - mn_t) + tl.sum(tl.where(keep, tl.exp(s_t - mn_t[:, None]), 0.0), 1)
        m_s = mn_s
        m_t = mn_t
    row_ok = l_t > 0.0
    lse_s = tl.where(row_ok, m_s + tl.log(tl.where(row_ok, l_s, 1.0)), 0.0)
    lse_t = tl.where(row_ok, m_t + tl.log(tl.where(row_ok, l_t, 1.0)), 0.0)

    # pass 2: sum_j P_T * (s_T - s_S) with the final lse_T
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        keep = _keep_tile(offs_m, offs_n, kpm_base, skpm_n, LQ, LK, HAS_KPM, CAUSAL)
        s_s, _ = _scores_tile(q_s, ks_base, offs_n, offs_ds, sks_n, sks_d, LK, DS, sc_s, IEEE)
        s_t, _ = _scores_tile(q_t, kt_base, offs_n, offs_dt, skt_n, skt_d, LK, DT, sc_t, IEEE)
        p_t = tl.where(keep, tl.exp(tl.where(keep, s_t, 0.0) - lse_t[:, None]), 0.0)
        acc += tl.sum(p_t * tl.where(keep, s_t - s_s, 0.0), 1)
    kl = tl.where(row_ok, acc - lse_t + lse_s, 0.0)

    out = bh * LQ + offs_m
    tl.store(kl_ptr + out, kl, mask=offs_m < LQ)
    tl.store(lses_ptr + out, lse_s, mask=offs_m < LQ)
    tl.store(lset_ptr + out, lse_t, mask=offs_m < LQ)


@triton.jit
def _ds_tile(q_s, q_t, ks_base, kt_base, kpm_base, offs_m, offs_n, offs_ds, offs_dt,
             sks_n, sks_d, skt_n, skt_d, skpm_n, lse_s, lse_t, g,
             LQ, LK, DS, DT, sc_s, sc_t,
             HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """dS[BM, BN] = g * (P_S - P_T) * sc_s (fp32) and the student's K tile."""
    keep = _keep_tile(offs_m, offs_n, kpm_base, skpm_n, LQ, LK, HAS_KPM, CAUSAL)
    s_s, k_s = _scores_tile(q_s, ks_base, offs_n, offs_ds, sks_n, sks_d, LK, DS, sc_s, IEEE)
    s_t, _ = _scores_tile(q_t, kt_base, offs_n, offs_dt, skt_n, skt_d, LK, DT, sc_t, IEEE)
    p_s = tl.where(keep, tl.exp(tl.where(keep, s_s, 0.0) - lse_s[:, None]), 0.0)
    p_t = tl.where(keep, tl.exp(tl.where(keep, s_t, 0.0) - lse_t[:, None]), 0.0)
    return g[:, None] * (p_s - p_t) * sc_s, k_s


@triton.jit
def _attention_kd_bwd_dq_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, lses_ptr, lset_ptr, g_ptr, dq_ptr,
    sqs_b, sqs_h, sqs_m, sqs_d,
    sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_m, sqt_d,
    skt_b, skt_h, skt_n, skt_d,
    skpm_b, skpm_n,
    H, G_S, G_T, LQ, LK, DS, DT, sc_s, sc_t,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    offs_nb = tl.arange(0, BLOCK_N)
    mrow = offs_m < LQ

    q_s = tl.load(qs_ptr + b * sqs_b + h * sqs_h + offs_m[:, None] * sqs_m + offs_ds[None, :] * sqs_d,
                  mask=mrow[:, None] & (offs_ds[None, :] < DS), other=0.0)
    q_t = tl.load(qt_ptr + b * sqt_b + h * sqt_h + offs_m[:, None] * sqt_m + offs_dt[None, :] * sqt_d,
                  mask=mrow[:, None] & (offs_dt[None, :] < DT), other=0.0)
    row = bh * LQ + offs_m
    lse_s = tl.load(lses_ptr + row, mask=mrow, other=0.0)
    lse_t = tl.load(lset_ptr + row, mask=mrow, other=0.0)
    g = tl.load(g_ptr + row, mask=mrow, other=0.0)
    ks_base = ks_ptr + b * sks_b + (h // G_S) * sks_h
    kt_base = kt_ptr + b * skt_b + (h // G_T) * skt_h
    kpm_base = kpm_ptr + b * skpm_b

    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, tl.maximum(pid_m * BLOCK_M + BLOCK_M + (LK - LQ), 0))
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        ds, k_s = _ds_tile(q_s, q_t, ks_base, kt_base, kpm_base, offs_m, offs_n, offs_ds, offs_dt,
                           sks_n, sks_d, skt_n, skt_d, skpm_n, lse_s, lse_t, g,
                           LQ, LK, DS, DT, sc_s, sc_t, HAS_KPM, CAUSAL, IEEE)
        if IEEE:
            dq += tl.dot(ds.to(k_s.dtype).to(tl.float32), k_s.to(tl.float32), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k_s.dtype), k_s)
    tl.store(dq_ptr + bh * LQ * DS + offs_m[:, None] * DS + offs_ds[None, :], dq,
             mask=mrow[:, None] & (offs_ds[None, :] < DS))


@triton.jit
def _attention_kd_bwd_dk_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, lses_ptr, lset_ptr, g_ptr, dk_ptr,
    sqs_b, sqs_h, sqs_m, sqs_d,
    sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_m, sqt_d,
    skt_b, skt_h, skt_n, skt_d,
    skpm_b, skpm_n,
    H, HK, G_S, G_T, LQ, LK, DS, DT, sc_s, sc_t,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    offs_mb = tl.arange(0, BLOCK_M)
    kpm_base = kpm_ptr + b * skpm_b
    ks_base = ks_ptr + b * sks_b + hk * sks_h

    # causal: query i sees key j iff i >= j - (LK - LQ); start at the block holding the first such query
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - (LK - LQ), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for gi in range(0, G_S):
        h = hk * G_S + gi
        kt_base = kt_ptr + b * skt_b + (h // G_T) * skt_h
        for start_m in range(lo, LQ, BLOCK_M):
            offs_m = start_m + offs_mb
            mrow = offs_m < LQ
            q_s = tl.load(qs_ptr + b * sqs_b + h * sqs_h + offs_m[:, None] * sqs_m + offs_ds[None, :] * sqs_d,
                          mask=mrow[:, None] & (offs_ds[None, :] < DS), other=0.0)
            q_t = tl.load(qt_ptr + b * sqt_b + h * sqt_h + offs_m[:, None] * sqt_m + offs_dt[None, :] * sqt_d,
                          mask=mrow[:, None] & (offs_dt[None, :] < DT), other=0.0)
            row = (b * H + h) * LQ + offs_m
            lse_s = tl.load(lses_ptr + row, mask=mrow, other=0.0)
            lse_t = tl.load(lset_ptr + row, mask=mrow, other=0.0)
            g = tl.load(g_ptr + row, mask=mrow, other=0.0)
            ds, _ = _ds_tile(q_s, q_t, ks_base, kt_base, kpm_base, offs_m, offs_n, offs_ds, offs_dt,
                             sks_n, sks_d, skt_n, skt_d, skpm_n, lse_s, lse_t, g,
                             LQ, LK, DS, DT, sc_s, sc_t, HAS_KPM, CAUSAL, IEEE)
            if IEEE:
                dk += tl.dot(tl.trans(ds.to(q_s.dtype).to(tl.float32)), q_s.to(tl.float32), input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds.to(q_s.dtype)), q_s)
    tl.store(dk_ptr + bhk * LK * DS + offs_n[:, None] * DS + offs_ds[None, :], dk,
             mask=(offs_n[:, None] < LK) & (offs_ds[None, :] < DS))


# ---- launchers --------------------------------------------------------------------------------------------------
def _check(q_s, k_s, q_t, k_t, key_padding_mask) -> None:
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _same_dtype(q_s, k_s, q_t, k_t):
    """One dtype for all four (tl.dot needs equal operand types): the widest of them, so a fp32 teacher is not
    rounded to a bf16 student's precision."""
    dt = q_s.dtype
    for t in (k_s, q_t, k_t):
        dt = torch.promote_types(dt, t.dtype)
    return tuple(t if t.dtype == dt else t.to(dt) for t in (q_s, k_s, q_t, k_t))


def _common(q_s, k_s, q_t, k_t, key_padding_mask):
    b, h, lq, ds = q_s.shape
    lk, dt = k_s.shape[2], q_t.shape[3]
    if key_padding_mask is None:
        kpm = torch.ones(1, 1, dtype=torch.int8, device=q_s.device)
        kpm_strides = (0, 0)
    else:
        kpm = (key_padding_mask != 0).to(torch.int8)
        kpm_strides = kpm.stride()
    # IEEE: dots on fp32 operands without TF32.  Used for fp32 inputs (to match the fp32 reference) and, under the
    # interpreter, for bf16 inputs: Triton's interpreter (3.9) returns garbage from tl.dot on bf16 operands.  Operands
    # are still loaded in bf16 and dS is still rounded to bf16 before its dots, as on the GPU; the products of bf16
    # values are exact in fp32, so only the accumulation order differs from the tensor-core path.
    ieee = q_s.dtype == torch.float32 or (q_s.dtype == torch.bfloat16 and _interpreting())
    blk_ds = max(16, triton.next_power_of_2(ds))
    blk_dt = max(16, triton.next_power_of_2(dt))
    strides = (*q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride(), *kpm_strides)
    meta = dict(HAS_KPM=key_padding_mask is not None, IEEE=ieee, BLOCK_DS=blk_ds, BLOCK_DT=blk_dt)
    return b, h, lq, lk, ds, dt, kpm, strides, meta


def _blocks(lq, lk, d_max) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps).  Untuned defaults (no GPU was available when this was written): 64 x 64 tiles
    keep two Q tiles (teacher + student) and two K tiles of d <= 128 in registers; 8 warps from d = 128."""
    bm = 64 if lq > 32 else max(16, triton.next_power_of_2(lq))
    bn = 64 if lk > 32 else max(16, triton.next_power_of_2(lk))
    if d_max > 128:
        bm, bn = min(bm, 32), min(bn, 32)
    return bm, bn, (8 if d_max >= 128 else 4)


def attention_kd_fwd(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], causal: bool, scale_s: float, scale_t: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, lse_s, lse_t), each fp32 [B, H, L_q]; scale_* are effective (softmax scale / temperature)."""
    _check(q_s, k_s, q_t, k_t, key_padding_mask)
    q_s, k_s, q_t, k_t = _same_dtype(q_s, k_s, q_t, k_t)
    b, h, lq, lk, ds, dt, kpm, strides, meta = _common(q_s, k_s, q_t, k_t, key_padding_mask)
    kl = torch.empty(b, h, lq, dtype=torch.float32, device=q_s.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    if kl.numel() == 0:
        return kl.zero_(), lse_s.zero_(), lse_t.zero_()
    bm, bn, nw = _blocks(lq, lk, max(ds, dt))
    grid = (triton.cdiv(lq, bm), b * h)
    _attention_kd_fwd_kernel[grid](
        q_s, k_s, q_t, k_t, kpm, kl, lse_s, lse_t, *strides,
        h, h // k_s.shape[1], h // k_t.shape[1], lq, lk, ds, dt, float(scale_s), float(scale_t),
        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, **meta,
    )
    return kl, lse_s, lse_t


def attention_kd_bwd(
    grad_rows: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], causal: bool, scale_s: float, scale_t: float,
    lse_s: torch.Tensor, lse_t: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dq_s, dk_s) in the dtypes of q_s and k_s for the upstream gradient ``grad_rows`` [B, H, L_q] on the KL rows."""
    _check(q_s, k_s, q_t, k_t, key_padding_mask)
    b, h, lq = q_s.shape[:3]
    for name, t in (("grad_rows", grad_rows), ("lse_s", lse_s), ("lse_t", lse_t)):
        if tuple(t.shape) != (b, h, lq):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected ({b}, {h}, {lq})")
    out_dtypes = (q_s.dtype, k_s.dtype)
    q_s, k_s, q_t, k_t = _same_dtype(q_s, k_s, q_t, k_t)
    b, h, lq, lk, ds, dt, kpm, strides, meta = _common(q_s, k_s, q_t, k_t, key_padding_mask)
    hk = k_s.shape[1]
    g = grad_rows.float().contiguous()
    lse_s = lse_s.float().contiguous()
    lse_t = lse_t.float().contiguous()
    # outputs in the caller's dtypes: the kernels accumulate in fp32 registers and round once on store
    dq = torch.empty(b, h, lq, ds, dtype=out_dtypes[0], device=q_s.device)
    dk = torch.empty(b, hk, lk, ds, dtype=out_dtypes[1], device=q_s.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_()
    bm, bn, nw = _blocks(lq, lk, max(ds, dt))
    args = (q_s, k_s, q_t, k_t, kpm, lse_s, lse_t, g)
    common = (lq, lk, ds, dt, float(scale_s), float(scale_t))
    _attention_kd_bwd_dq_kernel[(triton.cdiv(lq, bm), b * h)](
        *args, dq, *strides, h, h // hk, h // k_t.shape[1], *common,
        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, **meta,
    )
    _attention_kd_bwd_dk_kernel[(triton.cdiv(lk, bn), b * hk)](
        *args, dk, *strides, h, hk, h // hk, h // k_t.shape[1], *common,
        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, **meta,
    )
    return dq, dk


# ---- static-analysis launch descriptors (`pyquant bench static`) -------------------------------------------------
def static_launches(B: int, H: int, L: int, d: int, dtype: str = "bf16") -> list:
    """The forward call and the backward call (dQ + dK kernels) ``attention_kd_fwd`` / ``attention_kd_bwd`` make for
    teacher and student Q/K of shape [B, H, L, d] (contiguous, no GQA, no key-padding mask, not causal), in the
    schema of ``pyquant.bench.static``.  ``weights`` counts score elements (B * H * L * L), the unit of the
    per-"weight" figures for these kernels; ``bytes`` counts unique HBM bytes (K tiles re-read by every query block
    are assumed to hit L2).  Plain data: nothing is compiled or launched."""
    for name, v in (("B", B), ("H", H), ("L", L), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"d={d} exceeds the kernel's maximum {MAX_HEAD_DIM}")
    ty = {"bf16": ("*bf16", 2), "fp16": ("*fp16", 2), "fp32": ("*fp32", 4)}
    if dtype not in ty:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(ty)}")
    pt, eb = ty[dtype]
    bm, bn, nw = _blocks(L, L, d)
    blk = max(16, triton.next_power_of_2(d))
    strides = dict(zip(["b", "h", "m", "d"], [H * L * d, L * d, d, 1]))
    spec = {}
    for pre, names in (("sqs", "bhmd"), ("sks", "bhnd"), ("sqt", "bhmd"), ("skt", "bhnd")):
        for n, key in zip(names, "bhmd"):
            spec[f"{pre}_{n}"] = strides[key]
    spec.update(skpm_b=0, skpm_n=0, H=H, HK=H, G_S=1, G_T=1, LQ=L, LK=L, DS=d, DT=d)
    meta = dict(HAS_KPM=False, CAUSAL=False, IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=blk,
                BLOCK_DT=blk)
    ptr = dict(qs_ptr=pt, ks_ptr=pt, qt_ptr=pt, kt_ptr=pt, kpm_ptr="*i8", kl_ptr="*fp32", lses_ptr="*fp32",
               lset_ptr="*fp32", g_ptr="*fp32", dq_ptr=pt, dk_ptr=pt)

    def tri(fn):
        sig = {a: ("constexpr" if a in meta else ptr.get(a, "fp32" if a.startswith("sc_") else "i32"))
               for a in fn.arg_names}
        return dict(fn=fn, signature=sig, constexprs=dict(meta), specialize={a: v for a, v in spec.items()
                                                                             if a in sig}, num_warps=nw,
                    num_stages=3, weight_arg=None)

    bh, tiles_q, tiles_k = B * H, triton.cdiv(L, bm), triton.cdiv(L, bn)
    qk = B * H * L * d * eb  # one of q_s, k_s, q_t, k_t
    rows = B * H * L * 4  # one fp32 row vector
    scores = B * H * L * L
    tile_mma = 2 * bm * bn * blk
    fwd = dict(name="_attention_kd_fwd_kernel", triton=tri(_attention_kd_fwd_kernel), grid=[tiles_q, bh, 1],
               threads_per_cta=32 * nw, loop_trips=[tiles_k, tiles_k], weights=scores, bytes=4 * qk + 3 * rows,
               mma_flops=2 * 2 * tile_mma * tiles_q * tiles_k * bh)  # 2 passes x (teacher + student) QK^T
    dq = dict(name="_attention_kd_bwd_dq_kernel", triton=tri(_attention_kd_bwd_dq_kernel), grid=[tiles_q, bh, 1],
              threads_per_cta=32 * nw, loop_trips=tiles_k, weights=scores, bytes=4 * qk + 3 * rows + qk,
              mma_flops=3 * tile_mma * tiles_q * tiles_k * bh)  # QK^T of both maps + dS @ K
    dk = dict(name="_attention_kd_bwd_dk_kernel", triton=tri(_attention_kd_bwd_dk_kernel), grid=[tiles_k, bh, 1],
              threads_per_cta=32 * nw, loop_trips=tiles_q, weights=0, bytes=4 * qk + 3 * rows + qk,
              mma_flops=3 * tile_mma * tiles_q * tiles_k * bh)  # QK^T of both maps + dS^T @ Q
    cfg = f"BM={bm} BN={bn} BD={blk} w{nw}"
    return [dict(kernel="attention_kd_fwd", backend="triton", config=cfg, launches=[fwd]),
            dict(kernel="attention_kd_bwd", backend="triton", config=cfg, launches=[dq, dk])]

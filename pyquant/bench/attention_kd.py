"""Benchmark: fused streaming attention-map KL (Triton) vs the eager materialized loss, forward + backward.

Shapes (issue #5): B=8, H=32, d=128, bf16 Q/K for teacher and student, L in {512, 2048, 8192, 32768}, a key-padding
mask (every key kept, so both paths do the full work), reduction "paper".  The eager baseline is
``pyquant.reference.attention_map_loss``: it builds the fp32 B x H x L x L score and probability maps of both models,
as Kim et al.'s code does, and autograd differentiates through them.  For each path: median fwd+bwd time (CUDA events,
``triton.testing.do_bench``) and peak CUDA memory above the inputs; "oom" where the eager maps do not fit.

Targets (not claims): >= 10x faster at L=2048; extra peak memory <= 1% of eager's; L=32768 runs where eager OOMs.

GPU: ``pyquant bench attention-kd`` or ``python benchmarks/bench_attention_kd.py`` (JSON + CSV + PNG in
benchmarks/results/).  CPU: ``--smoke`` runs tiny shapes through the reference and the Triton interpreter to exercise
the code path; it prints "not measured" and writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["BenchConfig", "BenchRow", "main", "run"]

NAME = "attention_kd"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 8
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    dtype: str = "bf16"
    seq_lens: tuple = (512, 2048, 8192, 32768)
    causal: bool = False
    reduction: str = "paper"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


@dataclass(frozen=True)
class BenchRow:
    seq_len: int
    impl: str  # "fused_triton" | "eager_materialized"
    status: str  # "ok" | "oom" | "not measured"
    fwd_bwd_ms: Optional[float]
    peak_extra_bytes: Optional[int]
    loss: Optional[float]
    speedup_vs_eager: Optional[float] = None
    memory_fraction_of_eager: Optional[float] = None


def _inputs(cfg: BenchConfig, L: int, device: str):
    dt = DTYPES[cfg.dtype]
    g = torch.Generator(device=device).manual_seed(L)

    def r(h):
        return torch.randn(cfg.batch, h, L, cfg.head_dim, device=device, dtype=dt, generator=g)

    q_s, k_s, q_t, k_t = r(cfg.heads), r(cfg.kv_heads), r(cfg.heads), r(cfg.kv_heads)
    kpm = torch.ones(cfg.batch, L, dtype=torch.bool, device=device)
    return q_s.requires_grad_(), k_s.requires_grad_(), q_t, k_t, kpm


def _step(impl: str, cfg: BenchConfig, q_s, k_s, q_t, k_t, kpm) -> Callable[[], torch.Tensor]:
    from .. import reference
    from ..distill.attention import attention_map_loss
    from ..ops import use_backend

    def fused():
        with use_backend("triton"):
            loss = attention_map_loss(q_s, k_s, q_t, k_t, kpm, causal=cfg.causal, reduction=cfg.reduction)
            torch.autograd.grad(loss, (q_s, k_s))
        return loss

    def eager():
        loss = reference.attention_map_loss(q_s, k_s, q_t, k_t, kpm, causal=cfg.causal, reduction=cfg.reduction)
        torch.autograd.grad(loss, (q_s, k_s))
        return loss

    return fused if impl == "fused_triton" else eager


def _measure(impl, cfg, L, device, timed: bool) -> BenchRow:
    from . import common

    try:
        args = _inputs(cfg, L, device)
        fn = _step(impl, cfg, *args)
        loss = float(fn().detach())  # also compiles / warms up
        if not timed:
            return BenchRow(L, impl, "not measured", None, None, loss)
        peak = common.peak_memory_bytes(fn)
        ms = common.bench_ms(fn, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
        return BenchRow(L, impl, "ok", ms, peak, loss)
    except torch.cuda.OutOfMemoryError:
        return BenchRow(L, impl, "oom", None, None, None)
    finally:
        args = fn = None  # noqa: F841 - free before the next size
        if device == "cuda":
            torch.cuda.empty_cache()


def run(cfg: BenchConfig, device: str = "cuda", timed: bool = True, eager_max_len: Optional[int] = None,
        log=print) -> List[BenchRow]:
    rows: List[BenchRow] = []
    for L in cfg.seq_lens:
        fused = _measure("fused_triton", cfg, L, device, timed)
        if eager_max_len is not None and L > eager_max_len:
            eager = BenchRow(L, "eager_materialized", "skipped (--eager-max-len)", None, None, None)
        else:
            eager = _measure("eager_materialized", cfg, L, device, timed)
        if fused.status == "ok" and eager.status == "ok":
            fused = BenchRow(**{**asdict(fused), "speedup_vs_eager": eager.fwd_bwd_ms / fused.fwd_bwd_ms,
                                "memory_fraction_of_eager": fused.peak_extra_bytes / max(eager.peak_extra_bytes, 1)})
        for row in (fused, eager):
            log(_fmt(row))
        rows += [fused, eager]
    return rows


def _fmt(r: BenchRow) -> str:
    t = f"{r.fwd_bwd_ms:9.3f} ms" if r.fwd_bwd_ms is not None else f"{r.status:>12}"
    m = f"{r.peak_extra_bytes / 2**20:10.1f} MiB" if r.peak_extra_bytes is not None else " " * 14
    extra = ""
    if r.speedup_vs_eager is not None:
        extra = f"  speedup {r.speedup_vs_eager:6.1f}x  memory {100 * r.memory_fraction_of_eager:7.3f}% of eager"
    loss = f"  loss {r.loss:.6g}" if r.loss is not None else ""
    return f"L={r.seq_len:6d} {r.impl:20s} {t} {m}{loss}{extra}"


def _plot(rows, png_path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, style in (("fused_triton", "o-"), ("eager_materialized", "s--")):
        pts = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        ax1.plot([r["seq_len"] for r in pts], [r["fwd_bwd_ms"] for r in pts], style, label=impl)
        ax2.plot([r["seq_len"] for r in pts], [r["peak_extra_bytes"] / 2**30 for r in pts], style, label=impl)
        for r in rows:
            if r["impl"] == impl and r["status"] == "oom":
                ax1.axvline(r["seq_len"], color="gray", ls=":")
                ax1.annotate("eager OOM", (r["seq_len"], ax1.get_ylim()[1]), rotation=90, va="top", fontsize=8)
    for ax, lab in ((ax1, "fwd+bwd time (ms)"), (ax2, "peak extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("attention-map KL distillation, B=8 H=32 d=128 bf16: fused streaming vs eager materialized")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _parse(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog="pyquant bench attention-kd", description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=None, help="student/teacher key heads (GQA); default = --heads")
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(d.seq_lens))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reduction", choices=("paper", "mean_rows"), default=d.reduction)
    p.add_argument("--eager-max-len", type=int, default=None,
                   help="skip the eager baseline above this L (default: try every L; OOM is recorded)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU (reference + Triton interpreter) to exercise the code; nothing is measured "
                        "or written")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
            raise SystemExit("--smoke on CPU runs the Triton kernel through the interpreter: set TRITON_INTERPRET=1 "
                             "before starting Python (it must be set before triton is imported)")
        cfg = BenchConfig(batch=2, heads=2, kv_heads=1, head_dim=32, dtype="fp32", seq_lens=(17, 33),
                          causal=args.causal, reduction=args.reduction)
        device = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
        rows = run(cfg, device=device, timed=False)
        for L in cfg.seq_lens:
            f, e = [r for r in rows if r.seq_len == L]
            if abs(f.loss - e.loss) > 1e-4 * max(1.0, abs(e.loss)):
                print(f"smoke: fused loss {f.loss} != eager loss {e.loss} at L={L}", file=sys.stderr)
                return 1
        print("smoke run: code path exercised, fused loss == eager loss; timings and memory not measured, "
              "nothing written")
        return 0

    from . import common

    common.require_cuda("pyquant bench attention-kd")
    cfg = BenchConfig(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                      head_dim=args.head_dim, dtype=args.dtype, seq_lens=tuple(args.seq_lens), causal=args.causal,
                      reduction=args.reduction)
    meta = common.env_info()
    meta["config"] = asdict(cfg)
    meta["baseline"] = "pyquant.reference.attention_map_loss (fp32 materialized maps, autograd), as in Kim et al.'s code"
    print(f"{meta.get('gpu')}  torch {meta.get('torch')}  triton {meta.get('triton')}  commit {meta.get('git_commit')}")
    rows = run(cfg, device="cuda", timed=True, eager_max_len=args.eager_max_len)
    paths = common.write_results(NAME, [asdict(r) for r in rows], meta, plot=None if args.no_plot else _plot)
    for pth in paths:
        print("wrote", pth)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

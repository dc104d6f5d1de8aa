"""``pyquant bench moe``: the grouped packed matmul of MoE experts vs bf16 grouped GEMM and the reference loop.

Expert shapes: Mixtral-8x7B (E=8, H=4096, I=14336, top-2) and Qwen3-30B-A3B (E=128, H=2048, I=768, top-8); the two
projections of an expert MLP, ``gate_up`` (N=2I, K=H) and ``down`` (N=H, K=I).  Token counts: decode (1, 4, 8 tokens:
k routed rows each, on random experts -- most experts idle) and prefill (4096 tokens).  Routing is drawn at random
once per case (uniform top-k without repetition), so rows per expert are realistic and uneven.

Implementations: ``pyquant-triton`` (``pyquant.ops.grouped_packed_matmul`` through its Triton backend, one launch for
all experts), ``torch-bf16-grouped`` (``torch._grouped_mm`` on bf16 weights where torch has it, else a loop of bf16
matmuls over the active experts: recorded in ``note``) and ``reference-loop`` (pyquant's reference: dequantize each
active expert, then matmul -- the oracle, shown for scale).  Timing: median of CUDA-event timings
(``pyquant.bench.common.bench_ms``).  ``bytes`` counts what an ideal kernel reads (the active experts' weights as
stored, x, y).  Writes ``moe-<gpu>-<date>.json``/``.csv``/``.png`` with the environment; without a GPU it exits with a
message, and ``--smoke`` runs a tiny case through the same code on the CPU and writes nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["MOE_SHAPES", "TOKENS", "IMPLS", "MoeBenchRow", "run", "main"]

MOE_SHAPES: Dict[str, Dict[str, int]] = {
    "mixtral-8x7b": dict(experts=8, hidden=4096, inter=14336, top_k=2),
    "qwen3-30b-a3b": dict(experts=128, hidden=2048, inter=768, top_k=8),
}
TOKENS = (1, 4, 8, 4096)
IMPLS = ("pyquant-triton", "torch-bf16-grouped", "reference-loop")


@dataclass(frozen=True)
class MoeBenchRow:
    model: str
    proj: str
    tokens: int
    active_experts: int
    n: int
    k: int
    impl: str
    ms: Optional[float]
    gbs: Optional[float]
    speedup_vs_bf16: Optional[float]
    note: str = ""


def _routing(tokens: int, experts: int, top_k: int, device) -> torch.Tensor:
    scores = torch.rand(tokens, experts, device=device)
    return scores.topk(top_k, dim=-1).indices  # [tokens, top_k], distinct experts per token


def _case(n: int, k: int, ids: torch.Tensor, experts: int, device, method: str = "absmean"):
    """Sorted rows, offsets, packed weights (random codes; no float weight of this size is needed to time)."""
    from ..formats import WeightQuantConfig, pack_codes

    spec = WeightQuantConfig(method=method, granularity="channel")
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=experts)
    offsets = counts.cumsum(0)
    codes = torch.randint(0, spec.levels, (experts * n, k), device=device, dtype=torch.uint8)
    qweight = pack_codes(codes).reshape(experts, n, -1)
    scale = (torch.rand(experts, n, 1, device=device) * 0.02 + 0.01).to(spec.torch_scale_dtype)
    return dict(counts=counts, offsets=offsets, qweight=qweight, scale=scale, code_offset=spec.code_offset,
                active=int((counts > 0).sum()))


def _impl(impl: str, c: dict, x: torch.Tensor, n: int, k: int) -> tuple:
    """(callable or None, note)."""
    from .. import reference
    from ..ops import grouped_packed_matmul, use_backend

    qw, s, off, co = c["qweight"], c["scale"], c["offsets"], c["code_offset"]
    if impl == "pyquant-triton":
        def f():
            with use_backend("triton"):
                return grouped_packed_matmul(x, qw, s, None, None, off, in_features=k, code_offset=co,
                                             check_offsets=False)
        return f, ""
    if impl == "reference-loop":
        return (lambda: reference.grouped_packed_matmul(x, qw, s, None, None, off, k, co)), ""
    if impl == "torch-bf16-grouped":
        E = qw.shape[0]
        w = torch.randn(E, k, n, device=x.device, dtype=torch.bfloat16)  # [E, K, N] as grouped_mm takes it
        xb = x.to(torch.bfloat16)
        gm = getattr(torch, "_grouped_mm", None)
        if gm is not None and x.is_cuda:
            offs = off.to(torch.int32)
            try:
                gm(xb, w, offs=offs)
                return (lambda: gm(xb, w, offs=offs)), "torch._grouped_mm"
            except Exception as e:  # an arch / dtype torch's grouped GEMM does not take: fall back, say so
                note = f"torch._grouped_mm failed ({type(e).__name__}); loop of bf16 matmuls"
        else:
            note = "loop of bf16 matmuls over active experts (no torch._grouped_mm on this device)"
        ends = off.tolist()

        def loop():
            y = torch.empty(xb.shape[0], n, device=xb.device, dtype=xb.dtype)
            start = 0
            for e, end in enumerate(ends):
                if end > start:
                    y[start:end] = xb[start:end] @ w[e]
                start = end
            return y
        return loop, note
    raise ValueError(f"impl={impl!r} unknown: expected one of {IMPLS}")


def run(models: Sequence[str], tokens: Sequence[int], impls: Sequence[str], log=print, timer=None,
        device: str = "cuda") -> List[MoeBenchRow]:
    from .common import bench_ms

    timer = timer or (lambda f: bench_ms(f, warmup_ms=10, rep_ms=50))
    rows: List[MoeBenchRow] = []
    torch.manual_seed(0)
    for model in models:
        sh = MOE_SHAPES[model]
        E, H, inter, top_k = sh["experts"], sh["hidden"], sh["inter"], sh["top_k"]
        for t in tokens:
            ids = _routing(t, E, top_k, device)
            for proj, n, k in (("gate_up", 2 * inter, H), ("down", H, inter)):
                c = _case(n, k, ids, E, device)
                x = torch.randn(t * top_k, k, device=device, dtype=torch.bfloat16)
                ideal = c["active"] * n * ((k + 63) // 64) * 16 + c["active"] * n * 2 + x.numel() * 2 \
                    + x.shape[0] * n * 2
                times: Dict[str, Optional[float]] = {}
                notes: Dict[str, str] = {}
                for impl in impls:
                    fn, note = _impl(impl, c, x, n, k)
                    try:
                        times[impl] = timer(fn) if fn is not None else None
                    except Exception as e:  # recorded as not measured, the run goes on
                        times[impl], note = None, f"not measured: {type(e).__name__}: {e}"
                    notes[impl] = note
                bf = times.get("torch-bf16-grouped")
                for impl in impls:
                    ms = times[impl]
                    r = MoeBenchRow(model, proj, t, c["active"], n, k, impl, ms,
                                    ideal / (ms * 1e-3) / 1e9 if ms else None,
                                    bf / ms if (bf and ms) else None, notes[impl])
                    rows.append(r)
                    log(_fmt(r))
    return rows


def _fmt(r: MoeBenchRow) -> str:
    t = f"{r.ms * 1e3:9.1f} us" if r.ms else "      n/a  "
    sp = f"{r.speedup_vs_bf16:5.2f}x" if r.speedup_vs_bf16 else "  -  "
    return (f"{r.model:14s} {r.proj:8s} T={r.tokens:<5d} experts={r.active_experts:<4d} {r.n:6d}x{r.k:<6d} "
            f"{r.impl:19s} {t}  vs bf16 {sp} {r.note}")


def plot(rows: List[Dict[str, object]], png) -> None:
    import matplotlib.pyplot as plt

    cases = sorted({(r["model"], r["proj"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.2), squeeze=False)
    for ax, (model, proj) in zip(axes.flat, cases):
        for impl in IMPLS:
            pts = sorted((r["tokens"], r["speedup_vs_bf16"]) for r in rows
                         if (r["model"], r["proj"], r["impl"]) == (model, proj, impl) and r["speedup_vs_bf16"])
            if pts and impl != "torch-bf16-grouped":
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {proj}", fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speedup vs bf16 grouped")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def smoke(log=print) -> int:
    """A tiny MoE case through the same code on the CPU (reference, or the Triton interpreter); measures nothing."""
    from ..ops._dispatch import triton_interpret

    impls = ("pyquant-triton", "torch-bf16-grouped", "reference-loop") if triton_interpret() else \
        ("torch-bf16-grouped", "reference-loop")
    MOE_SHAPES["smoke"] = dict(experts=4, hidden=64, inter=32, top_k=2)
    try:
        rows = run(["smoke"], [3], impls, log=log, device="cpu",
                   timer=lambda f: (lambda t0: (f(), time.perf_counter() - t0)[1] * 1e3)(time.perf_counter()))
    finally:
        del MOE_SHAPES["smoke"]
    log("smoke mode (CPU wall times, not GPU measurements): nothing written to benchmarks/results/")
    return 0 if all(r.ms is not None for r in rows) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pyquant bench moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MOE_SHAPES), choices=list(MOE_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through the same code path; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    if a.smoke:
        return smoke()
    from .common import env_info, require_cuda, write_results

    require_cuda("pyquant bench moe")
    rows = run(a.models, a.tokens, a.impls)
    if not a.no_write:
        meta = dict(env_info(), benchmark="moe", models=a.models, tokens=a.tokens, impls=a.impls)
        for path in write_results("moe", [dataclasses.asdict(r) for r in rows], meta, plot=plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0

"""``pyquant bench matmul``: the 2-bit packed matmul against cuBLAS (torch bf16 / fp16) and gemlite's 2-bit kernel.

Shapes: Llama-3-8B (N x K = 4096x4096, 1024x4096, 14336x4096, 4096x14336, 128256x4096) and BERT-large (1024x1024,
4096x1024, 1024x4096); M in {1, 4, 16, 64, 256, 4096}.  Implementations: ``pyquant-triton``, ``pyquant-cuda``
(``pyquant._C``, M <= 8, when built), ``pyquant-linear`` (the public ``PackedLinear`` forward under ``no_grad``:
validation, backend dispatch and whatever kernel the dispatch picks -- the path users run, host overhead included),
``torch-bf16`` / ``torch-fp16`` (cuBLAS through ``torch.matmul``) and ``gemlite-2bit`` when gemlite is importable.

Timing: median of CUDA-event timings (``triton.testing.do_bench``, which also flushes L2 before every call; with
``--cuda-graph`` ``do_bench_cudagraph``, which removes host launch overhead, the setting of graph-captured decode).
Every implementation rotates through copies of its weights (and x) whose total size exceeds twice the L2 cache, so
no call finds its operands in L2.  Effective GB/s counts the bytes an ideal kernel moves (weights as stored, scales,
zero points, x, y) and is reported against the device-to-device copy bandwidth measured in the same run.
``speedup_vs_bf16`` is torch bf16 time / implementation time at the same (M, N, K).

Writes ``benchmarks/results/packed_matmul-<gpu>-<date>.json`` and ``.csv`` with the GPU name, versions and commit,
and a PNG of speedup vs M.  On a machine without CUDA it exits with a message; ``--smoke`` runs a tiny shape through
the same code (reference backend, or the Triton interpreter with TRITON_INTERPRET=1), times it on the CPU, and
writes nothing: those times are not GPU measurements.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["MatmulBenchConfig", "MatmulBenchRow", "SHAPES", "M_VALUES", "IMPLS", "run", "main"]

SHAPES: Dict[str, Tuple[Tuple[int, int], ...]] = {
    "llama3-8b": ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)),
    "bert-large": ((1024, 1024), (4096, 1024), (1024, 4096)),
}
M_VALUES = (1, 4, 16, 64, 256, 4096)
IMPLS = ("pyquant-triton", "pyquant-cuda", "pyquant-linear", "torch-bf16", "torch-fp16", "gemlite-2bit")
# issue #3's targets (H200); checked against this run's numbers, never assumed
TARGETS = (
    ("M=1 speedup vs cuBLAS bf16 on 4096x14336 and 14336x4096", 1, ((4096, 14336), (14336, 4096)), "speedup", 6.0),
    ("M=1 effective bandwidth vs copy bandwidth on the same shapes", 1, ((4096, 14336), (14336, 4096)), "pct_copy",
     0.8),
    ("M=16 speedup vs cuBLAS bf16 (all shapes)", 16, None, "speedup", 4.0),
    ("M=4096 speedup vs cuBLAS bf16 (all shapes)", 4096, None, "speedup", 0.9),
)


@dataclass(frozen=True)
class MatmulBenchConfig:
    models: Tuple[str, ...] = tuple(SHAPES)
    ms: Tuple[int, ...] = M_VALUES
    impls: Tuple[str, ...] = IMPLS
    dtype: str = "bfloat16"  # x dtype of the pyquant and gemlite runs
    method: str = "absmean"  # ternary by default; "uniform" for 2-bit
    group_size: Optional[int] = 128  # None: per-channel
    cuda_graph: bool = False
    warmup_ms: float = 25.0
    rep_ms: float = 100.0

    def __post_init__(self):
        bad = [m for m in self.models if m not in SHAPES]
        if bad:
            raise ValueError(f"models={bad} unknown: expected some of {tuple(SHAPES)}")
        bad = [i for i in self.impls if i not in IMPLS]
        if bad:
            raise ValueError(f"impls={bad} unknown: expected some of {IMPLS}")
        if not self.ms or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.ms):
            raise ValueError(f"ms={self.ms!r} must be positive ints")
        if self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'bfloat16' or 'float16'")


@dataclass(frozen=True)
class MatmulBenchRow:
    model: str
    n: int
    k: int
    m: int
    impl: str
    dtype: str
    ms: Optional[float]  # None: not measured (see note)
    gbs: Optional[float]
    pct_copy_bw: Optional[float]
    tflops: Optional[float]
    speedup_vs_bf16: Optional[float]
    speedup_vs_fp16: Optional[float]
    note: str = ""


# ---- operands ------------------------------------------------------------------------------------------------------
def _spec(cfg: MatmulBenchConfig):
    from ..formats import WeightQuantConfig

    if cfg.group_size is None:
        return WeightQuantConfig(method=cfg.method, granularity="channel")
    return WeightQuantConfig(method=cfg.method, granularity="group", group_size=cfg.group_size)


def _packed_weight(n: int, k: int, cfg: MatmulBenchConfig, device) -> Dict[str, object]:
    """Random codes and scales in the packed layout (no float weight of this size is needed to time a kernel)."""
    from ..formats import pack_codes

    spec = _spec(cfg)
    gs = spec.resolve_group_size(k)
    codes = torch.randint(0, spec.levels, (n, k), device=device, dtype=torch.uint8)
    scale = (torch.rand(n, k // gs, device=device) * 0.02 + 0.01).to(spec.torch_scale_dtype)
    zero = None if spec.symmetric else torch.rand(n, k // gs, device=device).mul(3).to(spec.torch_scale_dtype)
    return dict(codes=codes, qweight=pack_codes(codes), scale=scale, zero_point=zero, code_offset=spec.code_offset,
                group_size=gs)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _copies_for(bytes_per_set: int, l2_bytes: int, free_bytes: int) -> int:
    """Enough operand copies that one sweep exceeds 2x L2, without using more than a quarter of free memory."""
    want = max(1, math.ceil(2 * l2_bytes / max(1, bytes_per_set)))
    cap = max(1, free_bytes // (4 * max(1, bytes_per_set)))
    return min(want, cap)


class _Rotating:
    """Call ``fn(*operands[i])`` with i cycling over the copies (so consecutive calls touch different memory)."""

    def __init__(self, fn: Callable, sets: List[tuple]):
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*s)


# ---- implementations -------------------------------------------------------------------------------------------------
def _make_impl(impl: str, m: int, n: int, k: int, cfg: MatmulBenchConfig, device, l2: int, free: int
               ) -> Tuple[Optional[Callable], int, str]:
    """(callable or None, bytes an ideal kernel moves per call, note)."""
    xdt = getattr(torch, cfg.dtype)
    if impl in ("torch-bf16", "torch-fp16"):
        dt = torch.bfloat16 if impl == "torch-bf16" else torch.float16
        per = 2 * n * k + 2 * m * k + 2 * m * n
        sets = [(torch.randn(m, k, device=device, dtype=dt), torch.randn(n, k, device=device, dtype=dt))
                for _ in range(_copies_for(per, l2, free))]
        return _Rotating(lambda x, w: torch.nn.functional.linear(x, w), sets), per, ""
    if impl in ("pyquant-triton", "pyquant-cuda"):
        from ..ops._dispatch import backend_status
        from ..ops.packed_matmul import _cuda_supports, _kernels

        pw = _packed_weight(n, k, cfg, device)
        per = _nbytes(pw["qweight"], pw["scale"], pw["zero_point"]) + 2 * m * k + 2 * m * n
        copies = _copies_for(per, l2, free)
        sets = []
        for i in range(copies):
            w = pw if i == 0 else _packed_weight(n, k, cfg, device)
            sets.append((torch.randn(m, k, device=device, dtype=xdt), w["qweight"], w["scale"], w["zero_point"]))
        co = pw["code_offset"]
        if impl == "pyquant-triton":
            kern = _kernels()
            return _Rotating(lambda x, q, s, z: kern.packed_matmul(x, q, s, z, None, k, co), sets), per, ""
        ok, why = backend_status("cuda", torch.device(device))
        if ok:
            ok, why = _cuda_supports(sets[0][0], sets[0][1], sets[0][2], sets[0][3], None, k, co)
        if not ok:
            return None, per, f"not measured: {why}"
        from .. import _cuda_ext

        gs = pw["group_size"]
        return _Rotating(lambda x, q, s, z: _cuda_ext.packed_gemv(x, q, s, z, None, gs, 0.0 if co is None else co),
                         sets), per, ""
    if impl == "pyquant-linear":
        from ..nn import PackedLinear

        spec = _spec(cfg)
        pw = _packed_weight(n, k, cfg, device)
        per = _nbytes(pw["qweight"], pw["scale"], pw["zero_point"]) + 2 * m * k + 2 * m * n
        layers = []
        for i in range(_copies_for(per, l2, free)):
            w = pw if i == 0 else _packed_weight(n, k, cfg, device)
            lin = PackedLinear(k, n, bias=False, spec=spec, device=device, dtype=xdt)
            lin.load_state_dict({**lin.state_dict(), "qweight": w["qweight"], "scale": w["scale"],
                                 **({} if w["zero_point"] is None else {"zero_point": w["zero_point"]})})
            layers.append((lin, torch.randn(m, k, device=device, dtype=xdt)))

        def forward(lin, x):
            with torch.no_grad():
                return lin(x)

        return _Rotating(forward, layers), per, ""
    if impl == "gemlite-2bit":
        try:
            from gemlite.core import DType, GemLiteLinear  # type: ignore
        except Exception as e:  # not installed, or an API this adapter does not know
            return None, 0, f"not measured: gemlite not importable ({type(e).__name__}: {e})"
        try:
            gdt = {"bfloat16": DType.BF16, "float16": DType.FP16}[cfg.dtype]
            gs = cfg.group_size or k
            layers, per = [], 0
            pw = _packed_weight(n, k, cfg, device)
            per = n * k // 4 + 2 * _nbytes(pw["scale"]) + 2 * m * k + 2 * m * n
            for _ in range(_copies_for(per, l2, free)):
                w = _packed_weight(n, k, cfg, device)
                zero = w["zero_point"] if w["zero_point"] is not None else torch.full_like(w["scale"], _offset(w))
                lin = GemLiteLinear(2, group_size=gs, in_features=k, out_features=n, input_dtype=gdt,
                                    output_dtype=gdt)
                lin.pack(w["codes"], w["scale"].to(xdt), zero.to(xdt), None)
                layers.append((lin, torch.randn(m, k, device=device, dtype=xdt)))
            return _Rotating(lambda lin, x: lin(x), layers), per, ""
        except Exception as e:
            return None, 0, f"not measured: gemlite adapter failed ({type(e).__name__}: {e})"
    raise ValueError(f"impl={impl!r} unknown: expected one of {IMPLS}")


def _offset(w: Dict[str, object]) -> float:
    return float(w["code_offset"]) if w["code_offset"] is not None else 0.0


# ---- the run -------------------------------------------------------------------------------------------------------
def _time_ms(fn: Callable, cfg: MatmulBenchConfig) -> float:
    if cfg.cuda_graph:
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=cfg.rep_ms, return_mode="median"))
    from .common import bench_ms

    return bench_ms(fn, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)


def run(cfg: MatmulBenchConfig, log=print) -> Tuple[List[MatmulBenchRow], Dict[str, object]]:
    """Measure every (model shape, M, impl) on the current CUDA device; returns (rows, meta)."""
    from .common import env_info, measure_copy_bandwidth_gbs

    device = "cuda"
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
    copy_bw = measure_copy_bandwidth_gbs()
    log(f"copy bandwidth (read+write): {copy_bw:.0f} GB/s; L2 {l2 / 2**20:.0f} MiB")
    rows: List[MatmulBenchRow] = []
    for model in cfg.models:
        for n, k in SHAPES[model]:
            for m in cfg.ms:
                times: Dict[str, Optional[float]] = {}
                measured: List[Tuple[str, Optional[float], int, str]] = []
                for impl in cfg.impls:
                    free = torch.cuda.mem_get_info()[0]
                    try:
                        fn, nbytes, note = _make_impl(impl, m, n, k, cfg, device, l2, free)
                        t = None
                        if fn is not None:
                            fn()  # compile / autotune outside the timing
                            torch.cuda.synchronize()
                            t = _time_ms(fn, cfg)
                    except torch.cuda.OutOfMemoryError as e:
                        fn, t, nbytes, note = None, None, 0, f"not measured: out of memory ({e})"
                    except Exception as e:  # one failing implementation must not lose the rest of the run
                        fn, t, nbytes, note = None, None, 0, f"not measured: failed ({type(e).__name__}: {e})"
                    times[impl] = t
                    measured.append((impl, t, nbytes, note))
                    del fn
                    torch.cuda.empty_cache()
                for impl, t, nbytes, note in measured:
                    gbs = nbytes / (t * 1e-3) / 1e9 if t else None
                    bf, fp = times.get("torch-bf16"), times.get("torch-fp16")
                    row = MatmulBenchRow(
                        model=model, n=n, k=k, m=m, impl=impl, dtype=cfg.dtype, ms=t, gbs=gbs,
                        pct_copy_bw=gbs / copy_bw if gbs else None,
                        tflops=2 * m * n * k / (t * 1e-3) / 1e12 if t else None,
                        speedup_vs_bf16=bf / t if (t and bf) else None,
                        speedup_vs_fp16=fp / t if (t and fp) else None, note=note)
                    rows.append(row)
                    log(_fmt(row))
    meta = dict(env_info(), benchmark="packed_matmul", config=dataclasses.asdict(cfg), copy_bandwidth_gbs=copy_bw,
                l2_bytes=l2, targets=check_targets(rows))
    return rows, meta


def check_targets(rows: Sequence[MatmulBenchRow], impl: str = "pyquant-triton") -> List[Dict[str, object]]:
    """Each issue target with the measured values of this run (met=None where nothing was measured)."""
    out = []
    for name, m, shapes, kind, want in TARGETS:
        vals = []
        for r in rows:
            if r.impl != impl or r.m != m or (shapes is not None and (r.n, r.k) not in shapes):
                continue
            v = r.speedup_vs_bf16 if kind == "speedup" else r.pct_copy_bw
            if v is not None:
                vals.append(((r.n, r.k), v))
        out.append(dict(target=name, m=m, impl=impl, threshold=want, measured=[[list(s), v] for s, v in vals],
                        met=None if not vals else all(v >= want for _, v in vals)))
    return out


def _fmt(r: MatmulBenchRow) -> str:
    if r.ms is None:
        return f"{r.model:10s} {r.n:6d}x{r.k:<6d} M={r.m:<5d} {r.impl:15s} {r.note}"
    sp = f"{r.speedup_vs_bf16:5.2f}x" if r.speedup_vs_bf16 else "   -  "
    return (f"{r.model:10s} {r.n:6d}x{r.k:<6d} M={r.m:<5d} {r.impl:15s} {r.ms * 1e3:9.1f} us "
            f"{r.gbs:8.0f} GB/s ({100 * r.pct_copy_bw:5.1f}% copy) {r.tflops:7.1f} TFLOP/s  vs bf16 {sp}")


def plot_speedup(rows: List[Dict[str, object]], png) -> None:
    """One panel per shape: speedup over cuBLAS bf16 vs M, one line per implementation."""
    import matplotlib.pyplot as plt

    shapes = sorted({(r["model"], r["n"], r["k"]) for r in rows})
    impls = [i for i in IMPLS if i != "torch-bf16" and any(r["impl"] == i and r["speedup_vs_bf16"] for r in rows)]
    cols = 4
    nrows = max(1, math.ceil(len(shapes) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (model, n, k) in zip(axes.flat, shapes):
        for impl in impls:
            pts = sorted((r["m"], r["speedup_vs_bf16"]) for r in rows
                         if (r["model"], r["n"], r["k"], r["impl"]) == (model, n, k, impl) and r["speedup_vs_bf16"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} N={n} K={k}", fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("speedup vs cuBLAS bf16")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---- smoke mode (CPU): exercise the code path, measure nothing ----------------------------------------------------
def smoke(cfg: MatmulBenchConfig, log=print) -> int:
    from .. import reference
    from ..ops import packed_matmul, use_backend
    from ..ops._dispatch import triton_interpret

    backend = "triton" if triton_interpret() else "reference"
    n, k, m = 48, 256, 3
    pw = _packed_weight(n, k, cfg, "cpu")
    x = torch.randn(m, k, dtype=getattr(torch, cfg.dtype))
    t0 = time.perf_counter()
    with use_backend(backend):
        y = packed_matmul(x, pw["qweight"], pw["scale"], pw["zero_point"], None, in_features=k,
                          code_offset=pw["code_offset"])
    dt = time.perf_counter() - t0
    ref = reference.packed_matmul(x, pw["qweight"], pw["scale"], pw["zero_point"], None, k, pw["code_offset"])
    err = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-12)
    rows = [MatmulBenchRow("smoke", n, k, m, f"pyquant-{backend}", cfg.dtype, None, None, None, None, None, None,
                           note=f"CPU smoke run ({dt * 1e3:.1f} ms wall, not a GPU measurement); "
                                f"max rel err vs reference {err:.2e}")]
    # the public PackedLinear path, built exactly as the GPU run builds it (one copy: no L2 to defeat here)
    fn, _, _ = _make_impl("pyquant-linear", m, n, k, cfg, "cpu", 0, 1 << 40)
    lin, xl = fn.sets[0]
    t0 = time.perf_counter()
    with use_backend(backend):
        y = fn()
    dt = time.perf_counter() - t0
    ref = reference.packed_matmul(xl, lin.qweight, lin.scale, lin.zero_point, None, k, pw["code_offset"])
    lerr = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-12)
    rows.append(MatmulBenchRow("smoke", n, k, m, "pyquant-linear", cfg.dtype, None, None, None, None, None, None,
                               note=f"CPU smoke run ({dt * 1e3:.1f} ms wall, {backend} backend, not a GPU "
                                    f"measurement); max rel err vs reference {lerr:.2e}"))
    err = max(err, lerr)
    for r in rows:
        log(_fmt(r))
    log(f"targets (nothing measured): {[t['target'] for t in check_targets(rows)]}")
    log("smoke mode: nothing written to benchmarks/results/")
    return 0 if err < 2e-2 else 1


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyquant bench matmul", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=list(M_VALUES), help="batch rows M")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--method", default="absmean", choices=["absmean", "twn", "uniform", "seq"],
                   help="weight format (ternary absmean by default; 'uniform' for 2-bit)")
    p.add_argument("--group-size", type=int, default=128, help="0 for per-channel scales")
    p.add_argument("--cuda-graph", action="store_true", help="time with CUDA graphs (no host launch overhead)")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run through the same code path (reference or TRITON_INTERPRET=1); writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parse(argv)
    cfg = MatmulBenchConfig(models=tuple(a.models), ms=tuple(a.m), impls=tuple(a.impls), dtype=a.dtype,
                            method=a.method, group_size=a.group_size or None, cuda_graph=a.cuda_graph,
                            rep_ms=a.rep_ms)
    if a.smoke:
        return smoke(cfg)
    from .common import require_cuda, write_results

    require_cuda("pyquant bench matmul")
    rows, meta = run(cfg)
    for t in meta["targets"]:
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"target: {t['target']} >= {t['threshold']}: {status}")
    if not a.no_write:
        for path in write_results("packed_matmul", [dataclasses.asdict(r) for r in rows], meta, plot=plot_speedup):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

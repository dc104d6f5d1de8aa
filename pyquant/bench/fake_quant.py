"""``pyquant bench fake-quant``: fused fake-quant fwd+bwd and QATLinear fwd+bwd, time and peak memory.

Part 1, the op: ``pyquant.ops.fake_quant_weight`` forward + backward (Triton) on Llama-3-8B weight shapes against

* ``torch-naive``: the same straight-through estimator composed from torch ops under autograd (what a QAT library
  without fused kernels runs: statistics, divide, round with a detached residual, clamp, rescale, LSQ grad scaling);
* ``torch-learnable-fq``: ``torch._fake_quantize_learnable_per_channel_affine`` (learnable-scale specs; per-group as
  per-channel over the weight viewed as ``[N*K/group, group]``; it takes fp32, so the bf16 weight is upcast).

Part 2, the module: ``QATLinear`` (bf16 master weight, weight fake-quant, optional int8 input fake-quant) forward +
backward against bf16 ``nn.Linear`` at Llama-3-8B shapes with 8192 tokens.

Timing: median of CUDA-event timings (``triton.testing.do_bench`` via ``pyquant.bench.common.bench_ms``); memory: peak
CUDA memory allocated above the baseline during one fwd+bwd.  Writes ``benchmarks/results/fake_quant-<gpu>-<date>``
``.json``/``.csv``/``.png`` with the GPU name, versions and commit.  Targets of issue #4 (H200): fake-quant fwd+bwd
>= 3x the naive composition; QATLinear fwd+bwd <= 1.15x bf16 nn.Linear -- reported as met / not met from this run's
numbers only.  On a machine without CUDA it exits with a message; ``--smoke`` runs tiny shapes through the same code
on the CPU (reference backend, or the Triton interpreter with TRITON_INTERPRET=1) and writes nothing: those times are
not GPU measurements.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["FakeQuantBenchConfig", "FakeQuantBenchRow", "SHAPES", "SPECS", "run", "main"]

# Llama-3-8B linear layers, (N, K) = (out_features, in_features)
SHAPES: Dict[str, Tuple[int, int]] = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
SMOKE_SHAPES: Dict[str, Tuple[int, int]] = {"tiny": (48, 128)}
# name -> WeightQuantConfig kwargs
SPECS: Dict[str, dict] = {
    "twn-channel": dict(method="twn", granularity="channel"),
    "absmean-tensor": dict(method="absmean", granularity="tensor"),  # BitNet b1.58's weight quantizer
    "absmean-channel-lsq": dict(method="absmean", granularity="channel", learnable_scale=True),
    "int2-asym-group128-lsq": dict(method="uniform", symmetric=False, granularity="group", group_size=128,
                                   learnable_scale=True),
}
TARGET_OP_SPEEDUP = 3.0
TARGET_MODULE_RATIO = 1.15


@dataclass(frozen=True)
class FakeQuantBenchConfig:
    shapes: Tuple[str, ...] = tuple(SHAPES)
    specs: Tuple[str, ...] = tuple(SPECS)
    tokens: int = 8192
    dtype: str = "bfloat16"
    act_quant: bool = True  # part 2: also fake-quantize QATLinear's input (W2A8 QAT)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    smoke: bool = False
    backend: str = "auto"  # auto: triton (GPU, or the interpreter with TRITON_INTERPRET=1), else reference

    def __post_init__(self):
        if self.backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend={self.backend!r}: expected 'auto', 'triton' or 'reference'")
        table = SMOKE_SHAPES if self.smoke else SHAPES
        bad = [s for s in self.shapes if s not in table]
        if bad:
            raise ValueError(f"shapes={bad} unknown: expected some of {tuple(table)}")
        bad = [s for s in self.specs if s not in SPECS]
        if bad:
            raise ValueError(f"specs={bad} unknown: expected some of {tuple(SPECS)}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens={self.tokens!r}: expected a positive int")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'bfloat16', 'float16' or 'float32'")


@dataclass(frozen=True)
class FakeQuantBenchRow:
    part: str  # "op" | "module"
    shape: str
    n: int
    k: int
    tokens: Optional[int]
    spec: str
    impl: str
    dtype: str
    ms: Optional[float]  # None: not measured (see note)
    peak_mem_mib: Optional[float]
    speedup_vs_naive: Optional[float]  # op rows: naive time / this time
    ratio_vs_linear: Optional[float]  # module rows: this time / bf16 nn.Linear time
    note: str = ""


# ---- the naive torch composition (autograd through torch ops) ---------------------------------------------------
def naive_fake_quant(w: torch.Tensor, spec, scale: Optional[torch.Tensor] = None,
                     zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference STE composed from torch ops (several full-size fp32 temporaries, autograd saves them)."""
    from ..reference.quant import TWN_DELTA_RATIO, lsq_grad_scale

    n, k = w.shape
    wf = w.float()
    if spec.clip is not None:
        wf = wf.clamp(-spec.clip, spec.clip)
    gs = n * k if spec.granularity == "tensor" else spec.resolve_group_size(k)
    g = wf.reshape(-1, gs)
    dt = spec.torch_scale_dtype
    if scale is None:  # statistics, straight-through
        a = g.abs()
        if spec.method == "twn":
            delta = TWN_DELTA_RATIO * a.mean(-1, keepdim=True)
            keep = a > delta
            s = ((a * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1))
            s = s.clamp_min(torch.finfo(dt).tiny).to(dt).float()
            out = s * torch.sign(g) * keep
        else:
            s = a.mean(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny).to(dt).float()
            z = spec.code_offset
            out = ((g / s + z).add(0.5).floor().clamp(0, spec.max_code) - z) * s
        return (g + (out - g).detach()).reshape(n, k).to(w.dtype)
    gsc = lsq_grad_scale(spec, k, w.numel()) if spec.scale_grad == "lsq" else 1.0

    def grad_scaled(t):
        t = t * gsc + (t - t * gsc).detach()
        return t.reshape(-1, 1)

    s = grad_scaled(scale)
    s = s + (s.clamp_min(torch.finfo(dt).tiny).to(dt).float() - s).detach()
    z = spec.code_offset if spec.symmetric else grad_scaled(zero_point)
    vc = (g / s + z).clamp(0, spec.max_code)
    c = vc + (vc.add(0.5).floor() - vc).detach()
    return ((c - z) * s).reshape(n, k).to(w.dtype)


def _learnable_torch_fq(w, spec, scale, zero_point):
    """torch._fake_quantize_learnable_per_channel_affine on [N*K/group, group] (fp32 in, as torch requires)."""
    n, k = w.shape
    gs = spec.resolve_group_size(k)
    zp = torch.full_like(scale, spec.code_offset) if spec.symmetric else zero_point
    out = torch._fake_quantize_learnable_per_channel_affine(
        w.float().reshape(-1, gs), scale.reshape(-1), zp.reshape(-1), 0, 0, spec.max_code, 1.0)
    return out.reshape(n, k).to(w.dtype)


# ---- timing helpers ------------------------------------------------------------------------------------------------
def _time(fn: Callable[[], object], cfg: FakeQuantBenchConfig) -> Tuple[float, Optional[float]]:
    """(ms, peak MiB): CUDA events on a GPU; with --smoke, wall-clock on the CPU and no memory figure."""
    if cfg.smoke:
        fn()
        t = time.perf_counter()
        reps = 3
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e3 / reps, None
    from .common import bench_ms, peak_memory_bytes

    ms = bench_ms(fn, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    return ms, peak_memory_bytes(fn) / 2**20


def _impl_name(cfg: FakeQuantBenchConfig) -> str:
    from ..ops._dispatch import triton_interpret

    if cfg.backend != "auto":
        return f"pyquant-{cfg.backend}"
    return "pyquant-reference" if cfg.smoke and not triton_interpret() else "pyquant-triton"


def _op_rows(cfg: FakeQuantBenchConfig, device) -> List[FakeQuantBenchRow]:
    from ..formats import WeightQuantConfig
    from ..ops import fake_quant_weight, quantize_weight

    table = SMOKE_SHAPES if cfg.smoke else SHAPES
    dt = getattr(torch, cfg.dtype)
    rows = []
    for shape in cfg.shapes:
        n, k = table[shape]
        for sname in cfg.specs:
            spec = WeightQuantConfig(**SPECS[sname])
            w = (torch.randn(n, k, device=device) * 0.02).to(dt).requires_grad_(True)
            g = torch.randn(n, k, device=device).to(dt)
            s = z = None
            if spec.learnable_scale:
                init = WeightQuantConfig(**{**SPECS[sname], "learnable_scale": False})
                _, s0, z0 = quantize_weight(w.detach(), init)
                s = s0.clone().requires_grad_(True)
                z = None if z0 is None else z0.clone().requires_grad_(True)
            leaves = [t for t in (w, s, z) if t is not None]

            def fwd_bwd(f):
                def run_once():
                    for t in leaves:
                        t.grad = None
                    with _use(impl_name):  # forward and backward on the same backend
                        f().backward(g)
                return run_once

            impl_name = _impl_name(cfg)
            impls: Dict[str, Callable] = {}

            def fused():
                return fake_quant_weight(w, spec, s, z)

            with _use(impl_name), torch.no_grad():  # both sides compute the same STE: check before timing
                torch.testing.assert_close(fused().float(), naive_fake_quant(w, spec, s, z).float(),
                                           rtol=1e-2, atol=1e-2 * float(w.detach().abs().max()))
            impls[impl_name] = fwd_bwd(fused)
            impls["torch-naive"] = fwd_bwd(lambda: naive_fake_quant(w, spec, s, z))
            if spec.learnable_scale and spec.granularity != "tensor":
                impls["torch-learnable-fq"] = fwd_bwd(lambda: _learnable_torch_fq(w, spec, s, z))
            times = {name: _time(fn, cfg) for name, fn in impls.items()}
            base = times["torch-naive"][0]
            for name, (ms, mib) in times.items():
                rows.append(FakeQuantBenchRow(
                    "op", shape, n, k, None, sname, name, cfg.dtype, ms, mib,
                    base / ms if ms else None, None,
                    "CPU wall-clock (--smoke), not a GPU measurement" if cfg.smoke else ""))
            del w, g, s, z, leaves
    return rows


def _use(impl_name: str):
    from ..ops import use_backend

    return use_backend("reference" if impl_name == "pyquant-reference" else "triton")


def _module_rows(cfg: FakeQuantBenchConfig, device) -> List[FakeQuantBenchRow]:
    from ..formats import ActivationQuantConfig, WeightQuantConfig
    from ..nn import QATLinear

    table = SMOKE_SHAPES if cfg.smoke else SHAPES
    dt = getattr(torch, cfg.dtype)
    tokens = min(cfg.tokens, 16) if cfg.smoke else cfg.tokens
    impl_name = _impl_name(cfg)
    rows = []
    for shape in cfg.shapes:
        n, k = table[shape]
        x = torch.randn(tokens, k, device=device, dtype=dt).requires_grad_(True)
        gy = torch.randn(tokens, n, device=device, dtype=dt)
        lin = torch.nn.Linear(k, n, device=device, dtype=dt)

        def step(mod):
            def run_once():
                x.grad = None
                for p in mod.parameters():
                    p.grad = None
                with _use(impl_name):
                    mod(x).backward(gy)
            return run_once

        base_ms, base_mib = _time(step(lin), cfg)
        note = "CPU wall-clock (--smoke), not a GPU measurement" if cfg.smoke else ""
        rows.append(FakeQuantBenchRow("module", shape, n, k, tokens, "-", f"nn.Linear-{cfg.dtype}", cfg.dtype,
                                      base_ms, base_mib, None, 1.0, note))
        for sname in cfg.specs:
            spec = WeightQuantConfig(**SPECS[sname])
            ref = torch.nn.Linear(k, n, device=device, dtype=dt)
            q = QATLinear.from_linear(ref, spec, ActivationQuantConfig() if cfg.act_quant else None)
            ms, mib = _time(step(q), cfg)
            rows.append(FakeQuantBenchRow("module", shape, n, k, tokens, sname,
                                          f"QATLinear({impl_name}{', A8' if cfg.act_quant else ''})", cfg.dtype,
                                          ms, mib, None, ms / base_ms if base_ms else None, note))
            del q, ref
        del x, gy, lin
    return rows


def run(cfg: FakeQuantBenchConfig) -> List[FakeQuantBenchRow]:
    device = "cpu" if cfg.smoke else "cuda"
    return _op_rows(cfg, device) + _module_rows(cfg, device)


def targets(rows: List[FakeQuantBenchRow]) -> List[dict]:
    """Issue #4's targets, evaluated on this run's numbers (None when nothing was measured)."""
    fused = [r for r in rows if r.part == "op" and r.impl.startswith("pyquant") and r.speedup_vs_naive]
    mods = [r for r in rows if r.part == "module" and r.impl.startswith("QATLinear") and r.ratio_vs_linear]
    out = []
    if fused:
        worst = min(r.speedup_vs_naive for r in fused)
        out.append(dict(target=f"fake-quant fwd+bwd >= {TARGET_OP_SPEEDUP}x the naive torch composition",
                        worst=worst, met=worst >= TARGET_OP_SPEEDUP))
    if mods:
        worst = max(r.ratio_vs_linear for r in mods)
        out.append(dict(target=f"QATLinear fwd+bwd <= {TARGET_MODULE_RATIO}x bf16 nn.Linear", worst=worst,
                        met=worst <= TARGET_MODULE_RATIO))
    return out


def _plot(rows: List[dict], png) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    op = [r for r in rows if r["part"] == "op" and r["impl"] != "torch-naive" and r["speedup_vs_naive"]]
    labels = [f"{r['shape']}\n{r['spec']}\n{r['impl']}" for r in op]
    axes[0].bar(range(len(op)), [r["speedup_vs_naive"] for r in op])
    axes[0].axhline(TARGET_OP_SPEEDUP, color="r", ls="--", label=f"target {TARGET_OP_SPEEDUP}x")
    axes[0].set_xticks(range(len(op)), labels, rotation=90, fontsize=6)
    axes[0].set_ylabel("speedup vs naive torch (fwd+bwd)")
    axes[0].legend()
    mod = [r for r in rows if r["part"] == "module" and r["impl"].startswith("QATLinear")]
    axes[1].bar(range(len(mod)), [r["ratio_vs_linear"] for r in mod])
    axes[1].axhline(TARGET_MODULE_RATIO, color="r", ls="--", label=f"target <= {TARGET_MODULE_RATIO}x")
    axes[1].set_xticks(range(len(mod)), [f"{r['shape']}\n{r['spec']}" for r in mod], rotation=90, fontsize=6)
    axes[1].set_ylabel("time / bf16 nn.Linear (fwd+bwd)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pyquant bench fake-quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=None, help=f"subset of {tuple(SHAPES)}")
    p.add_argument("--specs", nargs="+", default=list(SPECS), help=f"subset of {tuple(SPECS)}")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--no-act-quant", action="store_true", help="QATLinear without int8 input fake-quant")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="pyquant backend for the fused side (auto: triton on a GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU to exercise the code path; prints, writes nothing")
    args = p.parse_args(argv)
    shapes = tuple(args.shapes) if args.shapes else tuple(SMOKE_SHAPES if args.smoke else SHAPES)
    cfg = FakeQuantBenchConfig(shapes=shapes, specs=tuple(args.specs), tokens=args.tokens, dtype=args.dtype,
                               act_quant=not args.no_act_quant, smoke=args.smoke,
                               backend=args.backend)
    if not cfg.smoke:
        from .common import require_cuda

        require_cuda("pyquant bench fake-quant")
    rows = run(cfg)
    for r in rows:
        ms = "not measured" if r.ms is None else f"{r.ms:9.3f} ms"
        mem = "" if r.peak_mem_mib is None else f"  peak {r.peak_mem_mib:8.1f} MiB"
        rel = f"  {r.speedup_vs_naive:5.2f}x vs naive" if r.speedup_vs_naive else \
            (f"  {r.ratio_vs_linear:5.2f}x of nn.Linear" if r.ratio_vs_linear else "")
        print(f"{r.part:6s} {r.shape:14s} {r.spec:24s} {r.impl:34s} {ms}{mem}{rel}")
    if cfg.smoke:
        print("--smoke: CPU wall-clock times to exercise the code path; not GPU measurements. Nothing written.")
        return 0
    from .common import env_info, write_results

    tg = targets(rows)
    for t in tg:
        print(f"target: {t['target']}: worst {t['worst']:.2f} -> {'met' if t['met'] else 'NOT met'}")
    meta = {**env_info(), "config": asdict(cfg), "targets": tg}
    paths = write_results("fake_quant", [asdict(r) for r in rows], meta, plot=_plot)
    for pth in paths:
        print(f"wrote {pth}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Shared benchmark plumbing: environment record, timing, memory, ceilings and result files.

Every number a benchmark writes comes from this run on this machine; the JSON records the machine, versions, date
and commit next to it.  GPU-only: :func:`require_cuda` exits with a clear message on a machine without CUDA.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

__all__ = [
    "RESULTS_DIR",
    "env_info",
    "require_cuda",
    "bench_ms",
    "peak_memory_bytes",
    "measure_copy_bandwidth_gbs",
    "measure_matmul_tflops",
    "write_results",
    "gpu_slug",
]

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info() -> Dict[str, object]:
    """Machine, versions, date and commit: recorded next to every result."""
    cuda = torch.cuda.is_available()
    info: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git_commit(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "driver": _driver() if cuda else None,
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    compute_capability=f"{p.major}.{p.minor}")
    return info


def gpu_slug(info: Optional[Dict[str, object]] = None) -> str:
    name = (info or env_info()).get("gpu") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")


def require_cuda(what: str) -> None:
    """Exit with a clear message when there is no CUDA GPU (benchmarks time GPU kernels only)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA GPU (none found: torch.cuda.is_available() is False). "
                         "Nothing was measured and nothing was written.")


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms, timed with CUDA events (triton.testing.do_bench), after warm-up."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by ``fn`` above what was allocated before it ran."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def measure_copy_bandwidth_gbs(nbytes: int = 2**31) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (the memory ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup_ms=50, rep_ms=200)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul rate on random data (the arithmetic ceiling), TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench_ms(lambda: a @ b, warmup_ms=50, rep_ms=200)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def write_results(name: str, rows: Iterable[Dict[str, object]], meta: Dict[str, object],
                  plot: Optional[Callable[[List[Dict[str, object]], Path], None]] = None,
                  out_dir: Optional[Path] = None) -> List[Path]:
    """Write ``<name>-<gpu>-<YYYYMMDD>.json`` and ``.csv`` (and ``.png`` via ``plot``) atomically.

    Into ``out_dir``, else ``$PYQUANT_RESULTS_DIR``, else ``benchmarks/results/``.
    """
    rows = list(rows)
    if out_dir is None:  # PYQUANT_RESULTS_DIR: where benchmarks/gpu_suite.py collects every result of one run
        out_dir = os.environ.get("PYQUANT_RESULTS_DIR") or RESULTS_DIR
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{gpu_slug(meta)}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d')}"
    paths = []
    js = out_dir / f"{stem}.json"
    _atomic_write(js, json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    paths.append(js)
    if rows:
        cs = out_dir / f"{stem}.csv"
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = cs.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, cs)
        paths.append(cs)
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            print("matplotlib is not installed: no PNG written (pip install 'pyquant[bench]')", file=sys.stderr)
        else:
            png = out_dir / f"{stem}.png"
            plot(rows, png)
            paths.append(png)
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

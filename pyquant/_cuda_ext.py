"""Lazy access to the optional CUDA extension ``pyquant._C`` (sources in ``csrc/``).

Nothing here runs at ``import pyquant``: the extension is looked up on the first :func:`load` / :func:`status` call
and the outcome (module or reason) is cached for the life of the process, so a failure is logged once on the
``"pyquant"`` logger and later calls return immediately.

Where ``_C`` comes from, in order:

1. ``import pyquant._C`` -- built by ``setup.py`` (``pip install --no-build-isolation -e .`` on a machine with a
   CUDA torch and nvcc);
2. a JIT build of the same sources with :func:`torch.utils.cpp_extension.load` (ninja, cached under
   ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``), only when asked for -- ``load(jit=True)`` or the
   environment variable ``PYQUANT_JIT_BUILD=1`` -- and only when a GPU is visible (the build targets its arch).

Python callers use :func:`packed_gemv` (``load().packed_gemv`` plus the split-K workspace kept here, one per
device and stream) or :class:`BoundGemv` (the same with everything but x fixed once: the decode fast path); the
binding (csrc/binding.cpp) checks every argument itself.

:func:`plan` mirrors the launcher's launch plan (``pyquant_packed_gemv_plan`` in csrc/packed_gemv.cu; the tests
check both agree) and :func:`static_launches` describes the launch for the static roofline tool.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

__all__ = ["load", "status", "source_dir", "sources", "jit_cuda_flags", "plan", "plan_mma", "mma_enabled",
           "static_launches", "packed_gemv", "workspace", "BoundGemv"]

_log = logging.getLogger("pyquant")
_lock = threading.Lock()
_UNSET = object()

# cached outcomes: (module or None, reason)
_prebuilt = _UNSET
_jit = _UNSET

_SOURCE_FILES = ("binding.cpp", "packed_gemv.cu")
JIT_NAME = "pyquant_C"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def source_dir() -> Optional[Path]:
    """Directory holding the CUDA sources: ``pyquant/csrc`` in a wheel install, ``<repo>/csrc`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in _SOURCE_FILES):
            return cand
    return None


def sources() -> List[str]:
    """The source files of ``pyquant._C`` (empty when they are not shipped with this install)."""
    d = source_dir()
    return [] if d is None else [str(d / f) for f in _SOURCE_FILES]


def jit_cuda_flags(capability: Tuple[int, int]) -> List[str]:
    """nvcc flags for a JIT build targeting one device; Hopper (9.0) gets the arch-specific sm_90a."""
    major, minor = capability
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    # no --use_fast_math: the kernel relies on IEEE fp32 (denormals kept, exact power-of-two scaling)
    return ["-O3", "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}"]


@functools.lru_cache(maxsize=None)
def _torch_cuda_reason() -> Optional[str]:
    """Why CUDA kernels cannot run in this process, or None if they can (cached: status() runs on every op call).

    torch.cuda.is_available() asks the driver for a device count; it does not create a CUDA context."""
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        return f"torch is not importable ({type(e).__name__}: {e})"
    if torch.version.cuda is None:
        return f"torch has no CUDA (torch {torch.__version__} is a CPU-only build)"
    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False)"
    return None


def _import_prebuilt() -> Tuple[Optional[ModuleType], str]:
    try:
        mod = importlib.import_module("pyquant._C")
    except ModuleNotFoundError as e:
        if e.name != "pyquant._C":  # _C exists but something it imports is missing: a broken build
            reason = f"pyquant._C failed to import: {type(e).__name__}: {e}"
            _log.warning("pyquant CUDA extension unavailable: %s", reason)
            return None, reason
        why = _torch_cuda_reason()
        reason = f"not built: {why}" if why else \
            "not built (reinstall with `pip install --no-build-isolation -e .` where nvcc is available, " \
            "or set PYQUANT_JIT_BUILD=1 to JIT-build it)"
        _log.info("pyquant CUDA extension: %s", reason)
        return None, reason
    except Exception as e:  # ImportError (undefined symbol, torch/CUDA mismatch), OSError, ...
        reason = f"pyquant._C failed to import: {type(e).__name__}: {e}"
        _log.warning("pyquant CUDA extension unavailable: %s", reason)
        return None, reason
    return mod, "built"


def _jit_build() -> Tuple[Optional[ModuleType], str]:
    why = _torch_cuda_reason()
    if why:
        return None, f"JIT build not possible: {why}"
    srcs = sources()
    if not srcs:
        reason = "JIT build not possible: the csrc/ sources are not shipped with this install"
        _log.warning("pyquant CUDA extension unavailable: %s", reason)
        return None, reason
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
        from torch.utils.cpp_extension import load as cpp_load

        if CUDA_HOME is None:
            raise RuntimeError("the CUDA toolkit (nvcc) was not found; set CUDA_HOME")
        flags = jit_cuda_flags(torch.cuda.get_device_capability())
        _log.info("pyquant: JIT-building the CUDA extension (%s) ...", " ".join(flags))
        mod = cpp_load(name=JIT_NAME, sources=srcs, extra_cflags=["-O3"], extra_cuda_cflags=flags,
                       extra_include_paths=[str(Path(srcs[0]).parent)], with_cuda=True, verbose=False)
    except Exception as e:  # compiler errors arrive as RuntimeError/OSError/subprocess errors
        msg = str(e).strip().splitlines()
        reason = f"JIT build failed: {type(e).__name__}: {msg[-1] if msg else ''}"
        _log.warning("pyquant CUDA extension unavailable: %s", reason)
        return None, reason
    return mod, "JIT-built"


def _resolve(jit: Optional[bool]) -> Tuple[Optional[ModuleType], str]:
    global _prebuilt, _jit
    if jit is None:
        jit = _env_flag("PYQUANT_JIT_BUILD")
    with _lock:
        if _prebuilt is _UNSET:
            _prebuilt = _import_prebuilt()
        mod, reason = _prebuilt
        if mod is not None:
            return mod, reason
        if _jit is not _UNSET:
            return _jit  # a JIT build was already attempted: reuse its outcome (never retried)
        if not jit:
            return mod, reason
        _jit = _jit_build()
        return _jit


def load(jit: Optional[bool] = None) -> Optional[ModuleType]:
    """Return the ``pyquant._C`` module, or None if it cannot be had (see :func:`status` for the reason).

    jit: JIT-build the extension when no prebuilt one is installed (None: follow ``PYQUANT_JIT_BUILD=1``).
    Never raises; the outcome is cached (a failure is logged once).
    """
    return _resolve(jit)[0]


def status(jit: Optional[bool] = None) -> Tuple[bool, str]:
    """(usable, reason) for ``pyquant env`` and backend dispatch, e.g. ``(True, "built")``,
    ``(False, "not built: torch has no CUDA (...)")``, ``(False, "built, but no GPU ...")``,
    ``(False, "JIT build failed: ...")``.  "usable" means the module loads *and* a GPU is visible."""
    mod, reason = _resolve(jit)
    if mod is None:
        return False, reason
    why = _torch_cuda_reason()
    if why:
        return False, f"{reason}, but {why}"
    return True, reason


def _reset() -> None:
    """Forget cached outcomes (tests only)."""
    global _prebuilt, _jit
    with _lock:
        _prebuilt = _UNSET
        _jit = _UNSET
        _torch_cuda_reason.cache_clear()


# ---- launch plan (mirror of pyquant_packed_gemv_plan in csrc/packed_gemv.cu) ---------------------------------------
GEMV_MAX_M = 8
_TARGET_CTAS = 264          # kTargetCtas
_SMEM_BUDGET = 100 * 1024   # kSmemBudget
_MAX_PASSES = 4             # kMaxPasses
_CHUNK_WORDS = 36           # kChunkWords


def _rows_per_warp(M: int) -> int:
    return 8 if M <= 2 else (4 if M <= 4 else 1)


def _smem_bytes(M: int, chunks: int) -> int:
    return M * chunks * (_CHUNK_WORDS * 4 + 16) + 16


@functools.lru_cache(maxsize=4096)
def plan(M: int, N: int, K: int) -> dict:
    """The launch the CUDA GEMV makes for x [M, K] and N output rows (pure function of the shape).

    Keys: threads, rows_per_warp, passes, splits, grid_x, iters_per_split, smem_bytes, workspace_bytes."""
    if not (1 <= M <= GEMV_MAX_M) or N < 1 or K < 1:
        raise ValueError(f"plan: M={M}, N={N}, K={K}: expected 1 <= M <= {GEMV_MAX_M}, N >= 1, K >= 1")
    R = _rows_per_warp(M)
    n_chunks = -(-K // 64)
    trips = -(-n_chunks // 32)
    threads = 256 if -(-N // (8 * R)) * trips >= _TARGET_CTAS else 128
    rows_pp = threads // 32 * R
    gx1 = -(-N // rows_pp)
    trips2 = trips // 2 if trips >= 2 else 1
    passes = 1
    for pp in range(_MAX_PASSES, 1, -1):
        if -(-gx1 // pp) * trips2 >= _TARGET_CTAS:
            passes = pp
            break
    grid_x = -(-gx1 // passes)
    max_iters = (_SMEM_BUDGET - 16) // (_smem_bytes(M, 32) - 16)
    splits = min(max(-(-_TARGET_CTAS // grid_x), 1), trips)
    iters = min(-(-trips // splits), max_iters)
    splits = -(-trips // iters)
    ws = (-(-grid_x // 4) * 4) * 4 + splits * M * N * 4 if splits > 1 else 0
    return {"threads": threads, "rows_per_warp": R, "passes": passes, "splits": splits, "grid_x": grid_x,
            "iters_per_split": iters, "smem_bytes": _smem_bytes(M, iters * 32), "workspace_bytes": ws}


# ---- the tensor-core variant (pyquant_packed_gemv_mma_plan) -------------------------------------------------------
_MMA_THREADS = 128  # kMmaThreads
_MMA_SMS = 132      # kMmaSms


def _mma_tg(M: int) -> int:
    return 4 if M <= 2 else 2


def _mma_mp(M: int) -> int:
    cw = 8 // _mma_tg(M)
    return -(-M // cw) * cw


def _mma_smem_bytes(M: int, steps: int) -> int:
    chunks = steps * (4 // _mma_tg(M))
    return M * chunks * _CHUNK_WORDS * 4 + _CHUNK_WORDS * 4 + 3 * steps * _mma_mp(M) * 4 + 16 + _MMA_THREADS * 32


@functools.lru_cache(maxsize=4096)
def plan_mma(M: int, N: int, K: int, group_size: int) -> Optional[dict]:
    """The launch the tensor-core GEMV (``pyquant_packed_gemv_mma_plan``) makes, or None where it declines the
    group size (grouped scales need ``group_size % 64 == 0`` for M <= 2, ``% 128 == 0`` for M = 3..8).

    Same keys as :func:`plan`; rows_per_warp is the rows of one warp (128 for M <= 2, else 64), passes is 1."""
    if not (1 <= M <= GEMV_MAX_M) or N < 1 or K < 1 or group_size < 1 or K % group_size:
        raise ValueError(f"plan_mma: M={M}, N={N}, K={K}, group_size={group_size}: expected 1 <= M <= "
                         f"{GEMV_MAX_M}, N >= 1, K >= 1 and a group size dividing K")
    tg = _mma_tg(M)
    ts = 4 // tg
    if K // group_size > 1 and group_size % (64 * ts):
        return None
    rows_cta = 4 * 16 * tg * 2
    grid_x = -(-N // rows_cta)
    total = -(-(-(-K // 64)) // ts)
    best = None
    for s in range(1, min(total, 8 * _MMA_SMS // grid_x + 1) + 1):
        it = -(-total // s)
        if -(-total // it) != s or _mma_smem_bytes(M, it) > _SMEM_BUDGET:
            continue
        ctas = grid_x * s
        cost = -(-ctas // _MMA_SMS) * (it + 2.0)
        if ctas < _MMA_SMS // 2:
            cost *= (_MMA_SMS // 2) / ctas
        if best is None or cost < best[0]:
            best = (cost, s, it)
    _, splits, iters = best if best is not None else (0.0, total, 1)
    ws = (-(-grid_x // 4) * 4) * 4 + splits * M * N * 4 if splits > 1 else 0
    return {"threads": _MMA_THREADS, "rows_per_warp": 16 * tg * 2, "passes": 1, "splits": splits,
            "grid_x": grid_x, "iters_per_split": iters, "smem_bytes": _mma_smem_bytes(M, iters),
            "workspace_bytes": ws}


def mma_enabled() -> bool:
    """Whether :func:`packed_gemv` runs the tensor-core kernel: opt-in (``PYQUANT_CUDA_GEMV=mma``) until a GPU run
    has passed its tests (tests/test_cuda_ext.py, ``gpu`` marker); the fp16 kernel is the default."""
    return os.environ.get("PYQUANT_CUDA_GEMV", "").strip().lower() == "mma"


_FORMATS_ASYM = ("int2-asym", "uniform-asym")


def _io_bytes(M, N, K, n_groups, asym, grid_x, ws):
    """Global bytes of one GEMV launch: weights once, scales (+ zeros), x once per CTA column (L2), y, and the
    split-K partials written and read once."""
    return (N * (-(-K // 64) * 16) + N * n_groups * 2 * (2 if asym else 1) + grid_x * M * K * 2 + M * N * 2
            + (2 * (ws - grid_x * 4) if ws else 0))


def _reduce_trips(M, rows_cta, threads, splits) -> float:
    """Trips of splitk_finish's loop per CTA: only the last CTA of a column runs it (averaged over the column's
    `splits` CTAs), M * rows_cta outputs over the CTA's threads; 0 without split-K."""
    return -(-(M * rows_cta) // threads) / splits if splits > 1 else 0.0


def _reduce_inner_trips(splits) -> List[float]:
    """Its inner loop over the splits, as nvcc compiles it: unrolled by 16, then a 4x remainder loop."""
    return [float(splits // 16), float((splits % 16) // 4)] if splits > 1 else [0.0, 0.0]


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int]) -> List[dict]:
    """Descriptors of the CUDA GEMV launches for the static roofline tool (schema: /work/BRIEF.md), one per kernel:
    the fp16 kernel (the default) and the tensor-core kernel (opt-in until GPU-verified, labelled so in its
    config; absent where it declines the group size).

    fmt: a pyquant format name (asymmetric ones -- names ending in "-asym" -- carry a zero-point tensor);
    group_size None = per-channel.  Template instances are chosen as csrc/packed_gemv.cu chooses them (x dtype is
    a runtime argument; scales are float16 as in the default spec).  nvcc_flags restrict each build to that M and
    kernel (PYQUANT_GEMV_ONLY_M, PYQUANT_GEMV_SIMT_ONLY / PYQUANT_GEMV_MMA_ONLY) to keep compiles short.

    Trip counts, per thread of a CTA (static.py, step 4), for every loop nvcc emits: the x staging loop, the row
    passes (fp16 kernel) or steps (tensor-core kernel), and the split-K reduction as main loops; the fp16 kernel's
    trip loop (``iters / 2`` per pass) and the reduction's loop over the splits as inner loops."""
    g = K if group_size is None else int(group_size)
    if g <= 0 or K % g:
        raise ValueError(f"group_size={group_size} is invalid for K={K}: a divisor of K, or None")
    if not 1 <= M <= GEMV_MAX_M or (g % 32 and g != K):
        return []  # the CUDA GEMV declines these calls (M > 8 runs the GEMM; group sizes not a multiple of 32)
    asym = str(fmt).endswith("-asym")
    n_groups = K // g
    calls = [_simt_call(M, N, K, asym, g, n_groups)]
    pm = plan_mma(M, N, K, g)
    if pm is not None:
        calls.append(_mma_call(M, N, K, asym, g, n_groups, pm))
    return calls


def _simt_call(M, N, K, asym, g, n_groups):
    pl = plan(M, N, K)
    mode = 0 if n_groups == 1 else (1 if (g % 64 == 0 and not asym) else 2)
    rows_cta = pl["threads"] // 32 * pl["rows_per_warp"] * pl["passes"]
    launch = {
        "name": "packed_gemv",
        "cuda": {"source": "csrc/packed_gemv.cu",
                 "kernel_regex": rf"packed_gemv_kernelILi{M}E6__halfLi{mode}E",
                 "nvcc_flags": ["-std=c++17", "-O3", f"-DPYQUANT_GEMV_ONLY_M={M}", "-DPYQUANT_GEMV_SIMT_ONLY=1"]},
        "grid": [pl["grid_x"], pl["splits"], 1],
        "threads_per_cta": pl["threads"],
        # main loops in address order: x staging, the row passes, the last CTA's split-K reduction; nested in them
        # the trip loop (unrolled by two: one SASS iteration = two 2048-weight trips) and the reduction's loops
        "loop_trips": [float(-(-(M * pl["iters_per_split"] * 32 * 4) // pl["threads"])), float(pl["passes"]),
                       _reduce_trips(M, rows_cta, pl["threads"], pl["splits"])],
        "inner_loop_trips": [pl["iters_per_split"] / 2.0] + _reduce_inner_trips(pl["splits"]),
        "weights": N * K,
        "bytes": int(_io_bytes(M, N, K, n_groups, asym, pl["grid_x"], pl["workspace_bytes"])),
        "mma_flops": 0,
    }
    cfg = (f"fp16 (default) threads={pl['threads']} rows/warp={pl['rows_per_warp']} passes={pl['passes']} "
           f"splitK={pl['splits']} iters={pl['iters_per_split']} rows/CTA={rows_cta} mode={mode}")
    return {"kernel": "packed_gemv", "backend": "cuda", "config": cfg, "launches": [launch]}


def _mma_call(M, N, K, asym, g, n_groups, pm):
    grouped = n_groups > 1
    tg = _mma_tg(M)
    ts, cw = 4 // tg, 8 // tg
    mh = -(-M // cw)
    steps, splits, gx = pm["iters_per_split"], pm["splits"], pm["grid_x"]
    rows_cta = 4 * pm["rows_per_warp"]
    stage_trips = -(-(M * steps * ts * 4) // _MMA_THREADS)
    launch = {
        "name": "packed_gemv_mma",
        "cuda": {"source": "csrc/packed_gemv.cu",
                 "kernel_regex": rf"packed_gemv_mma_kernelILi{M}E6__halfLi{(1 + int(asym)) if grouped else 0}E",
                 "nvcc_flags": ["-std=c++17", "-O3", f"-DPYQUANT_GEMV_ONLY_M={M}", "-DPYQUANT_GEMV_MMA_ONLY=1"]},
        "grid": [gx, splits, 1],
        "threads_per_cta": _MMA_THREADS,
        # main loops in address order: x staging, the step loop (unrolled by two: one SASS iteration = 2 steps),
        # and (split-K only) the last CTA's reduction; the reduction's inner loops run over the splits
        "loop_trips": [float(stage_trips), steps / 2.0, _reduce_trips(M, rows_cta, _MMA_THREADS, splits)],
        # inner loops: the staging loop's rolled copy loop for x tails (K % 16 != 0: the last split's CTAs, as if
        # every thread ran it; rows not 16-byte aligned, K % 8 != 0: every item, 16 values), then the reduction's
        "inner_loop_trips": [16.0 if K % 8 else (K % 16) / splits] + _reduce_inner_trips(splits),
        "weights": N * K,
        "bytes": int(_io_bytes(M, N, K, n_groups, asym, gx, pm["workspace_bytes"])),
        # every CTA runs `steps` steps of 16 MMAs per fragment (R = 2) and x block (MH) in each of its 4 warps
        "mma_flops": gx * splits * 4 * 2 * mh * 16 * steps * (2 * 16 * 8 * 16),
    }
    cfg = (f"mma.sync (opt-in, not GPU-verified) threads=128 rows/CTA={rows_cta} t-groups={tg} "
           f"splitK={splits} steps={steps} {'grouped' if grouped else 'per-channel'}")
    return {"kernel": "packed_gemv_mma", "backend": "cuda", "config": cfg, "launches": [launch]}


# ---- split-K workspace: zeroed once per (device, stream), re-armed by the kernel itself ---------------------------
_workspaces: dict = {}


def _current_stream(device) -> int:
    """The raw handle (``cudaStream_t`` as an int, = ``torch.cuda.Stream.cuda_stream``) of the current stream on
    ``device``: the key of its split-K workspace.  ``torch._C._cuda_getCurrentRawStream`` is what Triton and
    Inductor call before every launch (~0.1 us; ``torch.cuda.current_stream()`` builds a Stream object, ~2 us)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if raw is not None:
        return raw(index)
    return torch.cuda.current_stream(device).cuda_stream


def workspace(device, stream: int, nbytes: int):
    """A zero-initialized uint8 buffer of >= nbytes for the GEMV's split-K counters and partials on this
    (device, stream) -- stream is the raw handle, :func:`_current_stream`.  Allocated (and zeroed) only when it must
    grow; the kernel leaves its counters at zero, so the buffer is reused as is by every later call on that stream
    (no memset per call).  A buffer replaced by a larger one stays valid for whoever still holds it
    (:class:`BoundGemv`): launches on one stream run in order, so two buffers never race."""
    import torch

    key = (device, stream)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < nbytes:
        size = max(nbytes, 2 * (0 if buf is None else buf.numel()), 1 << 16)
        buf = torch.zeros(size, dtype=torch.uint8, device=device)
        _workspaces[key] = buf
    return buf


def packed_gemv(x, qweight, scale, zero_point, bias, group_size: int, code_offset: float, mma: Optional[bool] = None):
    """``pyquant._C.packed_gemv`` with the split-K workspace of x's device and current stream.

    mma: run the tensor-core kernel (None: :func:`mma_enabled`, i.e. ``PYQUANT_CUDA_GEMV=mma``; the fp16 kernel
    also runs where the tensor-core kernel declines the group size)."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"pyquant._C is unavailable: {status()[1]}")
    M, K = x.shape
    N = qweight.shape[0]
    ok = 1 <= M <= GEMV_MAX_M and N >= 1 and K >= 1 and group_size >= 1 and K % group_size == 0
    if mma is None:
        mma = mma_enabled() and ok and plan_mma(M, N, K, group_size) is not None
    ws = None
    pl = None
    if ok:
        pl = plan_mma(M, N, K, group_size) if mma else plan(M, N, K)
    if pl is not None and pl["workspace_bytes"]:
        ws = workspace(x.device, _current_stream(x.device), pl["workspace_bytes"])
    return ext.packed_gemv(x, qweight, scale, zero_point, bias, group_size, code_offset, ws, bool(mma))


class BoundGemv:
    """:func:`packed_gemv` for one weight and one M, everything but x fixed: ``BoundGemv(...)(x)`` equals
    ``packed_gemv(x, qweight, ...)`` for any x [M, K] on the weight's device (the binding still checks every
    argument).  Built once per (layer, M) by ``PackedLinear``'s fast path: the extension module, the launch plan's
    workspace size and the last stream's workspace are looked up here, not per call."""

    __slots__ = ("ext", "args", "group_size", "code_offset", "device", "ws_bytes", "mma", "_cur")

    def __init__(self, M: int, qweight, scale, zero_point, bias, group_size: int, code_offset: float):
        ext = load()
        if ext is None:
            raise RuntimeError(f"pyquant._C is unavailable: {status()[1]}")
        N, K = qweight.shape[0], scale.shape[1] * int(group_size)
        self.ext, self.args = ext, (qweight, scale, zero_point, bias)
        self.group_size, self.code_offset = int(group_size), float(code_offset)
        self.device = qweight.device
        ok = 1 <= M <= GEMV_MAX_M and N >= 1 and K >= 1 and group_size >= 1 and K % group_size == 0
        # the tensor-core kernel is chosen here, once per (layer, M): PYQUANT_CUDA_GEMV is read when the plan is bound
        self.mma = bool(ok and mma_enabled() and plan_mma(M, N, K, int(group_size)) is not None)
        pl = (plan_mma(M, N, K, int(group_size)) if self.mma else plan(M, N, K)) if ok else None
        self.ws_bytes = pl["workspace_bytes"] if pl is not None else 0
        self._cur = (None, None)  # (stream, its workspace): one tuple, so threads on two streams never mix them

    def __call__(self, x):
        ws = None
        if self.ws_bytes:
            stream = _current_stream(self.device)
            cur = self._cur
            if cur[0] != stream:  # first call, or another stream (CUDA-graph capture, a side stream)
                cur = (stream, workspace(self.device, stream, self.ws_bytes))
                self._cur = cur
            ws = cur[1]
        q, s, z, b = self.args
        return self.ext.packed_gemv(x, q, s, z, b, self.group_size, self.code_offset, ws, self.mma)

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

__all__ = ["load", "status", "source_dir", "sources", "jit_cuda_flags", "plan", "static_launches", "packed_gemv",
           "workspace", "BoundGemv"]

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


_FORMATS_ASYM = ("int2-asym", "uniform-asym")


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int]) -> List[dict]:
    """Descriptor of the CUDA GEMV launch for the static roofline tool (schema: /work/BRIEF.md, one candidate).

    fmt: a pyquant format name (asymmetric ones -- names ending in "-asym" -- carry a zero-point tensor);
    group_size None = per-channel.  The kernel's template instance is chosen as csrc/packed_gemv.cu chooses it
    (x dtype is a runtime argument of the kernel; scales are float16 as in the default spec).  nvcc_flags restrict
    the build to that M (PYQUANT_GEMV_ONLY_M) so only 9 kernels are compiled."""
    g = K if group_size is None else int(group_size)
    if g <= 0 or K % g:
        raise ValueError(f"group_size={group_size} is invalid for K={K}: a divisor of K, or None")
    if not 1 <= M <= GEMV_MAX_M or (g % 32 and g != K):
        return []  # the CUDA GEMV declines these calls (M > 8 runs the GEMM; group sizes not a multiple of 32)
    pl = plan(M, N, K)
    asym = str(fmt).endswith("-asym")
    mode = 0 if K // g == 1 else (1 if (g % 64 == 0 and not asym) else 2)
    rows_cta = pl["threads"] // 32 * pl["rows_per_warp"] * pl["passes"]
    weights = N * K
    n_groups = K // g
    scale_bytes = N * n_groups * 2 * (2 if asym else 1)
    ws = pl["workspace_bytes"]
    # x is read once per CTA column (grid_x times over its K slice), weights once, y written once; split-K
    # partials are written once and read once, counters touched twice per CTA
    x_bytes = pl["grid_x"] * M * K * 2
    bytes_moved = N * (-(-K // 64) * 16) + scale_bytes + x_bytes + M * N * 2 + (2 * (ws - pl["grid_x"] * 4) if ws else 0)
    launch = {
        "name": "packed_gemv",
        "cuda": {"source": "csrc/packed_gemv.cu",
                 "kernel_regex": rf"packed_gemv_kernelILi{M}E6__halfLi{mode}E",
                 "nvcc_flags": ["-std=c++17", "-O3", f"-DPYQUANT_GEMV_ONLY_M={M}"]},
        "grid": [pl["grid_x"], pl["splits"], 1],
        "threads_per_cta": pl["threads"],
        # the main loop is unrolled by two (one SASS iteration = two 2048-weight trips); averaged over the splits
        "loop_trips": pl["passes"] * (-(-(-(-K // 64)) // 32)) / pl["splits"] / 2.0,
        "weights": weights,
        "bytes": int(bytes_moved),
        "mma_flops": 0,
    }
    cfg = (f"threads={pl['threads']} rows/warp={pl['rows_per_warp']} passes={pl['passes']} "
           f"splitK={pl['splits']} iters={pl['iters_per_split']} rows/CTA={rows_cta} mode={mode}")
    return [{"kernel": "packed_gemv", "backend": "cuda", "config": cfg, "launches": [launch]}]


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


def packed_gemv(x, qweight, scale, zero_point, bias, group_size: int, code_offset: float):
    """``pyquant._C.packed_gemv`` with the split-K workspace of x's device and current stream."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"pyquant._C is unavailable: {status()[1]}")
    M, K = x.shape
    ws = None
    pl = plan(M, qweight.shape[0], K) if 1 <= M <= GEMV_MAX_M and qweight.shape[0] >= 1 else None
    if pl is not None and pl["workspace_bytes"]:
        ws = workspace(x.device, _current_stream(x.device), pl["workspace_bytes"])
    return ext.packed_gemv(x, qweight, scale, zero_point, bias, group_size, code_offset, ws)


class BoundGemv:
    """:func:`packed_gemv` for one weight and one M, everything but x fixed: ``BoundGemv(...)(x)`` equals
    ``packed_gemv(x, qweight, ...)`` for any x [M, K] on the weight's device (the binding still checks every
    argument).  Built once per (layer, M) by ``PackedLinear``'s fast path: the extension module, the launch plan's
    workspace size and the last stream's workspace are looked up here, not per call."""

    __slots__ = ("ext", "args", "group_size", "code_offset", "device", "ws_bytes", "_cur")

    def __init__(self, M: int, qweight, scale, zero_point, bias, group_size: int, code_offset: float):
        ext = load()
        if ext is None:
            raise RuntimeError(f"pyquant._C is unavailable: {status()[1]}")
        N, K = qweight.shape[0], scale.shape[1] * int(group_size)
        self.ext, self.args = ext, (qweight, scale, zero_point, bias)
        self.group_size, self.code_offset = int(group_size), float(code_offset)
        self.device = qweight.device
        self.ws_bytes = plan(M, N, K)["workspace_bytes"] if 1 <= M <= GEMV_MAX_M and N >= 1 else 0
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
        return self.ext.packed_gemv(x, q, s, z, b, self.group_size, self.code_offset, ws)

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

Python callers use ``load().packed_gemv(x, qweight, scale, zero_point, bias, group_size, code_offset)``; the binding
(csrc/binding.cpp) checks every argument itself.
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

__all__ = ["load", "status", "source_dir", "sources", "jit_cuda_flags"]

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


# ---- static-analysis launch descriptors (`pyquant bench static`) -------------------------------------------------
# Mirrors csrc/packed_gemv.cu: 128 threads, 16 rows per block, K tiles of 2048 * kU weights (kU = 2 for M <= 2),
# one staging loop (x -> shared memory) per tile of M * kTileK / 4 / 128 iterations.  Symmetric formats pass a
# runtime code offset, so only the scale dtype and M select the instantiation (x bf16, scales fp16 here).
_STATIC_ASYM = {"int2-asym"}
_STATIC_SYM = {"twn", "absmean", "int2-sym", "seq3", "seq4"}


def static_launches(M: int, N: int, K: int, fmt: str, group_size: Optional[int]) -> List[dict]:
    """The call ``pyquant._C.packed_gemv`` makes for x [M, K] (bf16) and a packed [N, K] weight of format ``fmt``
    (fp16 scales, ``group_size`` None = per-channel), in the schema of ``pyquant.bench.static``; [] where the kernel
    declines (M > 8, a group size that is not a multiple of 32).  Plain data: nothing is compiled or launched."""
    for name, v in (("M", M), ("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if fmt not in _STATIC_ASYM | _STATIC_SYM:
        raise ValueError(f"fmt={fmt!r}: expected one of {sorted(_STATIC_ASYM | _STATIC_SYM)}")
    gs = K if group_size is None else group_size
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1 or K % gs:
        raise ValueError(f"group_size={group_size!r} must be None or a positive divisor of K={K}")
    if M > 8 or (gs % 32 and gs != K):
        return []
    k_u = 2 if M <= 2 else 1
    tile_k = 2048 * k_u
    n_chunks = -(-K // 64)
    n_tiles = -(-n_chunks // (32 * k_u))
    G = K // gs
    has_zero = fmt in _STATIC_ASYM
    nbytes = N * n_chunks * 16 + N * G * 2 * (2 if has_zero else 1) + 2 * M * K + 2 * M * N
    smem = 4 * M * (32 * k_u * 68 + 64 * k_u)
    launch = dict(
        name="packed_gemv_kernel",
        cuda=dict(source="csrc/packed_gemv.cu", kernel_regex=rf"packed_gemv_kernelILi{M}E13__nv_bfloat166__halfEE",
                  nvcc_flags=["-std=c++17", "-O3"], weight_arg=1, dynamic_smem_bytes=smem),
        grid=[-(-N // 16), 1, 1], threads_per_cta=128, loop_trips=n_tiles, inner_loop_trips=[M * tile_k / 4 / 128],
        weights=N * K, bytes=nbytes, mma_flops=0)
    return [dict(kernel="packed_gemv_cuda", backend="cuda", config=f"M={M} kU={k_u} rows/block=16 tileK={tile_k}",
                 launches=[launch])]

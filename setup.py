"""pyquant build script: package layout + the optional CUDA extension ``pyquant._C``.

Project metadata and dependencies live in pyproject.toml only; this file decides *what* gets installed, not what is
required.

Environment switches (the one place they are documented)
---------------------------------------------------------
  PYQUANT_SKIP_CUDA_BUILD=1   never build the CUDA extension pyquant._C (pure Python + Triton install).
  PYQUANT_FORCE_CUDA_BUILD=1  build pyquant._C or fail the install loudly, with the reason (CI, release wheels).
  PYQUANT_CUDA_ARCH_LIST      ';'- or ','-separated compute capabilities to compile for; default "8.0;9.0a"
                              (-> sm_80 and sm_90a).  "+PTX" on an entry also embeds PTX (e.g. "9.0+PTX").
  MAX_JOBS                    parallel compile jobs (read by torch's BuildExtension / ninja).

Install from a checkout with:   pip install --no-build-isolation -e .
Why --no-build-isolation: with build isolation pip creates a throw-away build environment and installs the build
requirements into it; if that environment had to contain torch, pip would download a fresh multi-GB CUDA torch just
to run this file.  pyproject.toml therefore does not list torch as a build requirement, and this file imports torch
lazily and guarded: a build environment without torch (or with a CPU-only torch, or without nvcc) installs pyquant
without the extension and says so.  Without _C, pyquant falls back to Triton / pure-PyTorch kernels, and
pyquant._cuda_ext can JIT-build the same sources on a GPU machine (PYQUANT_JIT_BUILD=1).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
EXT_NAME = "pyquant._C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _packages() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """pyquant (+ its subpackages) from pyquant/, pyquant.kernels (+ subpackages) from the top-level kernels/.

    There is deliberately no top-level ``kernels`` package in site-packages.  The CUDA sources ship as package data
    under pyquant/csrc so that pyquant._cuda_ext can JIT-build them from a wheel install too.
    """
    packages = ["pyquant"] + [f"pyquant.{p}" for p in find_packages(where="pyquant")]
    package_dir = {"pyquant": "pyquant"}
    if (ROOT / "kernels").is_dir():
        packages += ["pyquant.kernels"] + [f"pyquant.kernels.{p}" for p in find_packages(where="kernels")]
        package_dir["pyquant.kernels"] = "kernels"
    package_data: dict[str, list[str]] = {}
    if (ROOT / CSRC).is_dir():
        packages.append("pyquant.csrc")  # data only (no __init__.py): the .cu/.cpp/.h sources for JIT builds
        package_dir["pyquant.csrc"] = CSRC
        package_data["pyquant.csrc"] = ["*.cu", "*.cpp", "*.h", "*.sh"]
    return packages, package_dir, package_data


def _notice(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\npyquant setup.py: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _gencode_flags(arch_list: str) -> list[str]:
    """"8.0;9.0a" -> ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]."""
    flags: list[str] = []
    for entry in arch_list.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        cc = entry[: -len("+PTX")] if ptx else entry
        num = cc.replace(".", "")
        if not (num[:-1].isdigit() if num.endswith(("a", "f")) else num.isdigit()):
            raise ValueError(f"PYQUANT_CUDA_ARCH_LIST entry {entry!r} is invalid: expected e.g. '8.0', '9.0a', '9.0+PTX'")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"PYQUANT_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags


def _cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for pyquant._C, or ([], {}) with a printed reason why it is not built."""
    force = _flag("PYQUANT_FORCE_CUDA_BUILD")
    if _flag("PYQUANT_SKIP_CUDA_BUILD"):
        if force:
            raise RuntimeError("PYQUANT_SKIP_CUDA_BUILD=1 and PYQUANT_FORCE_CUDA_BUILD=1 contradict each other")
        _notice("PYQUANT_SKIP_CUDA_BUILD=1: installing without the CUDA extension pyquant._C.")
        return [], {}

    reason = None
    try:
        import torch  # noqa: F401  (lazy: only needed to build the extension)
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # ImportError, or a broken torch install
        reason = (
            f"torch is not importable in the build environment ({type(exc).__name__}: {exc}); with pip's build "
            "isolation the build runs in a fresh environment without your torch, use `pip install "
            "--no-build-isolation -e .`"
        )
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} has no CUDA support (torch.version.cuda is None)"
        elif CUDA_HOME is None:
            reason = "the CUDA toolkit (nvcc) was not found; set CUDA_HOME or put nvcc on PATH"

    if reason is not None:
        if force:
            raise RuntimeError(f"PYQUANT_FORCE_CUDA_BUILD=1 but pyquant._C cannot be built: {reason}")
        _notice(
            f"building WITHOUT the CUDA extension pyquant._C: {reason}.\n"
            "pyquant still works (Triton / PyTorch kernels); `pyquant env` reports the extension status."
        )
        return [], {}

    arch_list = os.environ.get("PYQUANT_CUDA_ARCH_LIST", "8.0;9.0a")
    gencode = _gencode_flags(arch_list)
    sources = [f"{CSRC}/binding.cpp", f"{CSRC}/packed_gemv.cu"]  # relative paths: setuptools requires them
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={
            "cxx": ["-O3"],
            # no --use_fast_math: the kernel relies on IEEE fp32 (denormals kept, exact power-of-two scaling)
            "nvcc": ["-O3", "-lineinfo", *gencode],
        },
    )
    _notice(f"building the CUDA extension pyquant._C for {arch_list} ({' '.join(gencode)}), CUDA_HOME={CUDA_HOME}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages, package_dir, package_data = _packages()
ext_modules, cmdclass = _cuda_extension()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

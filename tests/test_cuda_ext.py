"""The CUDA extension ``pyquant._C`` (csrc/): compile checks, the lazy loader, and the decode GEMV's numbers.

Four layers, from no GPU to GPU:

* nvcc compile check of every ``csrc/*.cu`` for sm_80 and sm_90a, with ``-Xptxas -v`` parsed: every kernel
  instantiation must have 0 bytes of spills and stack frame (skipped without nvcc);
* ``pyquant._cuda_ext`` on a machine without CUDA: ``load()`` returns None, ``status()`` says why, nothing raises,
  the failure is logged once, and importing it touches no GPU;
* host emulation: ``csrc/packed_gemv.cu`` compiled by g++ with ``-DPYQUANT_HOST_EMULATION`` (csrc/host_emulation.h)
  runs the very same kernel body with every CUDA thread as a host thread, checked against a float64 reference
  built here from ``pyquant.formats.unpack_codes`` -- this catches indexing bugs (tiles, tails, groups of 32, the
  shared-memory layout, the warp reduction) without a GPU (skipped without g++ / CUDA headers); the tensor-core
  kernel runs there too, its mma.sync through an emulation of the documented fragment layout, on inputs where it
  is exact (so any indexing slip is a whole-unit error) and on random ones (accumulation bound MMA_ACC);
* ``@pytest.mark.gpu``: ``_C.packed_gemv`` on a real GPU against the same reference, plus bad-argument checks of
  the binding (skipped cleanly without CUDA).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyquant import _cuda_ext
from pyquant.formats import pack_codes, packed_cols, unpack_codes

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = {
    "sm_80": "-gencode=arch=compute_80,code=sm_80",
    "sm_90a": "-gencode=arch=compute_90a,code=sm_90a",
}
# packed_gemv.cu instantiates one kernel per (M in 1..8) x (scale: fp16, bf16, fp32) x (scale mode: per-channel,
# per-chunk, per-sub-chunk), and one tensor-core kernel per M x scale dtype x (per-channel, grouped, grouped with
# zero points); x's dtype is a runtime argument
EXPECTED_KERNELS = {"packed_gemv.cu": 8 * 3 * 3 + 8 * 3 * 3}
HAS_CUDA = torch.cuda.is_available()


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_include_dir() -> Path | None:
    nvcc = _nvcc()
    cands = [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []  # nvcc may be a wrapper script
    cands += [Path(h) / "include" for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    cands.append(Path("/usr/local/cuda/include"))
    for inc in cands:
        if (inc / "cuda_runtime.h").is_file() and (inc / "cuda_fp16.h").is_file():
            return inc
    return None


# ------------------------------------------------------------------------------------------------------------------
# shared reference
# ------------------------------------------------------------------------------------------------------------------
def _make_case(M, N, K, group_size, x_dtype, scale_dtype, asym, with_bias, seed, device="cpu"):
    """Fresh random inputs (never zeros): codes, packed weights, scales (+ zero points), bias, x."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), generator=g)
    qweight = pack_codes(codes)
    G = K // group_size
    scale = (torch.rand(N, G, generator=g) * 0.05 + 0.005).to(scale_dtype)
    zero = (torch.rand(N, G, generator=g) * 3.0).to(scale_dtype) if asym else None
    bias = torch.randn(N, generator=g).to(x_dtype) if with_bias else None
    x = torch.randn(M, K, generator=g).to(x_dtype)
    to = (lambda t: None if t is None else t.to(device))
    return to(x), to(qweight), to(scale), to(zero), to(bias)


def _reference(x, qweight, scale, zero, bias, group_size, code_offset):
    """float64 y = x @ ((c - z) * s)^T + bias, from unpack_codes; also sum |x| |w| for the accumulation bound."""
    K = x.shape[1]
    c = unpack_codes(qweight.cpu(), K).double()
    N, G = scale.shape
    z = zero.cpu().double() if zero is not None else torch.full((N, G), float(code_offset), dtype=torch.float64)
    s = scale.cpu().double()
    w = (c - z.repeat_interleave(group_size, 1)) * s.repeat_interleave(group_size, 1)
    xd = x.cpu().double()
    y = xd @ w.T
    if bias is not None:
        y = y + bias.cpu().double()
    return y, xd.abs() @ w.abs().T


def _folds(zero, code_offset) -> bool:
    """Whether the kernel folds the code offset into its dequantization (csrc/packed_gemv.cu: fold_zero)."""
    return zero is None and float(code_offset).is_integer() and 0 <= code_offset <= 3


def _fp16_mag(x, qweight, scale, zero, group_size, code_offset):
    """sum_k |x| |c - z~| |s|: what the kernel's fp16 sub-chunk accumulation error is proportional to."""
    K = x.shape[1]
    c = unpack_codes(qweight.cpu(), K).double()
    zt = float(code_offset) if _folds(zero, code_offset) else 0.0
    s = scale.cpu().double().abs().repeat_interleave(group_size, 1)
    return x.cpu().double().abs() @ ((c - zt).abs() * s).T


# The kernel's error bound (csrc/packed_gemv.cu, "fp16 accumulation, and its bound"): 17 fp16 roundings (u = 2^-11)
# of each 32-weight sub-chunk's partial sums, relative to sum |x| |c - z~| |s|, + fp32 flushes + the final rounding.
FP16_ACC = 17 * 2.0 ** -11


def _assert_close(y, x, qweight, scale, zero, bias, group_size, code_offset):
    ref, mag = _reference(x, qweight, scale, zero, bias, group_size, code_offset)
    y = y.cpu()
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(ref.shape)
    assert torch.isfinite(y).all(), "output has NaN/Inf (unwritten or poisoned elements)"
    # one ulp of the output dtype (the single final rounding) + fp16 sub-chunk accumulation + fp32 accumulation
    eps = torch.finfo(x.dtype).eps
    tol = eps * ref.abs() + FP16_ACC * _fp16_mag(x, qweight, scale, zero, group_size, code_offset) + 1e-5 * mag + 1e-6
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs off; worst err {err.max().item():.3e} "
        f"(tol there {tol.flatten()[err.argmax()].item():.3e})"
    )


# ------------------------------------------------------------------------------------------------------------------
# (a) nvcc compile check + ptxas resource usage
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ptxas_logs(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not CU_FILES:
        pytest.fail(f"no .cu files in {CSRC}")
    reused = _check_compile_logs()
    if reused is not None:
        return reused
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for cu in CU_FILES:  # both archs of a file compile in parallel (2-core CI)
        for sm, flag in ARCHS.items():
            cmd = [nvcc, "-c", "-o", str(out / f"{cu.stem}.{sm}.o"), flag, "-std=c++17", "-O3", "-Xptxas", "-v",
                   f"-I{CSRC}", str(cu)]
            procs[(cu.name, sm)] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                          text=True))
    logs = {}
    for key, (cmd, p) in procs.items():
        text, _ = p.communicate(timeout=1200)
        logs[key] = (p.returncode, " ".join(cmd), text)
    return logs


def _check_compile_logs():
    """The logs ``csrc/check_compile.sh`` kept in ``$PYQUANT_PTXAS_LOG_DIR`` (CI runs it just before the tests, with
    the same nvcc flags), when every (file, arch) is there and was compiled from the current source; else None."""
    import hashlib

    d = os.environ.get("PYQUANT_PTXAS_LOG_DIR")
    if not d:
        return None
    logs = {}
    for cu in CU_FILES:
        digest = hashlib.sha256(cu.read_bytes()).hexdigest()
        for sm in ARCHS:
            base = Path(d) / f"{cu.stem}.{sm}"
            try:
                rc = int(Path(f"{base}.rc").read_text().strip())
                sha = Path(f"{base}.sha256").read_text().strip()
                text = Path(f"{base}.log").read_text()
            except (OSError, ValueError):
                return None
            if sha != digest:
                return None
            logs[(cu.name, sm)] = (rc, f"bash csrc/check_compile.sh ({cu.name}, {sm}; log {base}.log)", text)
    return logs


def _ptxas_entries(text: str) -> dict:
    """kernel name -> {"regs": int, "stack": int, "spill_stores": int, "spill_loads": int} from -Xptxas -v."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            entries[current] = {}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            entries.setdefault(current, {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            entries[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            entries[current]["regs"] = int(m.group(1))
    return entries


@pytest.mark.parametrize("sm", sorted(ARCHS))
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_nvcc_compiles(ptxas_logs, cu, sm):
    rc, cmd, text = ptxas_logs[(cu, sm)]
    assert rc == 0, f"`{cmd}` failed:\n{text}"
    assert "error" not in text.lower(), text


@pytest.mark.parametrize("sm", sorted(ARCHS))
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_ptxas_no_spills_no_stack(ptxas_logs, cu, sm):
    rc, cmd, text = ptxas_logs[(cu, sm)]
    assert rc == 0, f"`{cmd}` failed:\n{text}"
    entries = _ptxas_entries(text)
    kernels = {k: v for k, v in entries.items() if "regs" in v}
    if cu in EXPECTED_KERNELS:
        assert len(kernels) == EXPECTED_KERNELS[cu], f"expected {EXPECTED_KERNELS[cu]} kernels, got {len(kernels)}"
    assert kernels, f"no kernels reported by ptxas for {cu}:\n{text}"
    assert "0 bytes spill stores" in text
    for name, info in entries.items():
        assert info.get("stack", 0) == 0, f"{name} [{sm}] uses a {info['stack']}-byte stack frame"
        assert info.get("spill_stores", 0) == 0 and info.get("spill_loads", 0) == 0, \
            f"{name} [{sm}] spills: {info}"
    for name, info in kernels.items():
        assert info["regs"] <= 255, f"{name} [{sm}] uses {info['regs']} registers"


# ------------------------------------------------------------------------------------------------------------------
# (b) the loader without CUDA
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_loader():
    _cuda_ext._reset()
    yield _cuda_ext
    _cuda_ext._reset()


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA path")
def test_loader_returns_none_with_reason_without_cuda(fresh_loader, monkeypatch):
    monkeypatch.delenv("PYQUANT_JIT_BUILD", raising=False)
    assert fresh_loader.load() is None
    ok, why = fresh_loader.status()
    assert ok is False
    assert why.startswith("not built") and ("torch has no CUDA" in why or "no GPU" in why), why
    # asking for a JIT build cannot help without a GPU: still None, with its own reason, never an exception
    assert fresh_loader.load(jit=True) is None
    ok, why = fresh_loader.status(jit=True)
    assert ok is False and why.startswith("JIT build not possible"), why


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA path")
def test_loader_env_switch_and_cache(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("PYQUANT_JIT_BUILD", "1")
    with caplog.at_level(logging.DEBUG, logger="pyquant"):
        for _ in range(3):
            assert fresh_loader.load() is None
            assert fresh_loader.status()[0] is False
    assert "JIT build not possible" in fresh_loader.status()[1]
    records = [r for r in caplog.records if r.name == "pyquant"]
    assert len(records) == 1, [r.getMessage() for r in records]  # outcome cached: logged once


def test_loader_reports_broken_extension(fresh_loader, monkeypatch, caplog):
    """An installed but unimportable _C (e.g. built against another torch) is a reason, not an exception."""
    import importlib

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "pyquant._C":
            raise ImportError("undefined symbol: _ZN3c104cuda9SomethingEv")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with caplog.at_level(logging.WARNING, logger="pyquant"):
        assert fresh_loader.load(jit=False) is None
        assert fresh_loader.load(jit=False) is None
    ok, why = fresh_loader.status(jit=False)
    assert not ok and why.startswith("pyquant._C failed to import") and "undefined symbol" in why
    assert len([r for r in caplog.records if r.name == "pyquant"]) == 1


def test_import_touches_no_gpu():
    code = (
        "import sys, torch, pyquant, pyquant._cuda_ext as c; "
        "assert 'pyquant._C' not in sys.modules; "
        "assert not torch.cuda.is_initialized(); "
        "c.status(); assert not torch.cuda.is_initialized(); print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_sources_and_jit_flags():
    srcs = _cuda_ext.sources()
    assert [Path(s).name for s in srcs] == ["binding.cpp", "packed_gemv.cu"]
    assert all(Path(s).is_file() for s in srcs)
    assert "-gencode=arch=compute_90a,code=sm_90a" in _cuda_ext.jit_cuda_flags((9, 0))
    assert "-gencode=arch=compute_80,code=sm_80" in _cuda_ext.jit_cuda_flags((8, 0))
    assert "-gencode=arch=compute_89,code=sm_89" in _cuda_ext.jit_cuda_flags((8, 9))
    assert not any("fast_math" in f for f in _cuda_ext.jit_cuda_flags((9, 0)))


# ------------------------------------------------------------------------------------------------------------------
# (c) host emulation of the kernel body (CPU)
# ------------------------------------------------------------------------------------------------------------------
_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("host emulation needs g++ and the CUDA headers (cuda_runtime.h, cuda_fp16.h)")
    so = tmp_path_factory.mktemp("emu") / "packed_gemv_emu.so"
    cmd = [cxx, "-x", "c++", "-std=c++20", "-O1", "-shared", "-fPIC", "-DPYQUANT_HOST_EMULATION", f"-I{inc}",
           f"-I{CSRC}", str(CSRC / "packed_gemv.cu"), "-o", str(so), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"`{' '.join(cmd)}` failed:\n{r.stderr}"
    lib = ctypes.CDLL(str(so))
    fn = lib.pyquant_packed_gemv_launch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int,
                                                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.pyquant_packed_gemv_plan.restype = ctypes.c_int
    lib.pyquant_packed_gemv_plan.argtypes = [ctypes.c_int] * 3 + [ctypes.POINTER(_Plan)]

    def run(x, qweight, scale, zero, bias, group_size, code_offset, y=None, workspace=None):
        M, K = x.shape
        N = qweight.shape[0]
        if y is None:
            y = torch.full((M, N), float("nan"), dtype=x.dtype)  # poisoned: every element must be written
        if workspace is None and 1 <= M <= 8 and N >= 1:
            need = _cuda_ext.plan(M, N, K)["workspace_bytes"]
            workspace = torch.zeros(max(need, 4), dtype=torch.uint8) if need else None
        ptr = (lambda t: None if t is None else t.data_ptr())
        rc = fn(ptr(x), ptr(qweight), ptr(scale), ptr(zero), ptr(bias), ptr(y), M, N, K, group_size,
                code_offset, _DT.get(x.dtype, 7), _DT.get(scale.dtype, 7), ptr(workspace),
                0 if workspace is None else workspace.numel(), None)
        return rc, y

    def plan(M, N, K):
        out = _Plan()
        rc = lib.pyquant_packed_gemv_plan(M, N, K, ctypes.byref(out))
        return rc, {f: getattr(out, f) for f, _ in _Plan._fields_}

    lp = lib.pyquant_packed_gemv_launch_plan
    lp.restype = ctypes.c_int
    lp.argtypes = list(fn.argtypes) + [ctypes.POINTER(_Plan)]

    def run_plan(x, qweight, scale, zero, bias, group_size, code_offset, plan_dict, workspace=None):
        M, K = x.shape
        N = qweight.shape[0]
        y = torch.full((M, N), float("nan"), dtype=x.dtype)
        pl = _Plan(**plan_dict)
        ptr = (lambda t: None if t is None else t.data_ptr())
        rc = lp(ptr(x), ptr(qweight), ptr(scale), ptr(zero), ptr(bias), ptr(y), M, N, K, group_size, code_offset,
                _DT.get(x.dtype, 7), _DT.get(scale.dtype, 7), ptr(workspace),
                0 if workspace is None else workspace.numel(), None, ctypes.byref(pl))
        return rc, y

    run.plan = plan
    run.launch_plan = run_plan

    # the tensor-core kernel: same arguments; its own plan (pyquant_packed_gemv_mma_plan, -1 = declined)
    mfn = lib.pyquant_packed_gemv_mma_launch
    mfn.restype = ctypes.c_int
    mfn.argtypes = list(fn.argtypes)
    mlp = lib.pyquant_packed_gemv_mma_launch_plan
    mlp.restype = ctypes.c_int
    mlp.argtypes = list(lp.argtypes)
    lib.pyquant_packed_gemv_mma_plan.restype = ctypes.c_int
    lib.pyquant_packed_gemv_mma_plan.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(_Plan)]

    def run_mma(x, qweight, scale, zero, bias, group_size, code_offset, plan_dict=None, workspace=None):
        M, K = x.shape
        N = qweight.shape[0]
        y = torch.full((M, N), float("nan"), dtype=x.dtype)
        pl = plan_dict if plan_dict is not None else _cuda_ext.plan_mma(M, N, K, group_size)
        if workspace is None and pl is not None and pl["workspace_bytes"]:
            workspace = torch.zeros(pl["workspace_bytes"], dtype=torch.uint8)
        ptr = (lambda t: None if t is None else t.data_ptr())
        args = (ptr(x), ptr(qweight), ptr(scale), ptr(zero), ptr(bias), ptr(y), M, N, K, group_size, code_offset,
                _DT.get(x.dtype, 7), _DT.get(scale.dtype, 7), ptr(workspace),
                0 if workspace is None else workspace.numel(), None)
        rc = mfn(*args) if plan_dict is None else mlp(*args, ctypes.byref(_Plan(**plan_dict)))
        return rc, y

    def mma_plan(M, N, K, group_size):
        out = _Plan()
        rc = lib.pyquant_packed_gemv_mma_plan(M, N, K, group_size, ctypes.byref(out))
        return rc, {f: getattr(out, f) for f, _ in _Plan._fields_}

    run.mma = run_mma
    run.mma_plan = mma_plan
    return run


class _Plan(ctypes.Structure):
    _fields_ = [("threads", ctypes.c_int), ("rows_per_warp", ctypes.c_int), ("passes", ctypes.c_int),
                ("splits", ctypes.c_int), ("grid_x", ctypes.c_int), ("iters_per_split", ctypes.c_int),
                ("smem_bytes", ctypes.c_size_t), ("workspace_bytes", ctypes.c_size_t)]


# (M, N, K, group_size, x dtype, scale dtype, asymmetric, bias, code_offset)
EMU_CASES = [
    (1, 20, 1000, 1000, torch.float16, torch.float16, False, True, 1.0),     # K % 64 = 40: masked chunk tail
    (1, 37, 4160, 32, torch.bfloat16, torch.float32, True, False, 0.0),     # 65 chunks: partial 2nd/3rd tile
    (2, 16, 8256, 64, torch.float16, torch.bfloat16, False, True, 1.5),     # M=2 tile of 4096, tail tile
    (3, 5, 1056, 32, torch.bfloat16, torch.bfloat16, True, True, 0.0),      # half-empty last chunk, N < 16
    (4, 48, 4096, 128, torch.float16, torch.float16, False, False, 2.0),
    (5, 17, 96, 96, torch.bfloat16, torch.float16, True, True, 0.0),        # group = K = 96 (not a power of 2)
    (6, 33, 2112, 96, torch.float16, torch.float32, False, True, 1.0),      # group 96: division, not shift
    (7, 9, 4160, 4160, torch.bfloat16, torch.bfloat16, False, False, 1.5),
    (8, 31, 4128, 32, torch.float16, torch.bfloat16, True, True, 0.0),      # M=8: 71.7 KB shared memory
    (8, 1, 40, 40, torch.bfloat16, torch.float32, False, True, 2.0),        # K < 64, N = 1
    (1, 70, 6208, 64, torch.bfloat16, torch.float16, False, True, 1.0),     # split-K 4 ways (4 trips), 2 CTAs
    (2, 9, 4160, 64, torch.float16, torch.float16, False, False, 1.3),      # odd offset: not folded, sum(x) path
    (3, 40, 64, 64, torch.float16, torch.bfloat16, False, True, 1.5),       # K = 64, z0 = 1.5: sum(x) path
]


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-"
                         f"{str(c[4])[6:]}-s{str(c[5])[6:]}-{'asym' if c[6] else 'sym'}{'-bias' if c[7] else ''}")
def test_emulated_kernel_matches_reference(emulated, case):
    M, N, K, gs, xdt, sdt, asym, with_bias, off = case
    x, qweight, scale, zero, bias = _make_case(M, N, K, gs, xdt, sdt, asym, with_bias, seed=M * 100003 + N * 101 + K)
    rc, y = emulated(x, qweight, scale, zero, bias, gs, off)
    assert rc == 0, f"launcher returned cudaError {rc}"
    _assert_close(y, x, qweight, scale, zero, bias, gs, off)


def _forced_plan(M, N, K, threads, passes, splits):
    """A consistent plan with the given threads / passes / splits (what the launcher would accept)."""
    R = _cuda_ext._rows_per_warp(M)
    trips = -(-(-(-K // 64)) // 32)
    iters = -(-trips // splits)
    assert -(-trips // iters) == splits, "splits must be reachable with equal trips per split"
    grid_x = -(-N // (threads // 32 * R * passes))
    ws = (-(-grid_x // 4) * 4) * 4 + splits * M * N * 4 if splits > 1 else 0
    return dict(threads=threads, rows_per_warp=R, passes=passes, splits=splits, grid_x=grid_x,
                iters_per_split=iters, smem_bytes=_cuda_ext._smem_bytes(M, iters * 32), workspace_bytes=ws)


# (M, N, K, group, threads, passes, splits, asym, code_offset): double-buffered multi-trip loops (odd and even trip
# counts), several row passes per CTA, and split-K with a partial last split, on shapes small enough to emulate
FORCED = [
    (1, 70, 6208, 64, 128, 2, 1, False, 1.0),     # 4 trips in one split: both buffers, 2 passes (rows 64..127 ragged)
    (3, 21, 6208, 32, 128, 3, 2, True, 0.0),      # 2 trips per split, per-sub scales + zero tensor, 3 passes
    (2, 40, 8256, 8256, 256, 1, 2, False, 1.5),   # 5 trips: splits of 3 and 2 (odd loop tail), per-channel
    (6, 19, 4160, 64, 128, 2, 1, False, 2.0),     # 3 trips, R = 2 rows per warp, 2 passes
]


@pytest.mark.parametrize("case", FORCED, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-t{c[4]}-p{c[5]}-s{c[6]}")
def test_emulated_forced_plans(emulated, case):
    M, N, K, gs, threads, passes, splits, asym, off = case
    x, qw, s, z, b = _make_case(M, N, K, gs, torch.bfloat16 if M % 2 else torch.float16, torch.float16, asym, True,
                                seed=N * 7 + K)
    pl = _forced_plan(M, N, K, threads, passes, splits)
    ws = torch.zeros(max(pl["workspace_bytes"], 4), dtype=torch.uint8) if pl["workspace_bytes"] else None
    first = None
    for _ in range(2):  # the same workspace twice: the kernel must re-arm its split-K counters itself
        rc, y = emulated.launch_plan(x, qw, s, z, b, gs, off, pl, workspace=ws)
        assert rc == 0, f"launcher returned cudaError {rc} for plan {pl}"
        _assert_close(y, x, qw, s, z, b, gs, off)
        if ws is not None:
            counters = ws[: pl["grid_x"] * 4].view(torch.int32)
            assert (counters == 0).all(), f"split-K counters not re-armed: {counters.tolist()}"
        if first is None:
            first = y.clone()
        else:
            assert torch.equal(y, first), "a second launch on the reused workspace gave a different result"


def test_emulated_launch_plan_rejects_inconsistent_plans(emulated):
    M, N, K, gs = 2, 40, 4160, 64
    x, qw, s, z, b = _make_case(M, N, K, gs, torch.float16, torch.float16, False, False, seed=1)
    good = _forced_plan(M, N, K, 128, 1, 3)
    ws = torch.zeros(good["workspace_bytes"], dtype=torch.uint8)
    assert emulated.launch_plan(x, qw, s, z, b, gs, 1.0, good, workspace=ws)[0] == 0
    for bad in (dict(threads=96), dict(rows_per_warp=4), dict(grid_x=1), dict(splits=2),
                dict(iters_per_split=2), dict(smem_bytes=good["smem_bytes"] - 16), dict(passes=0)):
        assert emulated.launch_plan(x, qw, s, z, b, gs, 1.0, {**good, **bad}, workspace=ws)[0] == 1, bad
    assert emulated.launch_plan(x, qw, s, z, b, gs, 1.0, good, workspace=ws[:-4])[0] == 1  # workspace too small
    assert emulated.launch_plan(x, qw, s, z, b, gs, 1.0, good, workspace=None)[0] == 1


PLAN_SHAPES = [(M, N, K) for M in (1, 2, 3, 4, 5, 8) for N, K in
               [(1, 40), (37, 4160), (1024, 4096), (4096, 4096), (4096, 14336), (14336, 4096), (128256, 4096),
                (1000, 100000), (8460, 64)]]


def test_python_plan_mirrors_the_launcher(emulated):
    """pyquant._cuda_ext.plan (used by static_launches and the workspace cache) == pyquant_packed_gemv_plan."""
    for M, N, K in PLAN_SHAPES:
        rc, c_plan = emulated.plan(M, N, K)
        assert rc == 0
        assert c_plan == _cuda_ext.plan(M, N, K), (M, N, K)
    assert emulated.plan(9, 16, 64)[0] == 1 and emulated.plan(1, 0, 64)[0] == 1


def test_plan_fills_the_gpu_and_bounds_shared_memory():
    for M, N, K in PLAN_SHAPES:
        pl = _cuda_ext.plan(M, N, K)
        rows = pl["grid_x"] * pl["passes"] * pl["threads"] // 32 * pl["rows_per_warp"]
        trips = -(-(-(-K // 64)) // 32)
        assert rows >= N and pl["splits"] * pl["iters_per_split"] >= trips
        assert pl["smem_bytes"] <= 100 * 1024 + 16
        assert (pl["splits"] > 1) == (pl["workspace_bytes"] > 0)
    assert _cuda_ext.plan(1, 1024, 4096)["splits"] > 1  # small N: split K rather than leave SMs idle
    big = _cuda_ext.plan(1, 4096, 14336)
    assert big["grid_x"] * big["splits"] >= 132


@pytest.mark.parametrize("fmt,group", [("twn", None), ("int2-asym", 128), ("absmean", 32), ("seq4", 64)])
def test_static_launches_schema(fmt, group):
    for M, N, K in [(1, 4096, 14336), (4, 14336, 4096), (8, 1024, 4096)]:
        calls = _cuda_ext.static_launches(M, N, K, fmt, group)
        g = K if group is None else group
        pm = _cuda_ext.plan_mma(M, N, K, g)
        assert len(calls) == (2 if pm is not None else 1)
        if pm is not None:  # the tensor-core kernel, labelled opt-in
            mc = calls[1]
            assert mc["kernel"] == "packed_gemv_mma" and "opt-in" in mc["config"]
            (ml,) = mc["launches"]
            assert ml["grid"] == [pm["grid_x"], pm["splits"], 1] and ml["threads_per_cta"] == 128
            grouped = K // g > 1
            mmode = (2 if fmt.endswith("-asym") else 1) if grouped else 0
            mangled = (f"_ZN7pyquant47_GLOBAL__N__0_14packed_gemv_cu22packed_gemv_mma_kernelILi{M}E6__halfLi"
                       f"{mmode}EEEvNS0_6ParamsE")
            assert re.search(ml["cuda"]["kernel_regex"], mangled), (ml["cuda"]["kernel_regex"], mangled)
            assert "-DPYQUANT_GEMV_MMA_ONLY=1" in ml["cuda"]["nvcc_flags"]
            assert len(ml["loop_trips"]) == 3 and ml["loop_trips"][1] == pm["iters_per_split"] / 2
            assert (ml["loop_trips"][2] > 0) == (pm["splits"] > 1) and len(ml["inner_loop_trips"]) == 3
            tg = 4 if M <= 2 else 2
            assert ml["mma_flops"] == pm["grid_x"] * pm["splits"] * 4 * 2 * -(-M // (8 // tg)) * 16 \
                * pm["iters_per_split"] * 4096
            assert ml["weights"] == N * K and ml["bytes"] >= N * K // 4
        call = calls[0]
        assert call["backend"] == "cuda" and call["kernel"] == "packed_gemv" and call["config"]
        (ln,) = call["launches"]
        pl = _cuda_ext.plan(M, N, K)
        assert ln["grid"] == [pl["grid_x"], pl["splits"], 1] and ln["threads_per_cta"] == pl["threads"]
        assert ln["cuda"]["source"] == "csrc/packed_gemv.cu" and (CSRC / "packed_gemv.cu").is_file()
        mode = 0 if group is None else (1 if group % 64 == 0 and not fmt.endswith("-asym") else 2)
        mangled = f"_ZN7pyquant47_GLOBAL__N__0_14packed_gemv_cu18packed_gemv_kernelILi{M}E6__halfLi{mode}EEEvNS0_6ParamsE"
        assert re.search(ln["cuda"]["kernel_regex"], mangled), (ln["cuda"]["kernel_regex"], mangled)
        assert f"-DPYQUANT_GEMV_ONLY_M={M}" in ln["cuda"]["nvcc_flags"]
        assert ln["weights"] == N * K and ln["bytes"] >= N * K // 4
        assert len(ln["loop_trips"]) == 3 and ln["loop_trips"][1] == pl["passes"] and ln["loop_trips"][0] >= 1
        assert ln["inner_loop_trips"][0] == pl["iters_per_split"] / 2 and len(ln["inner_loop_trips"]) == 3
        assert ln["mma_flops"] == 0
    with pytest.raises(ValueError, match="group_size"):
        _cuda_ext.static_launches(1, 64, 100, "twn", 48)


def test_emulated_kernel_ignores_garbage_past_k(emulated):
    """x and codes past K must not matter: x is masked to 0 there, whatever the (zero) padding bytes hold."""
    M, N, K, gs = 2, 16, 1000, 1000
    x, qweight, scale, zero, bias = _make_case(M, N, K, gs, torch.float16, torch.float16, False, False, seed=7)
    dirty = qweight.clone()
    dirty[:, K // 4:] = 0xFF  # codes 3 in the padding bytes (the layout promises zeros; the kernel must not care)
    rc, y = emulated(x, dirty, scale, zero, bias, gs, 1.0)
    assert rc == 0
    _assert_close(y, x, qweight, scale, zero, bias, gs, 1.0)


def test_emulated_launcher_rejects_bad_arguments(emulated):
    x, qweight, scale, zero, bias = _make_case(1, 16, 256, 64, torch.float16, torch.float16, False, False, seed=3)
    invalid = 1  # cudaErrorInvalidValue
    assert emulated(x, qweight, scale, zero, bias, 48, 1.0)[0] == invalid  # group not a multiple of 32 (nor K)
    assert emulated(x, qweight, scale, zero, bias, 96, 1.0)[0] == invalid  # does not divide K
    assert emulated(x.float(), qweight, scale, zero, bias, 64, 1.0)[0] == invalid  # fp32 x
    x9 = torch.randn(9, 256).half()
    assert emulated(x9, qweight, scale, zero, bias, 64, 1.0, y=torch.empty(9, 16).half())[0] == invalid  # M = 9
    buf = torch.zeros(qweight.numel() + 16, dtype=torch.uint8)
    off = (16 - buf.data_ptr() % 16) % 16 + 1  # a deliberately misaligned copy of qweight
    mis = buf[off:off + qweight.numel()].view(qweight.shape)
    mis.copy_(qweight)
    assert mis.data_ptr() % 16 != 0
    assert emulated(x, mis, scale, zero, bias, 64, 1.0)[0] == invalid


# ------------------------------------------------------------------------------------------------------------------
# (c2) the tensor-core kernel (packed_gemv_mma_kernel) through the same host emulation
# ------------------------------------------------------------------------------------------------------------------
# Its fp32 MMA accumulation carries the 1024 * b bias terms of the LOP3 dequantization (csrc/packed_gemv.cu,
# "Tensor-core decode kernel"): per step 16 MMAs, each rounding a running sum of at most 2 * 1027 * sum |x'|, i.e.
# 16 * 2054 * 2^-24 ~ 2^-9 relative to sum_k |x| |s|; 2^-8 leaves room for the hardware's truncating adds.
MMA_ACC = 2.0 ** -8


def _assert_close_mma(y, x, qweight, scale, zero, bias, group_size, code_offset, exact=False):
    ref, mag = _reference(x, qweight, scale, zero, bias, group_size, code_offset)
    y = y.cpu()
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(ref.shape)
    assert torch.isfinite(y).all(), "output has NaN/Inf (unwritten or poisoned elements)"
    eps = torch.finfo(x.dtype).eps
    babs = 0.0 if bias is None else bias.double().abs()
    if exact:  # every product and sum is exact: only the final rounding (and the fp32 bias add) remain
        tol = eps * ref.abs() + 2.0 ** -22 * (ref.abs() + babs) + 1e-12
    else:
        s = scale.cpu().double().abs().repeat_interleave(group_size, 1)
        tol = eps * ref.abs() + MMA_ACC * (x.cpu().double().abs() @ s.T) + 1e-5 * mag + 1e-6
    err = (y.double() - ref).abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs off; worst err {err.max().item():.3e} "
        f"(tol there {tol.flatten()[err.argmax()].item():.3e})"
    )


def _exact_case(M, N, K, group_size, x_dtype, scale_dtype, asym, with_bias, seed):
    """Inputs on which the tensor-core kernel is exact: x in {-1, 0, 1} * 2^a (a per row of x), power-of-two scales,
    zero points in multiples of 0.5 -- every product and partial sum is then a representable fp32 value, so any
    indexing slip (a code met with the wrong x, a wrong scale or zero point) shows as a whole-unit error."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), generator=g)
    G = K // group_size
    scale = torch.pow(2.0, -torch.randint(3, 9, (N, G), generator=g).double()).to(scale_dtype)
    zero = (torch.randint(0, 7, (N, G), generator=g) * 0.5).to(scale_dtype) if asym else None
    bias = (torch.randint(-64, 64, (N,), generator=g) / 8.0).to(x_dtype) if with_bias else None
    x = (torch.randint(-1, 2, (M, K), generator=g).double()
         * torch.pow(2.0, torch.randint(-6, 7, (M, 1), generator=g).double())).to(x_dtype)
    return x, pack_codes(codes), scale, zero, bias


# (M, N, K, group_size, x dtype, scale dtype, asymmetric, bias, code_offset); group sizes the kernel takes: per
# channel, or a multiple of 64 (M <= 2) / 128 (M >= 3)
MMA_CASES = [
    (1, 70, 1000, 1000, torch.float16, torch.float16, False, True, 1.0),     # K % 64 = 40, rows 70 of a 512 tile
    (1, 37, 4160, 64, torch.bfloat16, torch.float32, True, False, 0.0),     # zero tensor, g64, split-K
    (2, 530, 4096, 128, torch.float16, torch.bfloat16, False, True, 1.5),   # 2 CTA columns, z0 = 1.5 folded
    (3, 40, 1280, 128, torch.bfloat16, torch.bfloat16, True, True, 0.0),    # t-groups of 2 lanes, M = 3 of 4
    (4, 48, 4096, 4096, torch.float16, torch.float16, False, False, 2.0),
    (5, 17, 96, 96, torch.bfloat16, torch.float16, True, True, 0.0),        # M > 4: two MMAs per fragment; K < 128
    (8, 300, 2176, 128, torch.float16, torch.bfloat16, True, True, 0.0),    # 17 steps, two CTA columns
    (8, 1, 40, 40, torch.bfloat16, torch.float32, False, True, 2.0),        # K < 64, N = 1
    (6, 33, 2304, 256, torch.float16, torch.float32, False, True, 1.0),
]


def _mma_id(c):
    return (f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-{str(c[4])[6:]}-s{str(c[5])[6:]}-{'asym' if c[6] else 'sym'}"
            f"{'-bias' if c[7] else ''}")


@pytest.mark.parametrize("case", MMA_CASES, ids=_mma_id)
def test_emulated_mma_kernel_exact(emulated, case):
    M, N, K, gs, xdt, sdt, asym, with_bias, off = case
    x, qweight, scale, zero, bias = _exact_case(M, N, K, gs, xdt, sdt, asym, with_bias, seed=M * 7 + N * 13 + K)
    rc, y = emulated.mma(x, qweight, scale, zero, bias, gs, off)
    assert rc == 0, f"launcher returned cudaError {rc}"
    _assert_close_mma(y, x, qweight, scale, zero, bias, gs, off, exact=True)


@pytest.mark.parametrize("case", MMA_CASES[1::2], ids=_mma_id)
def test_emulated_mma_kernel_matches_reference(emulated, case):
    M, N, K, gs, xdt, sdt, asym, with_bias, off = case
    x, qweight, scale, zero, bias = _make_case(M, N, K, gs, xdt, sdt, asym, with_bias, seed=M * 100003 + N * 101 + K)
    x[:, ::7] *= 1e-3  # a wide dynamic range within each step: the per-step scale must keep the small ones
    rc, y = emulated.mma(x, qweight, scale, zero, bias, gs, off)
    assert rc == 0, f"launcher returned cudaError {rc}"
    _assert_close_mma(y, x, qweight, scale, zero, bias, gs, off)


def _forced_mma_plan(M, N, K, splits):
    tg = 4 if M <= 2 else 2
    total = -(-(-(-K // 64)) // (4 // tg))
    iters = -(-total // splits)
    assert -(-total // iters) == splits, "splits must be reachable with equal steps per split"
    grid_x = -(-N // (4 * 16 * tg * 2))
    ws = (-(-grid_x // 4) * 4) * 4 + splits * M * N * 4 if splits > 1 else 0
    return dict(threads=128, rows_per_warp=16 * tg * 2, passes=1, splits=splits, grid_x=grid_x, iters_per_split=iters,
                smem_bytes=_cuda_ext._mma_smem_bytes(M, iters), workspace_bytes=ws)


# (M, N, K, group, splits, asym, code_offset): the double-buffered step loop with odd and even step counts, a
# partial last split (clamped chunks), and split-K twice on one workspace (the counters must re-arm)
MMA_FORCED = [
    (1, 70, 6208, 64, 3, False, 1.0),     # 97 steps: splits of 33, 33, 31 (odd loop tails)
    (2, 20, 4096, 128, 1, True, 0.0),     # 64 steps in one CTA, grouped zero tensor
    (4, 40, 8448, 8448, 2, False, 1.5),   # 33 steps: 17 + 16, per-channel
    (7, 19, 2560, 128, 2, True, 0.0),     # 10 steps: 5 + 5
]


@pytest.mark.parametrize("case", MMA_FORCED, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-g{c[3]}-s{c[4]}")
def test_emulated_mma_forced_plans(emulated, case):
    M, N, K, gs, splits, asym, off = case
    x, qw, s, z, b = _exact_case(M, N, K, gs, torch.bfloat16 if M % 2 else torch.float16, torch.float16, asym, True,
                                 seed=N * 7 + K)
    pl = _forced_mma_plan(M, N, K, splits)
    ws = torch.zeros(max(pl["workspace_bytes"], 4), dtype=torch.uint8) if pl["workspace_bytes"] else None
    first = None
    for _ in range(2):
        rc, y = emulated.mma(x, qw, s, z, b, gs, off, plan_dict=pl, workspace=ws)
        assert rc == 0, f"launcher returned cudaError {rc} for plan {pl}"
        _assert_close_mma(y, x, qw, s, z, b, gs, off, exact=True)
        if ws is not None:
            assert (ws[: pl["grid_x"] * 4].view(torch.int32) == 0).all(), "split-K counters not re-armed"
        if first is None:
            first = y.clone()
        else:
            assert torch.equal(y, first)


def test_emulated_mma_plan_mirrors_and_declines(emulated):
    for M, N, K in PLAN_SHAPES:
        for gs in (K, 64, 128, 32):
            if K % gs:
                continue
            rc, c_plan = emulated.mma_plan(M, N, K, gs)
            py = _cuda_ext.plan_mma(M, N, K, gs)
            if py is None:
                assert rc == -1, (M, N, K, gs)
                continue
            assert rc == 0 and c_plan == py, (M, N, K, gs, c_plan, py)
            assert py["smem_bytes"] <= 100 * 1024 + 16
            assert (py["splits"] > 1) == (py["workspace_bytes"] > 0)
    # one wave on the large shapes: enough CTAs for every SM's bandwidth share, not more than one per SM
    for M in (1, 4, 8):
        for N, K in ((4096, 14336), (14336, 4096)):
            pl = _cuda_ext.plan_mma(M, N, K, 128)
            assert 66 <= pl["grid_x"] * pl["splits"] <= 132, (M, N, K, pl)
    assert _cuda_ext.plan_mma(1, 64, 4096, 32) is None and _cuda_ext.plan_mma(3, 64, 4096, 64) is None
    x, qw, s, z, b = _make_case(3, 16, 256, 64, torch.float16, torch.float16, False, False, seed=3)
    assert emulated.mma(x, qw, s, z, b, 64, 1.0, plan_dict=None)[0] == 1  # declined group size: an error code
    good = _forced_mma_plan(3, 16, 256, 1)
    x, qw, s, z, b = _make_case(3, 16, 256, 128, torch.float16, torch.float16, False, False, seed=3)
    assert emulated.mma(x, qw, s, z, b, 128, 1.0, plan_dict=good)[0] == 0
    for bad in (dict(threads=256), dict(rows_per_warp=128), dict(grid_x=2), dict(splits=2), dict(passes=2),
                dict(smem_bytes=good["smem_bytes"] - 16)):
        assert emulated.mma(x, qw, s, z, b, 128, 1.0, plan_dict={**good, **bad})[0] == 1, bad
    assert emulated.mma(x.float(), qw, s, z, b, 128, 1.0)[0] == 1  # fp32 x


# ------------------------------------------------------------------------------------------------------------------
# (d) the real thing, on a GPU
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ext():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    mod = _cuda_ext.load(jit=True)
    if mod is None:
        pytest.skip(f"pyquant._C unavailable: {_cuda_ext.status()[1]}")
    return mod


def _poisoned_gemv(ext, x, qweight, scale, zero, bias, gs, off):
    """Fill the allocator's next block with NaN first, so unwritten outputs of the binding's empty() show."""
    M, N = x.shape[0], qweight.shape[0]
    poison = torch.full((M, N), float("nan"), dtype=x.dtype, device=x.device)
    del poison
    y = _cuda_ext.packed_gemv(x, qweight, scale, zero, bias, gs, off)  # + this stream's split-K workspace
    torch.cuda.synchronize()
    return y


GPU_SHAPES = [(4096, 32), (4096, 128), (4096, 4096), (4160, 32), (4160, 4160), (1000, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("M", range(1, 9))
@pytest.mark.parametrize("K,gs", GPU_SHAPES, ids=[f"K{k}-g{g}" for k, g in GPU_SHAPES])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("asym,with_bias", [(False, False), (True, True), (False, True), (True, False)],
                         ids=["sym", "asym-bias", "sym-bias", "asym"])
def test_packed_gemv_matches_reference(ext, M, K, gs, x_dtype, asym, with_bias):
    N = 272  # 17 blocks of 16 rows
    sdt = [torch.float16, torch.bfloat16, torch.float32][(M + K // gs) % 3]
    off = 0.0 if asym else [1.0, 1.5, 2.0][M % 3]
    x, qweight, scale, zero, bias = _make_case(M, N, K, gs, x_dtype, sdt, asym, with_bias,
                                               seed=M * 7919 + K * 31 + gs, device="cuda")
    y = _poisoned_gemv(ext, x, qweight, scale, zero, bias, gs, off)
    _assert_close(y, x, qweight, scale, zero, bias, gs, off)


MMA_GPU_SHAPES = [(4096, 128), (4096, 4096), (4160, 4160), (1000, 1000), (2304, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("M", range(1, 9))
@pytest.mark.parametrize("K,gs", MMA_GPU_SHAPES, ids=[f"K{k}-g{g}" for k, g in MMA_GPU_SHAPES])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("asym,with_bias", [(False, False), (True, True), (False, True)],
                         ids=["sym", "asym-bias", "sym-bias"])
def test_packed_gemv_mma_matches_reference(ext, M, K, gs, x_dtype, asym, with_bias):
    """The tensor-core kernel on the GPU: this is what confirms its mma.sync fragment layout (the host emulation
    follows the documented one); until it passes on a GPU the kernel stays opt-in (PYQUANT_CUDA_GEMV=mma)."""
    N = 1100  # 3 CTA columns of 512 rows (M <= 2) / 5 of 256, ragged
    sdt = [torch.float16, torch.bfloat16, torch.float32][(M + K // gs) % 3]
    off = 0.0 if asym else [1.0, 1.5, 2.0][M % 3]
    for exact in (True, False):
        maker = _exact_case if exact else (lambda *a, seed: _make_case(*a, seed=seed))
        x, qweight, scale, zero, bias = maker(M, N, K, gs, x_dtype, sdt, asym, with_bias, seed=M * 7919 + K * 31 + gs)
        x, qweight, scale = x.cuda(), qweight.cuda(), scale.cuda()
        zero = None if zero is None else zero.cuda()
        bias = None if bias is None else bias.cuda()
        poison = torch.full((M, N), float("nan"), dtype=x.dtype, device="cuda")
        del poison
        y = _cuda_ext.packed_gemv(x, qweight, scale, zero, bias, gs, off, mma=True)
        torch.cuda.synchronize()
        _assert_close_mma(y, x, qweight, scale, zero, bias, gs, off, exact=exact)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
def test_packed_gemv_model_shape_and_side_stream(ext, M):
    """A Llama-3-8B down_proj sized GEMV (K = 14336, N = 4096) on a non-default stream."""
    N, K, gs = 4096, 14336, 128
    x, qweight, scale, zero, bias = _make_case(M, N, K, gs, torch.bfloat16, torch.float16, False, False,
                                               seed=11, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = _cuda_ext.packed_gemv(x, qweight, scale, zero, bias, gs, 1.0)
        y2 = _cuda_ext.packed_gemv(x, qweight, scale, zero, bias, gs, 1.0)  # workspace re-armed by the kernel
    s.synchronize()
    _assert_close(y, x, qweight, scale, zero, bias, gs, 1.0)
    assert torch.equal(y, y2)
    pl = _cuda_ext.plan(M, N, K)
    if pl["splits"] > 1:
        ws = _cuda_ext._workspaces[(x.device, s.cuda_stream)]  # keyed by the raw stream handle
        assert (ws[: pl["grid_x"] * 4].view(torch.int32) == 0).all()
        with pytest.raises(ValueError, match="needs a zero-initialized workspace"):
            ext.packed_gemv(x, qweight, scale, zero, bias, gs, 1.0)


@pytest.mark.gpu
def test_packed_gemv_bad_arguments_name_the_argument(ext):
    M, N, K, gs = 2, 64, 256, 64
    x, qw, s, z, b = _make_case(M, N, K, gs, torch.float16, torch.float16, True, True, seed=5, device="cuda")
    ok = dict(x=x, qweight=qw, scale=s, zero_point=z, bias=b, group_size=gs, code_offset=0.0)
    assert ext.packed_gemv(**ok).shape == (M, N)

    def bad(match, **changes):
        with pytest.raises((RuntimeError, ValueError), match=match):
            ext.packed_gemv(**{**ok, **changes})

    bad(r"x must be float16 or bfloat16", x=x.float())
    bad(r"x must be a CUDA tensor", x=x.cpu())
    bad(r"x has M=9 rows", x=torch.randn(9, K, device="cuda", dtype=torch.float16))
    bad(r"x must be 2-D", x=x[0])
    bad(r"x must be contiguous", x=torch.randn(K, M, device="cuda", dtype=torch.float16).t())
    bad(r"qweight has 32 columns.*packed_cols", qweight=qw[:, :32].contiguous())
    bad(r"qweight must be uint8", qweight=qw.to(torch.int8))
    bad(r"qweight must be a CUDA tensor", qweight=qw.cpu())
    bad(r"scale must have shape \[N, K/group_size\] = \[64, 4\]", scale=s[:, :2].contiguous())
    bad(r"scale must be float16, bfloat16 or float32", scale=s.double())
    bad(r"zero_point must have scale's dtype", zero_point=z.float())
    bad(r"bias must have shape \[N\] = \[64\]", bias=b[:10])
    bad(r"bias must have x's dtype", bias=b.float())
    bad(r"group_size=48 must be a positive divisor of K=256", group_size=48)
    bad(r"group_size=\d+ must be a multiple of 32", x=torch.randn(M, 240, device="cuda", dtype=torch.float16),
        qweight=pack_codes(torch.randint(0, 4, (N, 240))).cuda(), scale=torch.rand(N, 5, device="cuda").half(),
        zero_point=None, group_size=48)
    bad(r"code_offset=.* must be finite", code_offset=float("nan"))
    buf = torch.zeros(qw.numel() + 16, dtype=torch.uint8, device="cuda")
    mis = buf[1:1 + qw.numel()].view(qw.shape)
    mis.copy_(qw)
    bad(r"16-byte aligned", qweight=mis)
    assert packed_cols(K) == qw.shape[1]

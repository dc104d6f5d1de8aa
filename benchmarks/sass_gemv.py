"""SASS instruction count of the Triton GEMV (M <= 8) per config, compiled ahead of time for sm_90 -- no GPU needed.

A quick, self-contained check used while building ``_packed_gemv_kernel`` (the full roofline report is
``pyquant bench static``).  For each candidate call of ``kernels.packed_matmul.static_launches`` it compiles the
launch with Triton's AOT compiler (the JIT's 16-divisibility specialization applied), disassembles the cubin with
the ``cuobjdump`` bundled in the triton wheel, takes the largest loop (backward branch) as the main loop and reports

    instr/weight = (loop instructions x loop_trips + instructions outside the loop) x threads x CTAs / weights

plus registers, spill (local) bytes, the instruction mix of the loop and the widest packed-weight load, and a
predicted speedup over cuBLAS bf16 with the H200 figures below (issue rate: 132 SMs x 128 lanes x 1.98 GHz;
4.0e12 B/s HBM; cuBLAS bf16 taken as memory-bound at 2 bytes per weight), with a crude occupancy discount (grids
of fewer than 4 warps per SM, or with too few weight bytes in flight for Little's law, get the matching fraction of
the issue rate / bandwidth).  Predicted, not measured.

    python benchmarks/sass_gemv.py --M 1 4 8 --shape 4096x14336 --fmt twn --group 128 --configs "BLOCK_N=256 WORDS=8"
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ISSUE_PER_S = 132 * 128 * 1.98e9
HBM_BPS = 4.0e12
_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def compile_launch(launch: dict, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = launch["triton"]
    fn = t["fn"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in t.get("divisible_by_16", ())}
    src = ASTSource(fn=fn, signature=t["signature"], attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in t["constexprs"].items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=t["num_warps"], num_stages=t["num_stages"]))


_CACHE: dict = {}


def analyse(launch: dict) -> dict:
    """Compile (cached: SPLIT_K > 1 variants share one compile, their loops are identical) and count."""
    t = launch["triton"]
    consts = dict(t["constexprs"])
    if consts.get("SPLIT_K", 1) > 1:
        consts["SPLIT_K"] = 2
    key = (t["fn"].__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), t["num_warps"],
           tuple(t.get("divisible_by_16", ())))
    if key not in _CACHE:
        _CACHE[key] = _analyse_compiled(compile_launch(dict(launch, triton=dict(t, constexprs=consts))))
    r = dict(_CACHE[key])
    per_thread = r["loop"] * launch["loop_trips"] + r["outside"]
    g = launch["grid"]
    r["total_instr"] = per_thread * launch["threads_per_cta"] * g[0] * g[1] * g[2]
    return r


def _analyse_compiled(k) -> dict:
    sass = _cuobjdump(k.asm["cubin"], "-sass")
    res = _cuobjdump(k.asm["cubin"], "-res-usage")
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    ins = [(int(m.group(1), 16), m.group(3)) for m in _INS.finditer(sass)]
    ins = [(a, op) for a, op in ins if op != "NOP"]
    loops = []
    for m in _INS.finditer(sass):
        if m.group(3).startswith("BRA"):
            tgt = re.search(r"0x([0-9a-f]+)", m.group(4))
            if tgt and int(tgt.group(1), 16) <= int(m.group(1), 16):
                loops.append((int(tgt.group(1), 16), int(m.group(1), 16)))
    lo, hi = max(loops, key=lambda l: sum(l[0] <= a <= l[1] for a, _ in ins)) if loops else (0, -1)
    body = [op for a, op in ins if lo <= a <= hi]
    outside = len(ins) - len(body)  # every instruction outside the loop counted once (an upper bound)
    widest = max((int(w) // 8 for op in body if op.startswith("LDG") for w in re.findall(r"\.(\d+)", op)
                  if w in ("64", "128")), default=4)
    return dict(regs=regs, spill_bytes=local, loop=len(body), outside=outside,
                mix=dict(Counter(op.split(".")[0] for op in body).most_common(8)), widest_ldg_bytes=widest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--shape", nargs="+", default=["4096x14336", "14336x4096", "4096x4096", "1024x4096"])
    ap.add_argument("--fmt", default="twn")
    ap.add_argument("--group", type=int, default=128, help="0 = per-channel")
    ap.add_argument("--x-dtype", default="bf16", choices=["bf16", "fp16", "int8"])
    ap.add_argument("--configs", nargs="*", default=None, help="config-string prefixes to keep (default: all)")
    a = ap.parse_args(argv)
    from kernels.packed_matmul import static_launches

    for shape in a.shape:
        n, k = (int(v) for v in shape.split("x"))
        for m in a.M:
            best = None
            for call in static_launches(m, n, k, a.fmt, a.group or None, a.x_dtype):
                if a.configs and not any(call["config"].startswith(c) for c in a.configs):
                    continue
                rows = [analyse(l) for l in call["launches"]]
                tot = sum(r["total_instr"] for r in rows)
                weights = n * k
                nbytes = sum(l["bytes"] for l in call["launches"])
                # crude occupancy: issue needs >= 4 warps per SM; HBM needs ~3.2 MB in flight (4 TB/s x ~0.8 us),
                # taken as one K iteration of weights per resident warp (whole grid resident)
                lw = call["launches"][-1]
                warps = lw["threads_per_cta"] // 32 * lw["grid"][0] * lw["grid"][1]
                per_warp = lw["weights"] / 4 / max(1, lw["grid"][0] * lw["grid"][1] * lw["loop_trips"]) / (
                    lw["threads_per_cta"] // 32)
                mem_eff = min(1.0, warps * per_warp / 3.2e6)
                issue_eff = min(1.0, warps / (132 * 4))
                t = max(nbytes / (HBM_BPS * mem_eff), tot / (ISSUE_PER_S * issue_eff))
                sp = (2 * weights / HBM_BPS) / t
                r = rows[-1]
                print(f"M={m} {shape} {a.fmt} g{a.group} {a.x_dtype} [{call['config']}] instr/weight="
                      f"{tot / weights:.3f} regs={r['regs']} spill={r['spill_bytes']} ldg={r['widest_ldg_bytes']}B "
                      f"loop={r['loop']} predicted {t * 1e6:.2f} us, {sp:.2f}x cuBLAS bf16  {r['mix']}", flush=True)
                if best is None or t < best[0]:
                    best = (t, call["config"], tot / weights, sp)
            if best:
                print(f"BEST M={m} {shape}: [{best[1]}] instr/weight={best[2]:.3f} predicted {best[3]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

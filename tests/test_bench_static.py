"""`pyquant bench static`: the SASS parser and loop finder on canned SASS, the roofline math, the launch descriptors of
the landed kernels, a tiny Triton and a tiny CUDA kernel of known instruction count compiled for sm_90 and counted,
and `--quick` end to end (the compiling tests run in a subprocess without TRITON_INTERPRET and skip cleanly when
ptxas / nvcc / cuobjdump are missing)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyquant.bench import static as S

ROOT = Path(__file__).resolve().parents[1]

# nvdisasm style: a guarded loop of 12 instructions (4 FFMA, one 16-byte weight load, one 4-byte x load) between
# 12 instructions of prologue and 2 of epilogue; the BRA-to-itself after EXIT and the NOP are not executed code.
NVDISASM = r"""
//--------------------- .text.toy --------------------------
        .section        .text.toy,"ax",@progbits
toy:
.text.toy:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   ULDC.64 UR4, c[0x0][0x218] ;
        /*0020*/                   ULDC.64 UR6, c[0x0][0x210] ;
        /*0030*/                   S2R R0, SR_TID.X ;
        /*0040*/                   IMAD.WIDE R2, R0, 0x10, RZ ;
        /*0050*/                   IADD3 R4, P0, R2, UR4, RZ ;
        /*0060*/                   IADD3.X R5, R3, UR5, RZ, P0, !PT ;
        /*0070*/                   IADD3 R6, P0, R2, UR6, RZ ;
        /*0080*/                   IADD3.X R7, R3, UR7, RZ, P0, !PT ;
        /*0090*/                   MOV R8, RZ ;
        /*00a0*/                   ISETP.GE.AND P1, PT, R0, 0x20, PT ;
        /*00b0*/               @P1 BRA `(.L_x_1) ;
.L_x_0:
        /*00c0*/                   LDG.E.128 R12, desc[UR8][R4.64] ;
        /*00d0*/                   LDG.E R9, desc[UR8][R6.64] ;
        /*00e0*/                   FFMA R8, R12, R9, R8 ;
        /*00f0*/                   FFMA R8, R13, R9, R8 ;
        /*0100*/                   FFMA R8, R14, R9, R8 ;
        /*0110*/                   FFMA R8, R15, R9, R8 ;
        /*0120*/                   IADD3 R4, P0, R4, 0x200, RZ ;
        /*0130*/                   IADD3.X R5, RZ, R5, RZ, P0, !PT ;
        /*0140*/                   IADD3 R6, P0, R6, 0x200, RZ ;
        /*0150*/                   IADD3.X R7, RZ, R7, RZ, P0, !PT ;
        /*0160*/                   ISETP.NE.AND P2, PT, R0, RZ, PT ;
        /*0170*/               @P2 BRA `(.L_x_0) ;
.L_x_1:
        /*0180*/                   STG.E desc[UR8][R6.64], R8 ;
        /*0190*/                   EXIT ;
.L_x_2:
        /*01a0*/                   BRA `(.L_x_2);
        /*01b0*/                   NOP;
"""

CUOBJDUMP = """
\tcode for sm_90a
\t\tFunction : toy2
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   MOV R0, RZ ;                            /* 0x000fe20000000f00 */
        /*0020*/                   FADD R0, R0, 1 ;                        /* 0x000fe20000000f00 */
        /*0030*/                   ISETP.LT.AND P0, PT, R0, 0x10, PT ;     /* 0x000fe20000000f00 */
        /*0040*/                   LDG.E.64 R2, desc[UR4][R4.64] ;         /* 0x000fe20000000f00 */
        /*0050*/               @P0 BRA 0x20 ;                              /* 0x000fe20000000f00 */
        /*0060*/                   EXIT ;                                  /* 0x000fe20000000f00 */
        /*0070*/                   BRA 0x70;                               /* 0x000fe20000000f00 */
"""

# two versions of one loop (the compiler unswitched it on a runtime flag: neither reaches the other), the first with a
# nested loop; then (SEQUENTIAL) two loops one after the other, as in a two-pass kernel
ALTERNATIVES = r"""
.text.alt:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.NE.AND P0, PT, R0, RZ, PT ;
        /*0020*/               @P0 BRA `(.L_alt) ;
.L_a:
        /*0030*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_in:
        /*0040*/                   FFMA R3, R2, R2, R3 ;
        /*0050*/               @P1 BRA `(.L_in) ;
        /*0060*/               @P2 BRA `(.L_a) ;
        /*0070*/                   BRA `(.L_end) ;
.L_alt:
        /*0080*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0090*/                   FADD R3, R2, R3 ;
        /*00a0*/               @P2 BRA `(.L_alt) ;
.L_end:
        /*00b0*/                   EXIT ;
"""
SEQUENTIAL = r"""
.text.seq:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_p1:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FMNMX R3, R2, R3, !PT ;
        /*0030*/               @P2 BRA `(.L_p1) ;
.L_p2:
        /*0040*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0050*/                   FADD R6, R2, R6 ;
        /*0060*/                   FMUL R6, R6, R3 ;
        /*0070*/               @P2 BRA `(.L_p2) ;
        /*0080*/                   EXIT ;
"""

UNROLLED = r"""
.text.unr:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_u:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E R3, desc[UR4][R4.64+0x4] ;
        /*0030*/                   FFMA R6, R2, R2, R6 ;
        /*0040*/                   FFMA R6, R3, R3, R6 ;
        /*0050*/               @P2 BRA `(.L_u) ;
        /*0060*/               @!P3 BRA `(.L_end) ;
.L_r:
        /*0070*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0080*/                   FFMA R6, R2, R2, R6 ;
        /*0090*/               @P2 BRA `(.L_r) ;
.L_end:
        /*00a0*/                   EXIT ;
"""

PEELED = r"""
.text.peel:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_q:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x800] ;
        /*0030*/                   LDG.E.128 R12, desc[UR4][R2.64+0x1000] ;
        /*0040*/                   LDG.E.128 R16, desc[UR4][R2.64+0x1800] ;
        /*0050*/                   FMNMX R20, R4, R20, !PT ;
        /*0060*/                   FMNMX R20, R8, R20, !PT ;
        /*0070*/                   FMNMX R20, R12, R20, !PT ;
        /*0080*/                   FMNMX R20, R16, R20, !PT ;
        /*0090*/               @P2 BRA `(.L_q) ;
        /*00a0*/               @!P3 BRA `(.L_e) ;
        /*00b0*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00c0*/                   FMNMX R20, R4, R20, !PT ;
.L_e:
        /*00d0*/                   EXIT ;
"""

TWO_PASS = r"""
.text.two:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_a:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x800] ;
        /*0030*/                   FMNMX R20, R4, R20, !PT ;
        /*0040*/                   FMNMX R20, R8, R20, !PT ;
        /*0050*/               @P2 BRA `(.L_a) ;
.L_b:
        /*0060*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0070*/                   FMUL R4, R4, R20 ;
        /*0080*/                   STG.E.64 desc[UR4][R6.64], R4 ;
        /*0090*/               @P3 BRA `(.L_b) ;
        /*00a0*/                   EXIT ;
"""

SPILL = r"""
.text.spill:
        /*0000*/                   ULDC.64 UR4, c[0x0][0x218] ;
        /*0010*/                   MOV R2, UR4 ;
        /*0020*/                   MOV R3, UR5 ;
        /*0030*/                   STL.64 [R1+0x8], R2 ;
        /*0040*/                   MOV R2, RZ ;
        /*0050*/                   MOV R3, RZ ;
        /*0060*/                   LDL.64 R6, [R1+0x8] ;
        /*0070*/                   LDG.E.64 R8, desc[UR8][R6.64] ;
        /*0080*/                   LDG.E R9, desc[UR8][R2.64] ;
        /*0090*/                   EXIT ;
"""


def test_weight_pointer_taint_survives_a_spill():
    ins = S.parse_sass(SPILL)["spill"]
    assert S.weight_loads(ins, [8]) == {0x70}  # spilled to the stack and filled back into R6:R7
    assert S.weight_loads(ins, [0]) == set()


def test_parse_nvdisasm_loop_mix_and_weight_taint():
    funcs = S.parse_sass(NVDISASM)
    ins = funcs["toy"]
    assert len(ins) == 28 and ins[11].target == 0x180 and ins[23].target == 0xC0 and ins[11].pred == "@P1"
    assert ins[12].width_bytes == 16 and ins[12].mix_key == "LDG.128" and ins[13].mix_key == "LDG.32"
    top = S.find_loops(ins)
    assert len(top) == 1 and top[0].header == 0xC0 and (top[0].start, top[0].end) == (0xC0, 0x170)
    st = S.analyze(ins, weight_param_offsets=[8])  # the weight pointer is parameter 1, at c[0x0][0x218]
    assert st.main_loops == [(0xC0, 12)] and st.outside == 14 and st.n_instrs == 26
    assert st.loop_mix == {"LDG.128": 1, "LDG.32": 1, "FFMA": 4, "IADD3": 4, "ISETP": 1, "BRA": 1}
    assert st.widest_weight_load_bytes == 16 and st.widest_loop_load_bytes == 16
    assert S.analyze(ins, weight_param_offsets=[0]).widest_weight_load_bytes == 4  # x at c[0x0][0x210]
    assert S.analyze(ins, weight_param_offsets=[16]).widest_weight_load_bytes is None  # no load from there
    per_thread, mix, load_bytes, notes = S.executed_per_thread(st, 10)
    assert per_thread == 14 + 12 * 10 and mix["FFMA"] == 40 and load_bytes == 20 * 10 and notes == []
    with pytest.raises(ValueError, match="loop_trips has 2 values"):
        S.executed_per_thread(st, [1, 2])


def test_branch_to_a_nop_keeps_its_loop():
    """A back edge that lands on a NOP (padding at the loop head) still makes the loop: the NOP is dropped from the
    counts, the branch retargeted to the next instruction."""
    text = NVDISASM.replace(".L_x_0:\n        /*00c0*/                   LDG.E.128",
                            ".L_x_0:\n        /*00b8*/                   NOP ;\n        /*00c0*/                   LDG.E.128")
    text = text.replace("@P2 BRA `(.L_x_0) ;", "@P2 BRA 0xb8 ;")
    ins = S.parse_sass(text)["toy"]
    assert any(i.base == "NOP" and i.addr == 0xB8 for i in ins)
    assert [i.target for i in ins if i.base == "BRA"][1] == 0xB8
    st = S.analyze(ins, weight_param_offsets=[8])
    assert st.main_loops == [(0xC0, 12)] and st.outside == 14 and st.n_instrs == 26


def test_parse_cuobjdump_hex_targets():
    ins = S.parse_sass(CUOBJDUMP)["toy2"]
    assert [i.target for i in ins if i.base == "BRA"] == [0x20, 0x70]
    st = S.analyze(ins)
    assert st.main_loops == [(0x20, 4)] and st.outside == 3  # the trailing BRA 0x70 is unreachable
    assert st.widest_weight_load_bytes == 8 and "not named" in st.weight_load_source


def test_alternative_and_nested_loops():
    st = S.analyze(S.parse_sass(ALTERNATIVES)["alt"])
    assert [h for h, _ in st.main_loops] == [0x30] and "alternatives" in st.notes[0]
    assert st.main_loops == [(0x30, 2)] and st.inner_loops == [(0x40, 0, 2)] and st.outside == 5
    per_thread, mix, _, notes = S.executed_per_thread(st, 10, [3])
    assert per_thread == 5 + 2 * 10 + 2 * 10 * 3 and mix["FFMA"] == 30 and mix.get("FADD", 0) == 0
    _, _, _, notes = S.executed_per_thread(st, 10)
    assert any("inner loop" in n for n in notes)
    seq = S.analyze(S.parse_sass(SEQUENTIAL)["seq"])
    assert [n for _, n in seq.main_loops] == [3, 4] and seq.notes == []
    assert S.executed_per_thread(seq, [5, 7])[0] == 2 + 3 * 5 + 4 * 7
    unr = S.analyze(S.parse_sass(UNROLLED)["unr"])  # unrolled 2x + remainder: one source loop of 7 trips
    assert unr.unroll == [(2, "unrolled"), (2, "remainder")] and "unrolled 2x" in unr.notes[0]
    per_thread, mix, _, _ = S.executed_per_thread(unr, 7)
    assert mix["FFMA"] == 7 and per_thread == 3 + 5 * 3 + 3 * 1
    assert S.executed_per_thread(unr, [7])[0] == per_thread  # one value per source loop


def test_unrolled_loop_with_peeled_remainder_counts_source_trips():
    """Refinement (c): a loop that loads 4 source iterations' bytes per trip (LLVM unrolled it 4x and peeled the
    remainder into straight-line code) runs floor(t / 4) trips when the launch states ``trip_load_bytes``."""
    st = S.analyze(S.parse_sass(PEELED)["peel"])
    assert st.main_loops == [(0x10, 9)] and st.outside == 5 and st.unroll == [(1, "")]
    assert S.executed_per_thread(st, 14)[0] == 5 + 9 * 14  # without the statement: each trip taken as one
    per_thread, mix, load_bytes, notes = S.executed_per_thread(st, 14, trip_load_bytes=16)
    assert per_thread == 5 + 9 * 3 and mix["FMNMX"] == 4 * 3 + 1 and load_bytes == 64 * 3
    assert any("unrolled 4x" in n for n in notes)
    assert S.executed_per_thread(st, 14, trip_load_bytes=64)[0] == 5 + 9 * 14  # one source iteration per trip
    assert S.executed_per_thread(st, 14, trip_load_bytes=[24])[0] == 5 + 9 * 14  # not a whole multiple: as given
    with pytest.raises(ValueError, match="trip_load_bytes has 2 values"):
        S.executed_per_thread(st, 14, trip_load_bytes=[16, 16])
    with pytest.raises(ValueError, match="trip_load_bytes must be > 0"):
        S.executed_per_thread(st, 14, trip_load_bytes=0)
    # a max pass (2x unrolled, loads only) followed by a quantize pass (loads and stores): loads 2:1, but two
    # source loops, not an unrolled loop and its remainder
    two = S.analyze(S.parse_sass(TWO_PASS)["two"])
    assert two.unroll == [(1, ""), (1, "")] and not any("unrolled" in n for n in two.notes)
    assert S.executed_per_thread(two, [14, 3], trip_load_bytes=16)[0] == 2 + 5 * 7 + 4 * 3


def test_roofline_math_and_constants(tmp_path):
    c = S.Constants()
    assert math.isclose(c.issue_rate, 132 * 4 * 32 * 1.98e9)
    oh = c.launch_overhead_us
    # memory-bound: 4 MB at 4 TB/s is 1 us, on every SM
    p = S.predict_launch(c, thread_instrs_per_cta=0, ctas=528, threads_per_cta=128, nbytes=4e6)
    assert p["bound"] == "memory" and math.isclose(p["us"], 1.0 + oh)
    # issue-bound: one CTA of 4 warps per SM issuing 10 us of warp instructions; one CTA more doubles the busiest SM
    x = 32 * 4 * 1.98e9 * 1e-5
    p = S.predict_launch(c, thread_instrs_per_cta=x, ctas=132, threads_per_cta=128, nbytes=0)
    assert p["bound"] == "issue" and math.isclose(p["us"], 10.0 + oh)
    assert math.isclose(S.predict_launch(c, thread_instrs_per_cta=x, ctas=133, threads_per_cta=128,
                                         nbytes=0)["us"], 20.0 + oh)
    # a 1-warp CTA uses one scheduler of its SM
    assert math.isclose(S.predict_launch(c, thread_instrs_per_cta=x / 4, ctas=132, threads_per_cta=32,
                                         nbytes=0)["us"], 10.0 + oh)
    # tensor-bound at the stated efficiency; few CTAs also cap the bandwidth
    f = c.bf16_tc_flops * c.tc_efficiency * 1e-5
    p = S.predict_launch(c, thread_instrs_per_cta=0, ctas=132, threads_per_cta=128, nbytes=0, mma_flops=f)
    assert p["bound"] == "tensor" and math.isclose(p["us"], 10.0 + oh)
    p = S.predict_launch(c, thread_instrs_per_cta=0, ctas=33, threads_per_cta=128, nbytes=4e6)
    assert math.isclose(p["memory_us"], 2.0)  # 33 SMs x 2x their share = half the bandwidth
    # cuBLAS bf16: memory-bound at M=1, tensor-bound at M=4096
    n = k = 4096
    assert math.isclose(S.cublas_bf16_us(c, 1, n, k), (2 * n * k + 2 * k + 2 * n) / 4e12 * 1e6 + oh)
    assert math.isclose(S.cublas_bf16_us(c, 4096, n, k), 2 * 4096 ** 3 / (989e12 * 0.8) * 1e6 + oh)
    f = tmp_path / "measured.json"
    f.write_text(json.dumps({"hbm_Bps": 3.0e12, "launch_overhead_us": 0}))
    m = S.Constants.from_json(f)
    assert m.hbm_Bps == 3.0e12 and m.sms == 132 and math.isclose(S.cublas_bf16_us(m, 1, n, k),
                                                                  (2 * n * k + 2 * k + 2 * n) / 3e12 * 1e6)
    f.write_text(json.dumps({"hbm_bw": 3.0e12}))
    with pytest.raises(ValueError, match="unknown constant.*hbm_bw"):
        S.Constants.from_json(f)
    f.write_text(json.dumps({"sms": -1}))
    with pytest.raises(ValueError, match="sms=-1"):
        S.Constants.from_json(f)


def test_res_usage_kparams_and_ptxas_parsers():
    ru = S.parse_res_usage(" Function _k:\n  REG:95 STACK:8 SHARED:1024 LOCAL:8 CONSTANT[0]:616 TEXTURE:0\n")
    assert ru == {"_k": {"REG": 95, "STACK": 8, "SHARED": 1024, "LOCAL": 8}}
    kp = S.parse_kparams(".nv.info._k\n\tAttribute:\tEIATTR_KPARAM_INFO\n"
                         "\tValue:\tIndex : 0x0\tOrdinal : 0x1\tOffset  : 0x8\tSize    : 0x8\n")
    assert kp == {"_k": {1: (8, 8)}}
    log = ("ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'\n"
           "ptxas info    : Function properties for _Z1kPf\n    16 bytes stack frame, 12 bytes spill stores, "
           "12 bytes spill loads\n")
    assert S.parse_ptxas_spills(log) == {"_Z1kPf": 12}


def test_descriptors_of_every_kernel_follow_the_schema():
    """Every kernel module's static_launches output passes the tool's schema check (each owner's own tests pin the
    configs and geometry: tests/test_packed_matmul.py, test_attention_kd.py, test_cuda_ext.py)."""
    from pyquant import _cuda_ext
    from pyquant.ops._dispatch import kernel_module

    pm = kernel_module("packed_matmul")
    for m, fmt, gs, xd in ((1, "twn", None, "bf16"), (4, "int2-asym", 32, "fp16"), (8, "absmean", 128, "int8"),
                           (16, "twn", 128, "bf16"), (64, "int2-asym", None, "bf16"), (4096, "twn", 128, "bf16")):
        calls = pm.static_launches(m, 1024, 4096, fmt, gs, x_dtype=xd)
        assert calls, (m, fmt, gs, xd)
        for call in calls:
            S.check_call(call)
            assert any(la.get("weights") for la in call["launches"])
    cu = _cuda_ext.static_launches(3, 1000, 4096, "twn", 128)
    assert cu
    for call in cu:
        S.check_call(call)
    assert _cuda_ext.static_launches(16, 1000, 4096, "twn", 128) == []  # the CUDA GEMV declines M > 8
    for call in kernel_module("attention_kd").static_launches(2, 4, 256, 64):
        S.check_call(call)
    for call in kernel_module("grouped_packed_matmul").static_launches(16, 256, 512, "twn", None, experts=4):
        S.check_call(call)


# ---- compiled for sm_90 (subprocess without TRITON_INTERPRET) -------------------------------------------------------
_TINY = r"""
import json, sys, tempfile
from pathlib import Path
import triton
import triton.language as tl
from pyquant.bench import static as S

@triton.jit
def fma_loop(x_ptr, y_ptr, n_iter, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs)
    b = tl.load(x_ptr + BLOCK + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(n_iter):
        v = tl.load(x_ptr + (i + 2) * BLOCK + offs)
        acc = acc * a + v
        acc = acc * b + v
        acc = acc * a + v
        acc = acc * b + v
        acc = acc * a + v
        acc = acc * b + v
        acc = acc * a + v
        acc = acc * b + v
    tl.store(y_ptr + offs, acc)

CU = '''
extern "C" __global__ void fma_loop_cu(const float* __restrict__ x, float* __restrict__ y, int n) {
    const int t = threadIdx.x;
    const float a = x[t], b = x[128 + t];
    float acc = 0.f;
#pragma unroll 1
    for (int i = 0; i < n; ++i) {
        const float v = x[(i + 2) * 128 + t];
        acc = fmaf(acc, a, v); acc = fmaf(acc, b, v); acc = fmaf(acc, a, v); acc = fmaf(acc, b, v);
        acc = fmaf(acc, a, v); acc = fmaf(acc, b, v); acc = fmaf(acc, a, v); acc = fmaf(acc, b, v);
    }
    y[t] = acc;
}
'''
out = {}
cache = Path(tempfile.mkdtemp())
try:
    comp = S.Compiler("sm_90a", cache_dir=cache)
    comp.tools.need("cuobjdump")
except S.ToolMissing as e:
    print("SKIP", e); sys.exit(3)
trips = 103  # not a multiple of 4: LLVM unrolls this loop 4x, so its remainder loop runs too
tri = dict(fn=fma_loop, signature=dict(x_ptr="*fp32", y_ptr="*fp32", n_iter="i32", BLOCK="constexpr"),
           constexprs=dict(BLOCK=128), num_warps=4, num_stages=1, weight_arg="x_ptr")
launch = dict(name="fma_loop", triton=tri, grid=[2, 1, 1], threads_per_cta=128, loop_trips=trips,
              weights=2 * 128 * trips, bytes=4 * 128 * (trips + 3), mma_flops=0)
call = dict(kernel="fma_loop", backend="triton", config="-", launches=[launch])
r = S.score_call(comp, S.Constants(), call)
b = comp.triton(tri)

def summary(st):
    per_thread, mix, _, _ = S.executed_per_thread(st, trips)
    return dict(loop_ffma=[m.get("FFMA", 0) for m in st.main_mix], unroll=st.unroll, per_thread=per_thread,
                ffma_in_loops=mix["FFMA"] - st.outside_mix.get("FFMA", 0), loop_ldg=st.loop_mix.get("LDG.32"))

st = S.analyze(b.instrs, [0], b.name)
out["triton"] = dict(summary(st), ipw=r["sass_instr_per_weight"], widest=r["widest_weight_load_bytes"])
# the disk cache: a new Compiler (a rerun) compiles nothing and counts the same; an edited kernel compiles again
again = S.Compiler("sm_90a", cache_dir=cache)
out["rerun"] = dict(same=S.score_call(again, S.Constants(), call) == r, stats=dict(again.stats))
import importlib.util
KSRC = '''
import triton
import triton.language as tl

@triton.jit
def edited(x_ptr, y_ptr, n_iter, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(n_iter):
        acc = acc * 1.5 + tl.load(x_ptr + i * BLOCK + offs)%s
    tl.store(y_ptr + offs, acc)
'''
edited = []
for v, extra in (("v1", ""), ("v2", " * 0.5")):
    f = cache / f"kernel_{v}.py"
    f.write_text(KSRC % extra)
    spec_ = importlib.util.spec_from_file_location(f"kernel_{v}", f)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    ed = dict(tri, fn=mod.edited)
    c3 = S.Compiler("sm_90a", cache_dir=cache)
    c3.triton(ed)
    c4 = S.Compiler("sm_90a", cache_dir=cache)
    c4.triton(ed)
    edited.append((dict(c3.stats), dict(c4.stats), mod.edited.cache_key))
out["edited"] = edited
d = Path(tempfile.mkdtemp())
(d / "tiny.cu").write_text(CU)
cu = dict(source=str(d / "tiny.cu"), kernel_regex="fma_loop_cu", nvcc_flags=["-O3"], weight_arg=0)
try:
    bc = comp.cuda(cu)
except S.ToolMissing as e:
    out["cuda"] = "SKIP " + str(e)
else:
    stc = S.analyze(bc.instrs, [0], bc.name)
    out["cuda"] = dict(summary(stc), outside_ffma=stc.outside_mix.get("FFMA", 0), spill=bc.spill_bytes,
                       regs=bc.registers)
print("JSON" + json.dumps(out))
"""


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_py(args, timeout):
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, *args], env=_clean_env(), capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    if r.returncode == 3:
        pytest.skip((r.stdout + r.stderr).strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_tiny_kernels_of_known_instruction_count_are_counted_right(tmp_path):
    script = tmp_path / "tiny_static.py"  # @triton.jit needs its source in a file
    script.write_text(textwrap.dedent(_TINY))
    out = _run_py([str(script)], timeout=600)
    res = json.loads(out.split("JSON", 1)[1])
    t = res["triton"]
    # 8 FMAs per source iteration (one element per thread); the compiler may unroll the loop (then a remainder loop
    # runs the leftover trips): either way the loops execute exactly 8 x 103 FFMAs per thread
    assert sorted(t["loop_ffma"]) in ([8], [8, 32]) and t["ffma_in_loops"] == 8 * 103
    if len(t["loop_ffma"]) == 2:
        assert sorted(role for _, role in t["unroll"]) == ["remainder", "unrolled"]
    assert t["widest"] == 4
    # trips math: instructions per thread x 128 threads x 2 CTAs / (2 x 128 x 103 weights)
    assert math.isclose(t["ipw"], t["per_thread"] / 103)
    # a rerun reads the parsed result back from the disk cache: nothing compiled, the same counts
    assert res["rerun"]["same"] and res["rerun"]["stats"] == {"triton_disk_hits": 1}
    # an edited kernel source is a new cache entry (compiled once, then read back); the old entry stays valid
    (c1, r1, k1), (c2, r2, k2) = res["edited"]
    assert k1 != k2 and c1 == c2 == {"triton_compiled": 1} and r1 == r2 == {"triton_disk_hits": 1}
    if isinstance(res["cuda"], str):
        pytest.skip(res["cuda"])
    cu = res["cuda"]  # `#pragma unroll 1`: one loop of exactly 8 FFMAs and one 4-byte load
    assert cu["loop_ffma"] == [8] and cu["loop_ldg"] == 1 and cu["outside_ffma"] == 0
    assert cu["ffma_in_loops"] == 8 * 103 and cu["spill"] == 0 and cu["regs"] > 0


def test_quick_end_to_end_writes_valid_json(tmp_path):
    out = _run_py(["-m", "pyquant.bench.static", "--quick", "--jobs", "2", "--out", str(tmp_path)], timeout=900)
    assert "predicted, sm_90, not measured" in out
    (path,) = tmp_path.glob("static-sm90-quick-*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["label"] == "predicted, sm_90, not measured" and data["meta"]["constants"]["sms"] == 132
    rows = [r for r in data["rows"] if not r.get("error")]
    assert rows and len(rows) == len(data["rows"])
    need = ("kernel", "backend", "config", "M", "N", "K", "format", "registers", "spill_bytes", "smem_bytes",
            "widest_weight_load_bytes", "sass_instr_per_weight", "predicted_us", "predicted_speedup_vs_bf16",
            "mix_per_weight", "best")
    for r in rows:
        assert all(k in r for k in need), sorted(set(need) - set(r))
        assert r["predicted_us"] > 0 and r["registers"] > 0
    mm = [r for r in rows if r["format"] != "attention"]
    assert {r["backend"] for r in mm} == {"triton", "cuda"}
    for r in mm:
        assert r["sass_instr_per_weight"] > 0.5 and r["predicted_speedup_vs_bf16"] > 0
    groups = {(r["backend"], r["M"], r["N"], r["K"], r["format"], r["group_size"], r["x_dtype"]) for r in mm}
    assert sum(r["best"] for r in mm) == len(groups)
    comp = data["meta"]["compiles"]
    assert comp["distinct_triton"] + comp["distinct_cuda"] <= comp["launches"] and not data["meta"]["partial"]
    # a filtered rerun through the other entry point (`pyquant bench static`): every compile comes from the disk
    # cache `python -m` wrote, the file says it is partial, the rows agree
    out = _run_py(["-m", "pyquant.cli", "bench", "static", "--quick", "--m", "1", "--format", "twn,int2-asym",
                   "--out", str(tmp_path), "--markdown"], timeout=300)
    (part,) = tmp_path.glob("static-sm90-quick-partial-*.json")
    pdata = json.loads(part.read_text())
    assert pdata["meta"]["partial"] and pdata["meta"]["filters"] == {"m": [1], "format": ["twn", "int2-asym"]}
    assert pdata["meta"]["compiles"]["compiled"] == 0 and pdata["meta"]["compiles"]["from_disk"] > 0
    prow = {(r["backend"], r["config"], r["format"], r["group_size"]): r for r in pdata["rows"]}
    full = {(r["backend"], r["config"], r["format"], r["group_size"]): r for r in rows
            if r["M"] == 1 and r["format"] != "attention"}
    assert {k[0] for k in full} == {"triton", "cuda"}
    assert set(prow) == set(full) and all(prow[k]["sass_instr_per_weight"] == full[k]["sass_instr_per_weight"]
                                          for k in full)
    assert "| backend | kernel | M | N×K |" in out and "predicted, sm_90, not measured" in out


# ---- compile dedupe, the disk cache, filters, printers (no compiler needed) ----------------------------------------
class _FakeJit:
    """Stands in for a @triton.jit function: what the tool reads off one (arg names, identity, source hash)."""

    def __init__(self, name="fake_kernel", cache_key="src-v1"):
        self.arg_names = ["x_ptr", "qw_ptr", "N", "K", "BLOCK"]
        self.__name__ = name
        self.__module__ = __name__
        self.cache_key = cache_key


FAKE = _FakeJit()


def _fake_spec(fn=FAKE, block=64, div=("N", "K"), **kw):
    return dict(fn=fn, signature=dict(x_ptr="*bf16", qw_ptr="*u8", N="i32", K="i32", BLOCK="constexpr"),
                constexprs=dict(BLOCK=block), num_warps=4, num_stages=2, divisibility=list(div), **kw)


def _fake_call(spec, n=4096):
    la = dict(name="fake", triton=spec, grid=[n // 64, 1, 1], threads_per_cta=128, loop_trips=10, weights=n * 64,
              bytes=n * 16, mma_flops=0)
    return dict(kernel="fake_kernel", backend="triton", config=f"BLOCK={spec['constexprs']['BLOCK']}", launches=[la])


@pytest.fixture
def fake_compiles(monkeypatch):
    """Compiler._compile_triton replaced by a counter returning the canned toy SASS (taken by forked workers too)."""
    log = []

    def compile_(self, fn, sig_full, consts, attrs, nw, ns):
        log.append((fn.cache_key, tuple(sorted(consts.items())), attrs))
        ins = S.parse_sass(NVDISASM)["toy"]
        b = S.Binary("toy", ins, 32, 0, 0, {1: (8, 8)}, arg_order=[a for a in fn.arg_names if sig_full[a] !=
                                                                    "constexpr"])
        return b

    monkeypatch.setattr(S.Compiler, "_compile_triton", compile_)
    monkeypatch.setattr(S.Toolchain, "versions", lambda self: {"triton": "t", "triton_ptxas": "p"})
    return log


def test_compile_key_is_the_compile_inputs_only():
    comp = S.Compiler("sm_90a", persist=False)
    k = comp.triton_key(_fake_spec())
    # order of the specialization list, a JIT-style `specialize` of a multiple of 16, the weight argument name and
    # the launch geometry (not compile inputs) do not change the key
    assert comp.triton_key(_fake_spec(div=("K", "N", "N"))) == k
    assert comp.triton_key(dict(_fake_spec(div=()), specialize=dict(N=4096, K=14336))) == k
    assert comp.triton_key(_fake_spec(weight_arg="qw_ptr")) == k
    assert comp.triton_key(_fake_spec(block=128)) != k  # a constexpr
    assert comp.triton_key(_fake_spec(div=("N",))) != k  # a specialization
    assert comp.triton_key(dict(_fake_spec(), num_warps=8)) != k
    assert comp.triton_key(_fake_spec(fn=_FakeJit(cache_key="src-v2"))) != k  # the kernel source
    assert comp.triton_key(dict(_fake_spec(div=()), specialize=dict(N=1))) != k  # 1 becomes a constexpr


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_distinct_launch_compiles_once_and_reruns_read_the_disk_cache(tmp_path, fake_compiles, jobs):
    calls = [_fake_call(_fake_spec(block=b), n) for b in (64, 128) for n in (1024, 4096, 14336)]
    comp = S.Compiler("sm_90a", cache_dir=tmp_path)
    counts = comp.prepare(calls, jobs=jobs, log=lambda *_: None)
    cpu = counts.pop("compile_cpu_s")
    assert counts == dict(launches=6, distinct_triton=2, distinct_cuda=0, from_disk=0, compiled=2, failed=0)
    assert cpu >= 0
    if jobs == 1:
        assert len(fake_compiles) == 2
    assert comp.stats["triton_compiled"] == 2
    c = S.Constants()
    rows = [S.score_call(comp, c, call) for call in calls]
    assert comp.stats["triton_compiled"] == 2  # scoring compiled nothing more
    assert rows[0]["sass_instr_per_weight"] == pytest.approx((14 + 12 * 10) * 128 * 16 / (1024 * 64))
    assert rows[0]["widest_weight_load_bytes"] == 16  # the analysis cached with the Binary names qw_ptr's loads
    # a new process (a new Compiler) on the same cache: nothing compiles, the same numbers come back
    fake_compiles.clear()
    again = S.Compiler("sm_90a", cache_dir=tmp_path)
    assert again.prepare(calls, jobs=jobs, log=lambda *_: None)["from_disk"] == 2 and fake_compiles == []
    assert [S.score_call(again, c, call) for call in calls] == rows
    b = next(iter(again._triton.values()))  # stored as plain tuples, rebuilt only when an analysis needs them
    assert "_packed_instrs" in vars(b) and b.instrs == S.parse_sass(NVDISASM)["toy"] and "_packed_instrs" not in vars(b)
    # the kernel source changed: its launches compile again, the others do not
    v2 = _FakeJit(cache_key="src-v2")
    mixed = calls + [_fake_call(_fake_spec(fn=v2, block=64))]
    third = S.Compiler("sm_90a", cache_dir=tmp_path)
    counts = third.prepare(mixed, jobs=1, log=lambda *_: None)
    assert (counts["from_disk"], counts["compiled"]) == (2, 1) and fake_compiles[0][0] == "src-v2"
    # the parsing / analysis code changed: everything compiles again
    fake_compiles.clear()
    fresh = S.Compiler("sm_90a", cache_dir=tmp_path)
    fresh._fingerprint = fresh._toolchain_fingerprint() + "edited"
    assert fresh.prepare(calls, jobs=1, log=lambda *_: None)["compiled"] == 2


def test_failed_compile_is_one_row_error_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr(S.Compiler, "_compile_triton", lambda self, *a: (_ for _ in ()).throw(RuntimeError("ptxas")))
    monkeypatch.setattr(S.Toolchain, "versions", lambda self: {})
    comp = S.Compiler("sm_90a", cache_dir=tmp_path)
    counts = comp.prepare([_fake_call(_fake_spec())], jobs=1, log=lambda *_: None)
    assert counts["failed"] == 1 and not list(tmp_path.rglob("*.pkl"))  # failures are not cached on disk
    with pytest.raises(RuntimeError, match="ptxas"):
        S.score_call(comp, S.Constants(), _fake_call(_fake_spec()))


def _args(*argv):
    return S._parse(list(argv))


def test_filters_restrict_the_set_without_compiling():
    full = S.benchmark_calls(False, log=lambda *_: None)
    assert {i["format"] for i, _ in full} >= {"twn", "int2-asym", "attention"}
    f = S.filters_from_args(_args("--m", "1,4", "--shape", "4096x14336", "--format", "twn:128", "--backend",
                                  "cuda"), False)
    sel = S.benchmark_calls(False, f, log=lambda *_: None)
    assert sel and {(i["M"], i["N"], i["K"], i["format"], i["group_size"], c["backend"]) for i, c in sel} == \
        {(m, 4096, 14336, "twn", 128, "cuda") for m in (1, 4)}
    assert f.describe() == dict(backend=["cuda"], m=[1, 4], shape=["4096x14336"], format=["twn:128"])
    # a plain format name takes both group sizes; --m drops attention and MoE rows
    sel = S.benchmark_calls(False, S.filters_from_args(_args("--m", "16", "--format", "int2-asym"), False))
    assert {(i["M"], i["format"], i["group_size"]) for i, _ in sel} == {(16, "int2-asym", None),
                                                                        (16, "int2-asym", 128)}
    # kernel patterns; attention by its family name
    sel = S.benchmark_calls(False, S.filters_from_args(_args("--kernel", "attention_kd*"), False))
    assert sel and {i["format"] for i, _ in sel} == {"attention"}
    sel = S.benchmark_calls(False, S.filters_from_args(_args("--format", "moe"), False))
    assert sel and {i["format"] for i, _ in sel} == {"moe-twn"}
    sel = S.benchmark_calls(False, S.filters_from_args(_args("--kernel", "grouped_packed_matmul"), False))
    assert sel and all(c["kernel"].startswith("grouped_packed_matmul:") for _, c in sel)
    assert not S.filters_from_args(_args(), False).active
    for argv, msg in ((("--m", "2"), r"--m \[2\]: not in the benchmark set"),
                      (("--shape", "5x5"), r"--shape \['5x5'\]"), (("--format", "int4"), "--format int4"),
                      (("--format", "twn:64"), "--format twn:64"), (("--backend", "rocm"), "--backend")):
        with pytest.raises(ValueError, match=msg):
            S.filters_from_args(_args(*argv), False)
    with pytest.raises(ValueError, match="--quick set"):
        S.filters_from_args(_args("--m", "4096"), True)
    with pytest.raises(SystemExit):
        _args("--shape", "4096by14336")


def _canned_rows():
    base = dict(backend="triton", kernel="packed_gemv", format="twn", group_size=128, x_dtype="bf16", N=4096,
                K=14336, registers=64, spill_bytes=0, widest_weight_load_bytes=16, bound="issue")
    rows = [dict(base, M=1, config="A", sass_instr_per_weight=2.5, predicted_us=5.0, predicted_speedup_vs_bf16=6.0,
                 best=True),
            dict(base, M=1, config="B", sass_instr_per_weight=4.0, predicted_us=8.0, predicted_speedup_vs_bf16=3.7,
                 best=False),
            dict(base, M=4, N=1024, K=4096, config="C", sass_instr_per_weight=3.0, predicted_us=2.0,
                 predicted_speedup_vs_bf16=1.7, best=True),
            dict(base, M=4, config="D", error="RuntimeError: ptxas", predicted_us=None, best=False)]
    return rows


def test_markdown_table_of_best_rows_is_labelled_and_partial_runs_say_so(tmp_path, capsys):
    rows = _canned_rows()
    md = S.format_markdown(rows, dict(git_commit="abcdef123", partial=False), source="static-sm90-20261201.json")
    assert "predicted, sm_90, not measured" in md and "`static-sm90-20261201.json`, commit `abcdef1`" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| triton")]
    assert len(lines) == 2 and "`A`" in lines[0] and "4096×14336" in lines[0] and "6.00x cuBLAS bf16" in lines[0]
    assert "1024×4096" in lines[1] and "twn g128" in lines[1]  # sorted by shape in the report's order
    table = S.format_table(rows, best_only=False)
    assert "error: RuntimeError: ptxas" in table and sum(ln.endswith(" *") for ln in table.splitlines()) == 2
    assert "`B`" not in md and " B " not in S.format_table(rows)
    assert S.report_name(False, True, "20261201") == "static-sm90-partial-20261201.json"
    assert S.report_name(True, True, "20261201") == "static-sm90-quick-partial-20261201.json"
    meta = dict(label=S.LABEL, partial=True, filters=dict(m=[1]))
    path = S.write_json(rows, meta, tmp_path, quick=False)
    assert path.name.startswith("static-sm90-partial-")
    assert json.loads(path.read_text())["meta"]["filters"] == {"m": [1]}
    assert S.main(["--from-json", str(path), "--markdown"]) == 0  # reprints a saved report, compiles nothing
    out = capsys.readouterr().out
    assert "partial set: {'m': [1]}" in out and "| triton | packed_gemv | 1 | 4096×14336 |" in out
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert S.main(["--from-json", str(bad)]) == 2


def test_attention_speedup_is_fwd_plus_bwd_in_one_call_or_two():
    att = dict(format="attention", backend="triton", baseline_us=100.0, best=True)
    one = [dict(att, kernel="attention_kd", predicted_us=20.0,
                launches=[dict(name="fwd"), dict(name="bwd_dq"), dict(name="bwd_dk")])]
    S._attention_speedups(one)
    assert one[0]["predicted_fwd_bwd_us"] == 20.0 and one[0]["predicted_speedup_vs_eager"] == 5.0
    two = [dict(att, kernel="attention_kd_fwd", predicted_us=10.0), dict(att, kernel="attention_kd_bwd",
                                                                         predicted_us=15.0)]
    S._attention_speedups(two)
    assert all(r["predicted_speedup_vs_eager"] == 4.0 for r in two)
    fwd_only = two[:1]
    S._attention_speedups(fwd_only)
    assert fwd_only[0]["predicted_speedup_vs_eager"] is None


def test_disk_cache_refuses_a_planted_pickle(tmp_path):
    """A cache file naming anything but the tool's own dataclasses is refused (never executed) and recompiled."""
    import os
    import pickle

    import pyquant.bench.static as S

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    comp = S.Compiler("sm_90a", cache_dir=tmp_path)
    path = comp._disk_path("triton", ("planted",))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps((S._CACHE_FORMAT, Evil())))
    assert comp._disk_load(path) is None
    assert not marker.exists()
    assert comp.stats["disk_unreadable"] == 1


_GEMV_PRMT = """
import json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from pyquant.kernels import packed_matmul as k

out = {}
for fmt in ("twn", "int2-asym"):
    spec = k._static_launches_gemv(1, 64, 512, fmt, None, "bf16")[0]["launches"][-1]["triton"]
    fn = spec["fn"]
    idx = {a: i for i, a in enumerate(fn.arg_names)}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs={(idx[a],): v for a, v in spec["constexprs"].items()},
                    attrs={(idx[a],): [["tt.divisibility", 16]] for a in spec["divisible_by_16"]})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=spec["num_warps"], num_stages=1))
    ptx = ck.asm["ptx"]
    out[fmt] = {"prmt": spec["constexprs"]["PRMT"], "lo": ptx.count("0x5410;"), "hi": ptx.count("0x7632;")}
spec = k._static_quant_launch(16, 4096, True)["triton"]
fn = spec["fn"]
idx = {a: i for i, a in enumerate(fn.arg_names)}
src = ASTSource(fn=fn, signature=spec["signature"], constexprs={(idx[a],): v for a, v in spec["constexprs"].items()},
                attrs={(idx[a],): [["tt.divisibility", 16]] for a in spec["divisible_by_16"]})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2)).asm["ptx"]
out["quant"] = {"fast": spec["constexprs"]["FAST_DIV"], "rcp": ptx.count("rcp.approx.ftz.f32"),
                "div_rn": ptx.count("div.rn.f32")}
print("JSON" + json.dumps(out))
"""


def test_compiled_kernels_select_their_inline_ptx(tmp_path):
    # the compiled GEMV merges the two rows' halves with inline PTX prmt.b32 (the interpreter runs the bit-identical
    # shift-and-select form, which every interpreted GEMV test covers) and the W2A8 quantizer divides through a
    # hoisted rcp.approx (the interpreter: div_rn); this checks the asm compiles for sm_90 and is what the static
    # launches and the run-time launchers select
    script = tmp_path / "gemv_prmt.py"
    script.write_text(textwrap.dedent(_GEMV_PRMT))
    res = json.loads(_run_py([str(script)], timeout=600).split("JSON", 1)[1])
    q = res.pop("quant")  # W2A8's quantizer: one reciprocal per row, one IEEE division (the row's max / 127)
    assert q["fast"] is True and q["rcp"] == 1 and q["div_rn"] == 1, q
    for fmt, r in res.items():
        assert r["prmt"] is True and r["lo"] >= 1 and r["hi"] >= 1, (fmt, r)
    from pyquant.kernels import packed_matmul as k
    import torch
    common, _ = k._gemv_constexprs(torch.bfloat16, None, 1.0, 1, 0, 1, False, False)
    assert common["PRMT"] is (not k._interpret())


def test_prmt_selectors_match_the_plain_merge():
    # PTX prmt.b32 d, a, b, sel: byte i of d = byte (nibble i of sel) of the 8-byte value {b, a} (a = bytes 0-3)
    import random
    def prmt(a, b, sel):
        src = a | (b << 32)
        return sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
    rng = random.Random(0)
    for _ in range(1000):
        a, b = rng.getrandbits(32), rng.getrandbits(32)
        assert prmt(a, b, 0x5410) == (a & 0xFFFF) | ((b << 16) & 0xFFFFFFFF)
        assert prmt(a, b, 0x7632) == (a >> 16) | (b & 0xFFFF0000)

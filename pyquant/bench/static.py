"""``pyquant bench static``: a static roofline of the packed-matmul and attention-KD kernels, no GPU needed.

Every number this writes is **predicted, sm_90, not measured**: it comes from the machine code the compilers emit
for Hopper and from the H200 constants in :class:`Constants`, never from running a kernel.

Method
------
1. **What runs.**  Each kernel module describes what its launcher would launch with ``static_launches(...)``
   (``kernels/packed_matmul.py``, ``kernels/attention_kd.py``, ``pyquant/_cuda_ext.py``; schema in the module
   docstring of those functions and in :func:`check_call`).  One descriptor is one *call* = one config the launcher
   or its autotuner can choose, listing every kernel launch of that call (memset / cast / quantize side kernels too)
   with its grid, threads per CTA, main-loop trips per CTA, weights consumed, global bytes moved and tensor-core
   flops.
2. **Compile** each launch for sm_90: Triton launches ahead of time with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))`` (Triton emits ``sm_90a`` for capability 9.0), applying the JIT's
   specialization to the runtime values in the optional ``"specialize"`` dict (ints equal to 1 become constexprs,
   multiples of 16 get ``tt.divisibility=16``; pointers are 16-byte aligned, as torch allocations are); CUDA launches
   with ``nvcc -cubin -arch=sm_90a`` (``--arch sm_90`` for the non-"a" target) of the whole ``.cu``, picking the
   instantiation by ``kernel_regex``.  A launch is compiled once per distinct compile input -- Triton: (function,
   signature, constexprs, the specialization applied, warps, stages); CUDA: (source, flags) -- whatever M, N, K
   or config it serves, before any call is scored, in ``--jobs`` processes.  The *parsed* result (SASS,
   resources, main-loop analysis) persists in a disk cache keyed by those inputs plus Triton's hash of the kernel
   source and everything it calls (``JITFunction.cache_key``), the Triton / ptxas / nvcc versions and the hash of
   this module's parsing and analysis code, so a rerun is incremental: only launches whose kernel changed are
   compiled again (``--no-cache`` ignores it).  Caching changes nothing that is counted.
3. **Read** registers, stack/local bytes (= spills for Triton; ptxas' "spill stores" for nvcc) and static shared
   memory from ``cuobjdump -res-usage``, Triton's dynamic shared memory from its metadata; **disassemble** with the
   ``nvdisasm`` shipped in the Triton wheel (``cuobjdump -sass`` as fallback).
4. **Find the main loop.**  The control-flow graph of the SASS (basic blocks from branch targets and ``BRA`` /
   ``EXIT``) gives the natural loops: a back edge u -> h where h dominates u, body = h plus every block reaching u
   without passing h; back edges to one head are one loop; code the entry cannot reach (the ``BRA``-to-itself after
   ``EXIT``, subroutines) is ignored.  *Main loops* are the outermost loops whose body holds a global load (``LDG``,
   ``LDGSTS``, TMA).  Each runs ``loop_trips`` times per CTA (a list gives one value per main loop in address order,
   e.g. the two passes of a two-pass kernel).  Two refinements keep compiler transformations from being counted
   twice: (a) main loops neither of which can reach the other are *alternatives* (a loop unswitched on a runtime
   flag, only one runs): the larger is counted, an upper bound; (b) a main loop whose global loads and stores (by
   width) are U times those of a loop it runs into (or comes from) is the *unrolled* copy of one source loop and the
   other its *remainder* (a pass that only loads and one that also stores are two source loops):
   with source trips t they run floor(t / U) and t - U floor(t / U) times; (c) a launch may state
   ``trip_load_bytes`` (one value, or one per main loop): the global bytes per thread that ONE source iteration
   loads.  A main loop (not already paired by (b)) whose body loads U >= 2 times that is the source loop unrolled
   U times with its remainder peeled into straight-line code (LLVM does this for short bodies): it runs
   floor(t / U) times and the peeled copies count once, outside, as all straight-line code does (an upper bound).
   A loop nested in a main loop runs
   ``inner_loop_trips[i]`` times per main-loop iteration (i in header-address order; 1, with a note, when not
   given).  Everything else counts once per thread: a static count, so an upper bound for code behind branches.
   ``loop_load_bytes_ratio`` = global bytes the main loops load (x trips x threads x CTAs) / the descriptor's
   ``bytes`` flags a descriptor whose trips or bytes do not match the code: ~1 for a kernel that reads each byte
   once; > 1 where tiles (x in a GEMV, x and weights in a GEMM) are re-read from L2 by several CTAs, since
   ``bytes`` counts unique HBM bytes.
5. **Count.**  Warp instructions executed per thread = outside + sum(loop body x trips); thread instructions =
   that x threads x CTAs; ``sass_instr_per_weight`` = sum over the call's launches / the call's weights.  The mix
   (by opcode; loads and stores by access width in bits, ``LDG.128`` = 16 bytes) is given per weight the same
   way.  *Weight loads* are the global loads whose address derives (register taint from the kernel-parameter
   constant bank, ``c[0x0][...]``) from the weight pointer (``weight_arg``); ``widest_weight_load_bytes`` is the
   widest of them in the main loop.
6. **Predict** per launch ``t = max(bytes / BW_eff, issue, mma) + launch_overhead``:
   issue = warp instructions of the busiest SM (ceil(CTAs / SMs) CTAs) / (min(4, its warps) x clock);
   BW_eff = BW x min(1, active SMs x ``sm_bw_share_cap`` / SMs);  mma = the busiest SM's tensor flops / (per-SM
   tensor rate x ``tc_efficiency``), with the int8 rate when the code has IMMA/IGMMA and ``mma_sync_fraction`` of the
   rate for mma.sync (HMMA/IMMA) instead of wgmma.  The max assumes perfect overlap of memory, issue and tensor
   cores: an optimistic bound, and latency (occupancy, dependency chains) is not modelled.
   **cuBLAS bf16** is bounded the same way: ``max((2NK + 2MK + 2MN) / BW, 2MNK / (bf16 rate x tc_efficiency)) +
   launch_overhead`` (unique HBM bytes, one launch); ``predicted_speedup_vs_bf16`` = that / the call's time.
   Attention-KD rows compare with the eager materialized loss instead (fp32 maps of both models, fwd+bwd:
   ``eager_attention_bytes_per_score`` bytes per score element plus its four QK-sized GEMMs).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "Constants", "Instr", "parse_sass", "find_loops", "analyze", "FunctionStats", "predict_launch",
    "cublas_bf16_us", "Toolchain", "Compiler", "run", "main", "SHAPES", "M_VALUES", "FORMATS", "Filters",
    "benchmark_calls", "format_table", "format_markdown", "report_name",
]

LABEL = "predicted, sm_90, not measured"
REPO = Path(__file__).resolve().parents[2]
SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (1024, 4096))  # (N, K)
M_VALUES = (1, 4, 8, 16, 64, 4096)
FORMATS = (("twn", None), ("twn", 128), ("int2-asym", None), ("int2-asym", 128))  # (format, group size)
ATTENTION_SHAPE = dict(B=8, H=32, L=2048, d=128)
# MoE experts (the grouped packed matmul): (model, experts, hidden, intermediate, top_k) and token counts
MOE_SHAPES = (("mixtral-8x7b", 8, 4096, 14336, 2), ("qwen3-30b-a3b", 128, 2048, 768, 8))
MOE_TOKENS = (1, 4096)
QUICK_SHAPES = ((1024, 4096),)
QUICK_M = (1, 16)
QUICK_FORMATS = (("twn", None), ("int2-asym", 128))
QUICK_MAX_CONFIGS = 2


# ---- constants ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Constants:
    """Every hardware figure the prediction uses (H200 SXM), in one place; ``--constants FILE`` (JSON) overrides
    any of them with figures measured on a GPU (e.g. ``{"hbm_Bps": 4.3e12}``)."""

    gpu: str = "H200 SXM (sm_90)"
    sms: int = 132
    clock_hz: float = 1.98e9  # boost clock
    schedulers_per_sm: int = 4  # each issues 1 warp instruction per clock -> 132*4*32*1.98e9 = 3.3e13 thread-instr/s
    warp_size: int = 32
    hbm_peak_Bps: float = 4.8e12
    hbm_Bps: float = 4.0e12  # effective: ~83% of the 4.8 TB/s peak (what streaming kernels reach on Hopper HBM3e)
    sm_bw_share_cap: float = 2.0  # one SM sustains at most 2x its fair share (BW / SMs) of the bandwidth
    bf16_tc_flops: float = 989e12  # dense bf16/fp16 tensor cores (wgmma)
    int8_tc_flops: float = 1979e12  # dense int8
    mma_sync_fraction: float = 0.65  # mma.sync (HMMA/IMMA) reaches ~2/3 of the wgmma peak on sm_90
    tc_efficiency: float = 0.8  # fraction of the tensor peak a good GEMM sustains (applied to cuBLAS and ours alike)
    launch_overhead_us: float = 0.5  # GPU-side cost per kernel launch (ramp-up + tail), each launch of a call
    eager_attention_bytes_per_score: float = 96.0  # eager attention-map KL, fp32 maps of both models, fwd + bwd

    @property
    def issue_rate(self) -> float:
        """Thread instructions per second the whole GPU can issue."""
        return self.sms * self.schedulers_per_sm * self.warp_size * self.clock_hz

    @classmethod
    def from_json(cls, path) -> "Constants":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--constants {path}: cannot read a JSON object ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--constants {path}: expected a JSON object of constant names to values")
        names = {f.name: f for f in dataclasses.fields(cls)}
        bad = [k for k in data if k not in names]
        if bad:
            raise ValueError(f"--constants {path}: unknown constant(s) {bad}; expected some of {sorted(names)}")
        for k, v in data.items():
            want = str if names[k].type in ("str", str) else (int, float)
            if isinstance(v, bool) or not isinstance(v, want) or (want != str and not v >= 0):
                kind = "string" if want == str else "number >= 0"
                raise ValueError(f"--constants {path}: {k}={v!r} must be a {kind}")
        return dataclasses.replace(cls(), **data)


# ---- SASS parsing ------------------------------------------------------------------------------------------------
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s*(.*?)\s*;")
_LABEL_RE = re.compile(r"^\s*(\.L[\w$.]+):")
_FUNC_NVDISASM = re.compile(r"^\s*\.text\.(\S+?):\s*$")
_FUNC_CUOBJDUMP = re.compile(r"^\s*Function\s*:\s*(\S+)")
_REG_RE = re.compile(r"\b(U?R)(\d+|Z)\b")
_CBANK_RE = re.compile(r"c\[0x0\]\[(0x[0-9a-fA-F]+)\]")
_GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")
_GLOBAL_STORES = ("STG", "RED", "REDG", "ATOMG", "UTMASTG")
_NO_DEST = {"ST", "STG", "STS", "STL", "RED", "REDG", "BAR", "BRA", "EXIT", "NOP", "MEMBAR", "WARPSYNC", "BSYNC",
            "BSSY", "CALL", "RET", "LDGSTS", "LDGDEPBAR", "DEPBAR", "UTMALDG", "UTMASTG", "UBLKCP", "SYNCS", "FENCE",
            "WARPGROUP", "ERRBAR", "CCTL", "YIELD", "BPT", "JMP", "BRX", "STSM", "ELECT"}
_DATA_LOADS = {"LDG", "LDS", "LDL", "LD", "LDSM", "SHFL", "ATOM", "ATOMG", "ATOMS"}


@dataclass
class Instr:
    addr: int
    pred: Optional[str]
    op: str  # full opcode with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: List[str]
    target: Optional[int] = None  # branch target address

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def width_bytes(self) -> int:
        """Access width of a load/store (bytes)."""
        mods = self.op.split(".")[1:]
        for m, b in (("128", 16), ("64", 8), ("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2)):
            if m in mods:
                return b
        return 4

    @property
    def mix_key(self) -> str:
        b = self.base
        if b in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS", "LD", "ST", "ATOMG", "RED", "REDG"):
            return f"{b}.{8 * self.width_bytes}"
        return b


def _split_operands(s: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_sass(text: str) -> Dict[str, List[Instr]]:
    """{function name: instructions} from ``nvdisasm -c`` or ``cuobjdump -sass`` output (one or many functions)."""
    funcs: Dict[str, List[Instr]] = {}
    labels: Dict[str, Dict[str, int]] = {}
    pending: List[str] = []
    cur: Optional[str] = None
    for line in text.splitlines():
        m = _FUNC_NVDISASM.match(line) or _FUNC_CUOBJDUMP.match(line)
        if m:
            cur = m.group(1)
            funcs.setdefault(cur, [])
            labels.setdefault(cur, {})
            pending = []
            continue
        m = _LABEL_RE.match(line)
        if m and cur is not None:
            pending.append(m.group(1))
            continue
        m = _INSTR_RE.match(line)
        if not m or cur is None:
            continue
        addr = int(m.group(1), 16)
        for lab in pending:
            labels[cur][lab] = addr
        pending = []
        body = m.group(2).strip()
        pred = None
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        parts = body.split(None, 1)
        op = parts[0]
        funcs[cur].append(Instr(addr, pred, op, _split_operands(parts[1]) if len(parts) > 1 else []))
    for name, ins in funcs.items():
        for i in ins:
            if i.base in ("BRA", "JMP", "BRX", "CALL") and i.operands:
                t = i.operands[-1]
                lab = re.search(r"`\((\.L[\w$.]+)\)", t)
                if lab and lab.group(1) in labels[name]:
                    i.target = labels[name][lab.group(1)]
                else:
                    hx = re.search(r"0x([0-9a-fA-F]+)", t)
                    if hx and i.base != "BRX":
                        i.target = int(hx.group(1), 16)
    return funcs


@dataclass
class Loop:
    header: int  # address of the loop head
    body: frozenset  # addresses of the loop's instructions (natural loop: the header dominates them all)
    children: List["Loop"] = field(default_factory=list)

    @property
    def start(self) -> int:
        return min(self.body)

    @property
    def end(self) -> int:
        return max(self.body)

    def contains(self, addr: int) -> bool:
        return addr in self.body


_ENDS_BLOCK = ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX", "KILL")


def _blocks(instrs: Sequence[Instr]):
    """Basic blocks (lists of instruction indices) and successor lists of the control-flow graph."""
    if not instrs:
        return [], []
    by_addr = {i.addr: k for k, i in enumerate(instrs)}
    leaders = {0}
    for k, i in enumerate(instrs):
        if i.base in _ENDS_BLOCK:
            if k + 1 < len(instrs):
                leaders.add(k + 1)
            if i.target is not None and i.target in by_addr:
                leaders.add(by_addr[i.target])
    starts = sorted(leaders)
    blocks = [list(range(s, e)) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {}
    for bi, blk in enumerate(blocks):
        for k in blk:
            block_of[k] = bi
    succ: List[List[int]] = []
    for bi, blk in enumerate(blocks):
        last = instrs[blk[-1]]
        out = []
        uncond = last.pred in (None, "@PT")
        if last.base in ("BRA", "JMP") and last.target is not None and last.target in by_addr:
            out.append(block_of[by_addr[last.target]])
        falls = not (last.base in ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET", "KILL") and uncond)
        if falls and bi + 1 < len(blocks):
            out.append(bi + 1)
        succ.append(out)
    return blocks, succ


def _reachable(succ: List[List[int]], start: int = 0) -> set:
    seen, todo = {start}, [start]
    while todo:
        for s in succ[todo.pop()]:
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def find_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """Top-level natural loops (nested ones as children) of one function's control-flow graph: a back edge u -> h
    (h dominates u) makes a loop whose body is h plus every block that reaches u without passing h; back edges to
    the same head are one loop.  Code the entry cannot reach (subroutines, the BRA-to-itself after EXIT) is
    ignored."""
    blocks, succ = _blocks(instrs)
    if not blocks:
        return []
    reach = _reachable(succ)
    nodes = sorted(reach)
    pred: Dict[int, List[int]] = {n: [] for n in nodes}
    for n in nodes:
        for s in succ[n]:
            pred[s].append(n)
    dom = {n: set(nodes) for n in nodes}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for n in nodes[1:]:
            ps = [dom[p] for p in pred[n]]
            new = (set.intersection(*ps) if ps else set()) | {n}
            if new != dom[n]:
                dom[n], changed = new, True
    bodies: Dict[int, set] = {}
    for u in nodes:
        for h in succ[u]:
            if h in dom[u]:  # back edge u -> h
                body = bodies.setdefault(h, {h})
                todo = [u] if u != h else []
                while todo:
                    x = todo.pop()
                    if x not in body:
                        body.add(x)
                        todo.extend(pred[x])
    loops = [Loop(instrs[blocks[h][0]].addr, frozenset(instrs[k].addr for b_ in body for k in blocks[b_]))
             for h, body in bodies.items()]
    loops.sort(key=lambda lp: (-len(lp.body), lp.header))
    top: List[Loop] = []
    for lp in loops:  # largest first: each loop's parent is the smallest earlier loop holding its header
        parent = None
        for cand in _walk(top):
            if lp.header in cand.body and lp.body <= cand.body and (parent is None or len(cand.body) <
                                                                     len(parent.body)):
                parent = cand
        (parent.children if parent else top).append(lp)
    _sort_tree(top)
    return top


def _walk(lps: List[Loop]):
    for lp in lps:
        yield lp
        yield from _walk(lp.children)


def _sort_tree(lps: List[Loop]) -> None:
    lps.sort(key=lambda lp: lp.header)
    for lp in lps:
        _sort_tree(lp.children)


def _loop_reaches(instrs: Sequence[Instr], a: Loop, b: Loop) -> bool:
    """Whether control can get from loop ``a`` to loop ``b`` (sequential loops) rather than one or the other
    (alternative versions, e.g. a loop the compiler unswitched on a runtime flag)."""
    blocks, succ = _blocks(instrs)
    start = next(bi for bi, blk in enumerate(blocks) if instrs[blk[0]].addr == a.header)
    return any(instrs[blocks[bi][0]].addr == b.header for bi in _reachable(succ, start))


# ---- register taint: which loads read the weights ----------------------------------------------------------------
def _regs(operand: str) -> List[str]:
    """Registers an operand names, a ``.64`` register pair as both halves."""
    out = []
    for m in re.finditer(r"\b(U?R)(\d+)(\.64)?\b", operand):
        kind, n = m.group(1), int(m.group(2))
        out.append(f"{kind}{n}")
        if m.group(3):
            out.append(f"{kind}{n + 1}")
    return out


def _stack_slot(operand: str) -> Optional[int]:
    """Offset of a ``[R1+0x..]`` stack operand (R1 is the stack pointer), else None."""
    m = re.fullmatch(r"\[R1(?:\+(0x[0-9a-fA-F]+))?\]", operand.strip())
    return None if m is None else int(m.group(1) or "0", 16)


def _dest_count(i: Instr) -> int:
    mods = i.op.split(".")[1:]
    if "128" in mods:
        return 4
    if "64" in mods or "WIDE" in mods:
        return 2
    return 1


def weight_loads(instrs: Sequence[Instr], param_offsets: Iterable[int], param_size: int = 8) -> set:
    """Addresses of global loads whose address registers derive from the kernel parameters at ``param_offsets``
    (offsets into the sm_90 parameter bank, i.e. ``c[0x0][0x210 + offset]``).  A linear taint pass over the code,
    run twice so loop-carried pointers (incremented at the loop's end) are seen at the loop's head."""
    ranges = [(0x210 + o, 0x210 + o + param_size) for o in param_offsets]
    if not ranges:
        return set()
    taint: Dict[str, bool] = {}
    slots: Dict[int, bool] = {}  # stack offset -> taint (spilled registers)
    hits = set()
    for _ in range(2):
        for i in instrs:
            b, ops = i.base, i.operands
            if b in _GLOBAL_LOADS:
                addr_op = next((o for o in reversed(ops) if "[" in o), "")
                if any(taint.get(r) for r in _regs(addr_op)):
                    hits.add(i.addr)
            if b == "STL" and len(ops) >= 2:  # a spill: the stack slot keeps the register's taint
                off = _stack_slot(ops[0])
                if off is not None:
                    for j, r in enumerate(_regs(ops[1])[:1] * _dest_count(i)):
                        slots[off + 4 * j] = bool(taint.get(f"R{int(r[1:]) + j}"))
                continue
            if b == "LDL" and len(ops) >= 2:  # a fill
                off, m = _stack_slot(ops[1]), re.match(r"R(\d+)\b", ops[0])
                if m:
                    for j in range(_dest_count(i)):
                        taint[f"R{int(m.group(1)) + j}"] = off is not None and slots.get(off + 4 * j, False)
                continue
            if b in _NO_DEST or not ops:
                continue
            m = re.match(r"(U?R)(\d+)\b", ops[0])
            if not m:
                continue
            src_taint = False
            for o in ops[1:]:
                if any(lo <= int(v, 16) < hi for v in _CBANK_RE.findall(o) for lo, hi in ranges) \
                        or any(taint.get(r) for r in _regs(o)):
                    src_taint = True
                    break
            data = b in _DATA_LOADS  # a loaded value is data, not an address
            kind, n = m.group(1), int(m.group(2))
            for j in range(_dest_count(i)):
                taint[f"{kind}{n + j}"] = src_taint and not data
    return hits


# ---- per-function analysis ---------------------------------------------------------------------------------------
@dataclass
class FunctionStats:
    name: str
    n_instrs: int  # reachable instructions (NOPs excluded)
    outside: int  # reachable instructions outside every main loop (counted once per thread)
    main_loops: List[Tuple[int, int]]  # (header address, instructions of the body without nested loops)
    inner_loops: List[Tuple[int, int, int]]  # loops nested in a main loop: (header, index of the main loop, body)
    loop_mix: Dict[str, int]  # static opcode counts of the main loops' bodies (inner loops once)
    outside_mix: Dict[str, int]
    inner_mix: List[Dict[str, int]]
    main_mix: List[Dict[str, int]]  # per main loop, its body without its nested loops
    widest_weight_load_bytes: Optional[int]
    widest_loop_load_bytes: int
    weight_load_source: str
    loop_load_bytes: List[int]  # per main loop: global bytes loaded per thread per iteration (nested loops apart)
    inner_load_bytes: List[int]
    notes: List[str] = field(default_factory=list)
    unroll: List[Tuple[int, str]] = field(default_factory=list)  # per main loop: (factor U, "unrolled"|"remainder"|"")


def _counted(i: Instr) -> bool:
    return i.base != "NOP"


def _drop_nops(instrs: Sequence[Instr]) -> List[Instr]:
    """The instructions without NOPs, a branch to a NOP (alignment padding at a loop head, say) retargeted to the
    next instruction that is kept -- where the warp goes next -- so dropping the NOPs loses no CFG edge."""
    nxt: Dict[int, Optional[int]] = {}
    after: Optional[int] = None
    for i in reversed(instrs):
        if _counted(i):
            after = i.addr
        else:
            nxt[i.addr] = after
    out = []
    for i in instrs:
        if not _counted(i):
            continue
        if i.target is not None and i.target in nxt:
            i = dataclasses.replace(i, target=nxt[i.target])
        out.append(i)
    return out


def analyze(instrs: Sequence[Instr], weight_param_offsets: Optional[Iterable[int]] = None, name: str = "") \
        -> FunctionStats:
    """Main loops, instruction mix and weight-load width of one function (see the module docstring, steps 4-5)."""
    instrs = _drop_nops(instrs)
    notes: List[str] = []
    blocks, succ = _blocks(instrs)
    live = {instrs[k].addr for bi in (_reachable(succ) if blocks else ()) for k in blocks[bi]}
    loops = find_loops(instrs)

    def has_gload(lp: Loop) -> bool:
        return any(lp.contains(i.addr) and i.base in _GLOBAL_LOADS for i in instrs)

    cands: List[Loop] = []

    def collect(lps: List[Loop]) -> None:
        for lp in lps:
            if has_gload(lp):
                cands.append(lp)
            else:
                collect(lp.children)

    collect(loops)
    cands.sort(key=lambda lp: lp.header)
    mains: List[Loop] = []
    dropped: set = set()
    for lp in cands:  # alternatives (neither reaches the other): keep the larger one, an upper bound
        alt = next((m for m in mains if not _loop_reaches(instrs, m, lp) and not _loop_reaches(instrs, lp, m)), None)
        if alt is None:
            mains.append(lp)
            continue
        keep, drop = (lp, alt) if len(lp.body) > len(alt.body) else (alt, lp)
        dropped |= drop.body
        mains[mains.index(alt)] = keep
        notes.append(f"main loops at {alt.header:#x} and {lp.header:#x} are alternatives (e.g. unswitched on a "
                     f"runtime flag): counted the larger, at {keep.header:#x}")
    mains.sort(key=lambda lp: lp.header)
    inner: List[Tuple[Loop, int]] = sorted(((c, j) for j, lp in enumerate(mains) for c in lp.children),
                                           key=lambda t: t[0].header)
    wl = set()
    if weight_param_offsets is not None:
        wl = weight_loads(instrs, list(weight_param_offsets))
    outside_mix: Counter = Counter()
    main_mix = [Counter() for _ in mains]
    inner_mix = [Counter() for _ in inner]
    loop_mix: Counter = Counter()
    loop_bytes = [0] * len(mains)
    inner_bytes = [0] * len(inner)
    widest_w = None
    widest_any = 0
    n_live = 0
    for i in instrs:
        if i.addr not in live or i.addr in dropped and not any(lp.contains(i.addr) for lp in mains):
            continue
        n_live += 1
        k = i.mix_key
        mi = next((j for j, lp in enumerate(mains) if lp.contains(i.addr)), None)
        if mi is None:
            outside_mix[k] += 1
            continue
        loop_mix[k] += 1
        ii = next((j for j, (lp, _) in enumerate(inner) if lp.contains(i.addr)), None)
        gl = i.base in ("LDG", "LDGSTS")
        if ii is None:
            main_mix[mi][k] += 1
            if gl:
                loop_bytes[mi] += i.width_bytes
        else:
            inner_mix[ii][k] += 1
            if gl:
                inner_bytes[ii] += i.width_bytes
        if gl:
            widest_any = max(widest_any, i.width_bytes)
            if i.addr in wl:
                widest_w = max(widest_w or 0, i.width_bytes)
    # runtime unrolling (LLVM / nvcc): a loop whose global loads are U x those of the loop it runs into (or comes
    # from) is that loop unrolled U times, the other its remainder; they share one source-level trip count
    unroll = [(1, "")] * len(mains)
    # (global stores too, by width: two passes of a kernel, one only loading and the other also storing, are not
    # one loop however their loads compare)
    def mem_ops(lp: Loop) -> Counter:
        return Counter((i.base in _GLOBAL_STORES, i.width_bytes) for i in instrs
                       if (i.base in _GLOBAL_LOADS or i.base in _GLOBAL_STORES) and lp.contains(i.addr)
                       and not any(c.contains(i.addr) for c in lp.children))
    gl = [mem_ops(lp) for lp in mains]
    for a in range(len(mains)):
        for b in range(len(mains)):
            if a == b or unroll[a][1] or unroll[b][1] or not gl[b]:
                continue
            u = sum(gl[a].values()) // sum(gl[b].values())
            if u >= 2 and all(gl[a][w] == u * gl[b][w] for w in set(gl[a]) | set(gl[b])) and \
                    (_loop_reaches(instrs, mains[a], mains[b]) or _loop_reaches(instrs, mains[b], mains[a])):
                unroll[a], unroll[b] = (u, "unrolled"), (u, "remainder")
                notes.append(f"main loop at {mains[a].header:#x} is unrolled {u}x, with its remainder loop at "
                             f"{mains[b].header:#x}: one source loop (trips / {u} and trips mod {u})")
    if weight_param_offsets is None:
        src = "widest global load in the main loop (weight pointer not named)"
        widest_w = widest_any or None
    else:
        src = "loads whose address derives from the weight pointer"
    return FunctionStats(
        name=name, n_instrs=n_live, outside=sum(outside_mix.values()),
        main_loops=[(lp.header, sum(main_mix[j].values())) for j, lp in enumerate(mains)],
        inner_loops=[(lp.header, j, sum(inner_mix[q].values())) for q, (lp, j) in enumerate(inner)],
        loop_mix=dict(loop_mix), outside_mix=dict(outside_mix), inner_mix=[dict(c) for c in inner_mix],
        main_mix=[dict(c) for c in main_mix], widest_weight_load_bytes=widest_w, widest_loop_load_bytes=widest_any,
        weight_load_source=src, loop_load_bytes=loop_bytes, inner_load_bytes=inner_bytes, notes=notes, unroll=unroll)


def _split_unrolled(trips: List[float], unroll: List[Tuple[int, str]]) -> None:
    """Source trips t of an unrolled loop and its remainder -> floor(t / U) and t - U floor(t / U) (in place)."""
    rem = [j for j, (_, role) in enumerate(unroll) if role == "remainder"]
    for j, (u, role) in enumerate(unroll):
        if role != "unrolled":
            continue
        r = rem.pop(0)
        t = trips[j]
        trips[j] = float(math.floor(t / u))
        trips[r] = t - u * trips[j]


def _peeled_unroll(st: FunctionStats, trip_load_bytes, unroll: List[Tuple[int, str]]) -> List[int]:
    """Per main loop, how many source iterations one trip runs (refinement (c) of the module docstring): the
    loop's global load bytes per trip / ``trip_load_bytes`` when that is an integer >= 2, else 1."""
    nm = len(st.main_loops)
    if trip_load_bytes is None:
        return [1] * nm
    per = list(trip_load_bytes) if isinstance(trip_load_bytes, (list, tuple)) else [trip_load_bytes] * nm
    if len(per) != nm:
        raise ValueError(f"{st.name}: trip_load_bytes has {len(per)} values but the code has {nm} main loops")
    out = []
    for j in range(nm):
        b, want = float(st.loop_load_bytes[j]), float(per[j])
        if want <= 0:
            raise ValueError(f"{st.name}: trip_load_bytes must be > 0, got {per[j]!r}")
        u = b / want
        out.append(int(round(u)) if unroll[j][1] == "" and round(u) >= 2 and abs(u - round(u)) < 1e-6 else 1)
    return out


def executed_per_thread(st: FunctionStats, loop_trips, inner_trips: Optional[Sequence[float]] = None,
                        trip_load_bytes=None) -> Tuple[float, Counter, float, List[str]]:
    """(instructions executed per thread, executed mix per thread, global load bytes per thread in the main loops,
    notes) for the trips of a launch descriptor."""
    notes: List[str] = list(st.notes)
    nm = len(st.main_loops)
    unroll = st.unroll or [(1, "")] * nm
    peeled = _peeled_unroll(st, trip_load_bytes, unroll)
    if isinstance(loop_trips, (list, tuple)):
        trips = [float(t) for t in loop_trips]
        src_loops = nm - sum(1 for _, role in unroll if role == "remainder")
        if len(trips) == src_loops and src_loops != nm:  # one value per source loop: expand unroll groups
            it = iter(trips)
            trips = [0.0 if role == "remainder" else next(it) for _, role in unroll]
            _split_unrolled(trips, unroll)
        elif nm and len(trips) != nm:
            raise ValueError(f"{st.name}: loop_trips has {len(trips)} values but the code has {nm} main loops")
    else:
        trips = [float(loop_trips)] * nm
        _split_unrolled(trips, unroll)
    for j, u in enumerate(peeled):
        if u > 1:
            notes.append(f"main loop at {st.main_loops[j][0]:#x} loads {u} source iterations per trip (unrolled {u}x, "
                         f"remainder peeled): {trips[j]:g} source trips -> {math.floor(trips[j] / u)}")
            trips[j] = float(math.floor(trips[j] / u))
    inner_t = list(inner_trips) if inner_trips is not None else []
    if st.inner_loops and not inner_t:
        notes.append(f"{len(st.inner_loops)} inner loop(s) counted once per main-loop trip (no inner_loop_trips)")
        inner_t = [1.0] * len(st.inner_loops)
    if len(inner_t) != len(st.inner_loops):
        raise ValueError(f"{st.name}: inner_loop_trips has {len(inner_t)} values but the main loops hold "
                         f"{len(st.inner_loops)} nested loops")
    if nm == 0:
        notes.append("no main loop found (no loop with a global load): every instruction counted once")
    mix: Counter = Counter(st.outside_mix)
    total = float(st.outside)
    load_bytes = 0.0
    for j, (_, n) in enumerate(st.main_loops):
        t = float(trips[j])
        total += n * t
        load_bytes += st.loop_load_bytes[j] * t
        for k, v in st.main_mix[j].items():
            mix[k] += v * t
    for q, (_, j, n2) in enumerate(st.inner_loops):
        t = float(trips[j]) * float(inner_t[q])
        total += n2 * t
        load_bytes += st.inner_load_bytes[q] * t
        for k, v in st.inner_mix[q].items():
            mix[k] += v * t
    return total, mix, load_bytes, notes


# ---- the roofline --------------------------------------------------------------------------------------------------
def predict_launch(c: Constants, *, thread_instrs_per_cta: float, ctas: int, threads_per_cta: int, nbytes: float,
                   mma_flops: float = 0.0, tc_rate: Optional[float] = None) -> Dict[str, float]:
    """Time of one launch in µs: max(memory, issue, tensor cores) + launch overhead (module docstring, step 6)."""
    ctas = max(1, int(ctas))
    active = min(c.sms, ctas)
    per_sm = math.ceil(ctas / c.sms)  # CTAs on the busiest SM
    warps = per_sm * max(1, math.ceil(threads_per_cta / c.warp_size))
    sched = min(c.schedulers_per_sm, warps)
    issue = per_sm * thread_instrs_per_cta / c.warp_size / (sched * c.clock_hz)
    bw = c.hbm_Bps * min(1.0, active * c.sm_bw_share_cap / c.sms)
    mem = nbytes / bw
    rate = c.bf16_tc_flops if tc_rate is None else tc_rate
    mma = per_sm * (mma_flops / ctas) / (rate / c.sms * c.tc_efficiency) if mma_flops else 0.0
    parts = {"memory": mem, "issue": issue, "tensor": mma}
    bound = max(parts, key=parts.get)
    return dict(memory_us=mem * 1e6, issue_us=issue * 1e6, tensor_us=mma * 1e6, bound=bound,
                us=max(parts.values()) * 1e6 + c.launch_overhead_us)


def cublas_bf16_us(c: Constants, M: int, N: int, K: int) -> float:
    """cuBLAS bf16 ``x @ W.T`` bounded the same way: unique HBM bytes / BW vs flops / (bf16 rate x efficiency)."""
    nbytes = 2 * N * K + 2 * M * K + 2 * M * N
    return max(nbytes / c.hbm_Bps, 2 * M * N * K / (c.bf16_tc_flops * c.tc_efficiency)) * 1e6 + c.launch_overhead_us


def eager_attention_us(c: Constants, B: int, H: int, L: int, d: int) -> float:
    """The eager materialized attention-map KL, fwd + bwd: fp32 maps of both models stream through HBM several times
    (``eager_attention_bytes_per_score`` per score element) and four L x L x d GEMMs (two forward, dQ and dK)."""
    scores = B * H * L * L
    mem = scores * c.eager_attention_bytes_per_score / c.hbm_Bps
    mm = 4 * 2 * scores * d / (c.bf16_tc_flops * c.tc_efficiency)
    return (mem + mm) * 1e6 + 10 * c.launch_overhead_us  # ~10 eager kernels


# ---- toolchain -----------------------------------------------------------------------------------------------------
class ToolMissing(RuntimeError):
    pass


class Toolchain:
    """nvdisasm / cuobjdump (from the Triton wheel, else PATH) and nvcc (``$NVCC``, PATH, ``$CUDA_HOME/bin``)."""

    def __init__(self):
        bins = []
        try:
            import triton

            bins.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
        except ImportError:
            pass
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if os.environ.get(var):
                bins.append(Path(os.environ[var]) / "bin")
        self._bins = bins

    def find(self, tool: str) -> Optional[str]:
        for b in self._bins:
            p = b / tool
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
        return shutil.which(tool)

    def need(self, tool: str) -> str:
        p = self.find(tool)
        if p is None:
            raise ToolMissing(f"{tool} not found (looked in the Triton wheel's backends/nvidia/bin, $CUDA_HOME/bin, "
                              f"PATH)")
        return p

    def nvcc(self) -> Optional[str]:
        return os.environ.get("NVCC") or shutil.which("nvcc") or self.find("nvcc")

    def version(self, tool: Optional[str]) -> Optional[str]:
        if not tool:
            return None
        try:
            out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.findall(r"release ([\d.]+), V([\d.]+)", out)
        return m[-1][1] if m else (out.strip().splitlines() or [None])[-1]

    def versions(self) -> Dict[str, Optional[str]]:
        try:
            import triton

            tv = triton.__version__
            from triton.backends.nvidia.compiler import get_ptxas

            try:
                px = get_ptxas()
                ptxas = px.path if hasattr(px, "path") else px[0]
            except TypeError:
                ptxas = get_ptxas(90).path
        except Exception:
            tv, ptxas = None, self.find("ptxas")
        return {"triton": tv, "triton_ptxas": self.version(ptxas), "nvcc": self.version(self.nvcc()),
                "nvdisasm": self.version(self.find("nvdisasm")), "cuobjdump": self.version(self.find("cuobjdump"))}


def _run(cmd: List[str], **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 900), **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout + r.stderr


def parse_res_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump -res-usage``: {function: {"REG", "STACK", "SHARED", "LOCAL"}}."""
    out: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


def parse_kparams(text: str) -> Dict[str, Dict[int, Tuple[int, int]]]:
    """``cuobjdump -elf``: {function: {parameter ordinal: (offset, size)}} from EIATTR_KPARAM_INFO."""
    out: Dict[str, Dict[int, Tuple[int, int]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)\s*$", line.strip())
        if m:
            cur = m.group(1)
            out.setdefault(cur, {})
            continue
        m = re.search(r"Ordinal\s*:\s*(0x[0-9a-fA-F]+)\s+Offset\s*:\s*(0x[0-9a-fA-F]+)\s+Size\s*:\s*(0x[0-9a-fA-F]+)",
                      line)
        if m and cur:
            out[cur][int(m.group(1), 16)] = (int(m.group(2), 16), int(m.group(3), 16))
    return out


def parse_ptxas_spills(log: str) -> Dict[str, int]:
    """``-Xptxas -v``: {function: spill store bytes}."""
    out: Dict[str, int] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and cur:
            out[cur] = int(m.group(1))
    return out


@dataclass
class Binary:
    """One compiled kernel: its SASS analysis inputs and resource usage."""
    name: str
    instrs: List[Instr]
    registers: int
    spill_bytes: int
    smem_bytes: int
    params: Dict[int, Tuple[int, int]]
    arg_order: List[str] = field(default_factory=list)  # Triton: non-constexpr arguments = parameter ordinals
    analyses: Dict[Any, "FunctionStats"] = field(default_factory=dict)  # per weight-pointer offsets

    # pickled (the disk cache) with the instructions as plain tuples, rebuilt only when an analysis not in the cache
    # needs them: a rerun loads hundreds of Binaries, and thousands of Instr objects each are slow to unpickle
    def __getstate__(self):
        d = dict(self.__dict__)
        ins = d.pop("instrs", None)
        d["_packed_instrs"] = d.get("_packed_instrs") if ins is None else \
            [(i.addr, i.pred, i.op, tuple(i.operands), i.target) for i in ins]
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)

    def __getattr__(self, name):
        packed = self.__dict__.get("_packed_instrs")
        if name == "instrs" and packed is not None:
            self.instrs = [Instr(a, p, op, list(ops), t) for a, p, op, ops, t in packed]
            del self.__dict__["_packed_instrs"]
            return self.instrs
        raise AttributeError(name)


_CACHE_FORMAT = 3  # bump when the pickled Binary changes shape


class _CacheUnpickler(pickle.Unpickler):
    """Reads the disk cache without running code from it: the only globals a cache file may name are this module's
    plain dataclasses (what :meth:`Compiler._disk_store` writes); anything else -- a planted or foreign file -- is
    refused (``UnpicklingError``), and the entry is recompiled (the "Restricting Globals" recipe of the pickle docs)."""

    _ALLOWED = frozenset({"Binary", "Instr", "FunctionStats", "Loop"})

    def find_class(self, module, name):
        if module == "pyquant.bench.static" and name in self._ALLOWED:  # also when this file runs as __main__
            from pyquant.bench import static

            return getattr(static, name)
        raise pickle.UnpicklingError(f"the static-analysis cache may not name {module}.{name}")


_CODE_HASH: Optional[str] = None


def _code_hash() -> str:
    """Hash of the code that turns a compile into the cached result -- this module's SASS parsing and analysis, the
    resource parsers, :class:`Binary` and the compile/inspect methods of :class:`Compiler` -- so a cached parsed
    result is reused only if that code is unchanged (the roofline, the printers, the CLI may change freely).  Read
    once per process (a compile worker gets its parent's fingerprint)."""
    global _CODE_HASH
    if _CODE_HASH is None:
        import inspect

        text = Path(__file__).read_text()
        parts = []
        for start, end in (("# ---- SASS parsing", "# ---- the roofline"), ("# ---- toolchain", "_CACHE_FORMAT =")):
            i = text.find(start)
            j = text.find(end, i)
            parts.append(text[i:j] if i >= 0 and j >= 0 else text)
        parts += [inspect.getsource(m) for m in (Compiler._inspect, Compiler._compile_triton, Compiler._build_cuda)]
        _CODE_HASH = hashlib.sha256(f"{_CACHE_FORMAT}\n".encode() + "\n".join(parts).encode()).hexdigest()[:16]
    return _CODE_HASH


_FORK_FNS: Dict[int, Any] = {}  # the JIT functions of the launches being compiled, inherited by forked workers


def _resolve_fn(ref: Tuple[str, str, int]):
    """The @triton.jit function of ``(module, name, id)``: a forked worker has it already; a spawned one imports
    the module and takes the attribute (unwrapping ``@triton.autotune`` / ``@triton.heuristics``)."""
    mod_name, name, fid = ref
    fn = _FORK_FNS.get(fid)
    if fn is not None:
        return fn
    mod = sys.modules.get(mod_name)
    if mod is None:
        import importlib

        mod = importlib.import_module(mod_name)
    fn = getattr(mod, name, None)
    while fn is not None and not hasattr(fn, "cache_key") and hasattr(fn, "fn"):
        fn = fn.fn
    if fn is None:
        raise RuntimeError(f"compile worker: {mod_name}.{name} is not importable by name")
    return fn


class Compiler:
    """Compiles launches for sm_90 and caches the results (see the module docstring, steps 2-3).

    Two cache levels: in memory for the run, and on disk (``cache_dir``; ``persist=False`` turns it off) holding
    the *parsed* result of each compile (SASS, registers, spills, shared memory, parameter offsets and the main-loop
    analysis), so a rerun repeats no compile, no disassembly and no analysis.  A Triton entry is keyed by the
    compile inputs (function, its ``cache_key`` = Triton's hash of the kernel source and of every function and
    global it uses, signature, constexprs, the specialization applied, warps, stages), the Triton and ptxas
    versions and the hash of this module's parsing/analysis code, so editing a kernel recompiles exactly the
    launches of that kernel.  A CUDA entry is keyed by (source, flags) and the hash of every ``.cu``/``.h`` beside
    the source, the nvcc version and the same code hash: one nvcc compile per (source, flags).  :meth:`prepare`
    compiles every distinct launch of a set of calls up front, in ``jobs`` processes."""

    def __init__(self, arch: str = "sm_90a", tools: Optional[Toolchain] = None, cache_dir: Optional[Path] = None,
                 persist: bool = True):
        if arch not in ("sm_90", "sm_90a"):
            raise ValueError(f"arch={arch!r}: expected 'sm_90' or 'sm_90a'")
        self.arch = arch
        self.tools = tools or Toolchain()
        if cache_dir is None:
            env = os.environ.get("PYQUANT_STATIC_CACHE")
            cache_dir = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
                / "pyquant" / "static"
        self.cache_dir = Path(cache_dir)
        self.persist = persist
        self._triton: Dict[Any, Any] = {}  # key -> Binary, or the exception its compile raised
        self._cuda_funcs: Dict[Any, Any] = {}  # (source, flags) -> {function: Binary}, or an exception
        self._fingerprint: Optional[str] = None
        # what this process did: compiles run, parsed results read back from disk
        self.stats: Counter = Counter()

    # -- cubin -> Binary(s)
    def _inspect(self, cubin: bytes, spills: Optional[Dict[str, int]] = None) -> Dict[str, Binary]:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "k.cubin"
            p.write_bytes(cubin)
            nvdisasm = self.tools.find("nvdisasm")
            cuobjdump = self.tools.need("cuobjdump")
            sass = _run([nvdisasm, "-c", str(p)]) if nvdisasm else _run([cuobjdump, "-sass", str(p)])
            res = parse_res_usage(_run([cuobjdump, "-res-usage", str(p)]))
            kp = parse_kparams(_run([cuobjdump, "-elf", str(p)]))
        out = {}
        for name, ins in parse_sass(sass).items():
            r = res.get(name, {})
            sp = (spills or {}).get(name, max(r.get("STACK", 0), r.get("LOCAL", 0)))  # spills live in the frame
            out[name] = Binary(name, ins, r.get("REG", 0), sp, r.get("SHARED", 0), kp.get(name, {}))
        return out

    # -- the disk cache of parsed results
    def _toolchain_fingerprint(self) -> str:
        if self._fingerprint is None:
            v = self.tools.versions()
            knobs = {k: os.environ.get(k) for k in ("TRITON_DEFAULT_FP_FUSION", "DISABLE_LLVM_OPT", "MLIR_ENABLE_DUMP",
                                                     "TRITON_PTXAS_PATH", "TRITON_ENABLE_FAST_MATH")}
            self._fingerprint = repr((self.arch, v.get("triton"), v.get("triton_ptxas"), sorted(knobs.items()),
                                      _code_hash()))
        return self._fingerprint

    def _disk_path(self, kind: str, key) -> Path:
        h = hashlib.sha256(repr((kind, key, self._toolchain_fingerprint())).encode()).hexdigest()[:32]
        return self.cache_dir / "parsed" / f"{kind}-{h}.pkl"

    def _disk_load(self, path: Path):
        if not self.persist or not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                fmt, obj = _CacheUnpickler(f).load()
        except Exception:  # a truncated or foreign file: recompile (and overwrite it)
            self.stats["disk_unreadable"] += 1
            return None
        return obj if fmt == _CACHE_FORMAT else None

    def _disk_store(self, path: Path, obj) -> None:
        if not self.persist:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump((_CACHE_FORMAT, obj), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    # -- Triton
    def _triton_inputs(self, spec: Dict[str, Any]):
        """(cache key, fn, full signature, constexprs, names specialized as multiples of 16, warps, stages): the
        compile inputs of one launch, i.e. exactly what makes two launches compile to the same cubin."""
        fn = spec["fn"]
        if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("the Triton function is an interpreter function (TRITON_INTERPRET=1 is set): run "
                               "`pyquant bench static` without TRITON_INTERPRET")
        sig = dict(spec["signature"])
        consts = dict(spec.get("constexprs", {}))
        attrs_names = []
        for a, v in (spec.get("specialize") or {}).items():  # the JIT's specialization of runtime values
            if a not in sig:
                raise ValueError(f"specialize names {a!r}, not an argument of {fn.__name__}")
            if isinstance(v, bool) or not isinstance(v, int):
                continue
            if v == 1:
                sig[a], consts[a] = "constexpr", 1
            elif v % 16 == 0:
                attrs_names.append(a)
        # kernel owners may name the runtime ints the JIT would see as multiples of 16 directly
        for a in list(spec.get("divisible_by_16") or []) + list(spec.get("divisibility") or []):
            if a in sig and sig[a] != "constexpr" and a not in consts:
                attrs_names.append(a)
        for a, t in sig.items():
            if isinstance(t, str) and t.startswith("*") and a not in consts:
                attrs_names.append(a)
        missing = [a for a in fn.arg_names if a not in sig]
        if missing:
            raise ValueError(f"signature of {fn.__name__} misses arguments {missing}")
        for a, t in sig.items():
            if t == "constexpr" and a not in consts:
                raise ValueError(f"{fn.__name__}: {a} is a constexpr without a value in constexprs")
        nw, ns = int(spec.get("num_warps", 4)), int(spec.get("num_stages", 2))
        sig_full = {a: sig[a] for a in fn.arg_names}
        attrs = tuple(sorted(set(attrs_names)))
        key = (fn.__module__, fn.__name__, getattr(fn, "cache_key", ""), tuple(sorted(sig_full.items())),
               tuple(sorted((k, repr(v)) for k, v in consts.items())), attrs, nw, ns)
        return key, fn, sig_full, consts, attrs, nw, ns

    def triton_key(self, spec: Dict[str, Any]):
        return self._triton_inputs(spec)[0]

    def triton(self, spec: Dict[str, Any]) -> Binary:
        key, fn, sig_full, consts, attrs, nw, ns = self._triton_inputs(spec)
        b = self._triton.get(key)
        if b is None:
            path = self._disk_path("triton", key)
            b = self._disk_load(path)
            if b is not None:
                self.stats["triton_disk_hits"] += 1
            else:
                try:
                    b = self._compile_triton(fn, sig_full, consts, attrs, nw, ns)
                except ToolMissing:
                    raise
                except Exception as e:  # remembered for the run: every launch with these inputs fails alike
                    self._triton[key] = e
                    raise
                self.stats["triton_compiled"] += 1
                self.analysis(b, _weight_offsets(b, {"triton": spec}))  # cached with it
                self._disk_store(path, b)
            self._triton[key] = b
        else:
            self.stats["triton_memory_hits"] += 1
        if isinstance(b, Exception):
            raise b
        return b

    def _compile_triton(self, fn, sig_full, consts, attrs, nw, ns) -> Binary:
        import triton
        from triton.compiler import ASTSource
        try:
            from triton.backends.compiler import GPUTarget
        except ImportError:  # pragma: no cover - older layout
            from triton.compiler.compiler import GPUTarget  # type: ignore
        idx = {a: i for i, a in enumerate(fn.arg_names)}
        cx = {(idx[a],): v for a, v in consts.items()}
        attr_d = {(idx[a],): [["tt.divisibility", 16]] for a in attrs}
        try:
            src = ASTSource(fn=fn, signature=sig_full, constexprs=cx, attrs=attr_d)
        except TypeError as e:
            raise RuntimeError(f"this Triton's ASTSource API is not supported ({e})") from None
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))
        bins = self._inspect(ck.asm["cubin"])
        name = ck.metadata.name if hasattr(ck.metadata, "name") else fn.__name__
        b = bins.get(name) or next(iter(bins.values()))
        b.smem_bytes = max(b.smem_bytes, int(getattr(ck.metadata, "shared", 0) or 0))
        b.params = b.params or {}
        b.arg_order = [a for a in fn.arg_names if sig_full[a] != "constexpr"]
        return b

    @staticmethod
    def analysis(b: Binary, weight_offsets: Optional[List[int]]) -> "FunctionStats":
        """The main-loop analysis of ``b`` for these weight-pointer offsets (computed once per Binary)."""
        akey = None if weight_offsets is None else tuple(weight_offsets)
        st = b.analyses.get(akey)
        if st is None:
            st = b.analyses[akey] = analyze(b.instrs, weight_offsets, name=b.name)
        return st

    # -- CUDA
    def _nvcc_flags(self, flags: Sequence[str]) -> List[str]:
        out = [f for f in flags if not f.startswith(("-arch", "-gencode", "--gpu-architecture"))]
        return out + [f"-arch={self.arch}"]

    def _resolve_source(self, source: str) -> Path:
        p = Path(source)
        if p.is_absolute() and p.is_file():
            return p
        p = REPO / source
        if p.is_file():
            return p
        q = Path(__file__).resolve().parents[1] / source  # wheel install: pyquant/csrc/...
        if q.is_file():
            return q
        raise FileNotFoundError(f"CUDA source {source!r} not found under {REPO} or the pyquant package")

    def cuda_key(self, spec: Dict[str, Any]):
        return (spec["source"], tuple(self._nvcc_flags(spec.get("nvcc_flags", []))))

    def _cuda_functions(self, key) -> Dict[str, Binary]:
        funcs = self._cuda_funcs.get(key)
        if funcs is None:
            try:
                funcs = self._build_cuda(key)
            except ToolMissing:
                raise
            except Exception as e:
                self._cuda_funcs[key] = e
                raise
            self._cuda_funcs[key] = funcs
        if isinstance(funcs, Exception):
            raise funcs
        return funcs

    def _build_cuda(self, key) -> Dict[str, Binary]:
        source, flags = key
        nvcc = self.tools.nvcc()
        if not nvcc:
            raise ToolMissing("nvcc not found ($NVCC, PATH)")
        src = self._resolve_source(source)
        h = hashlib.sha256()
        for f in sorted(src.parent.glob("*")):
            if f.suffix in (".cu", ".h", ".cuh"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
        h.update(repr(flags).encode())
        h.update((self.tools.version(nvcc) or "").encode())
        stem = f"{src.stem}-{h.hexdigest()[:20]}"
        parsed = self._disk_path("cuda", (stem, self.arch))
        funcs = self._disk_load(parsed)
        if funcs is not None:
            self.stats["cuda_disk_hits"] += 1
            return funcs
        cub, log = self.cache_dir / f"{stem}.cubin", self.cache_dir / f"{stem}.log"
        if not (self.persist and cub.is_file() and log.is_file()):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "k.cubin"
                text = _run([nvcc, "-cubin", "-Xptxas", "-v", f"-I{src.parent}", *flags, "-o", str(out), str(src)])
                self.stats["cuda_compiled"] += 1
                cubin = out.read_bytes()
            if self.persist:
                for p, data in ((cub, cubin), (log, text.encode())):
                    tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
                    tmp.write_bytes(data)
                    os.replace(tmp, p)
        else:
            cubin, text = cub.read_bytes(), log.read_text()
        funcs = self._inspect(cubin, parse_ptxas_spills(text))
        self._disk_store(parsed, funcs)
        return funcs

    def cuda(self, spec: Dict[str, Any]) -> Binary:
        funcs = self._cuda_functions(self.cuda_key(spec))
        rx = re.compile(spec["kernel_regex"])
        hit = sorted(n for n in funcs if rx.search(n))
        if len(hit) != 1:
            raise ValueError(f"kernel_regex {spec['kernel_regex']!r} matches {len(hit)} kernels in "
                             f"{spec['source']} (expected exactly 1): {hit[:4]}")
        return funcs[hit[0]]

    # -- every distinct launch of a set of calls, up front, in parallel
    def prepare(self, calls: Iterable[Dict[str, Any]], jobs: int = 1, log=print, verbose: bool = False) \
            -> Dict[str, Any]:
        """Compile (or read back from the disk cache) every distinct launch of ``calls``, in ``jobs`` worker
        processes; afterwards :meth:`triton` / :meth:`cuda` answer from memory.  Returns the counts: launches,
        distinct compile inputs, compiled now, read from disk, failed, and the CPU seconds the compiles took (the
        compilers' subprocesses included: the wall time an idle machine with ``jobs`` cores would need is about
        that / ``jobs``).  ``verbose`` logs every compile with its CPU time."""
        tri: Dict[Any, Dict[str, Any]] = {}
        cud: Dict[Any, Dict[str, Any]] = {}
        n_launch = 0
        for call in calls:
            for la in call["launches"]:
                if "triton" in la:
                    n_launch += 1
                    try:
                        k = self.triton_key(la["triton"])
                    except Exception:
                        continue  # reported by score_call for its row
                    tri.setdefault(k, la["triton"])
                elif "cuda" in la:
                    n_launch += 1
                    cud.setdefault(self.cuda_key(la["cuda"]), la["cuda"])
        counts = dict(launches=n_launch, distinct_triton=len(tri), distinct_cuda=len(cud), from_disk=0, compiled=0,
                      failed=0, compile_cpu_s=0.0)
        todo: List[Tuple[str, Any, Any]] = []
        for k in cud:
            if k in self._cuda_funcs:
                continue
            todo.append(("cuda", k, None))
        for k, spec in tri.items():
            if k in self._triton:
                continue
            b = self._disk_load(self._disk_path("triton", k))
            if b is not None:
                self._triton[k] = b
                counts["from_disk"] += 1
                self.stats["triton_disk_hits"] += 1
                continue
            todo.append(("triton", k, spec))
        if self.stats["disk_unreadable"]:
            log(f"{self.stats['disk_unreadable']} entries of {self.cache_dir} could not be read: compiled again")
        if not todo:
            return counts
        jobs = max(1, min(int(jobs), len(todo)))
        log(f"compiling {len(todo)} distinct launches ({len(tri)} Triton, {len(cud)} CUDA; "
            f"{counts['from_disk']} read from {self.cache_dir}) in {jobs} process(es)")
        t0 = time.monotonic()
        done = 0

        def finished(kind, k, res, stats, cpu, merge=True):
            nonlocal done
            done += 1
            (self._cuda_funcs if kind == "cuda" else self._triton)[k] = res
            if isinstance(res, ToolMissing):
                raise res
            hit = stats.get("cuda_disk_hits") or stats.get("triton_disk_hits")  # a CUDA entry is looked up here
            counts["failed" if isinstance(res, Exception) else "from_disk" if hit else "compiled"] += 1
            counts["compile_cpu_s"] = round(counts["compile_cpu_s"] + cpu, 2)
            if merge:  # a worker's counts (in-process builds counted themselves)
                self.stats.update(stats)
            if verbose:
                log(f"  [{done}/{len(todo)}] {_describe(kind, k)}: {cpu:.1f} CPU s"
                    + (f" FAILED {str(res)[:120]}" if isinstance(res, Exception) else ""))
            elif done % 10 == 0 or done == len(todo):
                el = time.monotonic() - t0
                log(f"  [{done}/{len(todo)}] compiled, {el:.0f} s ({counts['compile_cpu_s']:.0f} CPU s), "
                    f"~{el / done * (len(todo) - done):.0f} s left")

        if jobs == 1:
            for kind, k, spec in todo:
                before = Counter(self.stats)
                res, cpu = _build_one(self, kind, k, spec)
                finished(kind, k, res, self.stats - before, cpu, merge=False)
            return counts
        import concurrent.futures as cf
        import multiprocessing as mp

        try:
            ctx = mp.get_context("fork")  # workers inherit the loaded kernel modules
        except ValueError:  # pragma: no cover - no fork on this platform
            ctx = mp.get_context("spawn")
        _FORK_FNS.clear()
        tasks = [(kind, k, spec if kind == "cuda" else _picklable_spec(spec)) for kind, k, spec in todo]
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                    initargs=(self.arch, str(self.cache_dir), self.persist,
                                              self._toolchain_fingerprint())) as pool:
            futs = {pool.submit(_worker_build, kind, k, task): (kind, k) for kind, k, task in tasks}
            try:
                for f in cf.as_completed(futs):
                    kind, k = futs[f]
                    try:
                        res, cpu, stats = f.result()
                    except Exception as e:  # the worker died (e.g. out of memory): that launch fails
                        res, cpu, stats = RuntimeError(f"compile worker failed: {type(e).__name__}: {e}"), 0.0, {}
                    finished(kind, k, res, stats, cpu)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        return counts


def _picklable_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A Triton launch spec with its JITFunction replaced by (module, name), to cross into a worker process."""
    out = dict(spec)
    fn = out.pop("fn")
    _FORK_FNS[id(fn)] = fn
    out["fn_ref"] = (fn.__module__, fn.__name__, id(fn))
    return out


def _cpu_s() -> float:
    """CPU seconds of this process and its finished subprocesses (ptxas, nvcc, nvdisasm)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _build_one(comp: Compiler, kind: str, key, spec) -> Tuple[Any, float]:
    """Build one distinct launch in ``comp``: (the Binary (Triton) or function dict (CUDA), or the exception; the
    CPU seconds it took)."""
    c0 = _cpu_s()
    try:
        res = comp._cuda_functions(key) if kind == "cuda" else comp.triton(spec)
    except Exception as e:
        res = e
    return res, _cpu_s() - c0


def _describe(kind: str, key) -> str:
    if kind == "cuda":
        return f"nvcc {key[0]} {' '.join(key[1])}"
    consts = " ".join(f"{a}={v}" for a, v in key[4] if a[:1].isupper() and v not in ("None",))
    return f"{key[1]} {consts} warps={key[6]} stages={key[7]}"[:200]


_WORKER: Dict[str, Any] = {}


def _worker_init(arch: str, cache_dir: str, persist: bool, fingerprint: str) -> None:
    comp = Compiler(arch, cache_dir=Path(cache_dir), persist=persist)
    comp._fingerprint = fingerprint  # exactly the parent's keys, whatever changed on disk since it started
    _WORKER["comp"] = comp


def _worker_build(kind: str, key, task):
    comp: Compiler = _WORKER["comp"]
    comp.stats.clear()
    if kind == "triton":
        task = dict(task)
        task["fn"] = _resolve_fn(task.pop("fn_ref"))
    res, cpu = _build_one(comp, kind, key, task)
    if isinstance(res, Exception):  # exceptions cross back as plain RuntimeErrors (their types may not pickle)
        res = res if isinstance(res, ToolMissing) else RuntimeError(f"{type(res).__name__}: {res}")
    return res, cpu, dict(comp.stats)


# ---- descriptors -> rows -------------------------------------------------------------------------------------------
_CALL_KEYS = {"kernel", "backend", "config", "launches"}
_LAUNCH_KEYS = {"name", "grid", "threads_per_cta", "loop_trips", "weights", "bytes", "mma_flops"}


def check_call(call: Dict[str, Any]) -> None:
    """Validate one descriptor (the interface shared with the kernel modules); clear errors name the field."""
    miss = _CALL_KEYS - set(call)
    if miss:
        raise ValueError(f"static_launches descriptor misses {sorted(miss)}: {call.get('kernel')!r}")
    if call["backend"] not in ("triton", "cuda"):
        raise ValueError(f"descriptor backend={call['backend']!r}: expected 'triton' or 'cuda'")
    for la in call["launches"]:
        miss = _LAUNCH_KEYS - set(la)
        if miss:
            raise ValueError(f"launch {la.get('name')!r} of {call['kernel']!r} misses {sorted(miss)}")
        if sum(k in la for k in ("triton", "cuda", "builtin", "library")) != 1:
            raise ValueError(f"launch {la['name']!r} of {call['kernel']!r}: give exactly one of 'triton', 'cuda', "
                             f"'builtin' (a torch side kernel: bytes only) or 'library' (a cuBLAS GEMM)")
        if "library" not in la and (len(la["grid"]) != 3 or any(int(g) < 0 for g in la["grid"])):
            raise ValueError(f"launch {la['name']!r}: grid must be [gx, gy, gz] >= 0, got {la['grid']}")


def _weight_offsets(b: Binary, la: Dict[str, Any]) -> Optional[List[int]]:
    """Parameter-bank offsets of the weight pointer, or None when the launch does not name one."""
    if "triton" in la:
        spec = la["triton"]
        w = spec.get("weight_arg", "__default__")
        if w == "__default__":
            w = next((a for a in spec["fn"].arg_names if re.search(r"(^|_)(qw|qweight|packed)(_|$)", a)), None)
        if w is None:
            return None
        ords = b.arg_order
        if w not in ords:
            return []  # the weight pointer is a constexpr (None): no weight loads
        ordinal = ords.index(w)
    else:
        w = la["cuda"].get("weight_arg")
        if w is None:
            return None
        ordinal = int(w)
    if ordinal in b.params:
        return [b.params[ordinal][0]]
    return None


def score_call(comp: Compiler, c: Constants, call: Dict[str, Any]) -> Dict[str, Any]:
    """Compile and analyse every launch of one descriptor; the call's predicted time and per-weight counts."""
    check_call(call)
    total_instr, weights, nbytes, us = 0.0, 0, 0, 0.0
    mix: Counter = Counter()
    launches, notes = [], []
    main = None
    loop_load, loop_bytes_desc = 0.0, 0
    for la in call["launches"]:
        weights += int(la["weights"])
        nbytes += int(la["bytes"])
        if "library" in la:  # a library GEMM (cuBLAS): bounded like the cuBLAS baseline, by bytes and MMA flops
            us_lib = max(int(la["bytes"]) / c.hbm_Bps, float(la.get("mma_flops", 0))
                         / (c.bf16_tc_flops * c.tc_efficiency)) * 1e6 + c.launch_overhead_us
            us += us_lib
            launches.append(dict(name=la["name"], library=la["library"], bytes=int(la["bytes"]),
                                 mma_flops=int(la.get("mma_flops", 0)), predicted_us=us_lib, bound="library"))
            notes.append(f"{la['name']}: library GEMM, bounded like the cuBLAS baseline (instructions not counted)")
            continue
        gx, gy, gz = (int(g) for g in la["grid"])
        ctas, tpc = gx * gy * gz, int(la["threads_per_cta"])
        if "builtin" in la:
            p = predict_launch(c, thread_instrs_per_cta=0, ctas=max(ctas, 1), threads_per_cta=max(tpc, 1),
                               nbytes=int(la["bytes"]))
            us += p["us"]
            launches.append(dict(name=la["name"], builtin=la["builtin"], ctas=ctas, bytes=int(la["bytes"]),
                                 predicted_us=p["us"], bound=p["bound"]))
            notes.append(f"{la['name']}: torch kernel, bytes only (instructions not counted)")
            continue
        b = comp.triton(la["triton"]) if "triton" in la else comp.cuda(la["cuda"])
        wo = _weight_offsets(b, la)
        st = comp.analysis(b, wo)
        per_thread, pmix, lbytes, n = executed_per_thread(st, la["loop_trips"], la.get("inner_loop_trips"),
                                                        la.get("trip_load_bytes"))
        notes += [f"{la['name']}: {x}" for x in n]
        ti = per_thread * tpc * ctas
        total_instr += ti
        for k, v in pmix.items():
            mix[k] += v * tpc * ctas
        ops = set(st.loop_mix) | set(st.outside_mix)
        int8 = bool(ops & {"IMMA", "IGMMA"})
        sync = bool(ops & {"HMMA", "IMMA"}) and not (ops & {"HGMMA", "IGMMA"})
        rate = (c.int8_tc_flops if int8 else c.bf16_tc_flops) * (c.mma_sync_fraction if sync else 1.0)
        p = predict_launch(c, thread_instrs_per_cta=per_thread * tpc, ctas=ctas, threads_per_cta=tpc,
                           nbytes=int(la["bytes"]), mma_flops=float(la["mma_flops"]), tc_rate=rate)
        us += p["us"]
        smem = max(b.smem_bytes, int(la["cuda"].get("dynamic_smem_bytes", 0)) if "cuda" in la else 0)
        info = dict(name=la["name"], function=b.name, ctas=ctas, threads_per_cta=tpc, registers=b.registers,
                    spill_bytes=b.spill_bytes, smem_bytes=smem, sass_instrs=st.n_instrs,
                    instr_outside_loop=st.outside, main_loop_instrs=[m[1] for m in st.main_loops],
                    inner_loop_instrs=[m[2] for m in st.inner_loops], loop_trips=la["loop_trips"],
                    inner_loop_trips=la.get("inner_loop_trips"), trip_load_bytes=la.get("trip_load_bytes"),
                    instr_per_thread=per_thread,
                    widest_weight_load_bytes=st.widest_weight_load_bytes, weight_load_source=st.weight_load_source,
                    mma_flops=int(la["mma_flops"]),
                    bytes=int(la["bytes"]), predicted_us=p["us"], memory_us=p["memory_us"], issue_us=p["issue_us"],
                    tensor_us=p["tensor_us"], bound=p["bound"])
        launches.append(info)
        info_mix = dict(sorted(st.loop_mix.items()))
        if main is None or int(la["weights"]) > int(main[0].get("weights", 0)) or \
                (int(la["weights"]) == int(main[0].get("weights", 0)) and ti > main[2]):
            main = (la, info, ti, info_mix)
        loop_load += lbytes * tpc * ctas
        loop_bytes_desc += int(la["bytes"])
    if main is None:
        raise ValueError(f"{call['kernel']}: no compiled launch")
    mi = main[1]
    denom = max(weights, 1)
    return dict(
        registers=mi["registers"], spill_bytes=max(x.get("spill_bytes", 0) for x in launches),
        smem_bytes=mi["smem_bytes"], widest_weight_load_bytes=mi["widest_weight_load_bytes"],
        sass_instr_per_weight=total_instr / denom if weights else None, thread_instrs=total_instr,
        predicted_us=us, bound=mi["bound"], n_launches=len(launches), bytes=nbytes, weights=weights,
        mix_per_weight=_top_mix(mix, denom) if weights else {},
        loop_mix=main[3], loop_load_bytes_ratio=(loop_load / loop_bytes_desc) if loop_bytes_desc else None,
        launches=launches, notes=notes)


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def _top_mix(mix: Counter, denom: float, n: int = 16) -> Dict[str, float]:
    """Executed instructions per weight by opcode: the ``n`` largest, the rest summed as ``other``."""
    items = sorted(mix.items(), key=lambda kv: -kv[1])
    out = {k: _sig(v / denom) for k, v in items[:n]}
    rest = sum(v for _, v in items[n:]) / denom
    if rest:
        out["other"] = _sig(rest)
    return out


def _short_mix(mix: Dict[str, float], n: int = 6) -> str:
    return " ".join(f"{k}:{v:.2f}" for k, v in list(mix.items())[:n])


@dataclass(frozen=True)
class Filters:
    """A restriction of the benchmark set for iterating on one kernel (``--kernel``, ``--backend``, ``--m``,
    ``--shape``, ``--format``; each a list, empty = no restriction).  ``--m``, ``--shape`` and a packed-matmul
    ``--format`` select packed-matmul rows; attention-KD and MoE rows are kept only when none of ``--m`` /
    ``--shape`` is given and ``--format`` (if given) names ``attention`` / ``moe``.  ``kernel`` entries are
    shell-style patterns matched against the kernel name (``packed_gemv``, ``attention_kd_fwd``,
    ``grouped_packed_matmul:mixtral-8x7b:down``) and against its part before the first ``:``."""

    kernel: Tuple[str, ...] = ()
    backend: Tuple[str, ...] = ()
    m: Tuple[int, ...] = ()
    shape: Tuple[Tuple[int, int], ...] = ()
    format: Tuple[Tuple[str, Any], ...] = ()  # (format, group size); group size "*" = any, None = per-channel

    @property
    def active(self) -> bool:
        return bool(self.kernel or self.backend or self.m or self.shape or self.format)

    def describe(self) -> Dict[str, Any]:
        fmt = [f if g == "*" else f"{f}:{g or 'none'}" for f, g in self.format]
        return {k: v for k, v in dict(kernel=list(self.kernel), backend=list(self.backend), m=list(self.m),
                                      shape=[f"{n}x{k}" for n, k in self.shape], format=fmt).items() if v}

    def _fmt_ok(self, fmt: str, gs) -> bool:
        return not self.format or any(f == fmt and (g == "*" or g == gs) for f, g in self.format)

    def matmul(self, m: int, n: int, k: int, fmt: str, gs) -> bool:
        return (not self.m or m in self.m) and (not self.shape or (n, k) in self.shape) and self._fmt_ok(fmt, gs)

    def family(self, name: str) -> bool:
        """Attention-KD ("attention") or MoE ("moe") rows."""
        return not self.m and not self.shape and (not self.format or any(f == name for f, _ in self.format))

    def call(self, call: Dict[str, Any]) -> bool:
        if self.backend and call["backend"] not in self.backend:
            return False
        name = call["kernel"]
        return not self.kernel or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.split(":")[0], p)
                                      for p in self.kernel)


NO_FILTERS = Filters()


def _calls(quick: bool, log, filters: Filters = NO_FILTERS) -> Iterable[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(shape info, descriptor) for every call of the benchmark set (restricted by ``filters``)."""
    from .. import _cuda_ext
    from ..ops._dispatch import kernel_module

    pm = kernel_module("packed_matmul")
    shapes = QUICK_SHAPES if quick else SHAPES
    ms = QUICK_M if quick else M_VALUES
    fmts = QUICK_FORMATS if quick else FORMATS
    x_dtypes = ("bf16",) if quick else ("bf16", "int8")
    for (n, k) in shapes:
        for fmt, gs in fmts:
            for m in ms:
                if not filters.matmul(m, n, k, fmt, gs):
                    continue
                for xd in x_dtypes:
                    if xd == "int8" and (gs is None or m < 16):
                        continue  # W2A8 rows: group 128, M >= 16 (the large-M int8-MMA target)
                    info = dict(M=m, N=n, K=k, format=fmt, group_size=gs, x_dtype=xd)
                    if not filters.backend or "triton" in filters.backend:
                        calls = pm.static_launches(m, n, k, fmt, gs, x_dtype=xd)
                        if quick:
                            calls = calls[:QUICK_MAX_CONFIGS]
                        for call in calls:
                            if filters.call(call):
                                yield info, call
                    if xd == "bf16" and hasattr(_cuda_ext, "static_launches") and \
                            (not filters.backend or "cuda" in filters.backend):
                        cc = _cuda_ext.static_launches(m, n, k, fmt, gs)
                        for call in (cc[:QUICK_MAX_CONFIGS] if quick else cc):
                            if filters.call(call):
                                yield info, call
    ak = kernel_module("attention_kd")
    if hasattr(ak, "static_launches") and filters.family("attention"):
        a = ATTENTION_SHAPE
        calls = ak.static_launches(a["B"], a["H"], a["L"], a["d"], dtype="bf16")
        for call in (calls[:1] if quick else calls):
            if filters.call(call):
                yield dict(M=a["B"] * a["H"] * a["L"], N=a["L"], K=a["d"], format="attention", group_size=None,
                           x_dtype="bf16", B=a["B"], H=a["H"], L=a["L"], d=a["d"]), call


def _moe_calls(quick: bool, filters: Filters = NO_FILTERS) -> Iterable[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """The grouped packed matmul of MoE experts: decode (1 token: top_k experts with 1 row each) and prefill (4096
    tokens spread evenly over all experts), the gate_up (N=2I, K=H) and down (N=H, K=I) projections, ternary."""
    from ..ops._dispatch import kernel_module

    if not filters.family("moe"):
        return
    gk = kernel_module("grouped_packed_matmul")
    if not hasattr(gk, "static_launches"):
        return
    for model, E, H, inter, top_k in (MOE_SHAPES[:1] if quick else MOE_SHAPES):
        for t in (MOE_TOKENS[:1] if quick else MOE_TOKENS):
            active = min(E, t * top_k)
            rows = max(1, t * top_k // active)
            for proj, n, k in (("gate_up", 2 * inter, H), ("down", H, inter)):
                for call in gk.static_launches(rows * active, n, k, "twn", None, x_dtype="bf16", experts=active,
                                               rows_per_expert=rows):
                    call = dict(call, kernel=f"{call['kernel']}:{model}:{proj}")
                    if filters.call(call):
                        yield dict(M=rows * active, N=n, K=k, format="moe-twn", group_size=None, x_dtype="bf16",
                                   experts=active, rows_per_expert=rows, tokens=t), call


def benchmark_calls(quick: bool = False, filters: Filters = NO_FILTERS, log=print) \
        -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Every (shape info, descriptor) of the benchmark set (``--quick``: the reduced one), restricted by ``filters``."""
    return list(_calls(quick, log, filters)) + list(_moe_calls(quick, filters))


def run(c: Constants, arch: str = "sm_90a", quick: bool = False, log=print, *, jobs: Optional[int] = None,
        filters: Filters = NO_FILTERS, cache_dir: Optional[Path] = None, persist: bool = True,
        verbose: bool = False) -> Tuple[List[Dict], Dict]:
    """Score the benchmark set: every distinct launch is compiled once (``jobs`` processes, default one per CPU;
    parsed results persist in the disk cache, see :class:`Compiler`), then every call is scored from memory."""
    t0 = time.monotonic()
    comp = Compiler(arch, cache_dir=cache_dir, persist=persist)
    comp.tools.need("cuobjdump")
    calls = benchmark_calls(quick, filters, log)
    if not calls:
        raise ValueError(f"no call of the {'quick ' if quick else ''}benchmark set matches the filters "
                         f"{filters.describe()}")
    counts = comp.prepare([call for _, call in calls], jobs=jobs or os.cpu_count() or 1, log=log, verbose=verbose)
    t_compile = time.monotonic() - t0
    rows: List[Dict[str, Any]] = []
    for i, (info, call) in enumerate(calls):
        row = dict(kernel=call["kernel"], backend=call["backend"], config=call["config"], **info)
        try:
            s = score_call(comp, c, call)
        except ToolMissing:
            raise
        except Exception as e:  # a config that does not compile is reported, not fatal
            row.update(error=f"{type(e).__name__}: {str(e)[:500]}", predicted_us=None, best=False)
            rows.append(row)
            log(f"[{i + 1}/{len(calls)}] {call['kernel']} {call['config']}: {row['error'][:160]}")
            continue
        row.update(s)
        if info["format"] == "attention":
            base = eager_attention_us(c, info["B"], info["H"], info["L"], info["d"])
            row.update(baseline="eager materialized attention-map KL, fwd+bwd", baseline_us=base,
                       predicted_speedup_vs_bf16=None)
        elif info["format"].startswith("moe"):  # bf16 experts: each active expert's N x K weight read once
            base = info["experts"] * cublas_bf16_us(c, info["rows_per_expert"], info["N"], info["K"]) \
                - (info["experts"] - 1) * c.launch_overhead_us
            row.update(baseline="bf16 grouped GEMM (active experts' weights once)", baseline_us=base,
                       predicted_speedup_vs_bf16=base / s["predicted_us"])
        else:
            base = cublas_bf16_us(c, info["M"], info["N"], info["K"])
            row.update(baseline="cuBLAS bf16", baseline_us=base, predicted_speedup_vs_bf16=base / s["predicted_us"])
        row["best"] = False
        rows.append(row)
    _mark_best(rows)
    _attention_speedups(rows)
    wall = time.monotonic() - t0
    log(f"scored {len(rows)} calls in {wall:.1f} s ({counts['launches']} kernel launches, "
        f"{counts['distinct_triton']} + {counts['distinct_cuda']} distinct Triton / CUDA compiles: "
        f"{counts['compiled']} compiled now, {counts['from_disk']} from the disk cache; compile phase "
        f"{t_compile:.1f} s, {counts['compile_cpu_s']:.0f} CPU s)")
    meta = _meta(c, arch, quick, comp.tools)
    meta.update(partial=filters.active, filters=filters.describe(), jobs=jobs or os.cpu_count() or 1,
                wall_s=round(wall, 1), compile_phase_s=round(t_compile, 1), compiles=counts)
    return rows, meta


def _group_key(r: Dict[str, Any]):
    if r["format"] == "attention":
        return ("attention", r["kernel"].split(":")[0])
    return (r["backend"], r["M"], r["N"], r["K"], r["format"], r["group_size"], r["x_dtype"])


def _mark_best(rows: List[Dict[str, Any]]) -> None:
    best: Dict[Any, Dict[str, Any]] = {}
    for r in rows:
        if r.get("predicted_us") is None:
            continue
        k = _group_key(r)
        if k not in best or r["predicted_us"] < best[k]["predicted_us"]:
            best[k] = r
    for r in best.values():
        r["best"] = True


def _covers(r: Dict[str, Any]) -> set:
    """Which of the attention-KD passes ("fwd", "bwd") a row's call launches (by its kernel and launch names)."""
    names = [r["kernel"]] + [str(la.get("name", "")) for la in r.get("launches", [])]
    return {p for p in ("fwd", "bwd") if any(p in n for n in names)}


def _attention_speedups(rows: List[Dict[str, Any]]) -> None:
    """The eager baseline is fwd+bwd: compare it with the best call that launches both (the attention-KD
    descriptor's one call: fwd, bwd dq, bwd dk), or with the best forward plus the best backward call where they
    are separate calls; None when the run scored only one pass (as ``--quick`` may)."""
    best = [r for r in rows if r["format"] == "attention" and r.get("best")]
    both = [r["predicted_us"] for r in best if _covers(r) == {"fwd", "bwd"}]
    fwd = [r["predicted_us"] for r in best if _covers(r) == {"fwd"}]
    bwd = [r["predicted_us"] for r in best if _covers(r) == {"bwd"}]
    cands = both + ([min(fwd) + min(bwd)] if fwd and bwd else [])
    total = min(cands) if cands else None
    for r in rows:
        if r["format"] == "attention" and r.get("predicted_us") is not None:
            r["predicted_fwd_bwd_us"] = total
            r["predicted_speedup_vs_eager"] = r["baseline_us"] / total if total else None


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _meta(c: Constants, arch: str, quick: bool, tools: Toolchain) -> Dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        benchmark="static", label=LABEL, arch=arch,
        note=("Triton kernels compile for sm_90a (Triton's target for capability 9.0); CUDA sources for " + arch +
              ". Every time is a model prediction from SASS instruction counts and the constants below, not a "
              "measurement."),
        date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), git_commit=_git("rev-parse",
                                                                                                    "HEAD"),
        clean_tree=(status == "") if status is not None else None, quick=quick, versions=tools.versions(),
        python=sys.version.split()[0], constants=dataclasses.asdict(c), issue_rate_thread_instr_per_s=c.issue_rate,
        shapes=[list(s) for s in (QUICK_SHAPES if quick else SHAPES)], m_values=list(QUICK_M if quick else M_VALUES),
        formats=[list(f) for f in (QUICK_FORMATS if quick else FORMATS)], attention_shape=ATTENTION_SHAPE,
        weight_loads=("widest_weight_load_bytes: the widest global load in the main loop whose address derives from "
                      "the weight pointer (register taint from its kernel parameter, through spills); None where the "
                      "main loop has no such load"),
        method=__doc__.split("Method\n------\n", 1)[-1])


def _m_col(r: Dict[str, Any]) -> str:
    return f"B{r['B']}H{r['H']}" if r["format"] == "attention" else str(r["M"])


def _nk_col(r: Dict[str, Any]) -> str:
    return f"L{r['L']} d{r['d']}" if r["format"] == "attention" else f"{r['N']}x{r['K']}"


def _fmt_col(r: Dict[str, Any]) -> str:
    g = r.get("group_size")
    return r["format"] if r["format"] in ("attention",) or r["format"].startswith("moe") else \
        f"{r['format']} {'g' + str(g) if g else 'per-channel'}"


def _sort_key(r: Dict[str, Any]):
    fam = 1 if r["format"] == "attention" else 2 if r["format"].startswith("moe") else 0
    shape = (r["N"], r["K"])
    si = SHAPES.index(shape) if shape in SHAPES else len(SHAPES)
    fi = next((i for i, (f, g) in enumerate(FORMATS) if f == r["format"] and g == r.get("group_size")), len(FORMATS))
    return (fam, si, r["N"], r["K"], r["M"], fi, r.get("x_dtype", ""), r["backend"], r["kernel"],
            r.get("predicted_us") or math.inf)


def format_table(rows: List[Dict[str, Any]], best_only: bool = True) -> str:
    """The printed table: the best config per shape (``best_only``), or every row (``*`` marks the best)."""
    head = (f"{'backend':7s} {'kernel':28s} {'fmt':10s} {'grp':>4s} {'x':4s} {'M':>5s} {'N x K':>12s} "
            f"{'config':34s} {'i/w':>6s} {'ld':>3s} {'reg':>4s} {'spl':>4s} {'bound':7s} {'pred us':>9s} "
            f"{'vs bf16':>8s}")
    what = "best config per shape" if best_only else f"{len(rows)} rows, * = best config per shape"
    lines = [f"static roofline ({LABEL}); {what}", head, "-" * len(head)]
    for r in sorted(rows, key=_sort_key) if not best_only else rows:
        if best_only and not r.get("best"):
            continue
        lead = (f"{r['backend']:7s} {r['kernel'][:28]:28s} {r['format'][:10]:10s} "
                f"{str(r['group_size'] or '-'):>4s} {r['x_dtype']:4s} {_m_col(r):>5s} {_nk_col(r):>12s} "
                f"{r['config'][:34]:34s}")
        if r.get("predicted_us") is None:
            lines.append(f"{lead} error: {str(r.get('error'))[:100]}")
            continue
        ipw = r.get("sass_instr_per_weight")
        sp = r.get("predicted_speedup_vs_bf16") or r.get("predicted_speedup_vs_eager")
        tag = "x" if r.get("predicted_speedup_vs_bf16") else "x eg"
        lines.append(
            f"{lead} {(f'{ipw:.2f}' if ipw is not None else '-'):>6s} "
            f"{str(r.get('widest_weight_load_bytes') or '-'):>3s} {r['registers']:>4d} {r['spill_bytes']:>4d} "
            f"{r['bound']:7s} {r['predicted_us']:9.2f} {(f'{sp:.2f}' + tag if sp else '-'):>8s}"
            f"{' *' if r.get('best') and not best_only else ''}")
    return "\n".join(lines)


def format_markdown(rows: List[Dict[str, Any]], meta: Optional[Dict[str, Any]] = None,
                    source: Optional[str] = None) -> str:
    """The README table: the best config per shape, grouped by N x K, labelled predicted, not measured."""
    meta = meta or {}
    where = ", ".join(x for x in (f"`{source}`" if source else "", f"commit `{str(meta.get('git_commit'))[:7]}`"
                                  if meta.get("git_commit") else "") if x)
    part = f"; partial set: {meta['filters']}" if meta.get("partial") else ""
    out = [f"Static roofline, best config per shape ({LABEL}{'; ' + where if where else ''}{part}):", "",
           "| backend | kernel | M | N×K | format | x | best config | SASS instr / weight | weight load | "
           "regs / spill B | bound | predicted µs | predicted speedup |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    attn = False
    for r in sorted((r for r in rows if r.get("best") and r.get("predicted_us") is not None), key=_sort_key):
        ipw = r.get("sass_instr_per_weight")
        if r["format"] == "attention":
            attn = True
            sp = r.get("predicted_speedup_vs_eager")
            spt = f"{sp:.2f}x eager fwd+bwd¹" if sp else "— (fwd or bwd only)"
            ipt = f"{ipw:.2f}¹" if ipw is not None else "—"
        else:
            sp = r.get("predicted_speedup_vs_bf16")
            spt = f"{sp:.2f}x {'bf16 grouped' if r['format'].startswith('moe') else 'cuBLAS bf16'}" if sp else "—"
            ipt = f"{ipw:.2f}" if ipw is not None else "—"
        wl = r.get("widest_weight_load_bytes")
        nk = _nk_col(r) if r["format"] == "attention" else f"{r['N']}×{r['K']}"
        out.append(f"| {r['backend']} | {r['kernel']} | {_m_col(r)} | {nk} | "
                   f"{_fmt_col(r)} | {r['x_dtype']} | `{r['config']}` | {ipt} | {f'{wl} B' if wl else '—'} | "
                   f"{r['registers']} / {r['spill_bytes']} | {r['bound']} | {r['predicted_us']:.2f} | {spt} |")
    if attn:
        out += ["", "¹ Attention KD: instructions per score element (B·H·L²); speedup = the best forward plus the "
                    "best backward against the eager materialized loss (`eager_attention_bytes_per_score` per score "
                    "element through HBM plus its four L×L×d GEMMs)."]
    return "\n".join(out)


def _compact(v):
    if isinstance(v, float):
        return _sig(v, 6)
    if isinstance(v, dict):
        return {k: _compact(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_compact(x) for x in v]
    return v


_LAUNCH_SUMMARY = ("name", "builtin", "ctas", "threads_per_cta", "registers", "spill_bytes", "instr_per_thread",
                   "bytes", "predicted_us", "memory_us", "issue_us", "tensor_us", "bound")


def report_name(quick: bool, partial: bool, date: Optional[str] = None) -> str:
    """``static-sm90[-quick][-partial]-<date>.json``: a filtered run says so in its name."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    return f"static-sm90-{'quick-' if quick else ''}{'partial-' if partial else ''}{date}.json"


def write_json(rows: List[Dict[str, Any]], meta: Dict[str, Any], out_dir: Path, quick: bool,
               partial: Optional[bool] = None) -> Path:
    """``static-sm90[-quick][-partial]-<date>.json`` (atomically): meta, then one row per line; the static loop mix
    and the full per-launch detail are kept on the best rows only (every row has its executed mix per weight)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = bool(meta.get("partial")) if partial is None else partial
    path = out_dir / report_name(quick, partial)
    lines = []
    for r in rows:
        r = dict(r)
        if not r.get("best"):  # the per-launch detail of the other rows: what the time is made of
            r.pop("loop_mix", None)
            r["launches"] = [{k: la[k] for k in _LAUNCH_SUMMARY if k in la} for la in r.get("launches", [])]
        lines.append(json.dumps(_compact(r), default=str, separators=(",", ":")))
    text = '{"meta": ' + json.dumps(meta, indent=1, default=str) + ',\n"rows": [\n' + ",\n".join(lines) + "\n]}\n"
    json.loads(text)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise ValueError(s)
    return v


def _shape(s: str) -> Tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", s)
    if not m:
        raise ValueError(s)
    return int(m.group(1)), int(m.group(2))


def _format(s: str) -> Tuple[str, Any]:
    name, _, g = s.strip().partition(":")
    if not g:
        return name, "*"
    if g.lower() in ("none", "per-channel", "pc"):
        return name, None
    return name, _pos_int(g)


_shape.__name__ = "NxK"
_format.__name__ = "FORMAT[:GROUP]"


def _flatten(v) -> tuple:
    return tuple(x for group in (v or []) for x in group)


def filters_from_args(a: argparse.Namespace, quick: bool) -> Filters:
    """The CLI filters, checked against the benchmark set: a value outside it is an error naming the option."""
    f = Filters(kernel=_flatten(a.kernel), backend=_flatten(a.backend), m=_flatten(a.m), shape=_flatten(a.shape),
                format=_flatten(a.format))
    ms, shapes, fmts = (QUICK_M, QUICK_SHAPES, QUICK_FORMATS) if quick else (M_VALUES, SHAPES, FORMATS)
    which = "the --quick set" if quick else "the benchmark set"
    bad = [m for m in f.m if m not in ms]
    if bad:
        raise ValueError(f"--m {bad}: not in {which}; expected some of {list(ms)}")
    bad = [s for s in f.shape if s not in shapes]
    if bad:
        raise ValueError(f"--shape {['%dx%d' % s for s in bad]}: not in {which}; expected some of "
                         f"{['%dx%d' % s for s in shapes]}")
    known = {n for n, _ in fmts} | {"attention", "moe"}
    for name, g in f.format:
        if name not in known or (name not in ("attention", "moe") and g != "*" and (name, g) not in fmts):
            raise ValueError(f"--format {name}{'' if g == '*' else ':' + str(g or 'none')}: not in {which}; expected "
                             f"one of {sorted(known)}, optionally :GROUP from {[f'{n}:{g or None}' for n, g in fmts]}")
    bad = [b for b in f.backend if b not in ("triton", "cuda")]
    if bad:
        raise ValueError(f"--backend {bad}: expected 'triton' and/or 'cuda'")
    return f


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyquant bench static",
                                description="Static roofline of the packed-matmul and attention-KD kernels from their "
                                            "sm_90 SASS (predicted, sm_90, not measured; no GPU needed).")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced set (N x K {QUICK_SHAPES}, M {QUICK_M}, {len(QUICK_FORMATS)} formats, the first "
                        f"{QUICK_MAX_CONFIGS} configs per kernel): CI time")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    p.add_argument("--arch", default="sm_90a", choices=["sm_90", "sm_90a"], help="nvcc target of the CUDA sources")
    p.add_argument("--constants", type=Path, default=None,
                   help="JSON object overriding Constants fields with measured figures, e.g. {\"hbm_Bps\": 4.2e12}")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--jobs", "-j", type=_pos_int, default=os.cpu_count() or 1,
                   help="compile processes (default: one per CPU, %(default)s here)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="disk cache of parsed compiles (default $PYQUANT_STATIC_CACHE or ~/.cache/pyquant/static)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the disk cache")
    p.add_argument("--verbose", "-v", action="store_true", help="log every compile with its CPU time")
    g = p.add_argument_group("filters (restrict the set; the report is then named static-sm90-partial-<date>.json "
                             "and its meta records them; each takes a comma list and may repeat)")
    g.add_argument("--kernel", type=_csv(str), action="append", metavar="NAME",
                   help="kernel name or shell pattern, e.g. packed_gemv, 'attention_kd_*', grouped_packed_matmul")
    g.add_argument("--backend", type=_csv(str), action="append", metavar="triton|cuda")
    g.add_argument("--m", type=_csv(_pos_int), action="append", metavar="M", help=f"rows M, of {list(M_VALUES)}")
    g.add_argument("--shape", type=_csv(_shape), action="append", metavar="NxK",
                   help=f"N x K, of {['%dx%d' % s for s in SHAPES]}")
    g.add_argument("--format", type=_csv(_format), action="append", metavar="FMT[:GROUP]",
                   help=f"weight format, optionally its group (e.g. twn, int2-asym:128, twn:none), or attention / moe; "
                        f"of {[f'{n}:{g or None}' for n, g in FORMATS]}")
    o = p.add_argument_group("printing")
    o.add_argument("--best-only", action="store_true",
                   help="print only the best config per shape (the default for the unfiltered sets; a filtered run "
                        "prints every row)")
    o.add_argument("--all-rows", action="store_true", help="print every row, also for the unfiltered sets")
    o.add_argument("--markdown", action="store_true",
                   help="also print the README table (best config per shape, labelled predicted, sm_90, not measured)")
    o.add_argument("--from-json", type=Path, default=None, metavar="REPORT",
                   help="print the table (and --markdown) of a report written earlier; compiles nothing")
    a = p.parse_args(argv)
    if a.best_only and a.all_rows:
        p.error("--best-only and --all-rows exclude each other")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parse(argv)
    if a.from_json is not None:
        try:
            data = json.loads(Path(a.from_json).read_text())
            rows, meta = data["rows"], data["meta"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"pyquant bench static: --from-json {a.from_json}: not a static report ({e})", file=sys.stderr)
            return 2
        print(format_table(rows, best_only=not a.all_rows))
        if a.markdown:
            print()
            print(format_markdown(rows, meta, source=Path(a.from_json).name))
        return 0
    try:
        filters = filters_from_args(a, a.quick)
        c = Constants.from_json(a.constants) if a.constants else Constants()
    except ValueError as e:
        print(f"pyquant bench static: {e}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False"):
        print("pyquant bench static compiles for sm_90: unset TRITON_INTERPRET (it turns @triton.jit functions into "
              "interpreter functions that cannot be compiled)", file=sys.stderr)
        return 2
    try:
        rows, meta = run(c, arch=a.arch, quick=a.quick, jobs=a.jobs, filters=filters, cache_dir=a.cache_dir,
                         persist=not a.no_cache, verbose=a.verbose)
    except ToolMissing as e:
        print(f"pyquant bench static: {e}; nothing written", file=sys.stderr)
        return 3
    except ValueError as e:  # no call matches the filters
        print(f"pyquant bench static: {e}; nothing written", file=sys.stderr)
        return 2
    best_only = a.best_only or (not a.all_rows and not filters.active)
    print(format_table(rows, best_only=best_only))
    errs = [r for r in rows if r.get("error")]
    if errs:
        print(f"{len(errs)} call(s) failed to compile (rows with 'error' in the JSON)")
    path = None if a.no_write else write_json(rows, meta, a.out, a.quick)
    if a.markdown:
        print()
        print(format_markdown(rows, meta, source=path.name if path else None))
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    # run the module imported by its name, not this ``__main__`` copy: the disk cache pickles this module's classes
    # (Binary, Instr, ...), and ``pyquant bench static`` / benchmarks/bench_static.py must read what ``python -m``
    # wrote and the other way round
    from pyquant.bench.static import main as _main

    sys.exit(_main())

#!/usr/bin/env python3
"""The H200 validation run: one command that measures everything pyquant claims, inside a fixed GPU-time budget.

    python benchmarks/gpu_suite.py [--out DIR] [--budget 540] [--dry-run] [--only STAGE ...] [--skip STAGE ...]

Stages, in order (each has its own time slice; a stage that overruns is killed and the suite moves on):

  env        nvidia-smi, ``pyquant env --json``, measured copy bandwidth and bf16 matmul rate (the ceilings)
  install    pyquant from this working tree without dependencies (PYTHONPATH, then an in-place build of the CUDA
             extension ``pyquant._C`` with ``setup.py build_ext --inplace``); build time and failure recorded
  gpu-tests  ``pytest -m gpu -x -q`` with a per-test timeout (PYQUANT_TEST_TIMEOUT, read by tests/conftest.py)
  bench-*    ``pyquant bench matmul`` (reduced M on Llama-3-8B shapes, without and with CUDA graphs), ``fake-quant``,
             ``attention-kd`` (L up to 32768), ``decode``, ``moe`` — those that exist in this checkout
  static     ``pyquant bench static`` (the predictions), printed beside the measurements in the summary
  reproduce  if budget remains: the GLUE / WikiText-2 reproduction scripts, where they exist, at full size
  summary    ``gpu_suite-summary.md``: every target with measured value, predicted value and pass / fail

Everything is written under ``--out`` (or $PYQUANT_SUITE_OUT; default ``benchmarks/results/gpu-suite-<date>``):
the per-stage logs and the benchmarks' JSON/CSV/PNG are bundled into ONE archive ``gpu_suite-results.tar.gz``
beside ``gpu_suite-summary.md`` and ``gpu_suite.json`` (three files: well inside what the device tool copies back).

``--dry-run`` runs every stage's plumbing on a CPU-only machine with tiny inputs (benchmarks in their ``--smoke``
mode, the GPU tests collected and skipped, the static tool in ``--quick`` mode) and says on every line and in the
summary that NOTHING WAS MEASURED.  CI runs it (tests/test_gpu_suite.py).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540.0
SUMMARY_RESERVE_S = 10.0  # always left for the summary and the archive


@dataclass
class Stage:
    name: str
    slice_s: float  # the most this stage may take (real run)
    dry_slice_s: float  # ... in --dry-run
    build: Callable[["Suite"], List[List[str]]]  # the commands to run (each a subprocess, sharing the slice)
    optional: bool = False  # skipped (not failed) when its entry point does not exist in this checkout


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped | not-run (budget)
    seconds: float
    commands: List[str] = field(default_factory=list)
    note: str = ""


def _have_bench(name: str) -> bool:
    sys.path.insert(0, str(ROOT))
    try:
        from pyquant.cli import BENCHES  # cheap: pyquant.cli imports nothing heavy
    finally:
        sys.path.pop(0)
    return name in BENCHES


class Suite:
    def __init__(self, out: Path, budget_s: float, dry_run: bool, python: str = sys.executable):
        self.out = out
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.python = python
        self.start = time.monotonic()
        self.results: List[StageResult] = []
        self.logs = out / "logs"
        self.bench_out = out / "bench"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.bench_out.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env["PYQUANT_RESULTS_DIR"] = str(self.bench_out)  # read by pyquant.bench.common.write_results
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"  # benchmarks' smoke modes run the Triton kernels on CPU
        else:
            self.env.pop("TRITON_INTERPRET", None)

    # -- helpers used by the stage builders ---------------------------------------------------------------------
    def pyquant(self, *args: str) -> List[str]:
        return [self.python, "-m", "pyquant.cli", *args]

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    # -- running -----------------------------------------------------------------------------------------------
    def run_stage(self, st: Stage) -> StageResult:
        t0 = time.monotonic()
        avail = self.left() - SUMMARY_RESERVE_S
        if avail < 3:
            return StageResult(st.name, "not-run", 0.0, note="no budget left")
        try:
            cmds = st.build(self)
        except _Skip as e:
            return StageResult(st.name, "skipped", 0.0, note=str(e))
        slice_s = min(st.dry_slice_s if self.dry_run else st.slice_s, avail)
        log = self.logs / f"{st.name}.log"
        status, notes = "ok", []
        with open(log, "w") as f:
            for cmd in cmds:
                remaining = slice_s - (time.monotonic() - t0)
                if remaining < 1:
                    status = "timeout"
                    notes.append("slice used up before: " + " ".join(cmd[:4]))
                    break
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                try:
                    r = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                       timeout=remaining, stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    status = "timeout"
                    notes.append(f"killed after its slice ({slice_s:.0f} s)")
                    f.write(f"\n[gpu_suite] killed: stage slice of {slice_s:.0f} s used up\n")
                    break
                except OSError as e:
                    status = "failed"
                    notes.append(f"could not start {cmd[0]}: {e}")
                    break
                f.write(f"[gpu_suite] exit {r.returncode}\n")
                if r.returncode != 0:
                    status = "failed"
                    notes.append(f"exit {r.returncode}: {' '.join(cmd[2:6])}")
        return StageResult(st.name, status, round(time.monotonic() - t0, 1), [" ".join(c) for c in cmds],
                           "; ".join(notes))

    def run(self, stages: List[Stage]) -> int:
        banner = "DRY RUN on this machine: nothing is measured" if self.dry_run else "GPU run"
        print(f"[gpu_suite] {banner}; budget {self.budget_s:.0f} s; output {self.out}", flush=True)
        for st in stages:
            res = self.run_stage(st)
            self.results.append(res)
            print(f"[gpu_suite] {res.name:18s} {res.status:8s} {res.seconds:7.1f} s  {res.note}", flush=True)
        summary = write_summary(self)
        print(summary)
        bundle(self)
        return 0 if all(r.status in ("ok", "skipped") for r in self.results) else 1


class _Skip(Exception):
    pass


# ---- stage builders ------------------------------------------------------------------------------------------------
_ENV_PROBE = r"""
import json, sys, torch
out = {"cuda": torch.cuda.is_available()}
if out["cuda"] and "--dry-run" not in sys.argv:
    from pyquant.bench.common import measure_copy_bandwidth_gbs, measure_matmul_tflops
    out["copy_bandwidth_gbs"] = measure_copy_bandwidth_gbs()
    out["bf16_matmul_tflops"] = measure_matmul_tflops()
else:
    out["note"] = "no GPU measurement (dry run or no CUDA): ceilings not measured"
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out))
"""


def _stage_env(s: Suite) -> List[List[str]]:
    cmds = []
    if shutil.which("nvidia-smi"):
        cmds.append(["nvidia-smi"])
    cmds.append(s.pyquant("env", "--json"))
    probe = [s.python, "-c", _ENV_PROBE, str(s.out / "logs" / "ceilings.json")]
    cmds.append(probe + (["--dry-run"] if s.dry_run else []))
    return cmds


def _stage_install(s: Suite) -> List[List[str]]:
    # pyquant itself runs from this tree (PYTHONPATH); no pip, no dependencies.  The CUDA extension is built in
    # place; without nvcc / a CUDA torch setup.py says so and exits 0 (the Triton / reference backends then run).
    cmds = [[s.python, "-c", "import pyquant, sys; print('pyquant', pyquant.__version__, 'from', pyquant.__file__)"]]
    if s.dry_run:
        cmds.append([s.python, "setup.py", "--name"])  # setup.py parses and imports here; no build on CPU
    else:
        cmds.append(["bash", "-c", f"start=$(date +%s); PYQUANT_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 {s.python} setup.py "
                                   "build_ext --inplace; rc=$?; echo \"[gpu_suite] CUDA extension build "
                                   "$(( $(date +%s) - start )) s, exit $rc\"; exit $rc"])
        cmds.append([s.python, "-c", "from pyquant import _cuda_ext; m = _cuda_ext.load(); "
                                     "print('pyquant._C loaded:', m is not None)"])
    return cmds


def _stage_gpu_tests(s: Suite) -> List[List[str]]:
    s.env["PYQUANT_TEST_TIMEOUT"] = "60"
    cmd = [s.python, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider",
           f"--junitxml={s.logs / 'gpu-tests.xml'}"]
    if s.dry_run:
        cmd.append("tests/test_packed_matmul.py")  # collection + marker plumbing only (its gpu tests skip on CPU)
    return [cmd]


def _bench_stage(name: str, real: List[str], smoke: Optional[List[str]] = None) -> Callable[[Suite], List[List[str]]]:
    def build(s: Suite) -> List[List[str]]:
        if not _have_bench(name):
            raise _Skip(f"`pyquant bench {name}` does not exist in this checkout")
        if s.dry_run:
            return [s.pyquant("bench", name, *(smoke if smoke is not None else ["--smoke"]))]
        return [s.pyquant("bench", name, *real)]
    return build


def _stage_matmul(s: Suite) -> List[List[str]]:
    if s.dry_run:
        return [s.pyquant("bench", "matmul", "--smoke")]
    base = ["bench", "matmul", "--models", "llama3-8b", "--m", "1", "4", "16", "64", "4096", "--rep-ms", "50",
            "--impls", "pyquant-triton", "pyquant-cuda", "torch-bf16"]
    return [s.pyquant(*base), s.pyquant(*base, "--cuda-graph")]


def _stage_reproduce(s: Suite) -> List[List[str]]:
    scripts = [ROOT / "benchmarks" / n for n in ("reproduce_glue.py", "reproduce_tsld.py")]
    have = [p for p in scripts if p.exists()]
    if not have:
        raise _Skip("no reproduction scripts in this checkout")
    mode = ["--smoke"] if s.dry_run else ["--device", "cuda", "--out", str(s.bench_out)]
    return [[s.python, str(p), *mode] for p in have]


def _stage_static(s: Suite) -> List[List[str]]:
    if not _have_bench("static"):
        raise _Skip("`pyquant bench static` does not exist in this checkout")
    # --quick in both modes: the full set compiles for far longer than the stage's slice (see the README); the
    # committed full report in benchmarks/results/ is the reference for the other shapes
    return [s.pyquant("bench", "static", "--out", str(s.bench_out), "--quick")]


STAGES: List[Stage] = [
    Stage("env", 45, 60, _stage_env),
    Stage("install", 100, 30, _stage_install),
    Stage("gpu-tests", 150, 90, _stage_gpu_tests),
    Stage("bench-matmul", 80, 60, _stage_matmul),
    Stage("bench-fake-quant", 30, 60, _bench_stage("fake-quant", ["--tokens", "8192"])),
    Stage("bench-attention-kd", 45, 60, _bench_stage("attention-kd", ["--seq-lens", "512", "2048", "8192", "32768",
                                                                      "--eager-max-len", "8192"])),
    Stage("bench-decode", 60, 60, _bench_stage("decode", []), optional=True),
    Stage("bench-moe", 30, 60, _bench_stage("moe", []), optional=True),
    Stage("static", 60, 120, _stage_static),
    Stage("reproduce", 10_000, 60, _stage_reproduce, optional=True),  # whatever budget remains
]


# ---- summary --------------------------------------------------------------------------------------------------------
def _load_jsons(d: Path) -> Dict[str, dict]:
    out = {}
    for p in sorted(d.glob("*.json")):
        try:
            out[p.name] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return out


def _static_best(static: Optional[dict]) -> Dict[tuple, float]:
    """(backend, M, N, K, format) -> predicted speedup of the best config, from the static report."""
    best: Dict[tuple, float] = {}
    for r in (static or {}).get("rows", []):
        if r.get("best") and r.get("predicted_speedup_vs_bf16") is not None:
            best[(r.get("backend"), r.get("M"), r.get("N"), r.get("K"), r.get("format"))] = r[
                "predicted_speedup_vs_bf16"]
    return best


def _predicted_for(best: Dict[tuple, float], backend: str, m, n, k) -> Optional[float]:
    vals = [v for (b, mm, nn, kk, _), v in best.items() if b == backend and (mm, nn, kk) == (m, n, k)]
    return max(vals) if vals else None


def write_summary(s: Suite) -> str:
    files = _load_jsons(s.bench_out)
    static = next((v for k, v in files.items() if k.startswith("static-")), None)
    best = _static_best(static)
    head = "DRY RUN — nothing was measured; every value below is plumbing only" if s.dry_run else "GPU run"
    lines = [f"# pyquant GPU suite — {head}", "",
             f"date {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, commit {_commit()}, "
             f"budget {s.budget_s:.0f} s, used {time.monotonic() - s.start:.0f} s", ""]
    try:
        ceil = json.loads((s.logs / "ceilings.json").read_text())
        lines += [f"ceilings: copy {ceil.get('copy_bandwidth_gbs', 'not measured')} GB/s, bf16 matmul "
                  f"{ceil.get('bf16_matmul_tflops', 'not measured')} TFLOP/s", ""]
    except (OSError, ValueError):
        lines += ["ceilings: not recorded", ""]
    lines += ["| stage | status | s | note |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds} | {r.note} |" for r in s.results]
    lines += ["", "| target | measured | predicted (static) | pass |", "|---|---|---|---|"]
    n_targets = 0
    for name, d in files.items():
        meta = d.get("meta", {})
        for t in meta.get("targets", []) or []:
            n_targets += 1
            meas = t.get("measured")
            pred = None
            if meta.get("benchmark") == "packed_matmul" and isinstance(meas, list):
                impl_backend = str(t.get("impl", "pyquant-triton")).replace("pyquant-", "")
                m = t.get("m")
                preds = [_predicted_for(best, impl_backend, m, nk[0], nk[1]) for nk, _ in meas if m is not None]
                pred = [p for p in preds if p is not None] or None
            met = t.get("met")
            verdict = "not measured" if met is None else ("pass" if met else "FAIL")
            if s.dry_run:
                verdict = "not measured (dry run)"
            lines.append(f"| {t.get('target')} (≥ {t.get('threshold')}) | {meas if meas else '—'} | "
                         f"{pred if pred else '—'} | {verdict} |")
    if not n_targets:
        lines.append("| (no benchmark wrote targets) | — | — | not measured |")
    if best:
        lines += ["", "Static predictions (best config per shape, predicted, sm_90, not measured):", "",
                  "| backend | M | N | K | format | predicted speedup vs bf16 |", "|---|---|---|---|---|---|"]
        for (b, m, n, k, fmt), v in sorted(best.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
            lines.append(f"| {b} | {m} | {n} | {k} | {fmt} | {v:.2f} |")
    text = "\n".join(lines) + "\n"
    (s.out / "gpu_suite-summary.md").write_text(text)
    (s.out / "gpu_suite.json").write_text(json.dumps(
        {"dry_run": s.dry_run, "budget_s": s.budget_s, "commit": _commit(),
         "stages": [r.__dict__ for r in s.results], "files": sorted(files)}, indent=2))
    return text


def bundle(s: Suite) -> Path:
    """Everything but the summary and the stage table into one archive (the device tool copies back ≤ 8 files)."""
    arc = s.out / "gpu_suite-results.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        for sub in (s.logs, s.bench_out):
            tar.add(sub, arcname=sub.name)
    shutil.rmtree(s.logs)
    shutil.rmtree(s.bench_out)
    return arc


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() + ("-dirty" if d.stdout.strip() else "") if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default $PYQUANT_SUITE_OUT or "
                                                           "benchmarks/results/gpu-suite-<date>)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds (default 540)")
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing run on tiny inputs; measures nothing")
    names = [st.name for st in STAGES]
    p.add_argument("--only", nargs="+", choices=names, default=None, help="run only these stages")
    p.add_argument("--skip", nargs="+", choices=names, default=[], help="skip these stages")
    a = p.parse_args(argv)
    if a.budget <= SUMMARY_RESERVE_S:
        p.error(f"--budget must be more than {SUMMARY_RESERVE_S:.0f} s (got {a.budget})")
    out = a.out or Path(os.environ.get("PYQUANT_SUITE_OUT") or
                        ROOT / "benchmarks" / "results" / f"gpu-suite-{_dt.date.today().strftime('%Y%m%d')}")
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} exists and is not empty: choose a new folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    stages = [st for st in STAGES if (a.only is None or st.name in a.only) and st.name not in a.skip]
    return Suite(out, a.budget, a.dry_run).run(stages)


if __name__ == "__main__":
    sys.exit(main())

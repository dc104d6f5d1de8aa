"""benchmarks/gpu_suite.py: the dry run executes every stage's plumbing on CPU and says nothing was measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _run(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    e.pop("TRITON_INTERPRET", None)  # the suite sets it itself for the dry run
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_every_stage(tmp_path):
    out = tmp_path / "suite"
    r = _run("--dry-run", "--out", str(out), "--skip", "static", "reproduce")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "nothing is measured" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_suite-results.tar.gz", "gpu_suite-summary.md", "gpu_suite.json"]
    summary = (out / "gpu_suite-summary.md").read_text()
    assert "DRY RUN" in summary and "nothing was measured" in summary
    assert "pass |" not in summary.replace("| pass |", "")  # no target claims a pass in a dry run
    rec = json.loads((out / "gpu_suite.json").read_text())
    stages = {s["name"]: s for s in rec["stages"]}
    assert rec["dry_run"] is True
    for name in ("env", "install", "gpu-tests", "bench-matmul", "bench-fake-quant", "bench-attention-kd"):
        assert stages[name]["status"] == "ok", stages[name]
    with tarfile.open(out / "gpu_suite-results.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/env.log" in names and "logs/bench-matmul.log" in names
    for f in out.iterdir():
        assert f.stat().st_size <= 16 * 2**20


def test_overrunning_stage_is_killed_and_suite_moves_on(tmp_path):
    """A tiny budget: stages past it are recorded 'not-run'/'timeout', the summary is still written."""
    out = tmp_path / "suite"
    r = _run("--dry-run", "--out", str(out), "--budget", "16", "--only", "env", "gpu-tests", "bench-matmul")
    rec = json.loads((out / "gpu_suite.json").read_text())
    statuses = [s["status"] for s in rec["stages"]]
    assert any(st in ("timeout", "not-run") for st in statuses), statuses
    assert r.returncode == 1
    assert (out / "gpu_suite-summary.md").exists()


def test_refuses_non_empty_out_and_tiny_budget(tmp_path):
    (tmp_path / "x").write_text("keep me")
    r = _run("--dry-run", "--out", str(tmp_path))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "x").read_text() == "keep me"
    r = _run("--dry-run", "--out", str(tmp_path / "new"), "--budget", "5")
    assert r.returncode == 2 and "--budget" in r.stderr


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGALRM"), reason="POSIX only")
def test_per_test_timeout_hook(tmp_path):
    t = tmp_path / "test_slow.py"
    t.write_text("import time\n\ndef test_slow():\n    time.sleep(20)\n")
    e = dict(os.environ, PYQUANT_TEST_TIMEOUT="1",
             PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    # load tests/conftest.py as a plugin into a run of a test file that lives outside tests/
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(t)],
                       cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "PYQUANT_TEST_TIMEOUT" in r.stdout, r.stdout[-2000:]

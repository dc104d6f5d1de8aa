"""``pyquant demo --smoke`` end to end: built-in corpus, FP teacher, PTQ, QAT, QAT+KD, packed conversion, table,
results JSON, the loss-curve PNG, and the packed student saved, reloaded in a fresh process and generating text."""
import json

import pytest
import torch

from pyquant.cli import main


def test_demo_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--out-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"].split(" [")[0].split(" (")[0]: r for r in res["table"]}
    assert set(rows) == {"FP teacher", "ternary PTQ", "ternary QAT, no KD", "ternary QAT + KD"}
    for r in res["table"]:
        assert r["perplexity"] > 1.0 and r["perplexity"] < 1e6
        assert r["model"] in printed
        if not torch.cuda.is_available():
            assert r["decode_tok_s"] is None
    assert "n/a (no GPU)" in printed or torch.cuda.is_available()
    fp = rows["FP teacher"]["size_mb"]
    for k in ("ternary PTQ", "ternary QAT, no KD", "ternary QAT + KD"):
        assert rows[k]["size_mb"] < fp  # packed linears: 2 bits/weight + scales
    assert res["corpus"]["train_chars"] > 0 and "standard library" in res["corpus"]["source"]
    png = out / "loss_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out.parent).glob("benchmarks"))  # the smoke run writes nothing to benchmarks/results
    # the journey: save_pretrained -> from_pretrained in a fresh process -> a line of text; sizes on disk
    r = res["reload"]
    assert r["identical_to_in_process"] and r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"])
    assert "tokens/s" in r["speed"] and r["text"] in printed
    cfg = json.loads((out / "student" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "pyquant" and cfg["quantization_config"]["state"] == "packed"
    assert 0 < r["student_disk_mb"] < r["teacher_disk_mb"]
    assert "checkpoint on disk: packed student" in printed and "FP teacher" in printed

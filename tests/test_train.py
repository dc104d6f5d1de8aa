"""Training loop, checkpoints, resume, data plumbing, metrics and the recipe CLIs (tiny models, CPU)."""
import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from pyquant.distill import DistillConfig, Distiller
from pyquant.formats import WeightQuantConfig
from pyquant.train import checkpoint as ckpt_mod
from pyquant.train import data as D
from pyquant.train.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from pyquant.train.loop import TrainConfig, train
from pyquant.train.quant import prepare_student

V = 37


def _llama(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                        max_position_embeddings=64, attention_dropout=dropout,
                                        tie_word_embeddings=False))


def _sequences(n=64, L=12, seed=0):
    """Structured token streams (arithmetic progressions mod V): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return [{"input_ids": r} for r in (start + step * torch.arange(L)) % V]


def _qat_distiller(dropout=0.0):
    t = _llama(1, dropout)
    s = _llama(1, dropout)
    prepare_student(s, WeightQuantConfig(method="twn", granularity="channel"))
    # tsld_reduction="mean": this exercises the loop at lr 1e-2; the paper's "sum" (the default) weights TSLD
    # B times more, which this tiny run's learning rate was not tuned for
    return Distiller(s, t, DistillConfig(ce=1.0, tsld=1.0, hidden=0.5, chunk_size=16, tsld_reduction="mean"))


def _cfg(out, **kw):
    base = dict(output_dir=str(out), max_steps=30, batch_size=4, lr=3e-3, warmup_ratio=0.1, progress=False,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_qat_kd_30_steps_lowers_loss(tmp_path):
    r = train(_qat_distiller(), _sequences(), D.CausalCollator(), _cfg(tmp_path / "run", lr=1e-2))
    tot = [h["total"] for h in r.history]
    assert len(tot) == 30 and all(math.isfinite(x) for x in tot)
    assert sum(tot[-5:]) / 5 < 0.9 * sum(tot[:5]) / 5
    ce = [h["ce"] for h in r.history]
    assert sum(ce[-5:]) / 5 < 0.8 * sum(ce[:5]) / 5
    assert {"ce", "tsld", "hidden", "total"} <= set(r.history[-1])
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31)) and "tokens_per_s" in lines[-1]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000030"]


def test_resume_from_step_15_reproduces_step_30_exactly(tmp_path):
    data = _sequences(40)
    full = train(_qat_distiller(dropout=0.2), data, D.CausalCollator(), _cfg(tmp_path / "a", save_every=15))
    # a run that "dies" after its step-15 checkpoint: stop at 15, then resume from a fresh process state
    part = tmp_path / "b"
    part.mkdir()
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-00000015", part / "checkpoint-00000015")
    shutil.copy(tmp_path / "a" / "log.jsonl", part / "log.jsonl")  # holds steps 1..30: 16..30 must be dropped
    torch.manual_seed(12345)  # whatever the RNG state before resuming, the result must not change
    resumed = train(_qat_distiller(dropout=0.2), data, D.CausalCollator(), _cfg(part, save_every=15, resume=True))
    assert resumed.resumed_from == 15
    assert [h["step"] for h in resumed.history] == list(range(16, 31))
    assert [h["total"] for h in resumed.history] == [h["total"] for h in full.history[15:]]  # bitwise equal
    a = torch.load(tmp_path / "a" / "checkpoint-00000030" / "trainer_state.pt", weights_only=False)
    b = torch.load(part / "checkpoint-00000030" / "trainer_state.pt", weights_only=False)
    assert a["scheduler"] == b["scheduler"]
    log = [json.loads(x)["step"] for x in (part / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 31))  # lines after the checkpoint were rewritten, not duplicated


def test_grad_accum_matches_big_batch(tmp_path):
    data = _sequences(32)
    big = train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path / "big", max_steps=4, batch_size=4))
    acc = train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path / "acc", max_steps=4, batch_size=2,
                                                                  grad_accum=2))
    for x, y in zip(big.history, acc.history):
        assert x["total"] == pytest.approx(y["total"], rel=1e-5)


def _files(d: Path):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_existing_checkpoints_refused_and_untouched(tmp_path):
    data = _sequences(16)
    train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path, max_steps=2))
    ck = tmp_path / "checkpoint-00000002"
    before = _files(ck)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match=r"different configuration.*train\.lr"):
        train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path, max_steps=4, lr=1e-3, resume=True))
    with pytest.raises(CheckpointError, match="nothing to do"):
        train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path, max_steps=2, resume=True))
    assert _files(ck) == before
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path / "empty", resume=True))


def test_unreadable_checkpoint(tmp_path):
    data = _sequences(16)
    train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path, max_steps=3, save_every=2))
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-00000003")
    f = tmp_path / "checkpoint-00000002" / "model.safetensors"
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable.*model.safetensors"):
        train(_qat_distiller(), data, D.CausalCollator(), _cfg(tmp_path, max_steps=3, save_every=2, resume=True))


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    m = _llama()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, m)
    assert list(tmp_path.iterdir()) == []  # neither checkpoint-00000005 nor a temp dir
    monkeypatch.undo()
    p = save_checkpoint(tmp_path, 5, m)
    before = _files(p)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(tmp_path, 5, _llama(seed=9))
    assert _files(p) == before


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    m = _llama(0)
    p = save_checkpoint(tmp_path, 1, m, meta={"config": {"a": 1}})
    m2 = _llama(5)
    ckpt_mod.load_checkpoint(p, m2, expect_config={"a": 1})
    for (k, v), (_, w) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(CheckpointError, match="differs in \\['a'\\]"):
        ckpt_mod.load_checkpoint(p, m2, expect_config={"a": 2})
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=50))
    with pytest.raises(CheckpointError, match="does not match the model"):
        ckpt_mod.load_checkpoint(p, bert)


def test_bf16_autocast_run(tmp_path):
    r = train(_qat_distiller(), _sequences(16), D.CausalCollator(), _cfg(tmp_path, max_steps=3, bf16=True))
    assert all(math.isfinite(h["total"]) for h in r.history)


def test_chunked_loss_is_fp32_under_autocast():
    from pyquant.distill.losses import LogitLossWeights, chunked_logit_losses
    from pyquant.reference.distill import cross_entropy

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 6, 16, generator=g), torch.randn(V, 16, generator=g)
    lab = torch.randint(0, V, (2, 6), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tot, _ = chunked_logit_losses(h, lab, weight=w, loss_weights=LogitLossWeights(ce=1.0), chunk_size=5)
    assert tot.item() == pytest.approx(cross_entropy(h @ w.t(), lab).item(), rel=1e-5)


def test_train_refuses_tiny_dataset_and_bad_config(tmp_path):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        train(_qat_distiller(), _sequences(3), D.CausalCollator(), _cfg(tmp_path))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(output_dir=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(output_dir=str(tmp_path), warmup_ratio=1.5)


# ---- data ------------------------------------------------------------------------------------------------------------
def test_glue_tsv_readers(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film \t1\nbad \"quoted film\t0\n")
    rows = D.load_glue("sst2", "train", str(tmp_path))
    assert rows == [(["good film "], 1), (["bad \"quoted film"], 0)]
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "dev.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta b\tc d\n",
                                               encoding="utf-8")
    assert D.load_glue("mrpc", "dev", str(tmp_path)) == [(["a b", "c d"], 1)]
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    assert D.load_glue("CoLA", "dev", str(tmp_path)) == [(["The cat sat."], 1), (["Cat the sat."], 0)]
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n")
    assert D.load_glue("rte", "dev", str(tmp_path)) == [(["a", "b"], 1)]


def test_glue_missing_column_and_bad_label(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence'\].*\['text', 'label'\]"):
        D.load_glue("sst2", "train", str(tmp_path))
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t7\n")
    with pytest.raises(ValueError, match="dev.tsv:2: label 7 out of range"):
        D.load_glue("sst2", "dev", str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        D.load_glue("rte", "train", str(tmp_path))
    with pytest.raises(ValueError, match="task='wnli2' is invalid"):
        D.glue_task("wnli2")


def test_metrics_hand():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert D.accuracy(pred, gold) == pytest.approx(3 / 5)
    # tp=2 fp=1 fn=1 tn=1
    assert D.f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert D.matthews(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert D.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert D.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1.5, 1.5, 3], y ranks [1, 2, 3]
    want = D.pearson([1.5, 1.5, 3.0], [1.0, 2.0, 3.0])
    assert D.spearman([5, 5, 9], [0.1, 0.2, 0.3]) == pytest.approx(want)
    assert D.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert D.glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 3.5])["pearson"] > 0.9


def test_sliding_window_perplexity_disjoint_windows_equals_direct():
    m = _llama(0).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (40,), generator=g).tolist()
    got = D.sliding_window_perplexity(m, ids, max_length=16, stride=16, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for a in range(0, 40, 16):
            x = torch.tensor([ids[a:a + 16]])
            lp = torch.log_softmax(m(input_ids=x).logits[0, :-1].float(), -1)
            tgt = x[0, 1:]
            nll -= lp.gather(-1, tgt[:, None]).sum().item()
            n += tgt.numel()
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        D.sliding_window_perplexity(m, ids, max_length=16, stride=17)


def test_demo_corpus_deterministic_and_split_by_file():
    a = D.demo_corpus(30_000, 5_000)
    b = D.demo_corpus(30_000, 5_000)
    assert a == b
    train_text, valid_text, info = a
    assert info["train_chars"] >= 30_000 and info["valid_chars"] >= 5_000
    assert len(set(train_text.split("\n\n")) & set(valid_text.split("\n\n")) - {""}) < 5
    assert sum(c.isalpha() for c in train_text) > 0.6 * len(train_text)  # prose, not random tokens


# ---- recipe CLIs on tiny local models ------------------------------------------------------------------------------
def _tiny_bert_dir(tmp_path: Path) -> Path:
    words = "the a film movie good bad great awful plot actors is was not very fun dull".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=len(words) + 5, num_labels=2))
    d = tmp_path / "bert"
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _glue_dir(tmp_path: Path) -> Path:
    g = tmp_path / "glue" / "SST-2"
    g.mkdir(parents=True)
    rows = ["the film is good", "a great movie", "very fun plot", "the actors were awful", "dull and bad",
            "not good", "a good film", "bad movie"]
    lab = [1, 1, 1, 0, 0, 0, 1, 0]
    body = "".join(f"{r}\t{l}\n" for r, l in zip(rows * 2, lab * 2))
    (g / "train.tsv").write_text("sentence\tlabel\n" + body)
    (g / "dev.tsv").write_text("sentence\tlabel\n" + body[: body.index("dull")])
    return tmp_path / "glue"


def _parse(add, argv):
    from pyquant.train import cli

    p = argparse.ArgumentParser()
    getattr(cli, f"add_{add}_arguments")(p)
    return p.parse_args(argv)


def test_qat_glue_cli_end_to_end(tmp_path, capsys):
    from pyquant.train import cli

    model = _tiny_bert_dir(tmp_path)
    data = _glue_dir(tmp_path)
    out = tmp_path / "out"
    args = _parse("qat_glue", ["--task", "sst2", "--teacher", str(model), "--data-dir", str(data),
                               "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
                               "--attention-kd", "none", "--no-progress"])
    assert cli.run_qat_glue(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["student"]["accuracy"] <= 1.0 and m["steps"] == 3
    assert (out / "checkpoint-00000003" / "model.safetensors").is_file()
    # the same command again without --resume: refused before training, checkpoint untouched
    before = _files(out / "checkpoint-00000003")
    assert cli.run_qat_glue(args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _files(out / "checkpoint-00000003") == before


def test_qat_glue_cli_bad_input(tmp_path, capsys):
    from pyquant.train import cli

    model = _tiny_bert_dir(tmp_path)
    data = tmp_path / "glue" / "SST-2"
    data.mkdir(parents=True)
    (data / "train.tsv").write_text("text\tlabel\ngood\t1\n")
    (data / "dev.tsv").write_text("text\tlabel\ngood\t1\n")
    base = ["--task", "sst2", "--output-dir", str(tmp_path / "o"), "--no-progress", "--attention-kd", "none"]
    assert cli.run_qat_glue(_parse("qat_glue", base + ["--teacher", str(model), "--data-dir",
                                                       str(tmp_path / "glue")])) == 2
    assert "lacks column(s) ['sentence']" in capsys.readouterr().err
    assert cli.run_qat_glue(_parse("qat_glue", base + ["--teacher", str(tmp_path / "nope"), "--tokenizer",
                                                       str(model), "--data-dir", str(_glue_dir(tmp_path / "x"))])) == 2
    assert "cannot load" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list_checkpoints(tmp_path / "o")


def test_finetune_and_qat_clm_cli_on_text_files(tmp_path):
    from pyquant.train import cli

    text = D.demo_corpus(20_000, 3_000)
    (tmp_path / "train.txt").write_text(text[0])
    (tmp_path / "valid.txt").write_text(text[1])
    tok = D.train_bpe_tokenizer(text[0], 120)
    m = _llama(0)
    m.resize_token_embeddings(len(tok))
    m.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    common = ["--text-files", str(tmp_path / "train.txt"), "--valid-files", str(tmp_path / "valid.txt"),
              "--block-size", "32", "--max-eval-tokens", "200", "--batch-size", "4", "--no-progress"]
    assert cli.run_finetune(_parse("finetune", ["--model", str(tmp_path / "lm"), "--output-dir",
                                                str(tmp_path / "ft"), "--max-steps", "3", "--lr", "1e-3"] + common)) == 0
    teacher = tmp_path / "ft" / "final"
    assert (teacher / "config.json").is_file()
    assert cli.run_qat_clm(_parse("qat_clm", ["--teacher", str(teacher), "--output-dir", str(tmp_path / "q"),
                                              "--max-steps", "3", "--chunk-size", "16"] + common)) == 0
    met = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert met["student"]["perplexity"] > 1 and met["teacher_perplexity"] > 1
    assert cli.run_qat_clm(_parse("qat_clm", ["--teacher", str(teacher), "--output-dir", str(tmp_path / "q2"),
                                              "--max-steps", "3"])) == 2  # no text given

"""``pyquant convert | generate | eval-ppl`` end to end on tiny models; bad input refused before any work; a pyquant
output directory where a model is expected resolves to its final/ model; ``convert`` killed by SIGKILL mid-write
leaves the previous output intact."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import pyquant
from pyquant.cli import main
from pyquant.formats import WeightQuantConfig
from pyquant.train import data as D

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    train, valid, _ = D.demo_corpus(20_000, 3_000)
    (d / "train.txt").write_text(train)
    (d / "valid.txt").write_text(valid)
    return d, D.train_bpe_tokenizer(train, 120)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("fp") / "lm"
    _, tok = corpus
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                                     tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=None,
                                     eos_token_id=None))
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _files(d: Path):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _ppl(model, tok, corpus_dir, block=32):
    ids = tok((corpus_dir / "valid.txt").read_text())["input_ids"][:300]
    return D.sliding_window_perplexity(model, ids, block, block // 2)


def test_convert_fp_to_packed_ptq_then_generate_and_eval_ppl(tmp_path, fp_dir, corpus, capsys):
    cdir, tok = corpus
    out = tmp_path / "packed"
    assert main(["convert", "--model", str(fp_dir), "--output-dir", str(out), "--method", "twn",
                 "--granularity", "group", "--group-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "packed PTQ" in printed and "layers swapped" in printed and f"wrote {out}" in printed
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "pyquant" and q["state"] == "packed" and q["weight"]["group_size"] == 32
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    # the packed checkpoint equals quantize() of the FP model in this process, bit for bit
    ref = AutoModelForCausalLM.from_pretrained(fp_dir)
    pyquant.quantize(ref, WeightQuantConfig(method="twn", granularity="group", group_size=32))
    got = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(got.model.layers[0].mlp.down_proj, pyquant.PackedLinear)
    x = torch.randint(0, len(tok), (2, 9))
    assert torch.equal(ref(x).logits, got(x).logits)

    assert main(["eval-ppl", "--model", str(out), "--text-files", str(cdir / "valid.txt"), "--block-size", "32",
                 "--max-tokens", "300"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] == 300 and res["stride"] == 16
    assert res["perplexity"] == pytest.approx(_ppl(ref, tok, cdir), rel=1e-6)

    assert main(["generate", "--model", str(out), "--prompt", "Return the", "--max-new-tokens", "6"]) == 0
    o = capsys.readouterr()
    assert o.out.startswith("Return the") and len(o.out.strip()) > len("Return the")
    assert "tokens/s" in o.err and "generated 6 tokens" in o.err


def test_finetune_qat_clm_convert_chain_through_output_dirs(tmp_path, fp_dir, corpus, capsys):
    """finetune --output-dir T; qat-clm --teacher T (not T/final) --output-dir S; convert --model S; eval-ppl."""
    cdir, tok = corpus
    common = ["--text-files", str(cdir / "train.txt"), "--block-size", "32", "--batch-size", "4", "--no-progress",
              "--max-steps", "2", "--chunk-size", "16"]
    assert main(["finetune", "--model", str(fp_dir), "--output-dir", str(tmp_path / "T"), "--max-steps", "2",
                 "--text-files", str(cdir / "train.txt"), "--block-size", "32", "--batch-size", "4",
                 "--no-progress"]) == 0
    assert main(["qat-clm", "--teacher", str(tmp_path / "T"), "--output-dir", str(tmp_path / "S")] + common) == 0
    err = capsys.readouterr().err
    assert f"--teacher {tmp_path / 'T'}: a pyquant output directory; using its model {tmp_path / 'T' / 'final'}" in err
    q = json.loads((tmp_path / "S" / "final" / "config.json").read_text())["quantization_config"]
    assert q["state"] == "qat"
    qat = AutoModelForCausalLM.from_pretrained(tmp_path / "S" / "final")
    pyquant.convert(qat)
    assert main(["convert", "--model", str(tmp_path / "S"), "--output-dir", str(tmp_path / "P")]) == 0
    assert "QAT checkpoint -> packed" in capsys.readouterr().out
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "P")
    x = torch.randint(0, len(tok), (1, 11))
    assert torch.equal(qat(x).logits, packed(x).logits)
    assert main(["eval-ppl", "--model", str(tmp_path / "P"), "--text-files", str(cdir / "valid.txt"),
                 "--block-size", "32", "--max-tokens", "200"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1


def test_bad_input_refused_before_work(tmp_path, fp_dir, corpus, capsys):
    cdir, _ = corpus
    out = tmp_path / "o"

    def refused(argv, *needles):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, (n, err)
        assert not out.exists()

    refused(["convert", "--model", str(tmp_path / "missing"), "--output-dir", str(out)], "--model", "no such directory")
    (tmp_path / "empty").mkdir()
    refused(["convert", "--model", str(tmp_path / "empty"), "--output-dir", str(out)], "not a model directory")
    (tmp_path / "run" / "checkpoint-00000004").mkdir(parents=True)
    refused(["generate", "--model", str(tmp_path / "run"), "--prompt", "x"], "without a final/ model",
            "checkpoint-00000004")
    (tmp_path / "f.txt").write_text("x")
    refused(["eval-ppl", "--model", str(tmp_path / "f.txt"), "--text-files", str(tmp_path / "f.txt")], "is a file")
    refused(["convert", "--model", str(fp_dir), "--output-dir", str(out), "--group-size", "32"], "group_size")
    refused(["convert", "--model", str(fp_dir), "--output-dir", str(out), "--granularity", "group",
             "--group-size", "64"], "not divisible by group_size=64")
    refused(["convert", "--model", str(fp_dir), "--output-dir", str(fp_dir)], "--output-dir is --model")
    refused(["eval-ppl", "--model", str(fp_dir), "--text-files", str(tmp_path / "nope.txt")], "nope.txt not found")
    refused(["generate", "--model", str(fp_dir), "--prompt", ""], "--prompt is empty")
    refused(["eval-ppl", "--model", str(fp_dir), "--text-files", str(cdir / "valid.txt"), "--block-size", "4096"],
            "exceeds the model's 128 positions")
    if not torch.cuda.is_available():
        refused(["generate", "--model", str(fp_dir), "--prompt", "a", "--device", "cuda"], "no CUDA GPU")
    refused(["generate", "--model", str(fp_dir), "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens")
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=20)).save_pretrained(tmp_path / "bert")
    refused(["generate", "--model", str(tmp_path / "bert"), "--prompt", "a"], "not a causal LM")
    # a QAT checkpoint carries its spec; a packed one has nothing to convert
    qat = AutoModelForCausalLM.from_pretrained(fp_dir)
    pyquant.prepare_qat(qat)
    qat.save_pretrained(tmp_path / "qat")
    refused(["convert", "--model", str(tmp_path / "qat"), "--output-dir", str(out), "--method", "absmean"],
            "--method", "QAT checkpoint")
    pyquant.convert(qat)
    qat.save_pretrained(tmp_path / "pk")
    refused(["convert", "--model", str(tmp_path / "pk"), "--output-dir", str(out)], "already a packed")
    # an existing non-empty output is not replaced without --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--model", str(fp_dir), "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


_KILLED_CHILD = r"""
import sys, time
import safetensors.torch as st
real = st.save_file
def slow_save(*a, **k):
    real(*a, **k)                      # the new weights are on disk (in the temporary directory) ...
    print("WRITING", flush=True)
    time.sleep(120)                    # ... and the process dies here, before the directory swap
st.save_file = slow_save
from pyquant.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_convert_killed_midway_leaves_previous_output_intact(tmp_path, fp_dir):
    out = tmp_path / "packed"
    assert main(["convert", "--model", str(fp_dir), "--output-dir", str(out)]) == 0
    before = _files(out)
    p = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, "convert", "--model", str(fp_dir), "--output-dir",
                          str(out), "--overwrite", "--method", "absmean"], stdout=subprocess.PIPE, text=True,
                         cwd=ROOT)
    try:
        t0 = time.time()
        lines = []
        while not lines or lines[-1].strip() != "WRITING":
            lines.append(p.stdout.readline())
            assert lines[-1], f"the child ended before writing: {lines}"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL and time.time() - t0 < 120
    assert _files(out) == before  # the previous checkpoint, byte for byte
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    leftovers = [x.name for x in tmp_path.iterdir() if x.name != "packed"]
    assert all(".pyquant-tmp-" in n for n in leftovers), leftovers  # at most the dead run's scratch directory
    # the next run completes over it
    assert main(["convert", "--model", str(fp_dir), "--output-dir", str(out), "--overwrite", "--method",
                 "absmean"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight"]["method"] == "absmean"


def test_convert_hf_bitnet_checkpoint(tmp_path):
    """An HF BitNet checkpoint (saved by transformers' own integration) -> a pyquant packed checkpoint with the
    same logits as pyquant.from_bitnet."""
    from transformers.integrations.bitnet import BitLinear, pack_weights, replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    torch.manual_seed(3)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)).eval()
    qc = BitNetQuantConfig(linear_class="bitlinear", modules_to_not_convert=["lm_head"])
    replace_with_bitnet_linear(m, modules_to_not_convert=["lm_head"], quantization_config=qc)
    for mod in m.modules():
        if isinstance(mod, BitLinear):
            mod.weight = pack_weights(torch.randint(-1, 2, (mod.out_features, mod.in_features)))
            mod.weight_scale = torch.rand(1) * 20 + 5
    m.config.quantization_config = qc
    m.save_pretrained(tmp_path / "bitnet")
    assert main(["convert", "--model", str(tmp_path / "bitnet"), "--output-dir", str(tmp_path / "p"),
                 "--method", "twn"]) == 2  # a BitNet checkpoint carries its spec
    assert main(["convert", "--model", str(tmp_path / "bitnet"), "--output-dir", str(tmp_path / "p")]) == 0
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["quant_method"] == "pyquant"
    ref = pyquant.from_bitnet(tmp_path / "bitnet")
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(got(x).logits, ref(x).logits)

"""WikiText-2 table of TSLD (Kim et al., NeurIPS 2023, "Token-Scaled Logit Distillation for ternary weight
generative language models"), reproduced on a small Llama-style decoder trained here from scratch; resumable per row.

    python benchmarks/reproduce_tsld.py                      # full setting (a GPU: ~10.5M-parameter teacher)
    python benchmarks/reproduce_tsld.py --rows fp,ptq,qat,tsld
    python benchmarks/reproduce_tsld.py --smoke              # seconds; what CI runs
    python benchmarks/reproduce_tsld.py --table              # print the Markdown table of the result file

Data: ``../shared/data/wikitext-2/{train,valid,test}.txt`` (the standard split, read in place, never copied).
Tokenizer: byte-level BPE trained on train.txt only (``--vocab-size``).  Teacher: FP Llama-style decoder
(``--hidden/--layers/--heads/--intermediate``; default 10.5M parameters) trained from scratch with next-token CE,
saved under ``--work-dir`` with the tokenizer and reused.  Students: initialized from the teacher, ternary TWN
weights per output row on every block linear (W2A16; embeddings and lm_head FP, as TSLD):
ptq (no training) · qat (CE) · kd (CE + logit KD, soft CE at T=1) · tsld (CE + TSLD, reduction "sum" = the paper's
code) · tsld_mean (CE + TSLD, per-sequence mean).  Metric: sliding-window test perplexity (window = block,
stride = block/2), and its ratio to the teacher's.

Results: ``<out>/reproduce_tsld-<tag>.{json,csv,png}``; each finished row is written at once, a rerun skips it.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _repro_store import ResultStore, median_step_s, parse_rows, run_meta, shared_data  # noqa: E402

ROWS = {
    "fp": "FP teacher (Llama-style, from scratch)",
    "ptq": "ternary PTQ (no training)",
    "qat": "QAT, CE only",
    "kd": "QAT + CE + logit KD",
    "tsld": "QAT + CE + TSLD (sum, paper)",
    "tsld_mean": "QAT + CE + TSLD (mean)",
}
CLAIM_RATIO = 1.07


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=shared_data("wikitext-2"))
    ap.add_argument("--smoke", action="store_true", help="tiny model and text (CI, seconds)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--work-dir", default=None, help="tokenizer + teacher (default <out>/.work/tsld-<tag>)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--train-chars", type=int, default=None, help="use only the first N characters of train.txt")
    ap.add_argument("--max-eval-tokens", type=int, default=None, help="truncate valid/test (default: all)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--teacher-epochs", type=float, default=8.0)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--qat-epochs", type=float, default=2.0)
    ap.add_argument("--qat-lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for the training steps (teacher and students; evaluation fp32): ~1.6x faster "
                         "per step on CPUs with AVX512-BF16/AMX; the result file gets a '-bf16' tag")
    ap.add_argument("--save-every", type=int, default=200,
                    help="checkpoint every N steps, so a killed run resumes its current row (default 200)")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.train_chars = a.train_chars or 6_000
        a.max_eval_tokens = a.max_eval_tokens or 128
        a.vocab_size, a.hidden, a.layers, a.heads, a.intermediate, a.block = 300, 32, 2, 2, 64, 32
        a.batch_size, a.teacher_epochs, a.qat_epochs, a.teacher_lr, a.qat_lr = 8, 1.0, 0.3, 5e-3, 2e-3
    a.rows = parse_rows(ap, a.rows, ROWS)
    return a


def _read(path: Path, limit=None) -> str:
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (expected WikiText-2 train.txt / valid.txt / test.txt in "
                         "--data-dir)")
    text = path.read_text(encoding="utf-8")
    return text if limit is None else text[:limit]


def encode(tok, text: str) -> List[int]:
    """Token ids of ``text`` encoded in line-aligned chunks (the byte-level pre-tokenizer splits at whitespace, so
    cutting at newlines gives the ids of the whole text)."""
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 2000]) for i in range(0, len(lines), 2000)]
    ids: List[int] = []
    for enc in tok.backend_tokenizer.encode_batch(chunks, add_special_tokens=False):
        ids += enc.ids
    return ids


def llama(a, vocab: int, pad_id: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    mc = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                     max_position_embeddings=max(256, a.block), tie_word_embeddings=False, pad_token_id=pad_id,
                     bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(mc)


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(rows)), [r["test_ppl"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    fp = next((r["test_ppl"] for r in rows if r["row"] == "fp"), None)
    if fp is not None:
        ax.axhline(fp * CLAIM_RATIO, color="tab:red", ls="--", lw=1, label=f"FP x {CLAIM_RATIO} (paper's bar)")
        ax.legend(fontsize=8)
    for i, r in enumerate(rows):
        ax.text(i, r["test_ppl"], f"{r['test_ppl']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["row"] for r in rows])
    ax.set_ylabel("test perplexity (sliding window)")
    ax.set_ylim(0, max(r["test_ppl"] for r in rows) * 1.15)
    c = data["config"]
    ax.set_title(f"WikiText-2, {c['teacher_params'] / 1e6:.2f}M-parameter Llama-style, ternary W2A16 ({c['tag']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def markdown(data: dict) -> str:
    c = data["config"]
    lines = [f"WikiText-2 test perplexity (sliding window {c['block']}/{c['stride']}), teacher "
             f"{c['teacher_params'] / 1e6:.2f}M parameters, BPE vocab {c['vocab_size']}, run `{c['tag']}`"
             f"{' (reduced)' if c['reduced'] else ''}; QAT {c['qat_epochs']:g} epochs, lr {c['qat_lr']:g}, "
             f"batch {c['batch_size']} x {c['block']} tokens, seed {c['seed']}.", "",
             "| row | test PPL | PPL / FP | valid PPL | steps | s/step | note |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        sps = "" if r.get("s_per_step") is None else f"{r['s_per_step']:.2f}"
        lines.append(f"| {r['name']} | {r['test_ppl']:.2f} | {r['ratio']:.3f} | {r['valid_ppl']:.2f} | "
                     f"{r.get('steps') or ''} | {sps} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from pyquant.distill.distiller import DistillConfig, Distiller
    from pyquant.formats import WeightQuantConfig
    from pyquant.train import recipes
    from pyquant.train.data import CausalCollator, block_examples, sliding_window_perplexity, train_bpe_tokenizer
    from pyquant.train.checkpoint import latest_checkpoint
    from pyquant.train.loop import TrainConfig, train
    from pyquant.train.quant import prepare_student

    if a.threads:
        torch.set_num_threads(a.threads)
    dev_kind = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag = a.tag or ("smoke" if a.smoke else dev_kind.split(":")[0].replace("cuda", "gpu")) + (
        "-bf16" if a.bf16 and not a.tag else "")
    out = Path(a.out)
    work = Path(a.work_dir) if a.work_dir else out / ".work" / f"tsld-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    if a.table:
        import json

        print(markdown(json.loads((out / f"reproduce_tsld-{tag}.json").read_text())))
        return 0
    d = Path(a.data_dir)
    train_text = _read(d / "train.txt", a.train_chars)
    valid_text, test_text = _read(d / "valid.txt"), _read(d / "test.txt")

    tdir = work / "teacher"
    from transformers import PreTrainedTokenizerFast

    if (tdir / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(tdir))
    else:
        tok = train_bpe_tokenizer(train_text, a.vocab_size)
    ids = {k: encode(tok, txt) for k, txt in (("train", train_text), ("valid", valid_text), ("test", test_text))}
    for k in ("valid", "test"):
        ids[k] = ids[k][:a.max_eval_tokens] if a.max_eval_tokens else ids[k]
    stride = a.block // 2
    weight = WeightQuantConfig(method="twn", granularity="channel")
    dev = torch.device(dev_kind)

    def ppl(m, split):
        return sliding_window_perplexity(m, ids[split], a.block, stride, device=dev)

    probe = llama(a, len(tok), tok.pad_token_id)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe
    config = {"tag": tag, "data_dir": str(d), "train_chars": len(train_text), "train_tokens": len(ids["train"]),
              "valid_tokens": len(ids["valid"]), "test_tokens": len(ids["test"]), "vocab_size": len(tok),
              "hidden": a.hidden, "layers": a.layers, "heads": a.heads, "intermediate": a.intermediate,
              "teacher_params": n_params, "block": a.block, "stride": stride, "batch_size": a.batch_size,
              "teacher_epochs": a.teacher_epochs, "teacher_lr": a.teacher_lr, "qat_epochs": a.qat_epochs,
              "qat_lr": a.qat_lr, "warmup_ratio": 0.1, "weight_decay": 0.01, "seed": a.seed,
              "weight": weight.to_dict(), "activation": None, "device": dev_kind, "tsld_tau": 10.0,
              "reduced": bool(a.smoke or a.train_chars or a.max_eval_tokens),
              **({"bf16_autocast": True} if a.bf16 else {})}
    store = ResultStore(out / f"reproduce_tsld-{tag}.json", config, plot)
    train_ex = block_examples(ids["train"], a.block)

    def tcfg(name, epochs, lr):
        # a killed run continues a row (or the teacher) from its last checkpoint in scratch/<name> (every
        # --save-every steps); the loop refuses a checkpoint written with another training configuration
        scratch = work / "scratch" / name
        resume = latest_checkpoint(scratch) is not None
        if resume:
            print(f"{name}: resuming from {latest_checkpoint(scratch)}", flush=True)
        return TrainConfig(output_dir=str(scratch), epochs=epochs, batch_size=a.batch_size, lr=lr, warmup_ratio=0.1,
                           weight_decay=0.01, seed=a.seed, device=dev_kind, progress=not a.smoke, log_every=10,
                           bf16=a.bf16, save_every=a.save_every, keep_last=1, resume=resume)

    t_all = time.time()
    if (tdir / "config.json").is_file():
        teacher = recipes.load_model(str(tdir), "causal_lm")
        teacher_info = store.data["extra"].get("teacher")
    else:
        t0 = time.time()
        teacher = llama(a, len(tok), tok.pad_token_id)
        res = recipes.finetune(teacher, train_ex, CausalCollator(), tcfg("teacher", a.teacher_epochs, a.teacher_lr),
                               "causal_lm")
        shutil.rmtree(work / "scratch" / "teacher", ignore_errors=True)
        tmp = work / "teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        teacher.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, tdir)
        teacher_info = {"steps": res.steps, "train_s": round(time.time() - t0, 1), "s_per_step": median_step_s(res.history),
                        "final_train_ce": res.history[-1].get("total")}
        store.set_extra("teacher", teacher_info)
    teacher.to(dev).eval()
    fp_test = store.done("fp")["test_ppl"] if store.done("fp") else ppl(teacher, "test")

    for row in a.rows:
        if store.done(row):
            print(f"{row}: already in {store.path}, skipped")
            continue
        t0 = time.time()
        meta = run_meta()
        rec = {"row": row, "name": ROWS[row], "seed": a.seed, "commit": meta["commit"],
               "clean_tree": meta["clean_tree"], "started": meta["date_utc"], "steps": None, "s_per_step": None}
        if row == "fp":
            m = teacher
            rec.update(teacher_info or {})
        else:
            m = copy.deepcopy(teacher).requires_grad_(True)
            prepare_student(m, weight, None)  # default exclusions keep lm_head FP; embeddings are not linears
            if row != "ptq":
                dc = DistillConfig(task="causal_lm", ce=1.0, kd=1.0 if row == "kd" else 0.0,
                                   tsld=1.0 if row.startswith("tsld") else 0.0,
                                   tsld_reduction="mean" if row == "tsld_mean" else "sum")
                dist = Distiller(m, teacher if dc.needs_teacher else None, dc)
                res = train(dist, train_ex, CausalCollator(), tcfg(row, a.qat_epochs, a.qat_lr))
                shutil.rmtree(work / "scratch" / row, ignore_errors=True)
                rec.update(steps=res.steps, s_per_step=median_step_s(res.history), distill=dc.to_dict(),
                           final_losses={k: v for k, v in res.history[-1].items() if k not in ("step", "epoch")})
                teacher.eval()
        rec["test_ppl"] = ppl(m, "test")
        rec["valid_ppl"] = ppl(m, "valid")
        rec["ratio"] = rec["test_ppl"] / fp_test
        if config["reduced"]:
            rec["note"] = "reduced run: not a reproduction"
        elif row in ("tsld", "tsld_mean"):
            rec["note"] = f"claim (PPL / FP <= {CLAIM_RATIO}) " + ("holds" if rec["ratio"] <= CLAIM_RATIO
                                                                 else "does NOT hold")
        rec["reproduced"] = not config["reduced"]
        rec["wall_s"] = round(time.time() - t0, 1)
        store.add_row(rec)
        print(f"{row}: test PPL {rec['test_ppl']:.2f} (x{rec['ratio']:.3f} of FP) ({rec['wall_s']} s)", flush=True)
        del m
    store.data["meta"]["last_run_wall_s"] = round(time.time() - t_all, 1)
    store.save()
    print(markdown(store.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pyquant demo``: the main job end to end on text every machine has, no download, CPU or GPU.

1. Corpus: the docstrings of this Python's standard library (real English technical prose), split by file into
   train / validation (``pyquant.train.data.demo_corpus``); a byte-level BPE tokenizer is trained on the train split.
2. A small Llama-style FP teacher is trained from scratch.
3. Three ternary students (TWN, per-row scales, W2A16; embeddings and lm_head FP), all from the teacher's weights:
   PTQ (no training), QAT with ground-truth CE only, and QAT + KD (CE + TSLD + attention-map KD).
4. The QAT students are converted to ``PackedLinear`` (2 bits/weight) and evaluated as packed models.
5. One table: validation perplexity (sliding window), size in MB (FP parameter bytes vs packed bytes: codes + scales +
   FP embeddings/norms/head), decode speed when a GPU is present; plus a PNG of the loss curves.
6. The journey out of the process: the packed QAT+KD student is saved with ``save_pretrained`` (``out_dir/student``,
   tokenizer included; the FP teacher next to it in ``out_dir/teacher``), reloaded with ``from_pretrained`` in a
   fresh Python process (``pyquant generate``), which writes a line of text from a prompt; the demo checks that
   line against the in-process model's and prints both checkpoints' sizes on disk.

``--smoke`` runs a tiny configuration (seconds) to exercise the code path in CI.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..formats import WeightQuantConfig
from .data import block_examples, demo_corpus, sliding_window_perplexity, train_bpe_tokenizer
from .loop import TrainConfig
from .quant import convert_to_packed, model_nbytes, ptq_to_packed

__all__ = ["DemoConfig", "run_demo", "FULL", "SMOKE"]


@dataclass(frozen=True)
class DemoConfig:
    train_chars: int
    valid_chars: int
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    block: int
    batch_size: int
    teacher_steps: int
    qat_steps: int
    teacher_lr: float
    qat_lr: float
    eval_tokens: int


FULL = DemoConfig(train_chars=1_200_000, valid_chars=120_000, vocab_size=512, hidden=128, layers=4, heads=4,
                  intermediate=384, block=128, batch_size=16, teacher_steps=1200, qat_steps=200, teacher_lr=3e-3,
                  qat_lr=5e-4, eval_tokens=8192)
SMOKE = DemoConfig(train_chars=40_000, valid_chars=6_000, vocab_size=300, hidden=32, layers=2, heads=2,
                   intermediate=64, block=32, batch_size=8, teacher_steps=20, qat_steps=8, teacher_lr=5e-3,
                   qat_lr=2e-3, eval_tokens=512)


def _llama(cfg: DemoConfig, vocab: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=max(256, cfg.block), tie_word_embeddings=False, pad_token_id=pad_id,
                     bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(mc)


def _decode_tok_s(model, prompt_ids: List[int], new_tokens: int = 128) -> Optional[float]:
    """Greedy decode throughput on CUDA (tokens/s, batch 1); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    model = model.cuda().eval()
    x = torch.tensor([prompt_ids], device="cuda")
    with torch.no_grad():
        model.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        torch.cuda.synchronize()
    model.cpu()
    return new_tokens / (time.perf_counter() - t0)


def _plot(curves: Dict[str, List[float]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("pyquant demo: training losses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt_table(rows: List[dict]) -> str:
    head = ["model", "val perplexity", "size (MB)", "decode (tok/s)"]
    body = [[r["model"], f"{r['perplexity']:.2f}", f"{r['size_mb']:.3f}",
             "n/a (no GPU)" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.0f}"] for r in rows]
    w = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(4)]
    line = lambda c: "| " + " | ".join(s.ljust(w[i]) if i == 0 else s.rjust(w[i]) for i, s in enumerate(c)) + " |"
    sep = "|" + "|".join("-" * (x + 2) for x in w) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


PROMPT = "Return the"


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6


def _save_reload_generate(student, teacher, tok, out: Path, new_tokens: int, prompt: str = PROMPT) -> dict:
    """save_pretrained the packed student and the FP teacher, generate from the student in a fresh process
    (``pyquant generate``: from_pretrained + generate), compare with the in-process model, print the disk sizes."""
    import subprocess
    import sys

    from .recipes import save_model_dir

    s_dir, t_dir = out / "student", out / "teacher"
    save_model_dir(student.cpu(), tok, s_dir)
    save_model_dir(teacher.cpu(), tok, t_dir)
    print(f"\n[5/5] saved the packed QAT+KD student with save_pretrained to {s_dir}; reloading it with from_pretrained "
          "in a fresh process (pyquant generate):", flush=True)
    cmd = [sys.executable, "-m", "pyquant.cli", "generate", "--model", str(s_dir), "--prompt", prompt,
           "--max-new-tokens", str(new_tokens), "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"reloading the saved student in a fresh process failed ({' '.join(cmd)}):\n{p.stderr}")
    text = p.stdout.rstrip("\n")
    speed = next((ln for ln in p.stderr.splitlines() if "tokens/s" in ln), "")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = student.eval().generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
    here = prompt + tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    same = text == here
    s_mb, t_mb = _dir_mb(s_dir), _dir_mb(t_dir)
    print(f"  {text!r}\n  ({speed.strip()}; {'identical to' if same else 'DIFFERS from'} the in-process model's "
          f"text)\n  checkpoint on disk: packed student {s_mb:.3f} MB, FP teacher {t_mb:.3f} MB "
          f"({t_mb / s_mb:.1f}x smaller)", flush=True)
    if not same:
        raise RuntimeError(f"the reloaded student generated {text!r}, the in-process one {here!r}")
    return {"student_dir": str(s_dir), "teacher_dir": str(t_dir), "prompt": prompt, "text": text,
            "speed": speed.strip(), "identical_to_in_process": same, "student_disk_mb": s_mb,
            "teacher_disk_mb": t_mb}


def run_demo(out_dir: str = "pyquant-demo", smoke: bool = False, seed: int = 0, threads: Optional[int] = None,
             config: Optional[DemoConfig] = None, progress: bool = True) -> dict:
    """Run the demo; returns the results dict (also written to ``out_dir/results.json``)."""
    from ..distill.distiller import DistillConfig, Distiller
    from .loop import train
    from .data import CausalCollator
    from .quant import prepare_student
    from .recipes import attention_kd_available

    cfg = config or (SMOKE if smoke else FULL)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    if runs.exists():
        import shutil

        shutil.rmtree(runs)  # the demo always starts fresh; its own scratch folder only
    t_start = time.time()
    train_text, valid_text, info = demo_corpus(cfg.train_chars, cfg.valid_chars)
    tok = train_bpe_tokenizer(train_text, cfg.vocab_size)
    train_ids = tok(train_text)["input_ids"]
    valid_ids = tok(valid_text)["input_ids"][:cfg.eval_tokens]
    vocab = len(tok)
    print(f"corpus: {info['source']}\n  train {info['train_chars']:,} chars / {len(train_ids):,} tokens "
          f"({info['train_files']} files), validation {info['valid_chars']:,} chars "
          f"({info['valid_files']} files), BPE vocab {vocab}", flush=True)
    examples = block_examples(train_ids, cfg.block)
    coll = CausalCollator()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def tcfg(name, steps, lr):
        return TrainConfig(output_dir=str(runs / name), max_steps=steps, batch_size=cfg.batch_size, lr=lr,
                           weight_decay=0.01, warmup_ratio=0.1, seed=seed, bf16=device == "cuda",
                           progress=progress, log_every=max(1, steps // 20))

    def ppl(m):
        return sliding_window_perplexity(m.to(device), valid_ids, cfg.block, cfg.block // 2, device=device)

    torch.manual_seed(seed)
    teacher = _llama(cfg, vocab, tok.pad_token_id)
    fp_bytes = model_nbytes(teacher)
    print(f"[1/5] FP teacher: {sum(p.numel() for p in teacher.parameters()):,} parameters, "
          f"{cfg.teacher_steps} steps", flush=True)
    r_t = train(Distiller(teacher, None, DistillConfig(task="causal_lm", ce=1.0)), examples, coll,
                tcfg("teacher", cfg.teacher_steps, cfg.teacher_lr))
    teacher.eval()
    spec = WeightQuantConfig(method="twn", granularity="channel")
    rows = [{"model": "FP teacher", "perplexity": ppl(teacher), "size_mb": fp_bytes / 1e6,
             "decode_tok_s": _decode_tok_s(teacher, valid_ids[:16])}]

    print("[2/5] ternary PTQ (no training)", flush=True)
    ptq = ptq_to_packed(copy.deepcopy(teacher).cpu(), spec)
    rows.append({"model": "ternary PTQ (no training)", "perplexity": ppl(ptq), "size_mb": model_nbytes(ptq) / 1e6,
                 "decode_tok_s": _decode_tok_s(ptq, valid_ids[:16])})
    del ptq

    attn = 1.0 if attention_kd_available() else 0.0
    curves = {"FP teacher (CE)": [h["total"] for h in r_t.history if "total" in h]}
    for i, (name, kd) in enumerate((("ternary QAT, no KD", False), ("ternary QAT + KD (TSLD + attn map)", True))):
        print(f"[{3 + i}/5] {name}: {cfg.qat_steps} steps", flush=True)
        student = copy.deepcopy(teacher).cpu()
        prepare_student(student, spec, None)
        dc = DistillConfig(task="causal_lm", ce=1.0, tsld=1.0 if kd else 0.0, attn_map=attn if kd else 0.0)
        res = train(Distiller(student, teacher if kd else None, dc), examples, coll,
                    tcfg(f"qat{int(kd)}", cfg.qat_steps, cfg.qat_lr))
        curves[f"{name}: total"] = [h["total"] for h in res.history if "total" in h]
        if kd:
            curves[f"{name}: CE"] = [h["ce"] for h in res.history if "ce" in h]
        student.eval()
        convert_to_packed(student)
        rows.append({"model": name + " [packed]", "perplexity": ppl(student), "size_mb": model_nbytes(student) / 1e6,
                     "decode_tok_s": _decode_tok_s(student, valid_ids[:16])})
        if kd:
            kd_student = student
        del student
    png = _plot(curves, out / "loss_curves.png")
    table = _fmt_table(rows)
    print("\n" + table)
    reload = _save_reload_generate(kd_student, teacher, tok, out, new_tokens=8 if smoke else 24)
    del kd_student
    result = {"table": rows, "corpus": info, "config": asdict(cfg), "smoke": smoke, "seed": seed,
              "attention_map_kd": bool(attn), "weight_format": spec.describe(), "device": device,
              "elapsed_s": round(time.time() - t_start, 1), "reload": reload,
              "loss_png": None if png is None else str(png)}
    with open(out / "results.json.tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out / "results.json.tmp", out / "results.json")  # atomic: a killed run keeps the previous results
    print(f"\nloss curves: {png}\nresults: {out / 'results.json'}  ({result['elapsed_s']:.0f} s)")
    if not attn:
        print("note: attention-map KD is unavailable in this build (pyquant.distill.capture missing); KD = TSLD only")
    return result

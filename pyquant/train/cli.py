"""Arguments and entry points of ``pyquant demo | qat-glue | qat-clm | finetune``.

For each command: ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` (0 ok, 2 bad input: the error is
printed before any training starts).  ``pyquant/cli.py`` wires them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = [
    "add_demo_arguments", "run_demo",
    "add_qat_glue_arguments", "run_qat_glue",
    "add_qat_clm_arguments", "run_qat_clm",
    "add_finetune_arguments", "run_finetune",
]


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ---- shared options ------------------------------------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser, *, epochs=3.0, lr=2e-5, batch=32, fsdp=True) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="checkpoints, log.jsonl, metrics.json")
    g.add_argument("--epochs", type=float, default=epochs)
    g.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--batch-size", type=int, default=batch,
                   help="per device" + (" (default: the task's, 32; CoLA 16)" if batch is None else ""))
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N optimizer steps")
    g.add_argument("--keep-last", type=int, default=None, help="keep only the last N checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument("--no-progress", action="store_true")
    if fsdp:
        g.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the student with FSDP2 (fully_shard) instead of DDP (the frozen "
                            "teacher stays a full replica per rank); without torchrun it trains unsharded (notice)")


def _train_config(args, **over):
    from .loop import TrainConfig

    kw = dict(batch_size=args.batch_size)
    kw.update(over)
    return TrainConfig(output_dir=args.output_dir, epochs=args.epochs, max_steps=args.max_steps,
                       grad_accum=args.grad_accum, lr=args.lr, **kw,
                       weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                       max_grad_norm=args.max_grad_norm, bf16=args.bf16, seed=args.seed, save_every=args.save_every,
                       keep_last=args.keep_last, resume=args.resume, progress=not args.no_progress,
                       distributed="fsdp" if getattr(args, "fsdp", False) else "ddp")


def _add_quant_args(p, *, granularity: str, act: bool) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--method", default=None, choices=["twn", "absmean", "uniform", "seq"], help="default twn")
    g.add_argument("--granularity", default=None, choices=["tensor", "channel", "group"],
                   help=f"default {granularity}")
    g.set_defaults(_granularity_default=granularity)
    g.add_argument("--group-size", type=int, default=None)
    if act:
        g.add_argument("--no-act-quant", action="store_true", help="W2A16 instead of W2A8")
    g.add_argument("--exclude", nargs="*", default=None,
                   help="module-name patterns kept FP (default: heads, lm_head, pooler)")


def _weight_spec(args):
    from ..formats import WeightQuantConfig

    return WeightQuantConfig(method=args.method or "twn", granularity=args.granularity or args._granularity_default,
                             group_size=args.group_size)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# ---- demo ----------------------------------------------------------------------------------------------------------
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), to exercise the code path")
    p.add_argument("--out-dir", default="pyquant-demo", help="where the table, results.json and loss PNG go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def run_demo(args) -> int:
    from .demo import run_demo as _run

    _run(args.out_dir, smoke=args.smoke, seed=args.seed, threads=args.threads, progress=not args.no_progress)
    return 0


# ---- qat-glue ------------------------------------------------------------------------------------------------------
def add_qat_glue_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, rte, qnli, qqp, mnli")
    p.add_argument("--teacher", required=True, help="task-fine-tuned FP model: hub name or local path")
    p.add_argument("--student", default=None, help="initialization of the student (default: the teacher)")
    p.add_argument("--tokenizer", default=None, help="default: the teacher's")
    p.add_argument("--data-dir", default=None, help="GLUE TSV folder (<dir>/<Task>/{train,dev}.tsv); "
                                                    "default: HF datasets")
    p.add_argument("--dataset", default="nyu-mll/glue", help="HF dataset name when --data-dir is not given")
    p.add_argument("--max-length", type=int, default=None, help="default 128 (64 for SST-2/CoLA)")
    p.add_argument("--padding", default="longest", choices=["longest", "max_length"],
                   help="pad each batch to its longest example (default) or to --max-length as the EMNLP'22 code "
                        "does (its unmasked MSE losses and per-tensor activation ranges see the padding)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--no-kd", action="store_true", help="ground-truth CE only (QAT without distillation)")
    p.add_argument("--gt-loss", action="store_true",
                   help="add the ground-truth loss to KD (NLL summed over the batch, as the EMNLP'22 code's "
                        "gt_loss; its shipped scripts leave it off)")
    p.add_argument("--attention-kd", default="map", choices=["map", "output", "both", "none", "score"],
                   help="score = TernaryBERT's attention-score MSE (the baseline)")
    p.add_argument("--attn-gamma", type=float, default=None, help="unified mix gamma*map + (1-gamma)*output")
    p.add_argument("--no-hidden-kd", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--mse-reduction", default="paper", choices=["masked", "paper"],
                   help="hidden-state and attention-output MSE: over all B*L*D entries as the paper's MSELoss "
                        "('paper', default) or over non-padding tokens only ('masked')")
    p.add_argument("--preset", default=None, choices=["kdqat-emnlp22"],
                   help="the EMNLP'22 KD-QAT quantization setting in one switch (TWN per tensor + clip 2.5 incl. "
                        "the pooler, 8-bit activations clipped at 2.5, row-wise TWN word embeddings, 8-bit Q/K/V "
                        "and attention probabilities); excludes --method/--granularity/--group-size/"
                        "--no-act-quant/--exclude")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on dev every N optimizer steps (default: the EMNLP'22 code's eval_step: CoLA 50, "
                        "SST-2 100, MRPC 50, STS-B 100, RTE 20, QNLI/QQP 1000, MNLI 8000; 0 = only at the end); "
                        "best and last dev score are both reported")
    _add_quant_args(p, granularity="tensor", act=True)
    _add_train_args(p, batch=None)


def run_qat_glue(args) -> int:
    import copy

    from ..convert import QATConfig
    from ..distill.distiller import DistillConfig
    from ..formats import ActivationQuantConfig
    from . import recipes
    from .data import encode_pairs, glue_task, load_glue

    try:
        t = glue_task(args.task)
        if args.preset is not None:
            clash = [f for f, v in (("--method", args.method), ("--granularity", args.granularity),
                                    ("--group-size", args.group_size), ("--no-act-quant", args.no_act_quant or None),
                                    ("--exclude", args.exclude)) if v is not None]
            if clash:
                raise ValueError(f"--preset {args.preset} sets the quantization itself; {', '.join(clash)} "
                                 "contradicts it (drop the option, or drop --preset)")
            weight = act = None
        else:
            weight = _weight_spec(args)
            act = None if args.no_act_quant else ActivationQuantConfig()
        if args.no_kd and args.gt_loss:
            raise ValueError("--gt-loss adds the ground-truth loss to KD; with --no-kd it is the only loss already")
        if args.eval_every is not None and args.eval_every < 0:
            raise ValueError(f"--eval-every={args.eval_every} is invalid: expected an int >= 0")
        dc = recipes.glue_distill_config(t.name, kd=not args.no_kd, attention=args.attention_kd,
                                         hidden=not args.no_hidden_kd, mse_reduction=args.mse_reduction,
                                         gt_loss=args.gt_loss)
        if not args.no_kd and (args.attn_gamma is not None or args.temperature != 1.0):
            d = dc.to_dict()
            d.update(attn_gamma=args.attn_gamma, temperature=args.temperature)
            dc = DistillConfig(**d)
        eval_every = t.eval_every if args.eval_every is None else (args.eval_every or None)
        tcfg = _train_config(args, batch_size=args.batch_size or t.batch_size, eval_every=eval_every)
        tok = recipes.load_tokenizer(args.tokenizer or args.teacher)
        ml = args.max_length or t.max_length
        train_ex = encode_pairs(load_glue(t.name, "train", args.data_dir, args.dataset, args.train_limit), tok, ml)
        dev_ex = encode_pairs(load_glue(t.name, "dev", args.data_dir, args.dataset), tok, ml)
        teacher = recipes.load_model(args.teacher, "classification", num_labels=t.num_labels)
        student = recipes.load_model(args.student, "classification", num_labels=t.num_labels) \
            if args.student else copy.deepcopy(teacher)
        run = {"command": "qat-glue", "task": t.name, "teacher": args.teacher, "student": args.student,
               "data": args.data_dir or args.dataset, "max_length": ml, "train_limit": args.train_limit,
               "weight": None if weight is None else weight.to_dict(),
               "activation": None if act is None else act.to_dict(),
               "quantization": QATConfig(preset=args.preset).to_dict() if args.preset else None,
               "distill": dc.to_dict(), "exclude": args.exclude, "preset": args.preset, "padding": args.padding}
        teacher_metrics = recipes.evaluate_glue(teacher, t.name, dev_ex, tok.pad_token_id) if dc.needs_teacher \
            else None
        res = recipes.qat_glue(teacher, student, t.name, train_ex, tok.pad_token_id, tcfg, dc, weight, act,
                               dev_examples=dev_ex, run_config=run, exclude=args.exclude, preset=args.preset,
                               pad_to=ml if args.padding == "max_length" else None)
    except ValueError as e:
        return _fail(str(e))
    from .loop import dist_info

    if dist_info()[0] != 0:  # rank 0 evaluates and writes
        return 0
    bl = recipes.best_and_last(t.name, res.history)
    metrics = {"student": res.history[-1].get("eval"), "student_best": bl["best"], "student_last": bl["last"],
               "evals": [h for h in res.history if "eval" in h], "teacher": teacher_metrics, "steps": res.steps,
               "checkpoint": res.checkpoint, "run": run}
    _write_json(Path(args.output_dir) / "metrics.json", metrics)
    print(json.dumps({"student": metrics["student"], "best": bl["best"], "last": bl["last"],
                      "teacher": teacher_metrics}))
    return 0


# ---- qat-clm -------------------------------------------------------------------------------------------------------
def _add_text_args(p) -> None:
    g = p.add_argument_group("text")
    g.add_argument("--text-files", nargs="*", default=None, help="local training text files (or folders of *.txt)")
    g.add_argument("--valid-files", nargs="*", default=None, help="local validation text files")
    g.add_argument("--dataset", default=None, help="HF dataset name (e.g. wikitext)")
    g.add_argument("--dataset-config", default=None, help="e.g. wikitext-2-raw-v1")
    g.add_argument("--train-split", default="train")
    g.add_argument("--valid-split", default="validation")
    g.add_argument("--text-column", default="text")
    g.add_argument("--block-size", type=int, default=512)
    g.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride (default block/2)")
    g.add_argument("--max-eval-tokens", type=int, default=None)


def _load_text(args):
    from .data import load_text_dataset, read_text_files

    if args.text_files:
        train = read_text_files(args.text_files)
        valid = read_text_files(args.valid_files) if args.valid_files else None
    elif args.dataset:
        train = load_text_dataset(args.dataset, args.dataset_config, args.train_split, args.text_column)
        valid = load_text_dataset(args.dataset, args.dataset_config, args.valid_split, args.text_column) \
            if args.valid_split else None
    else:
        raise ValueError("give --text-files or --dataset")
    return train, valid


def add_qat_clm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="FP causal LM: hub name or local path")
    p.add_argument("--student", default=None, help="default: initialized from the teacher")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--no-tsld", action="store_true", help="QAT with ground-truth CE only")
    p.add_argument("--attention-map", type=float, default=0.0, help="weight of attention-map KD (0 = off)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the logit losses")
    _add_text_args(p)
    _add_quant_args(p, granularity="channel", act=False)
    _add_train_args(p, epochs=1.0, lr=2e-5, batch=8)


def run_qat_clm(args) -> int:
    import copy

    from . import recipes
    from .data import sliding_window_perplexity

    try:
        weight = _weight_spec(args)
        tcfg = _train_config(args)
        tok = recipes.load_tokenizer(args.tokenizer or args.teacher)
        train_text, valid_text = _load_text(args)
        train_ids = tok(train_text)["input_ids"]
        valid_ids = tok(valid_text)["input_ids"][:args.max_eval_tokens] if valid_text else None
        teacher = recipes.load_model(args.teacher, "causal_lm")
        student = recipes.load_model(args.student, "causal_lm") if args.student else copy.deepcopy(teacher)
        run = {"command": "qat-clm", "teacher": args.teacher, "student": args.student,
               "data": args.text_files or [args.dataset, args.dataset_config], "block": args.block_size,
               "weight": weight.to_dict(), "tsld": not args.no_tsld, "attention_map": args.attention_map,
               "exclude": args.exclude}
        teacher_ppl = sliding_window_perplexity(teacher, valid_ids, args.block_size, args.eval_stride) \
            if valid_ids and not args.no_tsld else None
        from .quant import prepare_student  # noqa: F401  (qat_clm prepares the student)

        res = recipes.qat_clm(teacher if not args.no_tsld or args.attention_map else None, student, train_ids,
                              args.block_size, tcfg, weight, tsld=not args.no_tsld,
                              attention_map=args.attention_map, valid_ids=valid_ids, run_config=run,
                              chunk_size=args.chunk_size, eval_stride=args.eval_stride)
    except ValueError as e:
        return _fail(str(e))
    from .loop import dist_info

    if dist_info()[0] != 0:
        return 0
    metrics = {"student": res.history[-1].get("eval"), "teacher_perplexity": teacher_ppl, "steps": res.steps,
               "checkpoint": res.checkpoint, "run": run}
    _write_json(Path(args.output_dir) / "metrics.json", metrics)
    print(json.dumps({"student": metrics["student"], "teacher_perplexity": teacher_ppl}))
    return 0


# ---- finetune ------------------------------------------------------------------------------------------------------
def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub name or local path of the FP model")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--task", default=None, help="a GLUE task (classification/regression); omit for causal-LM text")
    p.add_argument("--data-dir", default=None, help="GLUE TSV folder")
    p.add_argument("--glue-dataset", default="nyu-mll/glue")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None)
    _add_text_args(p)
    # no --fsdp: run_finetune saves the model with save_pretrained on rank 0, which needs unsharded parameters
    _add_train_args(p, fsdp=False)


def run_finetune(args) -> int:
    from . import recipes
    from .data import CausalCollator, PadCollator, block_examples, encode_pairs, glue_task, load_glue, \
        sliding_window_perplexity

    try:
        tcfg = _train_config(args)
        tok = recipes.load_tokenizer(args.tokenizer or args.model)
        if args.task:
            t = glue_task(args.task)
            ml = args.max_length or t.max_length
            train_ex = encode_pairs(load_glue(t.name, "train", args.data_dir, args.glue_dataset, args.train_limit),
                                    tok, ml)
            dev_ex = encode_pairs(load_glue(t.name, "dev", args.data_dir, args.glue_dataset), tok, ml)
            model = recipes.load_model(args.model, "classification", num_labels=t.num_labels)
            ev = lambda m: recipes.evaluate_glue(m, t.name, dev_ex, tok.pad_token_id)  # noqa: E731
            kind = "regression" if t.is_regression else "classification"
            res = recipes.finetune(model, train_ex, PadCollator(tok.pad_token_id, t.is_regression), tcfg, kind, ev,
                                   run_config={"command": "finetune", "model": args.model, "task": t.name})
        else:
            train_text, valid_text = _load_text(args)
            valid_ids = tok(valid_text)["input_ids"][:args.max_eval_tokens] if valid_text else None
            model = recipes.load_model(args.model, "causal_lm")
            ev = (lambda m: {"perplexity": sliding_window_perplexity(m, valid_ids, args.block_size,
                                                                      args.eval_stride)}) if valid_ids else None
            res = recipes.finetune(model, block_examples(tok(train_text)["input_ids"], args.block_size),
                                   CausalCollator(), tcfg, "causal_lm", ev,
                                   run_config={"command": "finetune", "model": args.model, "block": args.block_size})
    except ValueError as e:
        return _fail(str(e))
    from .loop import dist_info

    if dist_info()[0] != 0:
        return 0
    final = Path(args.output_dir) / "final"
    if final.exists():
        return _fail(f"{final} already exists; not overwriting it")
    tmp = Path(args.output_dir) / ".tmp-final"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, final)  # the teacher folder appears complete or not at all
    ev_rec = res.history[-1].get("eval") if res.history else None
    _write_json(Path(args.output_dir) / "metrics.json", {"eval": ev_rec, "steps": res.steps, "model": str(final)})
    print(json.dumps({"eval": ev_rec, "model": str(final)}))
    return 0

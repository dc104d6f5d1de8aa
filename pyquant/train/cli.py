"""Arguments and entry points of ``pyquant demo | qat-glue | qat-clm | finetune | convert | generate | eval-ppl``.

For each command: ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` (0 ok, 2 bad input: the error is
printed before any training starts).  ``pyquant/cli.py`` wires them.

Every argument that takes a model (``--teacher``, ``--student``, ``--model``, ``--tokenizer``) goes through
:func:`resolve_model_arg`: a pyquant output directory (``pyquant finetune/qat-glue/qat-clm --output-dir T``, which
writes the model to ``T/final``) resolves to ``T/final``; a directory that holds only training checkpoints, a file,
or a missing local path is refused with a message that says what was found.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

__all__ = [
    "resolve_model_arg",
    "add_demo_arguments", "run_demo",
    "add_qat_glue_arguments", "run_qat_glue",
    "add_qat_clm_arguments", "run_qat_clm",
    "add_finetune_arguments", "run_finetune",
    "add_convert_arguments", "run_convert",
    "add_generate_arguments", "run_generate",
    "add_eval_ppl_arguments", "run_eval_ppl",
]


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _looks_local(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1


def resolve_model_arg(value, flag: str):
    """The model directory that ``value`` (given as ``flag``) names: itself when it holds a ``config.json``, its
    ``final/`` model when it is a pyquant output directory, a hub name unchanged; otherwise ``ValueError``."""
    if value is None:
        return None
    from .checkpoint import list_checkpoints

    p = Path(value).expanduser()
    if not p.exists():
        if _looks_local(str(value)):
            raise ValueError(f"{flag} {value!r}: no such directory")
        return str(value)  # a hub name: transformers resolves it (and says so when it cannot)
    if not p.is_dir():
        raise ValueError(f"{flag} {value!r} is a file; expected a model directory (config.json + weights)")
    if (p / "config.json").is_file():
        return str(p)
    final = p / "final"
    if (final / "config.json").is_file():
        print(f"{flag} {value}: a pyquant output directory; using its model {final}", file=sys.stderr)
        return str(final)
    ck = list_checkpoints(p)
    if ck:
        raise ValueError(f"{flag} {value!r} is a pyquant output directory without a final/ model: it holds "
                         f"{ck[-1].name} (training state, not a model; the run writes {p / 'final'} when it "
                         "finishes -- resume it with --resume to get there)")
    raise ValueError(f"{flag} {value!r} is not a model directory: no config.json in it (nor in {final})")


def _resolve_models(args) -> None:
    """Resolve every model-valued argument of ``args`` in place (see :func:`resolve_model_arg`)."""
    for name in ("teacher", "student", "model", "tokenizer"):
        if getattr(args, name, None) is not None:
            setattr(args, name, resolve_model_arg(getattr(args, name), "--" + name))


def _save_final(model, tok, output_dir) -> Path:
    """Write the trained model (+ tokenizer) to ``<output_dir>/final`` atomically (complete or absent); refuses to
    overwrite an existing one."""
    from .recipes import save_model_dir

    final = Path(output_dir) / "final"
    if final.exists():
        raise ValueError(f"{final} already exists; not overwriting it")
    save_model_dir(model, tok, final)
    return final


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
        _resolve_models(args)
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
    final = _final_student(student, tok, args)
    metrics = {"student": res.history[-1].get("eval"), "student_best": bl["best"], "student_last": bl["last"],
               "evals": [h for h in res.history if "eval" in h], "teacher": teacher_metrics, "steps": res.steps,
               "checkpoint": res.checkpoint, "model": final, "run": run}
    _write_json(Path(args.output_dir) / "metrics.json", metrics)
    print(json.dumps({"student": metrics["student"], "best": bl["best"], "last": bl["last"],
                      "teacher": teacher_metrics, "model": final}))
    return 0


def _final_student(student, tok, args):
    """The QAT student as a HF checkpoint in ``<output-dir>/final`` (``pyquant convert`` packs it); not under FSDP,
    whose parameters stay sharded after training (the last checkpoint holds them in full)."""
    if getattr(args, "fsdp", False) and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        print("note: --fsdp: no final/ model written (parameters are sharded); the last checkpoint holds the "
              "weights", file=sys.stderr)
        return None
    final = Path(args.output_dir) / "final"
    if final.exists():  # a resumed run that already finished once: keep what is there
        print(f"note: {final} already exists; not overwriting it", file=sys.stderr)
        return str(final)
    return str(_save_final(student, tok, args.output_dir))


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
        _resolve_models(args)
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
    final = _final_student(student, tok, args)
    metrics = {"student": res.history[-1].get("eval"), "teacher_perplexity": teacher_ppl, "steps": res.steps,
               "checkpoint": res.checkpoint, "model": final, "run": run}
    _write_json(Path(args.output_dir) / "metrics.json", metrics)
    print(json.dumps({"student": metrics["student"], "teacher_perplexity": teacher_ppl, "model": final}))
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
        _resolve_models(args)
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
    try:
        final = _save_final(model, tok, args.output_dir)  # the teacher folder appears complete or not at all
    except ValueError as e:
        return _fail(str(e))
    ev_rec = res.history[-1].get("eval") if res.history else None
    _write_json(Path(args.output_dir) / "metrics.json", {"eval": ev_rec, "steps": res.steps, "model": str(final)})
    print(json.dumps({"eval": ev_rec, "model": str(final)}))
    return 0


# ---- convert / generate / eval-ppl: HF checkpoints in, HF checkpoints out ---------------------------------------------
def _read_config(path: str, flag: str = "--model") -> dict:
    """``config.json`` of a local model directory (after :func:`resolve_model_arg`), or ``{}`` for a hub name."""
    f = Path(path) / "config.json"
    if not Path(path).is_dir():
        return {}
    try:
        with open(f) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path!r}: config.json is unreadable ({e})") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"{flag} {path!r}: config.json has no model_type; not a transformers model")
    return cfg


def _pyquant_state(cfg: dict) -> Optional[str]:
    """"qat" / "packed" for a pyquant checkpoint, None for a full-precision one; other quantizers are refused."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == "bitnet":
        return "bitnet"
    if method != "pyquant":
        raise ValueError(f"--model is quantized with quant_method={method!r}; pyquant convert takes a full-precision "
                         "model, a pyquant QAT checkpoint or an HF BitNet checkpoint")
    return q.get("state")


def _model_class(cfg: dict, causal: bool):
    """The transformers class that ``config.json`` names (``architectures[0]``), else AutoModelForCausalLM."""
    import transformers

    arch = (cfg.get("architectures") or [None])[0]
    if causal:
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        lm_arch = arch is None or arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
        if cfg and (cfg.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not lm_arch):
            raise ValueError(f"--model is a {cfg.get('model_type')!r} model ({arch}), not a causal LM: generate and "
                             "eval-ppl need a decoder")
        return AutoModelForCausalLM
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    return cls


def _load_hf(path: str, cls, **kw):
    import pyquant  # noqa: F401  (registers the "pyquant" quantization method before from_pretrained)

    try:
        return cls.from_pretrained(path, **kw)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on the cause
        raise ValueError(f"cannot load a model from {path!r}: {type(e).__name__}: {e}") from e


def _load_tok(path: str, required: bool = True):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        if not required:
            return None
        raise ValueError(f"cannot load a tokenizer from {path!r} (pass --tokenizer): {e}") from e


def _dir_bytes(d) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a pyquant QAT checkpoint (save_pretrained of a prepared model, or a qat-* --output-dir) or an "
                        "HF BitNet checkpoint -> packed; or a full-precision HF model -> post-training quantization "
                        "with the spec below")
    p.add_argument("--output-dir", required=True, help="where the packed checkpoint goes (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir (atomically)")
    p.add_argument("--tokenizer", default=None, help="copied next to the model (default: the model's, if any)")
    g = p.add_argument_group("post-training quantization spec (full-precision --model only)")
    g.add_argument("--method", default=None, choices=["twn", "absmean", "uniform", "seq"], help="default twn")
    g.add_argument("--granularity", default=None, choices=["tensor", "channel", "group"], help="default channel")
    g.add_argument("--group-size", type=int, default=None, help="with --granularity group")
    g.add_argument("--act-quant", action="store_true", help="W2A8: 8-bit per-token activations (default W2A16)")
    g.add_argument("--exclude", nargs="*", default=None,
                   help="module-name patterns kept FP (default: embeddings, lm_head and classifier heads)")


def run_convert(args) -> int:
    from ..formats import ActivationQuantConfig, WeightQuantConfig

    spec_given = [f"--{k.replace('_', '-')}" for k in ("method", "granularity", "group_size", "exclude")
                  if getattr(args, k) is not None] + (["--act-quant"] if args.act_quant else [])
    try:
        _resolve_models(args)
        cfg = _read_config(args.model)
        if not cfg:
            raise ValueError(f"--model {args.model!r}: no such directory (convert takes a local model directory)")
        state = _pyquant_state(cfg)
        if state == "packed":
            raise ValueError(f"--model {args.model!r} is already a packed pyquant checkpoint; nothing to convert")
        if state in ("qat", "bitnet") and spec_given:
            kind = "a QAT checkpoint" if state == "qat" else "an HF BitNet checkpoint"
            raise ValueError(f"{', '.join(spec_given)}: --model {args.model!r} is {kind}, which carries its own "
                             "quantization spec; these options apply to full-precision models only")
        spec = act = None
        if state is None:
            spec = WeightQuantConfig(method=args.method or "twn", granularity=args.granularity or "channel",
                                     group_size=args.group_size)
            act = ActivationQuantConfig() if args.act_quant else None
        out = Path(args.output_dir)
        if out.resolve() == Path(args.model).resolve():
            raise ValueError("--output-dir is --model; write the packed checkpoint to another directory")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise ValueError(f"--output-dir {out} exists and is not empty; pass --overwrite to replace it")
        tok = _load_tok(args.tokenizer or args.model, required=args.tokenizer is not None)
        cls = _model_class(cfg, causal=False)
        if state == "qat":
            from ..convert import convert as _to_packed

            model = _load_hf(args.model, cls)
            report = _to_packed(model)
        elif state == "bitnet":  # HF BitNet layers -> PackedLinear, effective weights bit-identical
            from ..integrations.bitnet import from_bitnet

            try:
                model = from_bitnet(args.model, model_class=cls)
            except Exception as e:
                raise ValueError(f"cannot load the BitNet checkpoint {args.model!r}: {type(e).__name__}: {e}") from e
            report = _packed_report(model)
        else:  # PTQ while loading, layer by layer: no full-precision copy of the whole model is ever held
            from ..integrations.hf import PyquantConfig

            qc = PyquantConfig(weight=spec, activation=act, state="packed", modules_to_not_convert=args.exclude)
            model = _load_hf(args.model, cls, quantization_config=qc)
            report = _packed_report(model)
    except ValueError as e:
        return _fail(str(e))
    from .recipes import save_model_dir

    save_model_dir(model, tok, out)
    what = {"qat": "QAT checkpoint -> packed", "bitnet": "HF BitNet checkpoint -> packed"}.get(
        state, f"full precision -> packed PTQ ({spec.describe() if spec else ''})")
    print(f"{what}: {report}")
    print(f"wrote {out} ({_dir_bytes(out) / 1e6:.2f} MB on disk; {args.model}: "
          f"{_dir_bytes(args.model) / 1e6:.2f} MB)" if Path(args.model).is_dir() else f"wrote {out}")
    return 0


def _packed_report(model):
    """What PTQ at load did, as ``pyquant.quantize`` reports it (layers packed, parameters, layers kept FP)."""
    from ..convert import SwapReport, _is_candidate
    from ..nn.packed_linear import PackedLinear

    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    kept = [n for n, m in model.named_modules() if n and _is_candidate(m)]
    q = sum(m.in_features * m.out_features for _, m in packed)
    return SwapReport("quantize (while loading)", [n for n, _ in packed], kept, q,
                      q + sum(p.numel() for p in model.parameters()))


def _device(name: Optional[str]):
    import torch

    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"--device {name!r} is invalid: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU here (torch.cuda.is_available() is False)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (packed, QAT or FP) or a pyquant --output-dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")


def run_generate(args) -> int:
    import time

    import torch

    try:
        if not args.prompt:
            raise ValueError("--prompt is empty")
        if args.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected a positive int")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        _resolve_models(args)
        cls = _model_class(_read_config(args.model), causal=True)
        dev = _device(args.device)
        tok = _load_tok(args.tokenizer or args.model)
        model = _load_hf(args.model, cls).to(dev).eval()
    except ValueError as e:
        return _fail(str(e))
    enc = tok(args.prompt, return_tensors="pt").to(dev)
    n_prompt = int(enc["input_ids"].shape[1])
    torch.manual_seed(args.seed)
    kw = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=pad, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    new = out[0, n_prompt:]
    text = tok.decode(new, skip_special_tokens=True)
    print(text if args.no_echo else args.prompt + text)
    print(f"generated {new.numel()} tokens in {dt:.2f} s: {new.numel() / max(dt, 1e-9):.1f} tokens/s "
          f"(batch 1, prompt {n_prompt} tokens, {dev.type}, prompt processing included)", file=sys.stderr)
    return 0


def add_eval_ppl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (packed, QAT or FP) or a pyquant --output-dir")
    p.add_argument("--text-files", nargs="+", required=True, help="text files (or folders of *.txt)")
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--block-size", type=int, default=512, help="window length (tokens)")
    p.add_argument("--stride", type=int, default=None, help="window advance (default block/2), as the recipes")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--device", default=None)


def run_eval_ppl(args) -> int:
    from .data import read_text_files, sliding_window_perplexity

    try:
        if args.block_size < 2:
            raise ValueError(f"--block-size {args.block_size}: expected >= 2")
        if args.stride is not None and not 0 < args.stride <= args.block_size:
            raise ValueError(f"--stride {args.stride}: expected 0 < stride <= --block-size {args.block_size}")
        text = read_text_files(args.text_files)
        _resolve_models(args)
        mcfg = _read_config(args.model)
        cls = _model_class(mcfg, causal=True)
        n_pos = mcfg.get("max_position_embeddings", mcfg.get("n_positions"))
        if isinstance(n_pos, int) and args.block_size > n_pos:
            raise ValueError(f"--block-size {args.block_size} exceeds the model's {n_pos} positions")
        tok = _load_tok(args.tokenizer or args.model)
        ids = tok(text)["input_ids"][:args.max_tokens]
        if len(ids) < 2:
            raise ValueError(f"--text-files hold {len(ids)} tokens; need at least 2")
        dev = _device(args.device)
        model = _load_hf(args.model, cls).to(dev).eval()
    except ValueError as e:
        return _fail(str(e))
    stride = args.stride or args.block_size // 2
    ppl = sliding_window_perplexity(model, ids, args.block_size, stride, batch_size=args.batch_size, device=dev)
    print(json.dumps({"perplexity": ppl, "tokens": len(ids), "block_size": args.block_size, "stride": stride,
                      "model": args.model, "files": list(args.text_files)}))
    return 0

"""The ``pyquant`` command: ``pyquant env | demo | qat-glue | qat-clm | finetune | convert | generate | eval-ppl |
bench <name>``.

Each command's module is imported only when that command runs, so ``pyquant --help`` is instant and ``pyquant env``
works on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

BENCHES = {
    "matmul": "pyquant.bench.matmul",
    "fake-quant": "pyquant.bench.fake_quant",
    "attention-kd": "pyquant.bench.attention_kd",
    "decode": "pyquant.bench.decode",
    "static": "pyquant.bench.static",  # no GPU: predicted from sm_90 SASS
    "moe": "pyquant.bench.moe",
}


def _env(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="pyquant env", description="Versions, GPU, and which backends can run here.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    from . import env

    info = env.collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2, default=str))
    else:
        print(env.format_report(info))
    return 0


def _train(name: str, description: str) -> Callable[[List[str]], int]:
    def run(argv: List[str]) -> int:
        from .train import cli as tcli

        p = argparse.ArgumentParser(prog=f"pyquant {name.replace('_', '-')}", description=description)
        getattr(tcli, f"add_{name}_arguments")(p)
        args = p.parse_args(argv)
        return int(getattr(tcli, f"run_{name}")(args) or 0)

    return run


def _bench(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="pyquant bench", description="GPU microbenchmarks (results to benchmarks/results).")
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    args, rest = p.parse_known_args(argv[:1])
    mod = importlib.import_module(BENCHES[args.name])
    return int(mod.main(argv[1:]) or 0)


COMMANDS: Dict[str, Tuple[str, Callable[[List[str]], int]]] = {
    "env": ("versions, GPU name, available backends and why not", _env),
    "demo": ("the main job on built-in data: FP teacher -> ternary QAT+KD student -> packed model, one table",
             _train("demo", "Train a small FP teacher on text found on this machine, QAT-distill a ternary student "
                            "(TSLD + attention-map KD), convert it to packed 2-bit, and compare.")),
    "qat-glue": ("encoder QAT + KD on a GLUE task (EMNLP'22 recipe)",
                 _train("qat_glue", "Ternary/2-bit QAT of an encoder on a GLUE task with logit, hidden-state and "
                                    "attention distillation from a fine-tuned FP teacher.")),
    "qat-clm": ("decoder QAT + TSLD on causal-LM text",
                _train("qat_clm", "Ternary/2-bit QAT of a causal LM with token-scaled logit distillation (TSLD).")),
    "finetune": ("fine-tune the FP teacher (same data plumbing)",
                 _train("finetune", "Full-precision fine-tuning to make a teacher.")),
    "convert": ("QAT checkpoint -> packed checkpoint, or FP model -> packed (post-training quantization)",
                _train("convert", "Write a packed (2 bits/weight) HF checkpoint from a pyquant QAT checkpoint or, with a "
                                  "chosen spec, from a full-precision model.")),
    "generate": ("text from a prompt with a (packed) model; tokens/s on stderr",
                 _train("generate", "Generate text from a prompt; the text goes to stdout, the speed to stderr.")),
    "eval-ppl": ("sliding-window perplexity of a model on text files",
                 _train("eval_ppl", "Sliding-window perplexity (the recipes' evaluation) on local text files.")),
    "bench": ("GPU benchmarks: " + ", ".join(sorted(BENCHES)), _bench),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="pyquant",
        description="pyquant: ternary (1.58-bit) and 2-bit Transformers — QAT, distillation, packed deployment.",
    )
    top.add_argument("--version", action="version", version=f"pyquant {_version()}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        top.parse_args(argv or ["--help"])
        return 0
    if argv[0] not in COMMANDS:
        top.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]][1](argv[1:])


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Data plumbing of the recipes: GLUE (local TSV or HF ``datasets``), causal-LM text (local files or HF
``datasets``), the demo's built-in corpus, collators, and the GLUE metrics.

Every loader checks its columns up front and raises a ValueError naming the file/dataset, the missing column and
the columns it found, before any training starts.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "GlueTask", "GLUE_TASKS", "glue_task", "load_glue", "encode_pairs", "PadCollator",
    "glue_metrics", "paper_score", "accuracy", "f1_binary", "matthews", "pearson", "spearman",
    "read_text_files", "load_text_dataset", "block_examples", "CausalCollator",
    "demo_corpus", "train_bpe_tokenizer", "sliding_window_perplexity",
]

csv.field_size_limit(sys.maxsize)


# ---------------------------------------------------------------------------------------------------------------------
# GLUE
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueTask:
    name: str  # HF glue config name
    dir_name: str  # folder name of the GLUE TSV distribution
    tsv_text: Tuple  # column names (or indices for header-less files) of text_a[, text_b]
    tsv_label: object  # column name or index
    hf_text: Tuple
    num_labels: int  # 1 = regression
    metric: str  # headline metric
    header: bool = True
    label_map: Optional[Tuple[Tuple[str, int], ...]] = None
    max_length: int = 128
    dev_split: str = "validation"
    # the EMNLP'22 code's per-task defaults (MarsJacobs/kd-qat-large-enc main.py:392-400, no augmentation):
    # max_seq_length (above), batch_size and eval_step
    batch_size: int = 32
    eval_every: int = 100

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: Dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", (3,), 1, ("sentence",), 2, "matthews", header=False, max_length=64, batch_size=16,
             eval_every=50),
    GlueTask("sst2", "SST-2", ("sentence",), "label", ("sentence",), 2, "accuracy", max_length=64, eval_every=100),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), 2, "f1",
             eval_every=50),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), 1, "pearson",
             eval_every=100),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), 2, "accuracy",
             label_map=(("entailment", 0), ("not_entailment", 1)), eval_every=20),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), 2, "accuracy",
             label_map=(("entailment", 0), ("not_entailment", 1)), eval_every=1000),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), 2, "f1",
             eval_every=1000),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"), 3, "accuracy",
             label_map=(("entailment", 0), ("neutral", 1), ("contradiction", 2)), dev_split="validation_matched",
             eval_every=8000),
]}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sst_2": "sst2", "sts_b": "stsb"}


def glue_task(name: str) -> GlueTask:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"task={name!r} is invalid: expected one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _tsv_rows(path: Path, task: GlueTask) -> List[Tuple[List[str], object]]:
    if not path.is_file():
        raise ValueError(f"GLUE file {path} not found (task {task.name}: expected {task.dir_name}/train.tsv and "
                         "dev.tsv under --data-dir)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    if task.header:
        if not rows:
            raise ValueError(f"{path} is empty")
        head = [h.strip() for h in rows[0]]
        cols = list(task.tsv_text) + [task.tsv_label]
        missing = [c for c in cols if c not in head]
        if missing:
            raise ValueError(f"{path} lacks column(s) {missing} needed for task {task.name}; it has {head}")
        idx = [head.index(c) for c in task.tsv_text]
        li = head.index(task.tsv_label)
        rows = rows[1:]
    else:
        idx, li = list(task.tsv_text), task.tsv_label
    out = []
    need = max(idx + [li])
    for r_no, r in enumerate(rows, start=2 if task.header else 1):
        if len(r) <= need:
            if not any(x.strip() for x in r):
                continue
            raise ValueError(f"{path}:{r_no} has {len(r)} columns, task {task.name} needs column {need}")
        out.append(([r[i] for i in idx], _label(r[li], task, f"{path}:{r_no}")))
    return out


def _label(v, task: GlueTask, where: str):
    if task.is_regression:
        return float(v)
    if task.label_map is not None and isinstance(v, str) and not v.strip().lstrip("-").isdigit():
        m = dict(task.label_map)
        if v.strip() not in m:
            raise ValueError(f"{where}: label {v!r} is not one of {sorted(m)}")
        return m[v.strip()]
    iv = int(v)
    if not 0 <= iv < task.num_labels:
        raise ValueError(f"{where}: label {iv} out of range [0, {task.num_labels})")
    return iv


def load_glue(task: str, split: str, data_dir: Optional[str] = None, dataset: str = "nyu-mll/glue",
              limit: Optional[int] = None) -> List[Tuple[List[str], object]]:
    """[(texts, label)] of a GLUE split ("train" or "dev"): from ``data_dir/<Task>/<split>.tsv`` when given,
    else from the HF dataset ``dataset`` (config = task name)."""
    t = glue_task(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split={split!r} is invalid: expected 'train' or 'dev'")
    if data_dir is not None:
        base = Path(data_dir)
        d = base / t.dir_name if (base / t.dir_name).is_dir() else base
        rows = _tsv_rows(d / f"{split}.tsv", t)
    else:
        from datasets import load_dataset

        ds = load_dataset(dataset, t.name, split="train" if split == "train" else t.dev_split)
        cols = list(t.hf_text) + ["label"]
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise ValueError(f"dataset {dataset}/{t.name} lacks column(s) {missing}; it has {ds.column_names}")
        rows = [([ex[c] for c in t.hf_text], _label(ex["label"], t, f"{dataset}[{i}]"))
                for i, ex in enumerate(ds) if (t.is_regression or ex["label"] >= 0)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"GLUE {t.name} {split} split is empty")
    return rows


def encode_pairs(rows, tokenizer, max_length: int) -> List[Dict]:
    """Tokenize [(texts, label)] -> [{"input_ids", "token_type_ids"?, "labels"}] (no padding)."""
    out = []
    for texts, label in rows:
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        ex = {"input_ids": enc["input_ids"], "labels": label}
        if "token_type_ids" in enc:
            ex["token_type_ids"] = enc["token_type_ids"]
        out.append(ex)
    return out


class PadCollator:
    """Pads ``input_ids`` (and ``token_type_ids``) to the batch's longest example (dynamic padding), or to
    ``pad_to`` tokens when given (the EMNLP'22 code pads every example to max_seq_length, utils_glue.py:519-522: its
    unmasked MSE losses and per-tensor activation ranges see those padding positions); builds ``attention_mask``."""

    def __init__(self, pad_id: int, regression: bool = False, pad_to: Optional[int] = None):
        if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to <= 0):
            raise ValueError(f"pad_to={pad_to!r} is invalid: expected None or a positive int")
        self.pad_id, self.regression, self.pad_to = int(pad_id), regression, pad_to

    def __call__(self, examples: List[Dict]) -> Dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        if self.pad_to is not None:
            if n > self.pad_to:
                raise ValueError(f"an example has {n} tokens, more than pad_to={self.pad_to}")
            n = self.pad_to
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        am = torch.zeros((len(examples), n), dtype=torch.long)
        tt = torch.zeros((len(examples), n), dtype=torch.long) if "token_type_ids" in examples[0] else None
        for i, e in enumerate(examples):
            L = len(e["input_ids"])
            ids[i, :L] = torch.as_tensor(e["input_ids"])
            am[i, :L] = 1
            if tt is not None:
                tt[i, :L] = torch.as_tensor(e["token_type_ids"])
        b = {"input_ids": ids, "attention_mask": am,
             "labels": torch.tensor([e["labels"] for e in examples],
                                    dtype=torch.float32 if self.regression else torch.long)}
        if tt is not None:
            b["token_type_ids"] = tt
        return b


# ---- metrics ---------------------------------------------------------------------------------------------------------
def paper_score(task: str, metrics: Dict[str, float]) -> Tuple[float, float]:
    """(selection key, reported score) of one dev evaluation as the EMNLP'22 code picks its best checkpoint
    (kd-qat-large-enc main.py:854-866): accuracy for SST-2/RTE/QNLI/MNLI (reported as is) and for MRPC/QQP
    (reported as (f1 + accuracy) / 2), (pearson + spearman) / 2 for STS-B, Matthews correlation for CoLA."""
    t = glue_task(task)
    if t.is_regression:
        c = (metrics["pearson"] + metrics["spearman"]) / 2
        return c, c
    if t.metric == "matthews":
        return metrics["matthews"], metrics["matthews"]
    if t.metric == "f1":
        return metrics["accuracy"], (metrics["f1"] + metrics["accuracy"]) / 2
    return metrics["accuracy"], metrics["accuracy"]



def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(len(gold), 1)


def f1_binary(pred, gold) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 1)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred, gold) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    tn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 0)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 1)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def pearson(x, y) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return 0.0 if sx == 0 or sy == 0 else sxy / (sx * sy)


def _ranks(v) -> List[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1  # average rank of ties
        i = j + 1
    return r


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


def glue_metrics(task: str, pred, gold) -> Dict[str, float]:
    t = glue_task(task)
    if t.is_regression:
        return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}
    m = {"accuracy": accuracy(pred, gold)}
    if t.metric == "f1":
        m["f1"] = f1_binary(pred, gold)
    if t.metric == "matthews":
        m["matthews"] = matthews(pred, gold)
    return m


# ---------------------------------------------------------------------------------------------------------------------
# causal-LM text
# ---------------------------------------------------------------------------------------------------------------------
def read_text_files(paths: Sequence[str]) -> str:
    """Concatenate text files (a directory means its ``*.txt`` files, sorted)."""
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(p.glob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"text file {p} not found")
    if not files:
        raise ValueError(f"no text files in {list(paths)}")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def load_text_dataset(name: str, config: Optional[str], split: str, text_column: str = "text") -> str:
    from datasets import load_dataset

    ds = load_dataset(name, config, split=split)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name}/{config} split {split} has no column {text_column!r}; it has "
                         f"{ds.column_names} (pass --text-column)")
    return "\n".join(t for t in ds[text_column] if t)


def block_examples(ids: Sequence[int], block: int) -> List[Dict]:
    """Consecutive non-overlapping blocks of ``block`` tokens (the tail shorter than a block is dropped)."""
    t = torch.as_tensor(ids, dtype=torch.long)
    n = t.numel() // block
    if n == 0:
        raise ValueError(f"text has {t.numel()} tokens, fewer than one block of {block}")
    return [{"input_ids": t[i * block:(i + 1) * block]} for i in range(n)]


class CausalCollator:
    def __call__(self, examples: List[Dict]) -> Dict[str, torch.Tensor]:
        ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def sliding_window_perplexity(model, ids: Sequence[int], max_length: int, stride: Optional[int] = None,
                              batch_size: int = 8, device=None) -> float:
    """Perplexity with a sliding window: windows of ``max_length`` tokens advanced by ``stride``; each token is
    scored once, with up to ``max_length - stride`` tokens of context before the new ones (HF's recipe)."""
    stride = stride or max_length // 2
    if not 0 < stride <= max_length:
        raise ValueError(f"stride={stride} is invalid: expected 0 < stride <= max_length={max_length}")
    t = torch.as_tensor(ids, dtype=torch.long)
    device = device or next(model.parameters()).device
    windows = []
    prev_end = 0
    for begin in range(0, t.numel(), stride):
        end = min(begin + max_length, t.numel())
        trg = end - prev_end
        if end - begin < 2:
            break
        windows.append((begin, end, trg))
        prev_end = end
        if end == t.numel():
            break
    nll, count = 0.0, 0
    was = model.training
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        L = max(e - b for b, e, _ in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        lab = torch.full((len(chunk), L), -100, dtype=torch.long)
        am = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, (b, e, trg) in enumerate(chunk):
            x[j, :e - b] = t[b:e]
            am[j, :e - b] = 1
            lab[j, e - b - trg:e - b] = t[e - trg:e]
        logits = model(input_ids=x.to(device), attention_mask=am.to(device)).logits.float()
        lg = logits[:, :-1]
        tl = lab[:, 1:].to(device)
        valid = tl != -100
        lp = torch.log_softmax(lg, -1).gather(-1, tl.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        nll -= float((lp * valid).sum())
        count += int(valid.sum())
    model.train(was)
    return math.exp(nll / max(count, 1))


# ---------------------------------------------------------------------------------------------------------------------
# the demo corpus: real English text that every Python installation carries (the standard library's docstrings)
# ---------------------------------------------------------------------------------------------------------------------
def _stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__",
            "ensurepip", "tkinter", "pydoc_data"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                files.append(Path(dirpath) / fn)
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _docstrings(path: Path) -> List[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=True)
            if d and len(d) >= 40:
                out.append(d.strip())
    return out


def demo_corpus(max_train_chars: int = 2_000_000, max_valid_chars: int = 200_000) -> Tuple[str, str, dict]:
    """(train_text, valid_text, info) from the docstrings of the running Python's standard library.

    Files are assigned to validation when the first byte of md5(relative path) is < 26 (~10%), to train otherwise;
    files are visited in sorted order and taken whole until each budget is met, so the selection is deterministic
    for a given Python installation and the splits never share a file.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    train, valid = [], []
    nt = nv = 0
    n_files = [0, 0]
    for p in _stdlib_files():
        rel = str(p.relative_to(root))
        is_valid = hashlib.md5(rel.encode()).digest()[0] < 26
        if (is_valid and nv >= max_valid_chars) or (not is_valid and nt >= max_train_chars):
            if nt >= max_train_chars and nv >= max_valid_chars:
                break
            continue
        docs = _docstrings(p)
        if not docs:
            continue
        text = "\n\n".join(docs) + "\n\n"
        if is_valid:
            valid.append(text)
            nv += len(text)
            n_files[1] += 1
        else:
            train.append(text)
            nt += len(text)
            n_files[0] += 1
    if nt == 0 or nv == 0:
        raise RuntimeError(f"found no docstrings in the standard library at {root}")
    info = {"source": f"docstrings of the Python {sys.version.split()[0]} standard library at {root}",
            "train_files": n_files[0], "valid_files": n_files[1], "train_chars": nt, "valid_chars": nv}
    return "".join(train), "".join(valid), info


def train_bpe_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``text`` (no download), wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")

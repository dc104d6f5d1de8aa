"""The training loop: deterministic data order, accumulation, clipping, bf16 autocast, atomic checkpoints, resume,
JSON-lines logs, tqdm progress, and DDP under ``torchrun``.

Reproducible resume: the data order of epoch ``e`` is ``randperm(N, generator=seed + e)`` and every optimizer step
``k`` starts from ``torch.manual_seed(hash(seed, k, rank))``, so what step ``k`` sees (its examples and its dropout
masks) depends only on (seed, k, rank), not on what ran before.  With the model, optimizer and scheduler state
restored from the checkpoint, a resumed run repeats the uninterrupted run's losses exactly (on CPU; GPU kernels may
be nondeterministic).  The scheduler is transformers' ``get_scheduler`` (linear warmup/decay by default).

Distributed: when launched by ``torchrun`` (``WORLD_SIZE > 1``) the loop initializes the process group (NCCL on
CUDA, gloo on CPU), wraps the model in ``DistributedDataParallel``, and gives each rank its slice of each global
batch (global batch = batch_size * world_size * grad_accum).  Only rank 0 writes logs and checkpoints.

FSDP2 (``TrainConfig.distributed="fsdp"``, ``--fsdp``): under ``torchrun`` the trainable module is sharded with
``torch.distributed.fsdp.fully_shard`` instead of DDP: first each repeated block (:func:`find_blocks`), then the
root, which is the module whose ``forward`` the loop calls (e.g. the ``Distiller``), so that the student's
embeddings / final norm / head are gathered even when the Distiller reads ``lm_head.weight`` directly.  Parameters
that are not the trainable module's (the Distiller's frozen teacher) are passed as ``ignored_params``: the teacher
is neither sharded nor in the optimizer, each rank holds a full replica of it.  Only the trainable parameters are
sharded (ZeRO-3 style: parameters, gradients and AdamW states are 1/world per rank).  With ``bf16`` the blocks use
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (bf16 all-gathers and compute, fp32 master
weights and fp32 gradient reduce-scatter) and bf16 autocast is kept on top of it, so that the unsharded teacher and
the ops autocast keeps in fp32 (softmax, log-softmax, the losses) behave as in the DDP path.  Checkpoints are full
state dicts gathered to rank 0 (``get_model_state_dict`` / ``get_optimizer_state_dict`` with
``full_state_dict=True, cpu_offload=True``) and written by rank 0 into the same files as the DDP path, the optimizer
state keyed by parameter index like ``optimizer.state_dict()``: an FSDP checkpoint loads into an unsharded model and
resumes under DDP or single-process (and vice versa).  ``fsdp`` without torchrun (``WORLD_SIZE`` 1) prints a
one-line notice and trains unsharded in one process.  Under FSDP ``eval_fn`` runs on every rank, under
``torch.no_grad`` with the root's own parameters gathered (its forward passes all-gather the blocks), and rank 0
alone writes the result; with ``bf16`` that evaluation computes with the bf16 parameter copies (the DDP path
evaluates in fp32).  After ``train`` the model's parameters are still DTensor shards: take the weights from the
final checkpoint (``result.checkpoint``), which holds them in full.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .checkpoint import (CheckpointError, gather_full_state, latest_checkpoint, list_checkpoints, load_checkpoint,
                         save_checkpoint)

__all__ = ["TrainConfig", "TrainResult", "train", "dist_info", "param_groups", "find_blocks"]


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs when set
    batch_size: int = 32  # per device, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    scheduler: str = "linear"
    max_grad_norm: Optional[float] = 1.0
    bf16: bool = False
    seed: int = 42
    save_every: Optional[int] = None  # steps; a final checkpoint is always written
    keep_last: Optional[int] = None
    log_every: int = 1
    resume: bool = False
    device: Optional[str] = None
    progress: bool = True
    distributed: str = "ddp"  # "ddp" | "fsdp" (FSDP2 fully_shard); only used under torchrun (WORLD_SIZE > 1)
    eval_every: Optional[int] = None  # also run eval_fn every N optimizer steps (the final evaluation always runs)

    def __post_init__(self):
        n = "TrainConfig"
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"{n}.distributed={self.distributed!r} is invalid: expected 'ddp' or 'fsdp'")
        for k in ("batch_size", "grad_accum", "log_every"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n}.{k}={v!r} is invalid: expected a positive int")
        for k in ("max_steps", "save_every", "keep_last", "eval_every"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{n}.{k}={v!r} is invalid: expected None or a positive int")
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"{n}.epochs={self.epochs!r} is invalid: expected a number > 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"{n}.lr={self.lr!r} is invalid: expected a float > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{n}.warmup_ratio={self.warmup_ratio!r} is invalid: expected a float in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"{n}.max_grad_norm={self.max_grad_norm!r} is invalid: expected None or a float > 0")

    def fingerprint(self) -> dict:
        """Fields that determine the training trajectory (a resume must match them)."""
        d = dataclasses.asdict(self)
        # ``distributed`` is left out: DDP and FSDP compute the same update from the same global batch and write the
        # same checkpoint files, so a run may be resumed under the other one (and pre-FSDP checkpoints still match).
        for k in ("output_dir", "resume", "device", "progress", "log_every", "save_every", "keep_last", "distributed",
                  "eval_every"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    steps: int
    history: List[Dict[str, float]] = field(default_factory=list)  # per optimizer step (this process's run)
    checkpoint: Optional[str] = None
    resumed_from: Optional[int] = None


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 otherwise)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases, norms and scales (the usual BERT/Llama practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        if p.dim() < 2 or "norm" in low or low.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def find_blocks(module: nn.Module) -> List[nn.Module]:
    """The repeated (transformer) blocks of ``module``: the entries of the ``nn.ModuleList`` whose entries all have
    one class and that holds the most parameters (``LlamaForCausalLM.model.layers``, ``BertModel.encoder.layer``;
    an MoE's experts list is inside a block, so it holds fewer).  ``[]`` when there is no such list."""
    best, best_n = [], 0
    for m in module.modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(c) for c in m}) != 1:
            continue
        n = sum(p.numel() for p in m.parameters())
        if n > best_n:
            best, best_n = list(m), n
    return best


def _fully_shard(model: nn.Module, trainable: nn.Module, bf16: bool) -> nn.Module:
    """FSDP2: shard each block of ``trainable``, then the root ``model`` with every non-trainable parameter (a
    frozen teacher) ignored, i.e. left as a full replica on each rank and out of the optimizer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # the root's inputs are the batch (ids, masks, float regression labels): do not cast them to bf16
    root_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=False)
    own = {id(p) for p in trainable.parameters()}
    ignored = {p for p in model.parameters() if id(p) not in own}
    for block in find_blocks(trainable):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=root_mp, ignored_params=ignored or None)
    return model


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _scalar(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def train(
    model: nn.Module,
    train_data: Sequence[Any],
    collate: Callable[[List[Any]], Dict[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    run_config: Optional[dict] = None,
    eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
    trainable: Optional[nn.Module] = None,
) -> TrainResult:
    """Train ``model`` (an ``nn.Module`` whose ``forward(batch)`` returns an object with ``.loss`` and a dict
    ``.losses`` of detached terms, e.g. a ``Distiller``) on ``train_data`` (indexable examples turned into a batch
    dict by ``collate``).

    ``trainable``: the module whose parameters are optimized and checkpointed (default: ``model.student`` if it
    exists, else ``model``).  ``run_config``: JSON-able description of everything else that defines the run
    (models, data, losses); stored in every checkpoint and compared on ``resume``.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    rank, world, local_rank = dist_info()
    if trainable is None:
        trainable = getattr(model, "student", model)
    out_dir = Path(cfg.output_dir)
    fingerprint = {"train": cfg.fingerprint(), "run": run_config or {}, "world_size": world}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    # ---- everything that can be refused is checked before any training ----------------------------------------
    n = len(train_data)
    per_step = cfg.batch_size * world * cfg.grad_accum
    if n < per_step:
        raise ValueError(f"train_data has {n} examples, fewer than one optimizer step needs "
                         f"(batch_size {cfg.batch_size} x world {world} x grad_accum {cfg.grad_accum} = {per_step})")
    steps_per_epoch = n // per_step
    total = cfg.max_steps if cfg.max_steps is not None else max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    resume_path = None
    existing = list_checkpoints(out_dir)
    if cfg.resume:
        resume_path = latest_checkpoint(out_dir)
        if resume_path is None:
            raise CheckpointError(f"--resume: no checkpoint-* directory in {out_dir}")
    elif existing:
        raise CheckpointError(f"{out_dir} already holds checkpoints ({existing[-1].name}); pass resume=True "
                              "(--resume) to continue, or choose a new output directory")

    device = torch.device(cfg.device) if cfg.device else (
        torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    ddp = world > 1  # any data parallelism (DDP or FSDP)
    fsdp = ddp and cfg.distributed == "fsdp"
    if cfg.distributed == "fsdp" and not ddp and rank == 0:
        print("notice: distributed='fsdp' (--fsdp) without torchrun (WORLD_SIZE 1): training unsharded in one "
              "process", file=sys.stderr)
    if ddp and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model.to(device)
    if fsdp:  # shard before the optimizer exists: fully_shard replaces the parameters by DTensors
        _fully_shard(model, trainable, bool(cfg.bf16))

    optimizer = torch.optim.AdamW(param_groups(trainable, cfg.weight_decay), lr=cfg.lr)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total),
                              num_training_steps=total)
    start = 0
    if resume_path is not None:
        meta = load_checkpoint(resume_path, trainable, optimizer, scheduler, expect_config=fingerprint,
                               sharded=fsdp)
        start = int(meta["step"])
        if start >= total:
            raise CheckpointError(f"{resume_path} is at step {start}, the run has only {total} steps: nothing to do")
    run_model = model
    if ddp and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    log_path = out_dir / "log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, start)
        with open(out_dir / "run_config.json", "w") as f:
            json.dump(fingerprint, f, indent=1, sort_keys=True)

    use_bf16 = bool(cfg.bf16)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    perms: Dict[int, torch.Tensor] = {}
    result = TrainResult(steps=total, resumed_from=start if resume_path is not None else None)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    def evaluate(at_step: int) -> None:
        """eval_fn on rank 0 (FSDP: every rank takes part in the all-gathers); appends {"step", "eval"}."""
        if eval_fn is None or not (rank == 0 or fsdp):
            return
        was = model.training
        model.eval()
        if fsdp:
            # eval_fn calls ``trainable`` itself, not the FSDP root: gather the root's own parameters (a student's
            # embeddings, final norm, head) for the duration; the blocks gather theirs in their forward hooks
            model.unshard()
            try:
                with torch.no_grad():
                    metrics = eval_fn(trainable)
            finally:
                model.reshard()
        else:
            metrics = eval_fn(trainable)
        model.train(was)
        result.history.append({"step": at_step, "eval": metrics})
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": at_step, "eval": metrics}) + "\n")

    model.train()
    t_last, tok_acc, steps_acc, tps = time.perf_counter(), 0, 0, float("nan")
    ckpt = None
    try:
        for step in range(start, total):
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in perms:
                g = torch.Generator().manual_seed(cfg.seed * 1000003 + epoch)
                perms = {epoch: torch.randperm(n, generator=g)}
            perm = perms[epoch]
            torch.manual_seed((cfg.seed * 1000003 + step) * 1009 + rank)
            sums: Dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                a = ((pos * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
                batch = _to(collate([train_data[int(i)] for i in perm[a:a + cfg.batch_size]]), device)
                tok_acc += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
                    int(batch["input_ids"].numel())
                if fsdp:  # reduce-scatter the gradients only on the last micro-batch
                    run_model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
                    sync = contextlib.nullcontext()
                else:
                    sync = contextlib.nullcontext() if (not ddp or micro == cfg.grad_accum - 1) \
                        else run_model.no_sync()
                with sync:
                    with autocast():
                        out = run_model(batch)
                    (out.loss / cfg.grad_accum).backward()
                for k, v in out.losses.items():
                    sums[k] = sums.get(k, 0.0) + _scalar(v) / cfg.grad_accum
            if not math.isfinite(sums.get("total", 0.0)):
                raise FloatingPointError(f"loss is not finite at step {step + 1}: {sums}")
            gnorm = None
            if cfg.max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.max_grad_norm)
                if hasattr(gn, "full_tensor"):  # FSDP: a DTensor norm over the sharded gradients
                    gn = gn.full_tensor()
                gnorm = float(gn)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ddp:  # average the logged terms over ranks
                keys = sorted(sums)
                t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(t)
                sums = {k: float(v) / world for k, v in zip(keys, t.tolist())}
            rec = {"step": step + 1, "epoch": epoch + (pos + 1) / steps_per_epoch,
                   "lr": scheduler.get_last_lr()[0], **sums}
            if gnorm is not None:
                rec["grad_norm"] = gnorm
            result.history.append(rec)
            steps_acc += 1
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                now = time.perf_counter()
                tps = tok_acc * world / max(now - t_last, 1e-9)  # tokens/s over the steps since the last line
                rec["tokens_per_s"] = tps
                rec["s_per_step"] = (now - t_last) / steps_acc
                t_last, tok_acc, steps_acc = now, 0, 0
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums.get('total', float('nan')):.4f}",
                                tok_s=f"{tps:.0f}", refresh=False)
            last = step + 1 == total
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                evaluate(step + 1)  # the paper's periodic dev evaluation (kd-qat-large-enc main.py:799)
            saving = bool((cfg.save_every and (step + 1) % cfg.save_every == 0) or last)
            full = gather_full_state(trainable, optimizer) if (fsdp and saving) else None  # collective
            if rank == 0 and saving:
                ckpt = save_checkpoint(out_dir, step + 1, trainable, optimizer, scheduler,
                                       meta={"config": fingerprint, "epoch": epoch,
                                             "losses": {k: v for k, v in sums.items()}},
                                       keep_last=cfg.keep_last,
                                       model_state=None if full is None else full[0],
                                       optimizer_state=None if full is None else full[1])
            del full
            if ddp and cfg.save_every and (step + 1) % cfg.save_every == 0:
                torch.distributed.barrier()
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    result.checkpoint = None if ckpt is None else str(ckpt)
    evaluate(total)
    model.eval()
    return result


def _truncate_log(path: Path, keep_upto: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again); atomic rewrite."""
    if not path.exists():
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= keep_upto and "eval" not in line:
                    keep.append(line)
            except ValueError:
                continue
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)

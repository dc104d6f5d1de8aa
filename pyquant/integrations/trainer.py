"""``DistillTrainer``: a ``transformers.Trainer`` that trains a prepared (QAT) student with pyquant's ``Distiller``.

For people who launch with ``accelerate`` / DeepSpeed / FSDP / ``torchrun`` and want to keep their launcher: the
Trainer's model is the ``Distiller`` (student + frozen teacher), so whatever wrapper the launcher puts around the
model wraps the student's forward and the losses; the teacher is not a registered submodule of the ``Distiller``,
so it is neither in the optimizer nor sharded nor in a saved state dict, and it stays in eval mode under
``no_grad`` with ``requires_grad=False``.

Usage::

    from pyquant import prepare_qat, QATConfig
    from pyquant.distill import DistillConfig
    from pyquant.integrations.trainer import DistillTrainer

    prepare_qat(student, QATConfig(...))
    trainer = DistillTrainer(student=student, teacher=teacher, distill_config=DistillConfig(ce=1.0, tsld=1.0),
                             args=TrainingArguments(output_dir="out", max_steps=1000, learning_rate=2e-5, ...),
                             train_dataset=examples, data_collator=pyquant.train.data.CausalCollator())
    trainer.train()
    trainer.save_model("out/final")          # the student, with save_pretrained

Each loss term is logged next to ``loss`` as ``loss_<term>`` (``loss_ce``, ``loss_tsld``, ``loss_attn_map``, ...),
averaged over the optimizer steps since the previous log line; ``trainer.history`` holds one record per optimizer
step (each term averaged over its micro-batches), like ``pyquant.train.loop.train``'s ``TrainResult.history``.

Same trajectory as pyquant's own loop (``pyquant.train.loop.train``) on the same data and seed
(``tests/test_trainer.py`` checks 20 steps): the optimizer is ``torch.optim.AdamW`` over
``pyquant.train.loop.param_groups(student)`` (no weight decay on biases, norms and scales), the scheduler is the
Trainer's own (``lr_scheduler_type`` + warmup steps; pyquant's loop uses ``int(warmup_ratio * steps)``, so give
``warmup_steps`` as that integer), the data order of epoch ``e`` is ``randperm(N, seed * 1000003 + e)`` (batches
interleaved over ranks as accelerate shards them, which is pyquant's layout), every optimizer step ``k`` starts from
``torch.manual_seed((seed * 1000003 + k) * 1009 + rank)`` (dropout masks depend only on the seed and the step, so a
resumed run sees the same masks), and gradients are clipped at ``max_grad_norm`` over the student's parameters.  A
dataset whose size is not a multiple of ``batch x world x grad_accum`` ends each epoch with a partial step in the
Trainer and drops it in pyquant's loop; pass ``dataloader_drop_last=True`` and a multiple to keep them equal.

Tested here: one process, and ``torchrun`` DDP with 2 CPU processes (gloo), both equal to pyquant's loop.  FSDP and
DeepSpeed through accelerate wrap the same module (the student's ``_no_split_modules`` are exposed for FSDP's
auto-wrap) but have not been run on this project's machines.

Saving writes the student with ``save_pretrained`` (the student's own keys; with ``import
pyquant`` a prepared student's ``config.json`` carries its ``quantization_config``); the Trainer's pickled
``training_args.bin`` is not written.  ``resume_from_checkpoint`` loads the student's weights from such a folder.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..distill.distiller import DistillConfig, Distiller
from ..train.loop import param_groups

__all__ = ["DistillTrainer", "PyquantOrderSampler"]

_INPUT_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels", "label", "label_ids"]


class PyquantOrderSampler(torch.utils.data.Sampler):
    """pyquant's data order: epoch ``e`` is ``randperm(n, generator=seed * 1000003 + e)``.  The epoch comes from
    ``set_epoch`` (the Trainer calls it) or, without it, counts the passes over the data."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())


class _DistillerModel(nn.Module):
    """What the Trainer (and the launcher's wrapper) holds: the Distiller, plus a ``config`` for the Trainer's
    introspection (a shallow copy of the student's, so the Trainer's ``use_cache`` edit does not reach the student)."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.distiller = distiller
        cfg = getattr(distiller.student, "config", None)
        self.config = copy.copy(cfg) if cfg is not None else None
        # FSDP auto-wrapping (accelerate's TRANSFORMER_BASED_WRAP) looks for the block classes here
        self._no_split_modules = getattr(distiller.student, "_no_split_modules", None)

    def forward(self, batch):
        return self.distiller(batch)


class _StepRecords(TrainerCallback):
    def __init__(self, trainer: "DistillTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step(state.global_step)


class DistillTrainer(Trainer):
    """``DistillTrainer(student=, teacher=, distill_config=, args=, train_dataset=, data_collator=, ...)``; every
    other keyword goes to ``transformers.Trainer``.  ``distiller=`` may be given instead of student/teacher/config.
    Batches are dicts as ``Distiller.forward`` takes them (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, student: Optional[nn.Module] = None, teacher: Optional[nn.Module] = None,
                 distill_config: Optional[DistillConfig] = None, *, distiller: Optional[Distiller] = None,
                 args=None, **kwargs):
        if "model" in kwargs:
            raise TypeError("DistillTrainer takes student= (and teacher=, distill_config=) or distiller=, not model=")
        if distiller is None:
            if student is None:
                raise ValueError("DistillTrainer needs student= (a prepared QAT model) or distiller=")
            distiller = Distiller(student, teacher, distill_config if distill_config is not None else DistillConfig())
        elif student is not None or teacher is not None or distill_config is not None:
            raise ValueError("give either distiller= or student=/teacher=/distill_config=, not both")
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a pyquant Distiller, got {type(distiller).__name__}")
        if args is not None and args.label_names is None:
            args.label_names = ["labels"]  # Distiller.forward(batch) has no 'labels' parameter to infer it from
        self.distiller = distiller
        self.history: List[Dict[str, float]] = []
        self._micro: Dict[str, float] = {}
        self._since_log: List[Dict[str, float]] = []
        self._seeded_step: Optional[int] = None
        super().__init__(model=_DistillerModel(distiller), args=args, **kwargs)
        self.add_callback(_StepRecords(self))

    # ---- optimizer, data order, RNG: as pyquant's loop ------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            a = self.args
            self.optimizer = torch.optim.AdamW(param_groups(self.distiller.student, a.weight_decay),
                                               lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                               eps=a.adam_epsilon)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        ds = self.train_dataset if train_dataset is None else train_dataset
        if ds is None or not hasattr(ds, "__len__"):
            return super()._get_train_sampler(train_dataset)
        return PyquantOrderSampler(len(ds), self.args.seed)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(_INPUT_COLUMNS)

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if self._seeded_step != step:  # the first micro-batch of optimizer step ``step``
            torch.manual_seed((self.args.seed * 1000003 + step) * 1009 + self.args.process_index)
            self._seeded_step = step
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- the loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(dict(inputs))
        if model.training:
            n = max(1, int(getattr(self, "current_gradient_accumulation_steps", None)
                           or self.args.gradient_accumulation_steps))
            for k, v in out.losses.items():
                self._micro[k] = self._micro.get(k, 0.0) + float(v.detach().float()) / n
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def _end_step(self, step: int) -> None:
        if not self._micro:
            return
        sums = self._micro
        if self.args.world_size > 1 and torch.distributed.is_initialized():  # average the terms over ranks
            keys = sorted(sums)
            t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(t)
            sums = {k: float(v) / self.args.world_size for k, v in zip(keys, t.tolist())}
        rec = {"step": step, **sums}
        self.history.append(rec)
        self._since_log.append(sums)
        self._micro = {}

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._since_log:
            keys = sorted({k for r in self._since_log for k in r})
            for k in keys:
                vals = [r[k] for r in self._since_log if k in r]
                logs[f"loss_{k}"] = sum(vals) / len(vals)
            self._since_log = []
        return super().log(logs, *args, **kwargs)

    # ---- saving and resuming: the student as a HF model -----------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None:
            pre = "distiller.student."
            state_dict = {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.distiller.student.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        d = resume_from_checkpoint
        single, index = os.path.join(d, "model.safetensors"), os.path.join(d, "model.safetensors.index.json")
        student = self.distiller.student
        if os.path.isfile(single):
            sd = load_file(single)
        elif os.path.isfile(index):
            import json

            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for name in files:
                sd.update(load_file(os.path.join(d, name)))
        else:
            raise ValueError(f"resume_from_checkpoint={d!r}: no model.safetensors (or its index) in that folder")
        own = student.state_dict()
        ptrs = {own[j].data_ptr() for j in sd if j in own}
        tied = {k for k in own if k not in sd and own[k].data_ptr() in ptrs}  # saved once under another name
        missing = [k for k in own if k not in sd and k not in tied]
        unexpected = [k for k in sd if k not in own]
        if missing or unexpected:
            raise ValueError(f"resume_from_checkpoint={d!r} does not match the student: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        student.load_state_dict(sd, strict=False)

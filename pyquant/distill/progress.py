"""Feed the training progress to a ``Distiller`` from the HF ``Trainer`` (pyquant's own loop calls
``set_progress`` itself): ``Trainer(..., callbacks=[ProgressCallback(distiller)])``."""
from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["ProgressCallback"]


class ProgressCallback(TrainerCallback):
    """Calls ``distiller.set_progress(global_step, max_steps, epoch, num_train_epochs)`` before every step."""

    def __init__(self, distiller):
        if not hasattr(distiller, "set_progress"):
            raise TypeError(f"distiller must have set_progress (a pyquant Distiller), got {type(distiller).__name__}")
        self.distiller = distiller

    def on_step_begin(self, args, state, control, **kwargs):
        total = max(int(state.max_steps or 0), 1)
        epochs = max(int(round(args.num_train_epochs)), 1)
        self.distiller.set_progress(min(int(state.global_step), total), total,
                                    epoch=min(int(state.epoch or 0), epochs - 1), num_epochs=epochs)
        return control

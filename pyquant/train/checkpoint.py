"""Checkpoints: atomic, self-describing, refused when they do not belong to the run.

Layout of ``<output_dir>/checkpoint-<step:08d>/``:

* ``model.safetensors``  the student's tensors (safetensors; tied tensors stored once per name)
* ``trainer_state.pt``   optimizer, scheduler, RNG states (torch / CUDA / python), data position
* ``meta.json``          step, epoch, batch index in the epoch, the run's config fingerprint

A checkpoint is written into a temporary sibling directory and renamed into place (``os.replace`` of a directory is
atomic on POSIX), so a checkpoint directory either exists complete or not at all; a crash leaves only a
``.tmp-*`` directory, which the next save ignores.  An existing checkpoint directory is never overwritten: saving a
step that already exists raises.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "CheckpointError"]

_NAME = re.compile(r"^checkpoint-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to a different configuration."""


def list_checkpoints(output_dir) -> list:
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Optional[Path]:
    c = list_checkpoints(output_dir)
    return c[-1] if c else None


def _rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tensor_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save_checkpoint(output_dir, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    meta: Optional[dict] = None, keep_last: Optional[int] = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; returns its path.  Call on one rank only."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{int(step):08d}"
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a checkpoint")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{int(step):08d}-", dir=out))
    try:
        save_file(_tensor_state(model), str(tmp / "model.safetensors"))
        state = {
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": _rng_state(),
        }
        torch.save(state, tmp / "trainer_state.pt")
        m = dict(meta or {})
        m["step"] = int(step)
        with open(tmp / "meta.json", "w") as f:
            json.dump(m, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_checkpoint(path, model: torch.nn.Module, optimizer=None, scheduler=None,
                    expect_config: Optional[dict] = None, restore_rng: bool = True) -> dict:
    """Load a checkpoint into model/optimizer/scheduler (+ RNG); returns its meta dict.

    Raises ``CheckpointError`` (a ValueError) naming the file when it is unreadable or when ``expect_config`` (the
    run's fingerprint) differs from the one it was written with.
    """
    from safetensors.torch import load_file

    p = Path(path)
    try:
        with open(p / "meta.json") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p} is unreadable (meta.json: {e})") from e
    if expect_config is not None:
        got = meta.get("config")
        if got != expect_config:
            a, b = _flatten(expect_config), _flatten(got or {})
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise CheckpointError(
                f"checkpoint {p} was written by a different configuration (differs in {keys}); resume with the same "
                "options or start a new output directory")
    try:
        tensors = load_file(str(p / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {p} is unreadable (model.safetensors: {e})") from e
    try:
        state = torch.load(p / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {p} is unreadable (trainer_state.pt: {e})") from e
    own = model.state_dict()
    missing = [k for k in own if isinstance(own[k], torch.Tensor) and k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {p} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"checkpoint {p}: {k} has shape {tuple(v.shape)}, model has "
                                      f"{tuple(own[k].shape)}")
            own[k].copy_(v)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return meta

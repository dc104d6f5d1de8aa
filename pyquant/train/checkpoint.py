"""Checkpoints: atomic, self-describing, refused when they do not belong to the run.

Layout of ``<output_dir>/checkpoint-<step:08d>/``:

* ``model.safetensors``  the student's tensors (safetensors; tied tensors stored once per name)
* ``trainer_state.pt``   optimizer, scheduler, RNG states (torch / CUDA / python): tensors and plain containers only
* ``meta.json``          step, epoch, batch index in the epoch, the run's config fingerprint

No code runs from a checkpoint: ``trainer_state.pt`` is read with ``torch.load(..., weights_only=True)``, whose
unpickler rebuilds only tensors, numbers, strings and containers and refuses every other object (a crafted file with a
pickled callable is rejected with :class:`CheckpointError` before anything in it runs); ``meta.json`` is JSON and the
tensors are safetensors.  The data position is ``meta["step"]`` (the loop derives the epoch's order from the seed).

A checkpoint is written into a temporary sibling directory and renamed into place (``os.replace`` of a directory is
atomic on POSIX), so a checkpoint directory either exists complete or not at all; a crash leaves only a
``.tmp-*`` directory, which the next save ignores.  An existing checkpoint directory is never overwritten: saving a
step that already exists raises.

FSDP2: :func:`gather_full_state` (collective) gathers the full model and optimizer state to rank 0's CPU, and
``save_checkpoint(..., model_state=, optimizer_state=)`` writes them into the same files (the optimizer state keyed
by parameter index, as ``optimizer.state_dict()``), so the checkpoint does not depend on how it was trained.
``load_checkpoint(..., sharded=True)`` loads it back into a sharded model and optimizer (call it on every rank).
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

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "CheckpointError",
           "gather_full_state"]

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


def _full_opts():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_state(model: torch.nn.Module, optimizer=None):
    """FSDP2: ``(model_state, optimizer_state)``, full (unsharded) CPU state dicts on rank 0 (empty on the other
    ranks); collective, call it on every rank.  The optimizer state is keyed by parameter index in
    ``param_groups`` order, exactly like ``optimizer.state_dict()``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_full_opts())
    osd = None
    if optimizer is not None:
        osd = _optim_by_index(get_optimizer_state_dict(model, optimizer, options=_full_opts()))
    return msd, osd


def _optim_by_index(osd: dict) -> dict:
    """An FQN-keyed optimizer state dict (torch.distributed.checkpoint) -> ``optimizer.state_dict()`` layout."""
    state, groups, i = {}, [], 0
    for g in osd.get("param_groups", []):
        ids = []
        for fqn in g["params"]:
            if fqn in osd.get("state", {}):
                state[i] = osd["state"][fqn]
            ids.append(i)
            i += 1
        groups.append({**g, "params": ids})
    return {"state": state, "param_groups": groups}


def _optim_by_fqn(osd: dict, model: torch.nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` layout -> FQN-keyed, using this optimizer's parameter order and ``model``'s
    names (the inverse of :func:`_optim_by_index`)."""
    names = {id(p): n for n, p in model.named_parameters()}  # a tied parameter under its first name
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    n_saved = sum(len(g["params"]) for g in osd["param_groups"])
    if n_saved != len(fqns):
        raise CheckpointError(f"optimizer state has {n_saved} parameters, the optimizer has {len(fqns)}")
    state = {fqns[int(i)]: v for i, v in osd["state"].items()}
    groups = [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _own_tensors(sd: dict) -> Dict[str, torch.Tensor]:
    """Tensors of a gathered state dict, each with its own storage (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to("cpu").contiguous()
            if v.untyped_storage().data_ptr() in seen:
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            out[k] = v
    return out


def save_checkpoint(output_dir, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    meta: Optional[dict] = None, keep_last: Optional[int] = None,
                    model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; returns its path.  Call on one rank only.

    ``model_state`` / ``optimizer_state``: already gathered full state dicts (FSDP, :func:`gather_full_state`),
    written instead of ``model.state_dict()`` / ``optimizer.state_dict()``."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{int(step):08d}"
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a checkpoint")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{int(step):08d}-", dir=out))
    try:
        tensors = _tensor_state(model) if model_state is None else _own_tensors(model_state)
        save_file(tensors, str(tmp / "model.safetensors"))
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        state = {
            "optimizer": optimizer_state,
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


def _load_trainer_state(f: Path) -> dict:
    """``trainer_state.pt`` with ``weights_only=True``: a file that holds anything but tensors and plain containers
    (e.g. a planted pickle payload) is refused, and nothing in it is executed."""
    import pickle

    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln]
        first = why[0] if why else type(e).__name__
        raise CheckpointError(
            f"checkpoint {f.parent} is refused: {f.name} holds objects other than tensors and plain containers, "
            f"which could run code when loaded; it was not loaded and nothing in it was executed ({first})") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {f.parent} is unreadable ({f.name}: {e})") from e
    rng = state.get("rng") if isinstance(state, dict) else None
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or "python" not in rng:
        raise CheckpointError(f"checkpoint {f.parent} is unreadable ({f.name}: expected a dict with 'optimizer', "
                              f"'scheduler' and 'rng' entries, got {type(state).__name__})")
    return state


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_checkpoint(path, model: torch.nn.Module, optimizer=None, scheduler=None,
                    expect_config: Optional[dict] = None, restore_rng: bool = True, sharded: bool = False) -> dict:
    """Load a checkpoint into model/optimizer/scheduler (+ RNG); returns its meta dict.

    ``sharded``: the model is sharded with FSDP2 (``fully_shard``) and the optimizer holds its DTensor
    parameters; the full state in the files is distributed into the shards (call it on every rank).

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
    state = _load_trainer_state(p / "trainer_state.pt")
    own = model.state_dict()
    missing = [k for k in own if isinstance(own[k], torch.Tensor) and k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {p} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if own[k].shape != v.shape:  # a DTensor's shape is the global one
            raise CheckpointError(f"checkpoint {p}: {k} has shape {tuple(v.shape)}, model has "
                                  f"{tuple(own[k].shape)}")
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, tensors, options=_full_opts())
        if optimizer is not None and state.get("optimizer") is not None:
            set_optimizer_state_dict(model, optimizer, _optim_by_fqn(state["optimizer"], model, optimizer),
                                     options=_full_opts())
    else:
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return meta

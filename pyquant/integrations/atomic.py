"""Atomic directory writes: a checkpoint directory is either the previous one or the new one, never half of each.

``atomic_directory(target)`` yields a fresh temporary directory next to ``target`` (same filesystem); when the block
ends without an exception, files of the old ``target`` that the new write did not produce are carried over (hard
links where possible: a tokenizer saved earlier survives a later ``save_pretrained``), except stale weight files
(``*.safetensors``, ``*.bin``, ``*.safetensors.index.json``: a new save decides the weight shards), everything is
fsynced, and the temporary directory replaces ``target`` in one step:

* Linux: ``renameat2(RENAME_EXCHANGE)`` swaps the two directories atomically, then the old one is deleted.  A
  SIGKILL at any moment leaves ``target`` complete (old before the swap, new after) plus at most one leftover
  ``.<name>.pyquant-tmp-*`` directory next to it, which is safe to delete.
* elsewhere (or a filesystem without RENAME_EXCHANGE): ``target`` is renamed to ``.<name>.pyquant-old-*`` and the
  new directory renamed into place; a kill between the two renames leaves the previous files intact under that
  name (not at ``target``).

An exception inside the block (or in the swap) removes the temporary directory and leaves ``target`` untouched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ["atomic_directory", "is_weight_file"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth"))


def _fsync_path(path: str, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(dirpath, f), False)
        _fsync_path(dirpath, True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap directories a and b (Linux renameat2); False when the platform cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a!r} and {b!r} failed: {os.strerror(err)}")


def _carry_over(old: str, new: str) -> None:
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(dst) or is_weight_file(name):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
            continue
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


@contextlib.contextmanager
def atomic_directory(target) -> Iterator[str]:
    """Write a directory atomically: yields a temporary directory that replaces ``target`` on success."""
    target = os.path.abspath(os.fspath(target))
    if os.path.isfile(target):
        raise ValueError(f"save directory {target!r} is an existing file, expected a directory (or a new path)")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.pyquant-tmp-", dir=parent)
    try:
        yield tmp
        existed = os.path.isdir(target)
        if existed:
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        if not existed:
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous directory
        else:
            old = tempfile.mkdtemp(prefix=f".{base}.pyquant-old-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(parent, True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

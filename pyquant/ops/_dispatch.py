"""Backend registry and selection for pyquant ops.

Each op (defined once with ``torch.library.custom_op`` in ``pyquant/ops/<op>.py``) has implementations per backend:

* ``cuda``      the C++ extension ``pyquant._C`` (CUDA tensors only; built by setup.py or JIT on request);
* ``triton``    kernels in ``pyquant.kernels`` (CUDA tensors; on CPU tensors only through the Triton interpreter,
                ``TRITON_INTERPRET=1``, and only when selected explicitly: the interpreter is a test tool);
* ``reference`` ``pyquant.reference``, pure PyTorch, always available.

The default order is ``cuda, triton, reference``: the first backend that is available *and* whose ``supports``
predicate accepts the call's arguments runs it.  Override the order with the environment variable
``PYQUANT_BACKEND`` (comma list, read at call time, e.g. ``PYQUANT_BACKEND=reference``) or the context manager
``use_backend("triton")``.  A selected backend that cannot run the call falls through to the next one in the list;
if none can, a RuntimeError explains why for each.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("pyquant")

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "PYQUANT_BACKEND"

class _Local(threading.local):
    # class-level defaults: reading an attribute never set in this thread costs no AttributeError (~1 us otherwise)
    order: Optional[Tuple[str, ...]] = None
    last: Optional[Tuple[str, str]] = None


_local = _Local()


def _env_reader(name: str) -> Callable[[], Optional[str]]:
    """A getter for one environment variable that sees every ``os.environ`` change (monkeypatch.setenv included).

    ``os.environ.get`` costs ~1-2 us per call (key encoding, Mapping machinery); the dispatch reads two variables on
    every op call, so on CPython this reads ``os.environ``'s own dict with the key encoded once (same value, same
    staleness as ``os.environ.get``: ``os.putenv`` is invisible to both).  Anything else uses ``os.environ.get``."""
    env = os.environ
    data, enc, dec = getattr(env, "_data", None), getattr(env, "encodekey", None), getattr(env, "decodevalue", None)
    if isinstance(data, dict) and callable(enc) and callable(dec):
        key = enc(name)
        get = data.get

        def read() -> Optional[str]:
            v = get(key)
            return None if v is None else dec(v)

        return read
    return lambda: os.environ.get(name)


_read_backend_env = _env_reader(ENV_VAR)
_read_interpret_env = _env_reader("TRITON_INTERPRET")


@dataclass
class _Impl:
    fn: Callable
    supports: Optional[Callable[..., Tuple[bool, str]]]
    bind: Optional[Callable[..., Callable]] = None


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}


def register(op: str, backend: str, supports: Optional[Callable[..., Tuple[bool, str]]] = None,
             bind: Optional[Callable[..., Callable]] = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``supports(*args, **kwargs) -> (ok, reason)`` may reject calls (shapes, dtypes) the kernel does not handle.
    ``bind(*args, **kwargs) -> launch`` (optional) precomputes, for the weight arguments and the x shape / dtype of
    this call, a ``launch(x)`` equivalent to ``fn(x, *the other args)``: what :func:`resolve_bound` hands to callers
    that repeat one kind of call (``PackedLinear``'s fast path).  Without it the fast path calls ``fn`` itself.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, supports, bind)
        return fn

    return deco


def _parse(names: Sequence[str], where: str) -> Tuple[str, ...]:
    out = []
    for n in names:
        n = n.strip().lower()
        if not n:
            continue
        if n not in BACKENDS:
            raise ValueError(f"{where}: unknown backend {n!r}; expected some of {BACKENDS}")
        out.append(n)
    if not out:
        raise ValueError(f"{where}: no backend named; expected some of {BACKENDS}")
    return tuple(out)


@contextlib.contextmanager
def use_backend(*names: str) -> Iterator[None]:
    """Run the block with this backend order, e.g. ``with use_backend("triton", "reference"):``."""
    order = _parse(names, "use_backend")
    prev = getattr(_local, "order", None)
    _local.order = order
    try:
        yield
    finally:
        _local.order = prev


def backend_order() -> Tuple[Tuple[str, ...], bool]:
    """(order, explicit): the context manager's order, else the env var's, else the default."""
    order = _local.order
    if order is not None:
        return order, True
    env = _read_backend_env()
    if env:
        return _parse_env(env), True
    return BACKENDS, False


@functools.lru_cache(maxsize=64)
def _parse_env(env: str) -> Tuple[str, ...]:
    return _parse(env.split(","), f"environment variable {ENV_VAR}={env!r}")


def dispatch_state() -> Tuple[Tuple[Tuple[str, ...], bool], Optional[str]]:
    """Everything besides the call's arguments that backend selection depends on: (:func:`backend_order`, the raw
    ``TRITON_INTERPRET`` value).  Callers caching :func:`resolve` results key their cache on it (cheap: ~0.5 us)."""
    return backend_order(), _read_interpret_env()


# ---- availability (cheap, cached, never initializes CUDA at import) ---------------------------------------------
def triton_interpret() -> bool:
    return (_read_interpret_env() or "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover
        return False, f"import triton failed: {e}"
    return True, "installed"


def backend_status(backend: str, device: Optional[torch.device] = None, explicit: bool = False) -> Tuple[bool, str]:
    """Whether ``backend`` can run on ``device`` (None: say in general) and why not."""
    if backend == "reference":
        return True, "pure PyTorch (always available)"
    if backend == "triton":
        # Decide from the device first: a CPU call without the interpreter never needs (or imports) triton.
        if device is not None and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            return False, f"needs CUDA tensors (got {device.type}); TRITON_INTERPRET=1 runs it on CPU for tests"
        if device is not None and device.type == "cpu" and not explicit:
            return False, "interpreter runs only when selected (use_backend('triton') or PYQUANT_BACKEND=triton)"
        ok, why = _triton_importable()
        if not ok:
            return False, why
        if device is None:
            if triton_interpret():
                return True, "interpreter (TRITON_INTERPRET=1): CPU tensors, only when selected explicitly"
            if torch.cuda.is_available():
                return True, "compiled for CUDA tensors"
            return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run kernels on CPU for testing)"
        if device.type == "cuda":
            return (False, "TRITON_INTERPRET=1 is set, which cannot run on CUDA tensors") if triton_interpret() \
                else (True, "compiled")
        if device.type == "cpu" and triton_interpret():
            return (True, "interpreter") if explicit else \
                (False, "interpreter runs only when selected (use_backend('triton') or PYQUANT_BACKEND=triton)")
        return False, f"needs CUDA tensors (got {device.type}); TRITON_INTERPRET=1 runs it on CPU for tests"
    if backend == "cuda":
        if device is not None and device.type != "cuda":
            return False, f"needs CUDA tensors (got {device.type})"
        try:  # the extension's Python side may be absent (not built, or not written yet): unavailable, not a crash
            from .. import _cuda_ext
        except ImportError as e:
            return False, f"pyquant._cuda_ext cannot be imported ({e})"
        return _cuda_ext.status()
    raise ValueError(f"unknown backend {backend!r}")


def kernel_module(name: str):
    """Import ``pyquant.kernels.<name>`` (the Triton kernels) on first use; never at ``import pyquant``.

    ``kernels/`` is installed as ``pyquant.kernels`` by setup.py (``pip install -e .`` for a source checkout); it is
    never imported as a top-level ``kernels`` package, so each kernel module (and its JIT cache) exists once.
    """
    try:
        return importlib.import_module(f"pyquant.kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("pyquant.kernels", f"pyquant.kernels.{name}"):
            raise
        raise ModuleNotFoundError(
            f"pyquant.kernels.{name} is not importable: the Triton kernels in kernels/ are installed as "
            "pyquant.kernels by `pip install -e .` (run it in the repository root)", name=e.name) from None


def _device_of(args, kwargs) -> torch.device:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def resolve(op: str, *args, **kwargs) -> Tuple[str, Callable]:
    """(backend, implementation) that :func:`call` would run for these arguments (in the current order)."""
    b, impl = _select(op, args, kwargs)
    return b, impl.fn


def resolve_bound(op: str, *args, **kwargs) -> Tuple[str, Callable]:
    """(backend, launch) for a caller that makes this kind of call many times: ``launch(x)`` runs what
    ``call(op, x, *args[1:], **kwargs)`` would run for an x like ``args[0]`` (same shape, dtype, device), with what
    depends only on the other arguments and that shape precomputed by the backend's ``bind`` (see :func:`register`).

    The caller (``PackedMatmulPlan``) caches it per (:func:`dispatch_state`, x dtype, rows) and must pass the same
    other arguments (tensors unchanged) every time."""
    b, impl = _select(op, args, kwargs)
    if impl.bind is not None:
        return b, impl.bind(*args, **kwargs)
    fn, rest = impl.fn, args[1:]
    return b, (lambda x: fn(x, *rest, **kwargs))


def _select(op: str, args, kwargs) -> Tuple[str, _Impl]:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    order, explicit = backend_order()
    dev = _device_of(args, kwargs)
    reasons: List[str] = []
    for b in order:
        impl = impls.get(b)
        if impl is None:
            reasons.append(f"{b}: no implementation of {op}")
            continue
        ok, why = backend_status(b, dev, explicit)
        if ok and impl.supports is not None:
            ok, why = impl.supports(*args, **kwargs)
        if ok:
            return b, impl
        reasons.append(f"{b}: {why}")
    raise RuntimeError(f"pyquant op {op!r}: no backend in {order} can run this call: " + "; ".join(reasons))


def call(op: str, *args, **kwargs):
    """Run ``op`` on the first backend (in the current order) that is available and supports these arguments."""
    b, fn = resolve(op, *args, **kwargs)
    _local.last = (op, b)
    return fn(*args, **kwargs)


def note_backend(op: str, backend: str) -> None:
    """Record a dispatch made outside :func:`call` (a cached :func:`resolve`), for :func:`last_backend`."""
    _local.last = (op, backend)


def last_backend() -> Optional[Tuple[str, str]]:
    """(op, backend) of the most recent dispatch in this thread (for tests and ``pyquant env``)."""
    return _local.last


def registered(op: str) -> Tuple[str, ...]:
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(op, {}))


def registered_ops() -> Tuple[str, ...]:
    """Names of the ops with at least one registered backend (those whose modules have been imported)."""
    return tuple(sorted(op for op, impls in _REGISTRY.items() if impls))

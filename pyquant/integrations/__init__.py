"""Integrations with other libraries' extension APIs (the only place in pyquant that knows them).

* :mod:`pyquant.integrations.hf` -- the ``"pyquant"`` transformers quantization method (``PyquantConfig``,
  ``PyquantHfQuantizer``): ``save_pretrained`` / ``from_pretrained`` of QAT and packed models, PTQ at load time.
* :mod:`pyquant.integrations.bitnet` -- ``from_bitnet``: HF BitNet checkpoints into pyquant's packed kernels.
* :mod:`pyquant.integrations.atomic` -- atomic directory writes (``save_pretrained`` never leaves half a checkpoint).

Registration without importing transformers: ``import pyquant`` must stay cheap, so it does not import transformers
to register the quantizer.  Instead :func:`install_hook` (called by ``import pyquant``) registers at once when
``transformers.quantizers.auto`` (the registry) is already imported, and otherwise puts a finder on ``sys.meta_path``
that runs the registration right after transformers executes that module -- which transformers does before it can
load any model (``modeling_utils`` imports it at module level).  So ``import pyquant`` + any later use of
transformers sees the ``"pyquant"`` method, and a process that never touches transformers never pays for it.
This module itself imports neither torch nor transformers.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading

__all__ = ["install_hook", "register"]

_REGISTRY_MODULE = "transformers.quantizers.auto"
_lock = threading.RLock()
_registered = False


def register() -> None:
    """Register the ``"pyquant"`` config and quantizer with transformers (idempotent; imports transformers)."""
    global _registered
    with _lock:
        if _registered:
            return
        hf = sys.modules.get(__name__ + ".hf")
        if hf is not None and not hasattr(hf, "_register"):
            return  # pyquant.integrations.hf is being imported (it imported transformers): it registers at its end
        from . import hf
        hf._register()
        _registered = True


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps transformers' loader of the registry module: executes it, then registers pyquant."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _remove_finder()
        try:
            register()
        except Exception as e:  # never break `import transformers` over pyquant's registration
            import warnings
            warnings.warn(f"pyquant could not register its transformers quantizer: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=2)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the wrapped loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        _remove_finder()  # find the real spec without finding ourselves again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if fullname not in sys.modules:
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_finder = _Finder()


def _remove_finder() -> None:
    while _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def install_hook() -> None:
    """Register now if transformers' registry is already imported, else register when it gets imported."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)

"""Layer backends by name (``parallel.layer_backend``): which module builds the tensor-parallel layers.

The built-in backends are named here by import path and imported on first use, so neither backend module
imports this registry nor each other (``parallel.te_backend`` needs ``parallel.layers``; the reverse would be a
cycle). Other backends register a factory with ``register_layer_backend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_BUILTIN: dict[str, tuple[str, str]] = {
    "torch": ("parallel.layers", "TorchLayerBackend"),
    "te": ("parallel.te_backend", "TELayerBackend"),
}
_REGISTERED: dict[str, Callable[[], object]] = {}


def register_layer_backend(name: str, factory: Callable[[], object]) -> None:
    """Make ``parallel.layer_backend=name`` build its layers with ``factory()``."""
    _REGISTERED[name] = factory


def get_layer_backend(name: str):
    """A new backend object for ``name`` (a built-in backend's module is imported here, on first use)."""
    if name in _REGISTERED:
        return _REGISTERED[name]()
    if name in _BUILTIN:
        module, attr = _BUILTIN[name]
        return getattr(importlib.import_module(module), attr)()
    known = sorted({*_BUILTIN, *_REGISTERED})
    raise ValueError(f"parallel.layer_backend={name!r} is unknown; available: {known}")

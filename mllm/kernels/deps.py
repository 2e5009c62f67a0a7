"""Optional dependencies: availability checks and the one-line error for a missing one."""

from __future__ import annotations

import importlib
import importlib.util

GPU_EXTRA = "pip install 'mllm[gpu]'"


class MissingDependencyError(ImportError):
    """An optional package a chosen feature needs is not installed (one line: feature, package, fix)."""


def is_available(module: str) -> bool:
    """True when ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, package: str, feature: str, hint: str = "") -> object:
    """Import ``module`` or raise ``MissingDependencyError`` naming ``feature``, ``package`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = f" ({hint})" if hint else ""
        raise MissingDependencyError(
            f"{feature} needs the '{package}' package, which is not installed: {GPU_EXTRA}{extra} "
            f"[import {module}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}]"
        ) from None

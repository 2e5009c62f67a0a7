"""Keep the HF config fields we do not model, so export writes back everything the user had."""

from __future__ import annotations

import copy
from typing import Any


def unmapped_fields(original: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    """Fields of ``original`` that ``generated`` (our config written back) lacks, recursively."""
    out: dict[str, Any] = {}
    for key, value in original.items():
        if key not in generated:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(generated[key], dict):
            nested = unmapped_fields(value, generated[key])
            if nested:
                out[key] = nested
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over`` (``over`` wins; nested dicts merged, not replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out

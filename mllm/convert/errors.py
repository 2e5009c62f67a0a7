"""The one error type the converter raises: a one-line message naming the file/tensor/key and the fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or its config cannot be read, written or converted as asked."""


def name_a_few(names: list[str], limit: int = 5) -> str:
    """'a, b, c (+12 more)': enough names to find the problem without flooding the terminal."""
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")

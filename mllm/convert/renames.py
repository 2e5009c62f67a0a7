"""Name mapping by templates: ``"vision_model.encoder.layers.{i}.norm1."`` <-> ``"vision.layers.{i}.norm1."``.

A rule maps a name prefix in one layout to a prefix in the other; ``{i}`` stands for a layer index and the rest of
the name (``weight``, ``bias``) is carried over. Rules are bidirectional so one table serves import and export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixRule:
    hf: str  # prefix in the Hugging Face layout, may contain {i}
    ours: str  # prefix in our layout, same placeholders


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{i\})", template)
    body = "".join(r"(?P<i>\d+)" if p == "{i}" else re.escape(p) for p in parts)
    return re.compile(body)


class RenameTable:
    """Prefix renames in both directions; the longest matching template wins."""

    def __init__(self, rules: list[PrefixRule]) -> None:
        ordered = sorted(rules, key=lambda r: len(r.hf), reverse=True)
        self._to_ours = [(_compile(r.hf), r.ours) for r in ordered]
        ordered = sorted(rules, key=lambda r: len(r.ours), reverse=True)
        self._to_hf = [(_compile(r.ours), r.hf) for r in ordered]

    @staticmethod
    def _apply(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in table:
            m = pattern.match(name)
            if m:
                head = target.replace("{i}", m.group("i")) if "{i}" in target else target
                return head + name[m.end() :]
        return None

    def to_ours(self, hf_name: str) -> str | None:
        """Our name for an HF tensor name, None when no rule covers it."""
        return self._apply(hf_name, self._to_ours)

    def to_hf(self, our_name: str) -> str | None:
        """The HF name for one of our tensor names, None when no rule covers it."""
        return self._apply(our_name, self._to_hf)

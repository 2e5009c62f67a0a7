"""Counting of rejected samples: every skip is logged with its reason and counted, per dataset.

The failure rule is windowed: a dataset fails when more than `max_bad_fraction` of its last `window` samples of
the global stream were rejected (once that window holds at least `min_samples`), so a cluster of bad lines early
in a long healthy dataset does not stop the run, and a dataset going bad later does. The stream is global (the
same on every rank, see sampling.py) and rejections found while decoding are shared by all ranks every step, so
every rank holds the same counts and fails at the same step with the same one-line error.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

log = logging.getLogger("mllm.data")

# Reasons a sample can be rejected; the trainer exports one metric per reason.
REASONS = (
    "bad_annotation",  # unparsable JSON line / record without conversations
    "empty_conversation",
    "bad_roles",  # turns not human/gpt alternating, or no answer
    "placeholder_mismatch",  # number of <image> placeholders != number of images
    "reserved_token_in_text",  # <img>, </img> or <IMG_CONTEXT> written literally in the text
    "tokenization_mismatch",  # a token straddles an answer boundary
    "no_supervised_tokens",
    "too_long",  # longer than a packed row and data.too_long=reject, or a cut would fall in an image's tokens
    "too_many_tiles",  # more tiles than a row may hold
    "missing_image",
    "corrupt_image",  # unreadable, truncated or not an image
    "missing_video",
    "corrupt_video",  # no decodable frames, unknown container
    "unreadable_shard",
)

LOG_FIRST = 20  # log the first N rejections of each reason, then every LOG_EVERY-th
LOG_EVERY = 1000


class DataQualityError(RuntimeError):
    """Too many samples of a dataset were rejected."""


class BadSampleCounter:
    """Per-dataset counts of seen and rejected samples, with a maximum rejected fraction."""

    def __init__(self, max_bad_fraction: float = 1.0, min_samples: int = 200, window: int = 1000) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.window = max(1, window)
        self.seen: Counter[str] = Counter()
        self.bad: dict[str, Counter[str]] = {}
        self.examples: dict[str, str] = {}  # dataset -> one example "key: reason (detail)"
        self.truncated: Counter[str] = Counter()  # samples cut to seq_len (kept, not rejections)
        # Per dataset: its last `window` samples as [stream position, rejected] (the failure rule's window).
        self.recent: dict[str, deque] = {}

    def record_truncated(self, dataset: str) -> None:
        self.truncated[dataset] += 1

    def _remember(self, dataset: str, pos: int | None, bad: bool, late: bool = False) -> None:
        recent = self.recent.setdefault(dataset, deque(maxlen=self.window))
        if (
            late and pos is not None
        ):  # rejected while decoding: it entered the window as fine when it was planned
            for entry in reversed(recent):
                if entry[0] == pos:
                    entry[1] = True
                    return
        recent.append([pos, bad])

    def record_ok(self, dataset: str, pos: int | None = None) -> None:
        self.seen[dataset] += 1
        self._remember(dataset, pos, False)

    def record_bad(
        self,
        dataset: str,
        reason: str,
        key: str,
        detail: str = "",
        count_seen: bool = True,
        pos: int | None = None,
    ) -> None:
        """Count a rejection; count_seen=False when the sample was already counted as seen (late rejection);
        pos: its position in the stream, for the window."""
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.seen[dataset] += int(count_seen)
        self._remember(dataset, pos, True, late=not count_seen)
        counts = self.bad.setdefault(dataset, Counter())
        counts[reason] += 1
        n = counts[reason]
        example = f"{key}: {reason}" + (f" ({detail})" if detail else "")
        self.examples.setdefault(dataset, example)
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            log.warning("skipped sample %s of dataset %s [%s #%d] %s", key, dataset, reason, n, detail)

    @property
    def num_seen(self) -> int:
        return sum(self.seen.values())

    @property
    def num_bad(self) -> int:
        return sum(sum(c.values()) for c in self.bad.values())

    @property
    def num_truncated(self) -> int:
        return sum(self.truncated.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_seen if self.num_seen else 0.0

    def counts(self) -> dict[str, int]:
        """Rejections per reason over all datasets."""
        total: Counter[str] = Counter()
        for c in self.bad.values():
            total.update(c)
        return dict(total)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for the trainer's logger."""
        out: dict[str, float] = {"data/bad_fraction": self.bad_fraction, "data/seen": float(self.num_seen)}
        out.update({f"data/bad/{reason}": float(n) for reason, n in self.counts().items()})
        if self.truncated:
            out["data/truncated"] = float(self.num_truncated)
        return out

    def check(self) -> None:
        """Raise DataQualityError (one line: dataset, window fraction, totals, example, fix) if a dataset's
        recent window is too bad."""
        for dataset, recent in sorted(self.recent.items()):
            n = len(recent)
            bad = sum(1 for _, b in recent if b)
            if n < self.min_samples or bad / n <= self.max_bad_fraction:
                continue
            reason, _ = self.bad[dataset].most_common(1)[0]
            total_bad = sum(self.bad[dataset].values())
            raise DataQualityError(
                f"dataset {dataset!r}: {bad} of its last {n} samples rejected ({bad / n:.1%} > "
                f"data.max_bad_fraction {self.max_bad_fraction}; {total_bad}/{self.seen[dataset]} in all), mostly "
                f"{reason}, e.g. {self.examples.get(dataset, '?')}; fix this dataset's annotation/images or raise "
                "data.max_bad_fraction / data.bad_window"
            )

    def state_dict(self) -> dict:
        return {
            "seen": dict(self.seen),
            "bad": {d: dict(c) for d, c in self.bad.items()},
            "examples": dict(self.examples),
            "truncated": dict(self.truncated),
            "recent": {d: [list(e) for e in r] for d, r in self.recent.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seen = Counter(state["seen"])
        self.bad = {d: Counter(c) for d, c in state["bad"].items()}
        self.examples = dict(state["examples"])
        self.truncated = Counter(state.get("truncated", {}))
        self.recent = {
            d: deque(([p, bool(b)] for p, b in r), maxlen=self.window)
            for d, r in state.get("recent", {}).items()
        }

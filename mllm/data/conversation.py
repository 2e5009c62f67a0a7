"""Conversation -> token ids and loss targets, with `<image>` expansion and explicit rejections.

The whole prompt is tokenized in one call (what the model sees at inference) and the loss targets come from
character offsets: a token is a target when it lies inside an assistant answer or its end token. A token that
straddles an answer boundary is a tokenization mismatch and rejects the sample, instead of InternVL's silent
all-masked sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm.data.templates import Template

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
RESERVED = (IMG_START, IMG_END, IMG_CONTEXT)
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class Rejected(Exception):
    """A sample that must be skipped; `reason` is one of badsamples.REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class TokenizedSample:
    input_ids: np.ndarray  # int32 [L], image context tokens expanded
    targets: np.ndarray  # bool [L]: this token is predicted with loss (not yet shifted)


def parse_turns(conversations: Any) -> tuple[list[tuple[str, str]], str | None]:
    """Validate an InternVL conversation list -> (role, text) turns and an optional system message."""
    if not isinstance(conversations, list) or not conversations:
        raise Rejected("empty_conversation", "no conversations")
    system = None
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Rejected("bad_annotation", f"turn {i} is not {{'from': ..., 'value': str}}")
        role = turn.get("from")
        if role == "system" and i == 0:
            system = turn["value"].strip()
            continue
        if role not in ROLE_ALIASES:
            raise Rejected("bad_roles", f"turn {i} has role {role!r}")
        # InternVL strips every turn before rendering (preprocess_internlm / _internvl2_5), so stray
        # whitespace around a question or answer is neither seen nor supervised.
        turns.append((ROLE_ALIASES[role], turn["value"].strip()))
    if not turns:
        raise Rejected("empty_conversation", "only a system message")
    for i, (role, _) in enumerate(turns):
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise Rejected(
                "bad_roles", f"turn {i} is {role}; turns must alternate human/gpt starting with human"
            )
    if turns[-1][0] != "gpt":
        turns = turns[:-1]  # a trailing question without an answer carries no loss
    if not turns:
        raise Rejected("bad_roles", "no assistant answer")
    return turns, system


def insert_image_placeholders(turns: list[tuple[str, str]], n_images: int) -> list[tuple[str, str]]:
    """Check placeholder counts; prepend them to the first question when the sample has none (InternVL)."""
    for _, text in turns:
        for token in RESERVED:
            if token in text:
                raise Rejected("reserved_token_in_text", f"text contains {token}")
    if any(IMAGE_PLACEHOLDER in text for role, text in turns if role == "gpt"):
        raise Rejected("placeholder_mismatch", "an answer contains <image>")
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if count == 0 and n_images > 0:
        if n_images == 1:
            prefix = IMAGE_PLACEHOLDER + "\n"
        else:
            prefix = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))
        turns = [(turns[0][0], prefix + turns[0][1])] + turns[1:]
        count = n_images
    if count != n_images:
        raise Rejected("placeholder_mismatch", f"{count} <image> placeholders for {n_images} images")
    return turns


class ConversationTokenizer:
    """Tokenizes conversations for one template; `tokenizer` is a fast Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, template: Template, num_image_token: int = 256) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast tokenizer; labels need "
                "offsets: save a fast version (AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_token = num_image_token
        ids = tokenizer.convert_tokens_to_ids(list(RESERVED))
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path} lacks {RESERVED}: add InternVL's special tokens to it"
            )
        self.context_id = ids[2]

    def __call__(
        self, conversations: Any, tiles_per_image: list[int], max_len: int | None = None
    ) -> TokenizedSample:
        turns, system = parse_turns(conversations)
        turns = insert_image_placeholders(turns, len(tiles_per_image))
        image_text = IMG_START + IMG_CONTEXT + IMG_END
        turns = [(role, text.replace(IMAGE_PLACEHOLDER, image_text)) for role, text in turns]
        pieces = self.template.pieces(turns, system)
        text = "".join(p for p, _ in pieces)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        targets = self._targets(pieces, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2))
        ids, targets = self._expand_images(ids, targets, tiles_per_image)
        if not targets.any():
            raise Rejected("no_supervised_tokens", "no answer tokens")
        if max_len is not None and len(ids) > max_len:
            raise Rejected("too_long", f"{len(ids)} tokens > row length {max_len}")
        return TokenizedSample(ids.astype(np.int32), targets)

    @staticmethod
    def _targets(pieces: list[tuple[str, bool]], offsets: np.ndarray) -> np.ndarray:
        ends = np.cumsum([len(p) for p, _ in pieces])
        supervised = np.array([s for _, s in pieces], dtype=bool)
        start, end = offsets[:, 0], offsets[:, 1]
        nonempty = end > start
        first = np.searchsorted(ends, start, side="right")
        last = np.searchsorted(ends, np.maximum(end - 1, start), side="right")
        first = np.minimum(first, len(pieces) - 1)
        last = np.minimum(last, len(pieces) - 1)
        straddle = nonempty & (supervised[first] != supervised[last])
        if straddle.any():
            i = int(np.flatnonzero(straddle)[0])
            raise Rejected(
                "tokenization_mismatch", f"token {i} spans chars {start[i]}..{end[i]} across an answer edge"
            )
        return nonempty & supervised[first]

    def _expand_images(
        self, ids: np.ndarray, targets: np.ndarray, tiles_per_image: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        where = np.flatnonzero(ids == self.context_id)
        if len(where) != len(tiles_per_image):
            raise Rejected("placeholder_mismatch", f"{len(where)} image slots after tokenization")
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[where] = np.asarray(tiles_per_image, dtype=np.int64) * self.num_image_token
        return np.repeat(ids, repeats), np.repeat(targets, repeats)

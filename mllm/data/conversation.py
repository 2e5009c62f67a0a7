"""Conversation -> token ids and loss targets, with `<image>` expansion, truncation and explicit rejections.

The conversation is prepared exactly as InternVL's `LazySupervisedDataset` + its template's preprocessing function
prepare it (see templates.py for the per-template rules): `<image>\n` is put before the first question of a
single-image sample without a placeholder, `<video>\n` becomes `Frame-i: <image>` lines, and the first turn is
dropped when it is the assistant's under the templates that need alternation.

The whole prompt is tokenized in one call (what the model sees at inference) and the loss targets come from
character offsets: a token is a target when it lies inside an assistant answer or its end token. A token that
starts before an answer and ends inside it (a role's trailing newline merged with an answer's leading newline)
is not a target, as in InternVL, whose prefix-length arithmetic masks it too. A token that straddles an answer's
end is a tokenization mismatch and rejects the sample, instead of InternVL's silent all-masked sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mllm.data.templates import Template

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
RESERVED = (IMG_START, IMG_END, IMG_CONTEXT)
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
# How a record carries its pixels: "image" (one image given as a string), "images" (a list), "video".
MEDIA_KINDS = ("image", "images", "video")
TOO_LONG_POLICIES = ("truncate", "reject")


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
    truncated: bool = False  # longer than max_len and cut to it (data.too_long=truncate)


def frame_prompt(n_frames: int) -> str:
    """InternVL's video prompt: one `Frame-i: <image>` line per frame (video_get_item)."""
    return "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n_frames))


def _turn_list(conversations: Any) -> tuple[list[tuple[str, str]], str | None]:
    """Validate an InternVL conversation list -> (role, text) turns and an optional leading system message."""
    if not isinstance(conversations, list) or not conversations:
        raise Rejected("empty_conversation", "no conversations")
    system = None
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Rejected("bad_annotation", f"turn {i} is not {{'from': ..., 'value': str}}")
        role = turn.get("from")
        if role == "system" and i == 0:
            system = turn["value"]
            continue
        if role not in ROLE_ALIASES:
            raise Rejected("bad_roles", f"turn {i} has role {role!r}")
        turns.append((ROLE_ALIASES[role], turn["value"]))
    if not turns:
        raise Rejected("empty_conversation", "only a system message")
    return turns, system


def _add_media_placeholders(turns: list[tuple[str, str]], n_images: int, media: str) -> list[tuple[str, str]]:
    """InternVL's get_item rules, applied to the first question before the template's preprocessing.

    InternVL applies them to the record's first turn whatever its role: a system message or a leading answer
    would get a literal `<image>` (see docs/data.md); here they apply to the first human turn.
    """
    first = next((i for i, (role, _) in enumerate(turns) if role == "human"), None)
    if first is None:
        return turns
    role, text = turns[first]
    if media == "image" and n_images == 1 and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER + "\n" + text
    elif media == "video":
        if VIDEO_PLACEHOLDER not in text:
            text = VIDEO_PLACEHOLDER + "\n" + text
        text = text.replace(VIDEO_PLACEHOLDER + "\n", frame_prompt(n_images) + "\n")
    return turns[:first] + [(role, text)] + turns[first + 1 :]


def parse_turns(
    conversations: Any, template: Template, n_images: int = 0, media: str = "image", generation: bool = False
) -> tuple[list[tuple[str, str]], str | None]:
    """InternVL's conversation as the template's preprocessing sees it -> (role, text) turns, system message.

    `generation`: the conversation is a prompt to answer (it ends with a question and needs no answer).
    """
    turns, system = _turn_list(conversations)
    if n_images:
        turns = _add_media_placeholders(turns, n_images, media)
    if not template.free_turn_order:
        if turns[0][0] == "gpt":
            turns = turns[1:]  # "Skip the first one if it is not from human"
        for i, (role, _) in enumerate(turns):
            if role != ("human" if i % 2 == 0 else "gpt"):
                raise Rejected(
                    "bad_roles", f"turn {i} is {role}; turns must alternate human/gpt starting with human"
                )
    if template.strip_turns:
        turns = [(role, text.strip()) for role, text in turns]
        system = system.strip() if system is not None else None
    if generation and (not turns or turns[-1][0] != "human"):
        raise Rejected("bad_roles", "a generation prompt must end with a question")
    if not generation and not any(role == "gpt" for role, _ in turns):
        raise Rejected("bad_roles", "no assistant answer")
    check_placeholders(turns, n_images, media)
    return turns, system


def check_placeholders(turns: list[tuple[str, str]], n_images: int, media: str) -> None:
    """Reject reserved tokens typed in text, `<image>` in answers and a placeholder count != the images'."""
    for _, text in turns:
        for token in RESERVED:
            if token in text:
                raise Rejected("reserved_token_in_text", f"text contains {token}")
        if VIDEO_PLACEHOLDER in text and media == "video":
            raise Rejected(
                "placeholder_mismatch", "<video> not followed by a newline (InternVL replaces '<video>\\n')"
            )
    if any(IMAGE_PLACEHOLDER in text for role, text in turns if role == "gpt"):
        raise Rejected("placeholder_mismatch", "an answer contains <image>")
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if count != n_images:
        hint = (
            "; InternVL adds none for a list of images: write Image-1: <image>\\n..."
            if media == "images"
            else ""
        )
        raise Rejected("placeholder_mismatch", f"{count} <image> placeholders for {n_images} images{hint}")


def _with_image_tokens(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each `<image>` placeholder -> `<img><IMG_CONTEXT></img>` (the context token is expanded after tokenizing)."""
    image_text = IMG_START + IMG_CONTEXT + IMG_END
    return [(role, text.replace(IMAGE_PLACEHOLDER, image_text)) for role, text in turns]


class ConversationTokenizer:
    """Tokenizes conversations for one template; `tokenizer` is a fast Hugging Face tokenizer.

    Over-long samples (more than `max_len` tokens) are cut to `max_len` as InternVL's tokenizer truncation does
    (`too_long="truncate"`), unless the cut would fall inside or before an image's tokens (InternVL's
    "image tokens are truncated" assertion), which rejects the sample; `too_long="reject"` rejects them all.
    """

    def __init__(
        self, tokenizer: Any, template: Template, num_image_token: int = 256, too_long: str = "truncate"
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} is not a fast tokenizer; labels need "
                "offsets: save a fast version (AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        if too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"data.too_long={too_long!r}: use one of {TOO_LONG_POLICIES}")
        self.tokenizer = tokenizer
        self.template = template
        self.num_image_token = num_image_token
        self.too_long = too_long
        ids = tokenizer.convert_tokens_to_ids(list(RESERVED))
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path} lacks {RESERVED}: add InternVL's special tokens to it"
            )
        self.end_id, self.context_id = ids[1], ids[2]

    def __call__(
        self,
        conversations: Any,
        tiles_per_image: list[int],
        max_len: int | None = None,
        media: str | None = None,
    ) -> TokenizedSample:
        """`media`: how the record gave its pixels (MEDIA_KINDS); default "image" for one, "images" for more."""
        media = media or ("image" if len(tiles_per_image) <= 1 else "images")
        turns, system = parse_turns(conversations, self.template, len(tiles_per_image), media)
        pieces = self.template.pieces(_with_image_tokens(turns), system)
        text = "".join(p for p, _ in pieces)
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        targets = self._targets(pieces, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2))
        ids, targets = self._expand_images(ids, targets, tiles_per_image)
        truncated = max_len is not None and len(ids) > max_len
        if truncated:
            ids, targets = self._truncate(ids, targets, max_len, len(tiles_per_image))
        if not targets.any():
            raise Rejected(
                "no_supervised_tokens", "no answer tokens" + (" left after truncation" * truncated)
            )
        return TokenizedSample(ids.astype(np.int32), targets, truncated)

    def generation_prompt(
        self, conversations: Any, tiles_per_image: list[int], media: str | None = None
    ) -> np.ndarray:
        """Token ids (int64) of a conversation that ends with a question, followed by the assistant role: the
        prompt to generate its answer from, as InternVL's `chat` builds it (training's rendering and
        tokenization, image tokens expanded)."""
        media = media or ("image" if len(tiles_per_image) <= 1 else "images")
        turns, system = parse_turns(
            conversations, self.template, len(tiles_per_image), media, generation=True
        )
        text = self.template.generation_prompt(_with_image_tokens(turns), system)
        ids = np.asarray(self.tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
        ids, _ = self._expand_images(ids, np.zeros(len(ids), dtype=bool), tiles_per_image)
        return ids

    def _truncate(
        self, ids: np.ndarray, targets: np.ndarray, max_len: int, n_images: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.too_long == "reject":
            raise Rejected("too_long", f"{len(ids)} tokens > row length {max_len} (data.too_long=reject)")
        if np.count_nonzero(ids[:max_len] == self.end_id) != n_images:
            raise Rejected(
                "too_long", f"{len(ids)} tokens > row length {max_len} and the cut falls in an image's tokens"
            )
        return ids[:max_len], targets[:max_len]

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
        # A token from before an answer into it is not a target (InternVL's prefix lengths mask it); one from
        # inside an answer out of it cannot be labelled consistently.
        straddle = nonempty & supervised[first] & ~supervised[last]
        if straddle.any():
            i = int(np.flatnonzero(straddle)[0])
            raise Rejected(
                "tokenization_mismatch", f"token {i} spans chars {start[i]}..{end[i]} across an answer's end"
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

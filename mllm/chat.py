"""``mllm-chat PATH --image IMG "question"``: talk to a checkpoint. PATH is a trainer checkpoint
(``RUN_DIR/checkpoints/step_*``, or a run directory: its latest checkpoint), a native directory or a Hugging Face
directory of either format. Without a question it is interactive (``/image PATH``, ``/reset``, ``/quit``).

The prompt is built exactly as training builds samples: the checkpoint's template (``mllm.data.templates``), its
tokenizer, InternVL's dynamic tiling at the run's limits (``mllm.data.tiling``, full-resolution decode), each
image expanded to ``<img>`` + ``<IMG_CONTEXT>`` x tiles x tokens + ``</img>``. The weights go into transformers'
``InternVLForConditionalGeneration`` in memory (no export written) and ``generate`` decodes greedily with its KV
cache until ``<|im_end|>``, on the GPU when there is one.

``transformers_processor(HF_DIR)`` loads an export's processor (``mllm.convert.processor``) the way a user of
that export does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mllm.convert.errors import CheckpointError
from mllm.convert.processor import PROCESSOR_FILE, ImageSettings, image_settings_of
from mllm.data.batch import normalize_pixels
from mllm.data.conversation import IMAGE_PLACEHOLDER, ConversationTokenizer
from mllm.data.templates import get_template
from mllm.data.tiling import decode_tiles


class ChatError(ValueError):
    """A path, image or tokenizer that cannot be chatted with; one line naming it and the fix."""


def resolve_checkpoint(path: Path) -> Path:
    """A run directory becomes its latest complete checkpoint; other directories are used as they are."""
    from mllm.train.checkpoint import latest_checkpoint

    if not path.is_dir():
        raise ChatError(f"{path}: no such directory; pass a checkpoint, a run directory or an HF directory")
    latest = latest_checkpoint(path / "checkpoints")
    return latest if latest is not None else path


def tokenizer_dir_for(ckpt: Path) -> Path:
    from mllm.convert.trainer_checkpoint import is_trainer_checkpoint, tokenizer_dir_of

    if is_trainer_checkpoint(ckpt):
        found = tokenizer_dir_of(ckpt)
        if found is None:
            raise ChatError(f"{ckpt}: its run's data.tokenizer is not a local directory; export it with one")
        return found
    if not (ckpt / "tokenizer_config.json").is_file() and not (ckpt / "tokenizer.json").is_file():
        raise ChatError(f"{ckpt}: no tokenizer files next to the weights")
    return ckpt


def build_transformers_model(ckpt: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(transformers InternVLForConditionalGeneration with the checkpoint's weights, our ModelConfig)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from mllm.convert import transformers_native
    from mllm.convert.core import read_checkpoint

    sd, cfg = read_checkpoint(ckpt)
    config = InternVLConfig(**transformers_native.config_from_ours(cfg))
    hf_sd = transformers_native.state_dict_from_ours(dict(sd), cfg)
    model = InternVLForConditionalGeneration.from_pretrained(None, config=config, state_dict=hf_sd)
    return model.to(device=device, dtype=dtype).eval(), cfg


@dataclass
class Chat:
    """A conversation with one checkpoint: turns so far and the images of the first question."""

    model: Any
    tokenizer: Any
    conv: ConversationTokenizer
    image: ImageSettings
    tile_size: int
    device: torch.device
    end_ids: list[int]
    max_new_tokens: int = 256
    turns: list[dict[str, str]] = field(default_factory=list)
    tiles: list[torch.Tensor] = field(default_factory=list)  # uint8 tiles per image

    def add_image(self, path: Path) -> int:
        if not path.is_file():
            raise ChatError(f"{path}: no such image file")
        tiles = decode_tiles(
            path.read_bytes(), self.image.min_tiles, self.image.max_tiles, self.tile_size, True, False
        )
        self.tiles.append(torch.from_numpy(tiles))
        return len(tiles)

    def _user_turn(self, question: str) -> dict[str, str]:
        """The images go before the first question (InternVL's ``<image>\\n`` placement)."""
        if self.tiles and not self.turns and IMAGE_PLACEHOLDER not in question:
            question = "\n".join([IMAGE_PLACEHOLDER] * len(self.tiles)) + "\n" + question
        return {"from": "human", "value": question}

    def prompt_ids(self, question: str) -> torch.Tensor:
        """Token ids of the conversation so far + ``question`` + the assistant role (training's rendering and
        tokenization)."""
        turns = [*self.turns, self._user_turn(question)]
        return torch.from_numpy(self.conv.generation_prompt(turns, [len(t) for t in self.tiles]))[None]

    @torch.no_grad()
    def ask(self, question: str) -> str:
        ids = self.prompt_ids(question).to(self.device)
        images = {}
        if self.tiles:
            pixels = normalize_pixels(torch.cat(self.tiles).to(self.device))
            images["pixel_values"] = pixels.to(self.model.dtype)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **images,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answer = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        self.turns += [self._user_turn(question), {"from": "gpt", "value": answer}]
        return answer


def open_chat(path: str | Path, device: str = "auto", max_new_tokens: int = 256) -> Chat:
    from mllm.data.pipeline import load_tokenizer

    ckpt = resolve_checkpoint(Path(path))
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, cfg = build_transformers_model(ckpt, dev, dtype)
    tokenizer = load_tokenizer(str(tokenizer_dir_for(ckpt)))
    template = get_template(cfg.template)
    end = tokenizer.convert_tokens_to_ids(template.sep.strip())
    end_ids = [end] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, end) else [])
    return Chat(
        model,
        tokenizer,
        ConversationTokenizer(tokenizer, template, cfg.num_image_token),
        image_settings_of(ckpt) or ImageSettings(),
        cfg.vision.image_size,
        dev,
        end_ids,
        max_new_tokens,
    )


def transformers_processor(hf_dir: str | Path) -> Any:
    """The export's processor through ``AutoProcessor``. transformers' InternVL processor also loads a video
    processor, which needs torchvision; without torchvision the same processor class is built from the same
    files (PIL image backend, no video processor)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(hf_dir)
    except ValueError as exc:
        if "torchvision" not in str(exc):
            raise
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.internvl import InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, attribute_name, arg):
            if attribute_name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(attribute_name, arg)

    root = Path(hf_dir)
    template = (root / "chat_template.jinja").read_text()
    return ImageOnlyInternVLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(root, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(root),
        video_processor=None,
        image_seq_length=json.loads((root / PROCESSOR_FILE).read_text())["image_seq_length"],
        chat_template=template,
    )


def _lines(stream) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\n")


def interactive(chat: Chat, stream=None) -> None:
    print(
        "chat: type a question; /image PATH adds an image, /reset starts over, /quit (or end of input) ends"
    )
    for line in _lines(stream or sys.stdin):
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            chat.turns.clear()
            chat.tiles.clear()
            print("(conversation cleared)")
            continue
        if text.startswith("/image "):
            n = chat.add_image(Path(text.split(" ", 1)[1].strip()))
            print(f"(image added: {n} tiles)")
            continue
        print(chat.ask(text), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mllm-chat", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="trainer checkpoint, run directory, native or HF directory")
    p.add_argument("question", nargs="?", help="one question (omit for an interactive chat)")
    p.add_argument(
        "--image", action="append", default=[], help="an image for the first question (repeatable)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    args = p.parse_intermixed_args(argv)
    try:
        chat = open_chat(args.path, args.device, args.max_new_tokens)
        for image in args.image:
            chat.add_image(Path(image))
        if args.question is None:
            interactive(chat)
        else:
            print(chat.ask(args.question))
    except (ChatError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

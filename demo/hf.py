"""``make demo`` steps after training: trainer checkpoint -> our model -> transformers, and one question.

``load_checkpoint_model`` reads the trainer's DCP checkpoint (any tp/pp/dp layout, ``mllm.convert.trainer_checkpoint``) into
our single-device model in one process without a process group; ``mllm.hf.save`` then writes the transformers
format (``python -m mllm.convert export-hf STEP_DIR OUT --format transformers`` does both in one go).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mllm.hf
from mllm.convert.core import write_hf
from mllm.convert.trainer_checkpoint import read_trainer_checkpoint
from mllm.data.batch import normalize_pixels
from mllm.data.config import DataConfig
from mllm.data.conversation import ConversationTokenizer
from mllm.data.pipeline import load_tokenizer
from mllm.data.templates import get_template
from mllm.data.tiling import decode_tiles, per_image_max_tiles
from mllm.model.config import ModelConfig
from mllm.model.internvl import InternVLModel


def load_checkpoint_model(ckpt_dir: str | os.PathLike, cfg: ModelConfig | None = None) -> InternVLModel:
    """Our model (eval mode, fp32) with the weights of the trainer checkpoint ``ckpt_dir`` (a ``step_*`` dir).

    ``cfg``: the model config the run was trained with (the recipe's ``model``; default: the checkpoint's
    ``model_config.json``); a checkpoint of another model is refused with one line naming the tensors that do
    not fit. The same reader serves ``python -m mllm.convert export-hf`` (``mllm.convert.trainer_checkpoint``).
    """
    sd, cfg = read_trainer_checkpoint(ckpt_dir, cfg)
    return mllm.hf.model_from_state_dict(sd, cfg).eval()


def export_checkpoint_to_hf(
    ckpt_dir: str | os.PathLike, cfg: ModelConfig, out_dir: str | os.PathLike, tokenizer_dir: str | None
) -> Path:
    """Trainer checkpoint -> transformers ``InternVLForConditionalGeneration`` directory (+ tokenizer files)."""
    sd, cfg = read_trainer_checkpoint(ckpt_dir, cfg)
    return write_hf(sd, cfg, out_dir, "transformers", tokenizer_dir=tokenizer_dir)


# -- one question about a synthetic image ---------------------------------------------------------------------
@dataclass
class Question:
    sample_id: str
    image: Path
    question: str
    expected: str
    input_ids: torch.Tensor  # int64 [1, L]: system + question (image tokens expanded) + assistant role
    pixel_values: torch.Tensor  # float32 [tiles, 3, T, T], normalized


def pick_sample(data_dir: Path, dataset: str = "synth_en") -> dict[str, Any]:
    """The first single-image sample of ``dataset`` asking about a colour (else any single-image sample)."""
    records = [json.loads(line) for line in (data_dir / f"{dataset}.jsonl").read_text().splitlines() if line]
    single = [r for r in records if isinstance(r.get("image"), str)]
    if not single:
        raise ValueError(f"{data_dir / f'{dataset}.jsonl'}: no single-image sample to ask about")
    colour = [r for r in single if r["conversations"][0]["value"].split("\n")[-1].startswith("What colour")]
    return (colour or single)[0]


def build_question(data_dir: Path, data: DataConfig, dataset: str = "synth_en") -> Question:
    """The first question/answer turn of a synthetic sample as a generation prompt, tokenized and tiled exactly
    as training does (same template, tiling limits, tokenizer, image-token expansion)."""
    meta = json.loads((data_dir / "meta.json").read_text())[dataset]
    record = pick_sample(data_dir, dataset)
    turns = record["conversations"][:2]
    image = data_dir / meta["root"] / record["image"]
    budget = per_image_max_tiles(meta.get("max_dynamic_patch") or data.max_dynamic_patch, 1)
    lo = min(data.min_dynamic_patch, budget)
    tiles = decode_tiles(image.read_bytes(), lo, budget, data.tile_size, data.use_thumbnail, data.fast_decode)
    conv = ConversationTokenizer(
        load_tokenizer(data.tokenizer), get_template(data.template), data.num_image_token
    )
    sample = conv(turns, [len(tiles)])
    answer_start = int(sample.targets.argmax())  # the prompt ends with the assistant role, before the answer
    return Question(
        sample_id=record["id"],
        image=image,
        question=turns[0]["value"].replace("<image>\n", ""),
        expected=turns[1]["value"],
        input_ids=torch.from_numpy(sample.input_ids[:answer_start].astype("int64"))[None],
        pixel_values=normalize_pixels(torch.from_numpy(tiles)),
    )


@torch.no_grad()
def our_logits(model: InternVLModel, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    segment_ids = torch.ones_like(input_ids)
    return model(input_ids, pixel_values, segment_ids=segment_ids).logits


@torch.no_grad()
def transformers_logits(hf_model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(input_ids)
    return hf_model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values).logits


@torch.no_grad()
def transformers_answer(
    hf_model: Any, tokenizer: Any, q: Question, end_token: str, max_new_tokens: int = 24
) -> tuple[str, int]:
    """Greedy ``generate`` from transformers; returns (decoded answer, number of new tokens)."""
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    out = hf_model.generate(
        input_ids=q.input_ids,
        attention_mask=torch.ones_like(q.input_ids),
        pixel_values=q.pixel_values,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=end_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new = out[0, q.input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


@torch.no_grad()
def processor_chat(
    hf_dir: Path, image: Path, question: str, max_new_tokens: int = 24
) -> tuple[str, torch.Tensor]:
    """What a user of the export does: its processor renders the chat (template, tiling, image tokens) and
    ``generate`` stops at the generation config's end token. Returns (answer, the prompt's input_ids)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from mllm.chat import transformers_processor

    processor = transformers_processor(hf_dir)
    model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": question}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return answer, inputs["input_ids"]

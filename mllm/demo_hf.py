"""``make demo`` steps after training: trainer checkpoint -> our model -> transformers, and one question.

``load_checkpoint_model`` is the minimal path from the trainer's DCP checkpoint (any tp/pp/dp layout; tensors are
stored unsharded under single-device names ``model/<name>``, see ``mllm.train.state``) to our single-device
model, read in one process without a process group. ``mllm.hf.save`` then writes the transformers format.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import mllm.hf
from mllm.convert.core import expected_shapes
from mllm.convert.errors import CheckpointError, name_a_few
from mllm.data.batch import normalize_pixels
from mllm.data.config import DataConfig
from mllm.data.conversation import ConversationTokenizer
from mllm.data.pipeline import load_tokenizer
from mllm.data.templates import get_template
from mllm.data.tiling import decode_tiles, per_image_max_tiles
from mllm.model.config import ModelConfig
from mllm.model.internvl import InternVLModel

MODEL_PREFIX = "model/"


def load_checkpoint_model(ckpt_dir: str | os.PathLike, cfg: ModelConfig) -> InternVLModel:
    """Our model (eval mode, fp32) with the weights of the trainer checkpoint ``ckpt_dir`` (a ``step_*`` dir).

    ``cfg`` is the model config the run was trained with (the recipe's ``model``); a checkpoint of another
    model is refused with one line naming the tensors that do not fit.
    """
    path = Path(ckpt_dir)
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: not a trainer checkpoint (no .metadata); pass RUN_DIR/checkpoints/step_XXXXXXXX"
        )
    reader = dcp.FileSystemReader(str(path))
    stored = {
        k[len(MODEL_PREFIX) :]: tuple(v.size)
        for k, v in reader.read_metadata().state_dict_metadata.items()
        if k.startswith(MODEL_PREFIX)
    }
    shapes = expected_shapes(cfg)
    if cfg.text.tie_word_embeddings:  # one tensor, saved under the embedding's name
        shapes.pop("lm_head.weight", None)
    missing = [k for k in shapes if k not in stored]
    wrong = [
        f"{k} {stored[k]} != {shape}" for k, shape in shapes.items() if k in stored and stored[k] != shape
    ]
    if missing or wrong:
        problem = f"missing {name_a_few(missing)}" if missing else f"shapes differ: {name_a_few(wrong, 3)}"
        raise CheckpointError(
            f"{path}: does not hold the recipe's model ({problem}); export with the run's recipe"
        )
    tensors = {MODEL_PREFIX + k: torch.empty(shape, dtype=torch.float32) for k, shape in shapes.items()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    sd = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items()}
    if cfg.text.tie_word_embeddings:
        sd["lm_head.weight"] = sd["llm.embed_tokens.weight"]
    return mllm.hf.model_from_state_dict(sd, cfg).eval()


def export_checkpoint_to_hf(
    ckpt_dir: str | os.PathLike, cfg: ModelConfig, out_dir: str | os.PathLike, tokenizer_dir: str | None
) -> Path:
    """Trainer checkpoint -> transformers ``InternVLForConditionalGeneration`` directory (+ tokenizer files)."""
    model = load_checkpoint_model(ckpt_dir, cfg)
    return mllm.hf.save(model, out_dir, format="transformers", tokenizer_dir=tokenizer_dir)


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

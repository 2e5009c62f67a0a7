"""The processor half of a transformers-native export: what ``AutoProcessor.from_pretrained(dir)`` needs to turn
a chat with an image into the model's inputs exactly as training did.

- ``preprocessor_config.json``: transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches`` - InternVL's
  dynamic tiling (closest aspect-ratio grid of min..max tiles, a thumbnail when there is more than one tile),
  ImageNet mean/std, bicubic resize - at the model's tile size and the run's tile limits.
- ``processor_config.json``: ``InternVLProcessor`` with ``image_seq_length`` = image tokens per tile; it expands
  each ``<IMG_CONTEXT>`` of the rendered chat into ``<img>`` + ``<IMG_CONTEXT>`` x tiles x tokens + ``</img>``.
- ``chat_template.jinja``: the training template (``mllm.data.templates``), system message included, an image
  as ``<IMG_CONTEXT>\\n`` before the text (InternVL's ``<image>\\n`` placement).
- ``tokenizer_config.json``: the image tokens named (``start_image_token``, ...) as InternVLProcessor reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.data.batch import IMAGENET_MEAN, IMAGENET_STD
from mllm.data.conversation import IMG_CONTEXT, IMG_END, IMG_START
from mllm.data.templates import Template, get_template
from mllm.model.config import ModelConfig

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VIDEO_TOKEN = "<video>"  # InternVLProcessor requires the attribute; our models are trained without video
NAMED_IMAGE_TOKENS = {  # tokenizer attributes InternVLProcessor reads
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO_TOKEN,
}


@dataclass(frozen=True)
class ImageSettings:
    """Tiling limits of the run (``data.min_dynamic_patch`` / ``max_dynamic_patch``); InternVL 1.5's default."""

    min_tiles: int = 1
    max_tiles: int = 12


def image_settings_of(directory: Path) -> ImageSettings | None:
    """The tiling limits a directory records: a trainer checkpoint's ``config.yaml`` (``data.*_dynamic_patch``)
    or an exported ``preprocessor_config.json``; None when it records neither."""
    run_yaml, pre = directory / "config.yaml", directory / PREPROCESSOR_FILE
    if run_yaml.is_file():
        from omegaconf import OmegaConf

        data = OmegaConf.load(run_yaml).get("data", {})
        return ImageSettings(int(data.get("min_dynamic_patch", 1)), int(data.get("max_dynamic_patch", 12)))
    if pre.is_file():
        config = json.loads(pre.read_text())
        return ImageSettings(int(config.get("min_patches", 1)), int(config.get("max_patches", 12)))
    return None


def chat_template(template: Template) -> str:
    """A Jinja chat template that renders exactly ``template.generation_prompt`` of the same turns (the
    assistant role after them, as ``mllm.chat`` and InternVL's ``chat`` do): each message's text stripped under
    the templates that strip turns, an empty message as its role alone under the others but internvl2_5."""
    system_open = template.system_template.split("{system_message}")[0]
    quote = json.dumps  # Jinja string literals accept JSON's escapes
    trim = " | trim" if template.strip_turns else ""
    text_and_sep = "{{- text + " + quote(template.sep) + " -}}"
    if not template.free_turn_order:  # InternVL's get_prompt: an empty message is its role alone
        text_and_sep = "{%- if text -%}" + text_and_sep + "{%- endif -%}"
    return (
        "{%- set system = " + quote(template.system_message) + " -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}\n"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
        "else messages[0]['content'][0]['text'] -%}\n"
        "{%- set messages = messages[1:] -%}\n"
        "{%- endif -%}\n"
        "{{- bos_token if bos_token else '' -}}\n"
        "{{- " + quote(system_open) + " + (system" + trim + ") + " + quote(template.sep) + " -}}\n"
        "{%- for message in messages -%}\n"
        "{%- set ns = namespace(text='') -%}\n"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}\n"
        "{%- else -%}{%- for item in message['content'] -%}\n"
        "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + "
        + quote(IMG_CONTEXT + "\n")
        + " -%}\n"
        "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}\n"
        "{%- endfor -%}{%- endif -%}\n"
        "{%- set text = ns.text" + trim + " -%}\n"
        "{%- if message['role'] == 'assistant' -%}{{- " + quote(template.assistant_role) + " -}}\n"
        "{%- else -%}{{- " + quote(template.user_role) + " -}}{%- endif -%}\n" + text_and_sep + "\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- " + quote(template.assistant_role) + " -}}{%- endif -%}\n"
    )


def preprocessor_config(cfg: ModelConfig, image: ImageSettings) -> dict[str, Any]:
    size = cfg.vision.image_size
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": image.min_tiles,
        "max_patches": image.max_tiles,
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 3,  # bicubic, as InternVL's build_transform
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def tokenizer_config_with_image_tokens(src: Path) -> dict[str, Any] | None:
    """The source's tokenizer_config.json with the image tokens named for InternVLProcessor (None without one).
    A list of extra special tokens moves to ``additional_special_tokens`` (still special)."""
    path = src / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict) and NAMED_IMAGE_TOKENS.items() <= extra.items():
        return config  # already named (e.g. an export of an export)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
        extra = {}
    config["extra_special_tokens"] = {**(extra or {}), **NAMED_IMAGE_TOKENS}
    return config


def processor_files(cfg: ModelConfig, tokenizer_dir: Path, image: ImageSettings | None) -> dict[str, str]:
    """{file name: text} to write next to a transformers-native export (its tokenizer files come from
    ``tokenizer_dir``); empty when the tokenizer has no tokenizer_config.json to extend."""
    tok_config = tokenizer_config_with_image_tokens(tokenizer_dir)
    if tok_config is None:
        return {}
    image = image or ImageSettings()
    unchanged = tok_config == json.loads((tokenizer_dir / TOKENIZER_CONFIG_FILE).read_text())
    tokenizer = (
        {}
        if unchanged
        else {TOKENIZER_CONFIG_FILE: json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"}
    )
    return {
        **tokenizer,
        PREPROCESSOR_FILE: json.dumps(preprocessor_config(cfg, image), indent=2) + "\n",
        PROCESSOR_FILE: json.dumps(
            {"processor_class": "InternVLProcessor", "image_seq_length": cfg.num_image_token}, indent=2
        )
        + "\n",
        CHAT_TEMPLATE_FILE: chat_template(get_template(cfg.template)),
    }

"""`synth`: a small deterministic bilingual image-conversation dataset, a tiny tokenizer and a meta JSON.

Images show coloured shapes at positions and in counts; questions and answers (English or Chinese) depend on
the image, so a tiny model can learn them. Used by the demo and the tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from mllm.data.templates import TEMPLATES

COLOURS = {
    "red": ("红色", (220, 30, 30)),
    "green": ("绿色", (30, 170, 60)),
    "blue": ("蓝色", (30, 60, 220)),
    "yellow": ("黄色", (235, 210, 20)),
    "purple": ("紫色", (140, 40, 170)),
    "orange": ("橙色", (245, 140, 20)),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SIDES = {"left": "左", "right": "右", "top": "上", "bottom": "下"}
NUMBERS_ZH = "零一二三四五六七八九"
SPECIAL_TOKENS = [
    "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip
VOCAB_SIZE = 1000


@dataclass
class SynthInfo:
    out_dir: Path
    meta: Path
    tokenizer: Path
    vocab_size: int
    num_samples: int


def _draw(rng: random.Random, shapes: list[tuple[str, str, str]]) -> Image.Image:
    """Draw (shape, colour, side) items on a light background of random size and aspect ratio."""
    w, h = rng.randint(64, 700), rng.randint(64, 700)
    img = Image.new("RGB", (w, h), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    r = max(6, min(w, h) // 8)
    for i, (shape, colour, side) in enumerate(shapes):
        cx = {"left": w // 4, "right": 3 * w // 4}.get(side, w // 2)
        cy = {"top": h // 4, "bottom": 3 * h // 4}.get(side, h // 2)
        if side == "any":
            cx = (i + 1) * w // (len(shapes) + 1)
            cy = h // 2 + rng.randint(-h // 6, h // 6)
        fill = COLOURS[colour][1]
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _single(rng: random.Random, zh: bool) -> tuple[list, list[tuple[str, str, str]]]:
    shape, colour, side = rng.choice(list(SHAPES)), rng.choice(list(COLOURS)), rng.choice(list(SIDES))
    if zh:
        qa = [
            (f"图中的{SHAPES[shape]}是什么颜色？", f"{COLOURS[colour][0]}。"),
            (f"{SHAPES[shape]}在图的哪一边？", f"在{SIDES[side]}边。"),
            ("图中是什么形状？", f"{COLOURS[colour][0]}的{SHAPES[shape]}。"),
        ]
    else:
        qa = [
            (f"What colour is the {shape}?", f"The {shape} is {colour}."),
            (f"Where is the {shape}?", f"It is on the {side}."),
            ("What shape is in the image?", f"A {colour} {shape}."),
        ]
    rng.shuffle(qa)
    return qa[: rng.randint(1, 3)], [(shape, colour, side)]


def _count(rng: random.Random, zh: bool) -> tuple[list, list[tuple[str, str, str]]]:
    shape, colour, n = rng.choice(list(SHAPES)), rng.choice(list(COLOURS)), rng.randint(1, 5)
    if zh:
        qa = [(f"图中有几个{SHAPES[shape]}？", f"{NUMBERS_ZH[n]}个{COLOURS[colour][0]}的{SHAPES[shape]}。")]
    else:
        qa = [
            (
                f"How many {shape}s are there?",
                f"There {'is' if n == 1 else 'are'} {n} {colour} {shape}{'s' * (n > 1)}.",
            )
        ]
    return qa, [(shape, colour, "any")] * n


def _conversation(qa: list[tuple[str, str]]) -> list[dict]:
    conv = []
    for q, a in qa:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


def _image_samples(rng: random.Random, n: int, zh: bool, image_dir: Path, prefix: str, bar) -> list[dict]:
    records = []
    for i in range(n):
        if i % 10 == 9:  # two images: which has more shapes
            counts = [rng.randint(1, 4), rng.randint(1, 4)]
            while counts[0] == counts[1]:
                counts[1] = rng.randint(1, 4)
            names = []
            for j, c in enumerate(counts):
                shape, colour = rng.choice(list(SHAPES)), rng.choice(list(COLOURS))
                name = f"{prefix}_{i:05d}_{j}.jpg"
                _draw(rng, [(shape, colour, "any")] * c).save(image_dir / name, quality=90)
                names.append(name)
            more = 0 if counts[0] > counts[1] else 1
            q = "哪张图里的形状更多？" if zh else "Which image has more shapes?"
            a = ("第一张。", "第二张。")[more] if zh else ("The first image.", "The second image.")[more]
            q = f"Image-1: <image>\nImage-2: <image>\n{q}"
            records.append({"id": f"{prefix}_{i}", "image": names, "conversations": _conversation([(q, a)])})
        else:
            qa, shapes = (_count if i % 3 == 2 else _single)(rng, zh)
            ext = "png" if i % 5 == 4 else "jpg"
            name = f"{prefix}_{i:05d}.{ext}"
            img = _draw(rng, shapes)
            img.save(image_dir / name, **({"quality": 90} if ext == "jpg" else {}))
            conv = _conversation(qa)
            if rng.random() < 0.5:  # half carry an explicit placeholder, the rest rely on the auto-prepend
                conv[0]["value"] = "<image>\n" + conv[0]["value"]
            records.append({"id": f"{prefix}_{i}", "image": name, "conversations": conv})
        bar.update(1)
    return records


def _text_samples(rng: random.Random, n: int) -> list[dict]:
    records = []
    for i in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if i % 2:
            qa = [(f"{a}加{b}等于多少？", f"等于{a + b}。")]
        else:
            qa = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
        records.append({"id": f"text_{i}", "conversations": _conversation(qa)})
    return records


def build_tokenizer(corpus: list[str], out_dir: Path) -> int:
    """Train a small byte-level BPE (any text encodes) and save it as a HF fast tokenizer; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=1 << 20,
    )
    fast.save_pretrained(str(out_dir))
    return len(fast)


def synth(out_dir: str | Path, num_samples: int = 1000, seed: int = 0, progress: bool = True) -> SynthInfo:
    """Write OUT/images, OUT/synth_{en,zh,text}.jsonl, OUT/meta.json, OUT/tokenizer and OUT/info.json."""
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_img = max(2, int(num_samples * 0.45))
    n_text = max(2, num_samples - 2 * n_img)
    with tqdm(total=2 * n_img, desc="synth images", unit="sample", disable=not progress) as bar:
        datasets = {
            "synth_en": _image_samples(rng, n_img, False, image_dir, "en", bar),
            "synth_zh": _image_samples(rng, n_img, True, image_dir, "zh", bar),
            "synth_text": _text_samples(rng, n_text),
        }
    meta = {}
    for name, records in datasets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        meta[name] = {
            "root": "images",
            "annotation": f"{name}.jsonl",
            "data_augment": False,
            "repeat_time": 1,
            "length": len(records),
        }
    meta["synth_zh"]["max_dynamic_patch"] = 6
    meta["synth_text"]["repeat_time"] = 0.5
    (out / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    corpus = [t["value"] for recs in datasets.values() for r in recs for t in r["conversations"]]
    corpus += [t.system_message for t in TEMPLATES.values()] + ["system user assistant Image-1: Image-2:\n"]
    vocab = build_tokenizer(corpus, out / "tokenizer")
    total = sum(len(r) for r in datasets.values())
    (out / "info.json").write_text(json.dumps({"vocab_size": vocab, "num_samples": total, "seed": seed}))
    return SynthInfo(out, out / "meta.json", out / "tokenizer", vocab, total)

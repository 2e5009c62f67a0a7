"""Our conversations -> (ids, labels) equal InternVL's own preprocessing functions, per template.

InternVL's functions are copied verbatim in `internvl_reference.py` (MIT). Each template is paired with a tiny
byte-level BPE tokenizer that encodes like the tokenizer family the template is trained with, because InternVL's
label arithmetic counts tokens of separately tokenized pieces and assumes that family's special-token handling:
internlm2-chat adds `<s>` (InternLM2), Hermes-2 adds nothing (Yi/Qwen style), internvl2_5 is used with both
(Qwen2.5: nothing; InternLM2.5: `<s>` with `add_bos_token`), and phi3-chat's -1/-2 offsets assume Phi-3's slow
Llama tokenizer, which puts one extra token (the "▁" dummy prefix) after `<s>` when a string starts with a special
token; the phi3 tokenizer here emulates that with a special "▁" token after `<s>`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from internvl_reference import get_preprocess_function
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mllm.data.conversation import ConversationTokenizer, Rejected, frame_prompt
from mllm.data.templates import TEMPLATES, get_template

NUM_IMAGE_TOKEN = 4
SPECIAL = [
    "<s>", "</s>", "<pad>", "▁", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip
# post-processor and InternVL's `add_bos_token` per tokenizer family
FAMILIES = {
    "bos": ("<s> $A", True),
    "none": ("$A", False),
    "phi3": ("<s> ▁ $A", False),
}
CASES = {  # template -> tokenizer families it is used with
    "internlm2-chat": ["bos"],
    "Hermes-2": ["none"],
    "internvl2_5": ["none", "bos"],
    "phi3-chat": ["phi3"],
}


def turns(*values, first="human"):
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


# name -> (record, tiles per image); every record is something InternVL trains.
RECORDS = {
    "whitespace": (
        {"image": "a.jpg", "conversations": turns("  What colour is the circle? \n", " A red circle.\n")},
        [3],
    ),
    "multi_turn_placeholder": (
        {
            "image": "a.jpg",
            "conversations": turns("<image>\nWhat shape?", "A square. ", "\tWhere is it?", "On the left.  "),
        },
        [1],
    ),
    "answer_leading_newline": (
        {"image": "a.jpg", "conversations": turns("Describe it.", "\n\nThe circle is red.")},
        [2],
    ),
    "gpt_first": ({"conversations": turns("Hello.", "What colour?", "Red.", first="gpt")}, []),
    "empty_image_is_text": ({"image": "", "conversations": turns("1 plus 1?", " 2.")}, []),
    "text_chinese": ({"conversations": turns("图中的圆是什么颜色？", "红色。\n")}, []),
    "multi_image": (
        {
            "image": ["a.jpg", "b.jpg"],
            "conversations": turns("Image-1: <image>\nImage-2: <image>\nWhich has more?", "The first image."),
        },
        [2, 3],
    ),
    "video": (
        {"video": "v.mp4", "conversations": turns("What happens?", "A ball rolls.")},
        [1, 1, 1],
    ),
}


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    corpus = [t["value"] for rec, _ in RECORDS.values() for t in rec["conversations"]]
    corpus += [t.system_message for t in TEMPLATES.values()] + ["system user assistant Frame-1: Image-2:\n"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
        model_max_length=1 << 20,
    )
    template, add_bos = FAMILIES[family]
    fast.add_bos_token = add_bos  # read by preprocess_internvl2_5
    names = [t for t in ("<s>", "▁") if t in template]
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in names]
    )  # after add_bos_token, which resets it
    assert fast("x").input_ids[: len(names)] == fast.convert_tokens_to_ids(names)
    return fast


@pytest.fixture(scope="module")
def tokenizers():
    return {family: _tokenizer(family) for family in FAMILIES}


def internvl_item(template: str, record: dict, tiles: list[int], tok, max_len: int | None = None):
    """What InternVL's LazySupervisedDataset.*_get_item does with the conversation (its placeholder rules and
    preprocess call, internvl_chat_finetune.py), without the pixels -> (input_ids, labels) as numpy."""
    record = copy.deepcopy(record)
    conv = record["conversations"]
    tok.model_max_length = max_len or 1 << 20
    kwargs = dict(group_by_length=False, use_packed_ds=True, ds_name="test")
    preprocess = get_preprocess_function(template)
    if record.get("image"):
        if isinstance(record["image"], list):  # multi_modal_multi_image_get_item: no placeholder added
            tokens = [NUM_IMAGE_TOKEN * t for t in tiles]
            ret = preprocess(template, [conv], tok, tokens, num_image=len(tiles), **kwargs)
        else:  # multi_modal_get_item
            if "<image>" not in conv[0]["value"]:
                conv[0]["value"] = "<image>\n" + conv[0]["value"]
            ret = preprocess(template, [conv], tok, [NUM_IMAGE_TOKEN * tiles[0]], **kwargs)
    elif record.get("video"):  # video_get_item: one tile per frame
        if "<video>" not in conv[0]["value"]:
            conv[0]["value"] = "<video>\n" + conv[0]["value"]
        conv[0]["value"] = conv[0]["value"].replace("<video>\n", frame_prompt(len(tiles)) + "\n")
        ret = preprocess(
            template, [conv], tok, [NUM_IMAGE_TOKEN] * len(tiles), num_image=len(tiles), **kwargs
        )
    else:  # pure_text_get_item
        ret = preprocess(template, [conv], tok, [NUM_IMAGE_TOKEN], text_only=True, **kwargs)
    return np.asarray(ret["input_ids"][0]), np.asarray(ret["labels"][0])


def ours(template: str, record: dict, tiles: list[int], tok, max_len: int | None = None):
    media = "video" if record.get("video") else "images" if isinstance(record.get("image"), list) else "image"
    sample = ConversationTokenizer(tok, get_template(template), NUM_IMAGE_TOKEN)(
        record["conversations"], tiles, max_len=max_len, media=media
    )
    ids = sample.input_ids.astype(np.int64)
    return ids, np.where(sample.targets, ids, -100), sample


PAIRS = [(t, f) for t, families in CASES.items() for f in families]


@pytest.mark.parametrize("template,family", PAIRS)
@pytest.mark.parametrize("name", list(RECORDS))
def test_ids_and_labels_equal_internvl(tokenizers, template, family, name):
    record, tiles = RECORDS[name]
    tok = tokenizers[family]
    ref_ids, ref_labels = internvl_item(template, record, tiles, tok)
    ids, labels, _ = ours(template, record, tiles, tok)
    assert (ref_labels != -100).any(), "InternVL masked the whole sample: the case would test nothing"
    assert np.array_equal(ids, ref_ids), tok.decode(ref_ids)
    assert np.array_equal(labels, ref_labels)


@pytest.mark.parametrize("template,family", PAIRS)
def test_whitespace_is_kept_except_under_internlm2_chat(tokenizers, template, family):
    record, tiles = RECORDS["whitespace"]
    tok = tokenizers[family]
    _, labels, _ = ours(template, record, tiles, tok)
    supervised = tok.decode(labels[labels != -100].tolist())
    end = get_template(template).sep.rstrip("\n")
    answer = "A red circle." if template == "internlm2-chat" else " A red circle.\n"
    assert supervised == answer + end


def test_system_turn_as_internvl2_5(tokenizers):
    # Only preprocess_internvl2_5 reads a system turn (the others fail on it); it keeps it verbatim.
    record = {"conversations": [{"from": "system", "value": " Be brief. "}] + turns("What is it?", "A dot.")}
    tok = tokenizers["none"]
    ref_ids, ref_labels = internvl_item("internvl2_5", record, [], tok)
    ids, labels, _ = ours("internvl2_5", record, [], tok)
    assert np.array_equal(ids, ref_ids) and np.array_equal(labels, ref_labels)
    assert tok.decode(ids.tolist()).startswith("<|im_start|>system\n Be brief. <|im_end|>\n")


@pytest.mark.parametrize("template,family", PAIRS)
@pytest.mark.parametrize("name", ["multi_turn_placeholder", "text_chinese"])
def test_truncation_equals_internvl(tokenizers, template, family, name):
    record, tiles = RECORDS[name]
    tok = tokenizers[family]
    full, _, _ = ours(template, record, tiles, tok)
    max_len = len(full) - 2  # cuts into the last answer
    ref_ids, ref_labels = internvl_item(template, record, tiles, tok, max_len)
    ids, labels, sample = ours(template, record, tiles, tok, max_len)
    assert sample.truncated and len(ids) == max_len
    assert np.array_equal(ids, ref_ids) and np.array_equal(labels, ref_labels)


def test_a_cut_inside_image_tokens_rejects(tokenizers):
    record, tiles = RECORDS["multi_image"]
    tok = tokenizers["bos"]
    full, _, _ = ours("internlm2-chat", record, tiles, tok)
    last_image_end = int(np.flatnonzero(full == tok.convert_tokens_to_ids("</img>"))[-1])
    with pytest.raises(Rejected, match="image's tokens") as e:
        ours("internlm2-chat", record, tiles, tok, max_len=last_image_end)
    assert e.value.reason == "too_long"
    ids, _, sample = ours("internlm2-chat", record, tiles, tok, max_len=len(full) - 1)
    assert sample.truncated and len(ids) == len(full) - 1
    conv = ConversationTokenizer(tok, get_template("internlm2-chat"), NUM_IMAGE_TOKEN, too_long="reject")
    with pytest.raises(Rejected, match="too_long=reject"):
        conv(record["conversations"], tiles, max_len=len(full) - 1, media="images")


def test_multi_image_without_placeholders_is_rejected_as_internvl_fails_it(tokenizers):
    # InternVL adds no placeholder for a list of images; its "image tokens are truncated" assertion then fails.
    record = {"image": ["a.jpg", "b.jpg"], "conversations": turns("Which has more?", "The first.")}
    with pytest.raises(Rejected, match="Image-1") as e:
        ours("internvl2_5", record, [1, 1], tokenizers["none"])
    assert e.value.reason == "placeholder_mismatch"


@pytest.mark.parametrize("template,family", PAIRS)
def test_a_question_after_the_last_answer_is_kept_unsupervised(tokenizers, template, family):
    # docs/data.md: InternVL supervises it (internlm2-chat) or masks the whole sample (Hermes-2, phi3-chat);
    # internvl2_5 keeps it unsupervised, as we do for every template. The ids are InternVL's in every case.
    record = {"conversations": turns("1 plus 1?", "2.", "And 2 plus 2?")}
    tok = tokenizers[family]
    ref_ids, ref_labels = internvl_item(template, record, [], tok)
    ids, labels, _ = ours(template, record, [], tok)
    answered_ids, answered_labels, _ = ours(template, {"conversations": turns("1 plus 1?", "2.")}, [], tok)
    n = len(answered_ids)
    assert np.array_equal(ids, ref_ids) and np.array_equal(ids[:n], answered_ids)
    assert np.array_equal(labels[:n], answered_labels) and (labels[n:] == -100).all()
    if template == "internvl2_5":
        assert np.array_equal(labels, ref_labels)

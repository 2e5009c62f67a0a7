"""Templates, <image> expansion, labels and explicit rejections."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from mllm.data.batch import shifted_labels
from mllm.data.conversation import ConversationTokenizer, Rejected
from mllm.data.templates import INTERNVL_SYSTEM, Template, get_template


@pytest.fixture(scope="module")
def tok(synth_dir):
    return AutoTokenizer.from_pretrained(str(synth_dir.tokenizer))


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def render(name, turns):
    return "".join(p for p, _ in get_template(name).pieces(turns))


def test_template_strings():
    turns = [("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]
    assert render("internlm2-chat", turns) == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1"
        "<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>"
    )
    assert render("Hermes-2", turns) == render("internlm2-chat", turns)
    assert render("internvl2_5", turns[:2]) == (
        "<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
        "<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
    )
    assert render("phi3-chat", turns[:2]) == (
        f"<|system|>\n{INTERNVL_SYSTEM}<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|>"
    )
    with pytest.raises(ValueError, match="data.template"):
        get_template("vicuna")


@pytest.mark.parametrize("template", ["internlm2-chat", "internvl2_5", "Hermes-2", "phi3-chat"])
def test_labels_only_on_answers_and_end_token(tok, template):
    ct = ConversationTokenizer(tok, get_template(template), num_image_token=4)
    sample = ct(
        conv("<image>\nWhat colour is the circle?", "The circle is red.", "Where?", "图中的圆在左边。"), [3]
    )
    # The end token is supervised; internvl2_5's newline after it is not (InternVL ignores it too).
    end = get_template(template).sep.rstrip("\n")
    supervised = tok.decode(sample.input_ids[sample.targets].tolist())
    assert supervised == "The circle is red." + end + "图中的圆在左边。" + end
    assert sample.input_ids[0] == tok.bos_token_id
    # shifted: the label at t is the next token when that token is supervised
    labels = shifted_labels(sample.input_ids.astype(np.int64), sample.targets)
    t = np.flatnonzero(sample.targets)
    assert np.array_equal(labels[t - 1], sample.input_ids[t]) and labels[-1] == -100
    assert (labels != -100).sum() == sample.targets.sum()


def test_image_expansion_and_prepend(tok):
    ct = ConversationTokenizer(tok, get_template("internlm2-chat"), num_image_token=4)
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    with_placeholder = ct(conv("<image>\nWhat is it?", "A square."), [5])
    without = ct(conv("What is it?", "A square."), [5])
    assert np.array_equal(with_placeholder.input_ids, without.input_ids)  # "<image>\n" prepended
    x = without.input_ids
    ctx = np.flatnonzero(x == ids("<IMG_CONTEXT>"))
    assert len(ctx) == 4 * 5 and np.all(np.diff(ctx) == 1)
    assert x[ctx[0] - 1] == ids("<img>") and x[ctx[-1] + 1] == ids("</img>")
    assert not without.targets[ctx].any()
    two = ct(conv("Image-1: <image>\nImage-2: <image>\nWhich?", "The first."), [2, 1])
    assert (two.input_ids == ids("<IMG_CONTEXT>")).sum() == 4 * 3
    text_only = ct(conv("1 plus 1?", "2."), [])
    assert (text_only.input_ids == ids("<IMG_CONTEXT>")).sum() == 0


@pytest.mark.parametrize(
    "conversations,tiles,reason",
    [
        ([], [1], "empty_conversation"),
        (conv("<image>\n<image>\nq", "a"), [1], "placeholder_mismatch"),
        (conv("q", "a <image>"), [1], "placeholder_mismatch"),
        (conv("<image>\nq", "a"), [], "placeholder_mismatch"),
        (conv("look <IMG_CONTEXT>", "a"), [], "reserved_token_in_text"),
        ([{"from": "gpt", "value": "a"}], [], "bad_roles"),
        ([{"from": "human", "value": "q"}], [], "bad_roles"),
        ([{"from": "human"}], [], "bad_annotation"),
        (conv("<image>\nq", "a"), [40], "too_long"),  # a cut never falls in an image's tokens
    ],
)
def test_rejections(tok, conversations, tiles, reason):
    ct = ConversationTokenizer(tok, get_template("internlm2-chat"), num_image_token=4)
    with pytest.raises(Rejected) as e:
        ct(conversations, tiles, max_len=150)
    assert e.value.reason == reason


def test_token_across_an_answer_start_is_masked_across_its_end_rejected(tok):
    # A role ending in a space: byte-level BPE glues " circle" into one token that starts before the answer;
    # InternVL's prefix-length arithmetic masks such a token, and so do we.
    t = Template("r", "{system_message}", "s", "<|im_start|>user\n", "<|im_start|>assistant ", "<|im_end|>")
    sample = ConversationTokenizer(tok, t, num_image_token=4)(conv("q", "circle is red."), [])
    assert tok.decode(sample.input_ids[sample.targets].tolist()) == " is red.<|im_end|>"
    # Without an end token, a user role of plain text glues onto the answer's last word: rejected.
    t = Template("e", "{system_message}", "s", "ircle\n", "<|im_start|>assistant\n", "")
    with pytest.raises(Rejected) as e:
        ConversationTokenizer(tok, t, num_image_token=4)(conv("q", "The c", "q", "a"), [])  # " circle"
    assert e.value.reason == "tokenization_mismatch"


def test_system_turn_overrides_default(tok):
    ct = ConversationTokenizer(tok, get_template("internlm2-chat"), num_image_token=4)
    sample = ct([{"from": "system", "value": "Be brief."}] + conv("q", "a"), [])
    assert tok.decode(sample.input_ids.tolist()).startswith("<s><|im_start|>system\nBe brief.<|im_end|>")


def test_turns_are_stripped_like_internvl(tok):
    ct = ConversationTokenizer(tok, get_template("internlm2-chat"), num_image_token=4)
    padded = ct(conv("  <image>\nWhat colour is the circle? \n", "\nThe circle is red.\n  "), [1])
    clean = ct(conv("<image>\nWhat colour is the circle?", "The circle is red."), [1])
    assert np.array_equal(padded.input_ids, clean.input_ids)
    assert np.array_equal(padded.targets, clean.targets)


@pytest.mark.parametrize("template", ["internlm2-chat", "internvl2_5", "Hermes-2", "phi3-chat"])
def test_generation_prompt_is_training_text_before_the_answer_and_the_export_chat_template(tok, template):
    import jinja2

    from mllm.convert.processor import chat_template

    t = get_template(template)
    questions = ("<image>\nWhat colour? ", "A1 ", "\nWhere?")
    ids = ConversationTokenizer(tok, t, num_image_token=4).generation_prompt(conv(*questions), [2])
    # reference 1: the training sample of the same conversation answered, cut where the answer starts
    sample = ConversationTokenizer(tok, t, num_image_token=4)(conv(*questions, "Left."), [2])
    supervised = np.flatnonzero(sample.targets)
    answer_start = supervised[np.flatnonzero(np.diff(supervised) > 1)[-1] + 1]  # the last run: "Left." + end
    assert np.array_equal(ids, sample.input_ids[:answer_start])
    # reference 2: the export's Jinja chat template (the image rendered as <IMG_CONTEXT>, expanded by the processor)
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": q} for i, q in enumerate(questions)
    ]
    messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": "What colour? "}]
    text = jinja2.Template(chat_template(t)).render(
        messages=messages, add_generation_prompt=True, bos_token=""
    )
    text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 8 + "</img>")
    assert tok(text, add_special_tokens=True)["input_ids"] == ids.tolist()

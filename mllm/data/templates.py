"""InternVL's conversation templates (MPT separator style) rendered into supervised / unsupervised pieces.

Each template also carries the conversation rules of the InternVL preprocessing function it is trained with
(`internvl_chat/internvl/train/dataset.py`, chosen by `LazySupervisedDataset.get_preprocess_function`):
internlm2-chat -> `preprocess_internlm` (strips every turn), Hermes-2 -> `preprocess_mpt`, phi3-chat ->
`preprocess_phi3`, internvl2_5 -> `preprocess_internvl2_5` (no stripping, any human/gpt order, a leading gpt turn
is trained). The first three drop a leading gpt turn and need human/gpt alternation.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str
    system_message: str
    user_role: str
    assistant_role: str
    sep: str
    strip_turns: bool = False  # preprocess_internlm strips every turn's text; the others keep it verbatim
    free_turn_order: bool = False  # preprocess_internvl2_5: turns in any order, a first gpt turn is trained

    def pieces(
        self, turns: list[tuple[str, str]], system_message: str | None = None
    ) -> list[tuple[str, bool]]:
        """Render (role, text) turns to (text, supervised) pieces; concatenated they are the prompt.

        MPT style: system + sep, then role + message + sep per turn (InternVL's `Conversation.get_prompt`, where
        an empty message renders as its role alone; preprocess_internvl2_5 renders it in full). The assistant's
        answer and its end token are supervised; a newline after the end token (internvl2_5's "<|im_end|>\n")
        is not, as in InternVL.
        """
        end_token = self.sep.rstrip("\n")
        after_end = self.sep[len(end_token) :]
        system = self.system_template.format(
            system_message=self.system_message if system_message is None else system_message
        )
        out = [(system + self.sep, False)]
        for role, text in turns:
            if not text and not self.free_turn_order:
                out.append((self.user_role if role == "human" else self.assistant_role, False))
            elif role == "human":
                out.append((self.user_role + text + self.sep, False))
            else:
                out.append((self.assistant_role, False))
                out.append((text + end_token, True))
                if after_end:
                    out.append((after_end, False))
        return out

    def generation_prompt(self, turns: list[tuple[str, str]], system_message: str | None = None) -> str:
        """The prompt to answer the last (human) turn: the turns rendered as `pieces`, then the assistant role
        (InternVL's `chat`: an assistant message of None renders as its role alone)."""
        return "".join(text for text, _ in self.pieces(turns, system_message)) + self.assistant_role


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "internlm2-chat",
            "<|im_start|>system\n{system_message}",
            INTERNVL_SYSTEM,
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
            strip_turns=True,
        ),
        Template(
            "Hermes-2",
            "<|im_start|>system\n{system_message}",
            INTERNVL_SYSTEM,
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
        ),
        Template(
            "internvl2_5",
            "<|im_start|>system\n{system_message}",
            INTERNVL2_5_SYSTEM,
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            free_turn_order=True,
        ),
        Template(
            "phi3-chat",
            "<|system|>\n{system_message}",
            INTERNVL_SYSTEM,
            "<|user|>\n",
            "<|assistant|>\n",
            "<|end|>",
        ),
    )
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: set data.template to one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]

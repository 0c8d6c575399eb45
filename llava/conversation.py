"""Prompt templates, rendered exactly as LLaVA renders them (`plain` for stage 1, `vicuna_v1` for stage 2).

Templates are read-only: `get_conv_template(name)` hands out a fresh copy, so nothing in training or serving
mutates shared module state (LLaVA's global `default_conversation` does).
"""

import copy
import enum
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


class SeparatorStyle(enum.Enum):
    PLAIN = enum.auto()
    TWO = enum.auto()


@dataclass
class Conversation:
    """A chat being built: `messages` is a list of [role, text]; text None marks the slot to generate."""

    system: str
    roles: Tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: Optional[str] = None
    version: str = ""
    messages: List[list] = field(default_factory=list)

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)

    def append_message(self, role: str, text: Optional[str]) -> None:
        self.messages.append([role, text])

    def render(self) -> Tuple[str, List[Tuple[int, int]]]:
        """The prompt, and for every non-empty reply (odd position) the [start, end) character span of what a
        model generates after the inference prompt `...ROLE:`: the space, the reply, and its closing separator
        (`</s>` for TWO)."""
        seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
        if self.sep_style is SeparatorStyle.TWO:
            parts, two = [self.system + seps[0]], True
        elif self.sep_style is SeparatorStyle.PLAIN:
            parts, two = [self.system], False
        else:
            raise ValueError(f"unsupported separator style {self.sep_style}")
        reply_spans = []
        length = len(parts[0])
        for i, (role, text) in enumerate(self.messages):
            generation_prompt = f"{role}:" if two else ""
            if text:
                piece = generation_prompt + (" " if two else "") + text + seps[i % 2]
                if i % 2 == 1:
                    reply_spans.append((length + len(generation_prompt), length + len(piece)))
            else:
                piece = generation_prompt
            parts.append(piece)
            length += len(piece)
        return "".join(parts), reply_spans

    def get_prompt(self) -> str:
        return self.render()[0]


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

# LLaVA's own v1 template says "human" where Vicuna says "user"; kept so exported chat templates match.
conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

# Stage-1 alignment: no system text, no roles; every message is closed by a newline.
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
    sep2="\n",
    version="plain",
)

conv_templates = {
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "vicuna_v1": conv_vicuna_v1,
    "v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh, empty copy of the template `name` (the value of `--version` / `--conv-mode`)."""
    if name not in conv_templates:
        valid = ", ".join(sorted(conv_templates))
        raise ValueError(f"unknown conversation template {name!r} (--version / --conv-mode); valid names: {valid}")
    return conv_templates[name].copy()

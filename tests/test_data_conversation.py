"""Conversation templates render exactly as LLaVA's, and templates are never shared mutable state."""

import pytest

from llava.conversation import SeparatorStyle, conv_templates, get_conv_template

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def test_vicuna_v1_training_string_and_reply_spans():
    conv = get_conv_template("vicuna_v1")
    for role, text in [(0, "<image>\nq1"), (1, "a1"), (0, "q2"), (1, "a2")]:
        conv.append_message(conv.roles[role], text)
    prompt, spans = conv.render()
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    assert [prompt[s:e] for s, e in spans] == [" a1</s>", " a2</s>"]
    assert conv.get_prompt() == prompt


def test_vicuna_v1_inference_prompt_ends_with_assistant_colon():
    conv = get_conv_template("v1")
    conv.append_message(conv.roles[0], "hi")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == f"{VICUNA_SYSTEM} USER: hi ASSISTANT:"


def test_llava_v1_keeps_llava_wording():
    conv = get_conv_template("llava_v1")
    assert "curious human" in conv.system and "human's questions" in conv.system
    assert conv.roles == ("USER", "ASSISTANT") and conv.sep_style is SeparatorStyle.TWO


def test_plain_renders_messages_with_newlines():
    conv = get_conv_template("plain")
    conv.append_message(conv.roles[0], "<image>")
    conv.append_message(conv.roles[1], "a red circle")
    prompt, spans = conv.render()
    assert prompt == "<image>\na red circle\n"
    assert [prompt[s:e] for s, e in spans] == ["a red circle\n"]


def test_get_conv_template_returns_independent_copies():
    first = get_conv_template("vicuna_v1")
    first.append_message("USER", "x")
    assert get_conv_template("vicuna_v1").messages == []
    assert conv_templates["vicuna_v1"].messages == []


def test_unknown_template_names_flag_and_valid_names():
    with pytest.raises(ValueError, match=r"--version.*plain.*vicuna_v1"):
        get_conv_template("chatml")

"""The evaluation prompt: image tokens in front of the task's question, wrapped in a conversation template.

lmms-eval's contexts carry no `<image>` token, so the model adds one per image (the paper's setup:
`"<image>\\n" + question` in the `vicuna_v1` template, the same as lmms-eval's own llava adapter).
"""

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template


def with_image_tokens(context: str, num_images: int) -> str:
    """Prepend one `<image>` per image (space separated, then a newline) unless the context already has them."""
    if num_images == 0 or DEFAULT_IMAGE_TOKEN in context:
        return context
    return " ".join([DEFAULT_IMAGE_TOKEN] * num_images) + "\n" + context


def build_prompt(context: str, num_images: int, conv_template: str) -> str:
    """The full prompt up to and including the assistant's role tag, ready for generation."""
    conversation = get_conv_template(conv_template)
    conversation.append_message(conversation.roles[0], with_image_tokens(context, num_images))
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()

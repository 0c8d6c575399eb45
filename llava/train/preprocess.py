"""One LLaVA conversation -> `input_ids` + `labels`, with the loss exactly on what the assistant says.

LLaVA finds the assistant spans by re-tokenizing pieces of the prompt and subtracting lengths, which breaks
with tokenizer versions and with answers that contain the separator, and then silently masks the whole
sample. Here the rendered prompt knows the character span of every reply, and the tokenizer's offsets map
those spans to tokens, so the mask is right for any fast tokenizer; a sample whose mask cannot be built
raises an error instead of being trained on nothing.
"""

from typing import Dict, List, Sequence, Tuple

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, get_conv_template
from llava.mm_utils import tokenizer_adds_bos

HUMAN, GPT = "human", "gpt"


def count_image_tags(conversations: Sequence[dict]) -> int:
    return sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conversations)


def check_turns(conversations: Sequence[dict]) -> List[dict]:
    """The turns to train on: a leading non-human turn is dropped (as LLaVA does), then the turns must
    alternate human/gpt, hold text, contain at least one non-empty gpt reply, and keep `<image>` out of replies."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in (HUMAN, GPT):
            raise ValueError(
                f"turn {j} must be a dict with 'from' in ('human', 'gpt') and a string 'value', got {turn!r:.120}"
            )
    turns = conversations[1:] if conversations[0]["from"] != HUMAN else conversations
    for j, turn in enumerate(turns):
        expected = HUMAN if j % 2 == 0 else GPT
        if turn["from"] != expected:
            raise ValueError(
                f"turns must alternate human/gpt; turn {j} is from {turn['from']!r}, expected {expected!r}"
            )
        if expected == GPT and not turn["value"].strip():
            raise ValueError(f"turn {j} is an empty gpt reply")
        if expected == GPT and DEFAULT_IMAGE_TOKEN in turn["value"]:
            raise ValueError(f"turn {j} is a gpt reply containing {DEFAULT_IMAGE_TOKEN}; only human turns may hold it")
    if len(turns) < 2:
        raise ValueError("the conversation has no gpt reply after a human turn, so there is nothing to learn")
    return list(turns)


def move_image_tag_to_front(turns: Sequence[dict]) -> List[dict]:
    """LLaVA's `preprocess_multimodal`: a turn holding `<image>` gets it removed and put first, as `<image>\\n`."""
    moved = []
    for turn in turns:
        value = turn["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        moved.append({"from": turn["from"], "value": value})
    return moved


def _render_plain(turns: List[dict], sep: str) -> Tuple[str, List[Tuple[int, int]]]:
    """Stage 1: the instruction is dropped; the sample is `<image>` + caption + sep, loss on caption + sep."""
    if len(turns) != 2:
        raise ValueError(f"the 'plain' template needs exactly one human and one gpt turn, got {len(turns)} turns")
    prompt = DEFAULT_IMAGE_TOKEN + turns[1]["value"] + sep
    return prompt, [(len(DEFAULT_IMAGE_TOKEN), len(prompt))]


def _render_chat(turns: List[dict], template_name: str) -> Tuple[str, List[Tuple[int, int]]]:
    conv = get_conv_template(template_name)
    for turn in turns:
        conv.append_message(conv.roles[0] if turn["from"] == HUMAN else conv.roles[1], turn["value"])
    return conv.render()


def _tokenize_with_labels(prompt: str, spans: List[Tuple[int, int]], tokenizer) -> Tuple[List[int], List[int]]:
    """Tokenize like `tokenizer_image_token`; a token is supervised when its characters overlap a reply span."""
    input_ids = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    labels = [IGNORE_INDEX] * len(input_ids)
    tokens_per_span = [0] * len(spans)
    chunk_start = 0
    for c, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if c:
            input_ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            start, end = start + chunk_start, end + chunk_start
            hit = next((k for k, (s, e) in enumerate(spans) if start < e and end > s), None)
            input_ids.append(token_id)
            labels.append(token_id if hit is not None else IGNORE_INDEX)
            if hit is not None:
                tokens_per_span[hit] += 1
        chunk_start += len(chunk) + len(DEFAULT_IMAGE_TOKEN)
    empty = [k for k, n in enumerate(tokens_per_span) if n == 0]
    if empty:
        raise ValueError(f"could not map reply {empty[0]} to any token; the label mask cannot be built")
    return input_ids, labels


def preprocess(
    conversations: Sequence[dict], tokenizer, template_name: str, has_image: bool
) -> Dict[str, torch.Tensor]:
    """dict(input_ids, labels) as 1-D LongTensors; labels are IGNORE_INDEX except each reply and its end token.

    With `has_image`, exactly one `<image>` tag must be present and becomes one IMAGE_TOKEN_INDEX; without it,
    no tag may be present. No truncation happens here: the model truncates after splicing in image features.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("label masking needs a fast tokenizer (character offsets); load it with use_fast=True")
    turns = check_turns(list(conversations))
    tags = count_image_tags(turns)
    if has_image and tags != 1:
        raise ValueError(
            f"an image sample needs exactly one {DEFAULT_IMAGE_TOKEN} tag in its human turns, found {tags}"
        )
    if not has_image and tags:
        raise ValueError(f"a text-only sample holds {tags} {DEFAULT_IMAGE_TOKEN} tag(s) but has no image")
    if has_image:
        turns = move_image_tag_to_front(turns)
    template = get_conv_template(template_name)
    if template.sep_style is SeparatorStyle.PLAIN:
        if not has_image:
            raise ValueError("the 'plain' template (stage-1 alignment) needs an image in every sample")
        prompt, spans = _render_plain(turns, template.sep)
    else:
        prompt, spans = _render_chat(turns, template_name)
    input_ids, labels = _tokenize_with_labels(prompt, spans, tokenizer)
    return dict(input_ids=torch.tensor(input_ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long))

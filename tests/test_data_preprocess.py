"""Label masks: the loss covers exactly each assistant reply and its end token, for both templates."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import tokenizer_image_token
from llava.tiny_models import build_tiny_tokenizer, training_corpus
from llava.train.preprocess import move_image_tag_to_front, preprocess


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer():
    """Llama-like pieces: "▁" marks spaces and can be a token of its own (e.g. before digits or rare words)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def supervised_runs(sample, tokenizer):
    """Decoded text of each maximal run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def rendered_ids(turns, tokenizer, template="vicuna_v1"):
    conv = get_conv_template(template)
    for turn in turns:
        conv.append_message(conv.roles[turn["from"] == "gpt"], turn["value"])
    return tokenizer_image_token(conv.get_prompt(), tokenizer)


def test_vicuna_multi_turn_image_first(tokenizer):
    turns = [human("<image>\nWhat shape is it?"), gpt("A red circle."), human("And the colour?"), gpt("Red")]
    sample = preprocess(turns, tokenizer, "vicuna_v1", has_image=True)
    assert supervised_runs(sample, tokenizer) == [" A red circle.</s>", " Red</s>"]
    assert sample["input_ids"].tolist() == rendered_ids(turns, tokenizer)
    assert sample["input_ids"][0] == tokenizer.bos_token_id
    assert (sample["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert sample["labels"][sample["input_ids"] == IMAGE_TOKEN_INDEX].item() == IGNORE_INDEX
    assert sample["labels"][sample["input_ids"] == tokenizer.eos_token_id].tolist() == [tokenizer.eos_token_id] * 2


def test_sentencepiece_style_tokenizer_supervises_the_space_piece(sentencepiece_style_tokenizer):
    tok = sentencepiece_style_tokenizer
    turns = [human("<image>\nHow many?"), gpt("2"), human("Colour?"), gpt("Red and blue.")]
    sample = preprocess(turns, tok, "vicuna_v1", has_image=True)
    assert sample["input_ids"].tolist() == rendered_ids(turns, tok)
    pieces, runs = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label != IGNORE_INDEX:
            pieces.append(tok.convert_ids_to_tokens(token))
        elif pieces:
            runs.append("".join(pieces).replace("\u2581", " "))
            pieces = []
    runs.append("".join(pieces).replace("\u2581", " "))
    assert runs == [" 2</s>", " Red and blue.</s>"]
    assert "\u2581" in tok.convert_ids_to_tokens(sample["input_ids"][sample["labels"] != IGNORE_INDEX].tolist())


def test_vicuna_image_tag_after_text_is_moved_to_front(tokenizer):
    turns = [human("Describe this picture: <image>"), gpt("Two blue squares.")]
    sample = preprocess(turns, tokenizer, "vicuna_v1", has_image=True)
    moved = move_image_tag_to_front(turns)
    assert moved[0]["value"] == "<image>\nDescribe this picture:"
    assert sample["input_ids"].tolist() == rendered_ids(moved, tokenizer)
    assert supervised_runs(sample, tokenizer) == [" Two blue squares.</s>"]


def test_vicuna_text_only_answers_with_separator_inside(tokenizer):
    # LLaVA's string arithmetic breaks (and masks the whole sample) when a reply contains "ASSISTANT: ".
    turns = [human("Say it."), gpt("USER: hi ASSISTANT: hello"), human("Again, with 世界 🎉"), gpt("Grüße 世界")]
    sample = preprocess(turns, tokenizer, "v1", has_image=False)
    assert IMAGE_TOKEN_INDEX not in sample["input_ids"].tolist()
    assert supervised_runs(sample, tokenizer) == [" USER: hi ASSISTANT: hello</s>", " Grüße 世界</s>"]


def test_leading_gpt_turn_is_dropped_and_trailing_question_unsupervised(tokenizer):
    turns = [gpt("stray"), human("Q1"), gpt("A1"), human("dangling question")]
    sample = preprocess(turns, tokenizer, "vicuna_v1", has_image=False)
    assert supervised_runs(sample, tokenizer) == [" A1</s>"]
    assert "stray" not in tokenizer.decode(sample["input_ids"])


def test_plain_keeps_only_image_and_caption(tokenizer):
    turns = [human("Give a short caption.\n<image>"), gpt("a yellow star")]
    sample = preprocess(turns, tokenizer, "plain", has_image=True)
    caption_ids = tokenizer("a yellow star\n", add_special_tokens=False).input_ids
    assert sample["input_ids"].tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX] + caption_ids
    assert sample["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX] + caption_ids
    assert supervised_runs(sample, tokenizer) == ["a yellow star\n"]


@pytest.mark.parametrize(
    "turns, template, has_image, message",
    [
        ([human("<image>\nq"), human("q2")], "vicuna_v1", True, "alternate human/gpt; turn 1"),
        ([human("q")], "vicuna_v1", False, "no gpt reply"),
        ([human("q"), gpt("   ")], "vicuna_v1", False, "turn 1 is an empty gpt reply"),
        ([human("q"), {"from": "bot", "value": "a"}], "vicuna_v1", False, "turn 1 must be a dict with 'from'"),
        ([human("<image> q <image>"), gpt("a")], "vicuna_v1", True, "exactly one <image> tag.*found 2"),
        ([human("<image> q"), gpt("a")], "vicuna_v1", False, "text-only sample holds 1"),
        ([human("q"), gpt("a <image>")], "vicuna_v1", False, "gpt reply containing <image>"),
        ([human("<image>"), gpt("a"), human("q"), gpt("b")], "plain", True, "exactly one human and one gpt"),
        ([human("q"), gpt("a")], "plain", False, "needs an image"),
        ([human("q"), gpt("a")], "chatml", False, "--version"),
    ],
)
def test_bad_conversations_raise_clear_errors(tokenizer, turns, template, has_image, message):
    with pytest.raises(ValueError, match=message):
        preprocess(turns, tokenizer, template, has_image)

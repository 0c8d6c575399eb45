"""The tiny offline model builder: loadable with stock `from_pretrained`, Llama-like tokenizer, deterministic."""

import filecmp
import os

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from llava.tiny_models import build_tiny_models, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(str(tmp_path_factory.mktemp("tiny")))


def test_tokenizer_has_llama_special_ids_and_adds_only_bos(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.llm)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) == 1000
    assert tok.model_max_length == 2048
    ids = tok("USER: hello ASSISTANT: hi").input_ids
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
    assert 1 not in tok("hello", add_special_tokens=False).input_ids


def test_tokenizer_round_trips_arbitrary_text_and_reads_eos_text_as_eos(tiny):
    tok = AutoTokenizer.from_pretrained(tiny.llm)
    text = "Grüße, 世界! 🎉 tabs\tand\nnewlines  ~^`"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    ids = tok("a red circle</s>USER:", add_special_tokens=False).input_ids
    assert ids.count(tok.eos_token_id) == 1


def test_llama_folder_loads_with_expected_config(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny.llm)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (4, 64, 128)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.vocab_size) == (1, 2, 0, 1000)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.do_sample is False
    assert os.path.exists(os.path.join(tiny.llm, "model.safetensors"))
    logits = model(torch.tensor([[1, 5, 6]])).logits
    assert logits.shape == (1, 3, 1000)


def test_clip_folder_loads_with_pil_processor(tiny):
    model = CLIPVisionModel.from_pretrained(tiny.vision_tower)
    assert (model.config.image_size, model.config.patch_size, model.config.hidden_size) == (56, 14, 32)
    processor = AutoImageProcessor.from_pretrained(tiny.vision_tower, backend="pil")
    assert processor.crop_size == {"height": 56, "width": 56}
    assert processor.size == {"shortest_edge": 56}
    out = model(pixel_values=torch.zeros(1, 3, 56, 56)).last_hidden_state
    assert out.shape == (1, 17, 32)


def test_same_seed_same_bytes_and_cli(tiny, tmp_path, capsys):
    main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "tiny-llama"), str(tmp_path / "tiny-clip")]
    for sub, name in [("tiny-llama", "model.safetensors"), ("tiny-llama", "tokenizer.json"),
                      ("tiny-clip", "model.safetensors")]:
        assert filecmp.cmp(os.path.join(os.path.dirname(tiny.llm), sub, name), tmp_path / sub / name, shallow=False)


def test_other_seed_other_weights(tiny, tmp_path):
    other = build_tiny_models(str(tmp_path), seed=1)
    a = AutoModelForCausalLM.from_pretrained(tiny.llm).lm_head.weight
    b = AutoModelForCausalLM.from_pretrained(other.llm).lm_head.weight
    assert not torch.equal(a, b)

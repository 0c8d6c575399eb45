"""Our loader and model reproduce the official p-MoD code's outputs on its own tiny checkpoints.

The fixtures (tests/fixtures/official_pmod, see its README) were written by the official implementation:
LLaVA-1.5 mode (case A) and LLaVA-NeXT anyres mode (case B), float32, batch 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pmod.layer
from llava.model.builder import load_pretrained_model
from pmod.hf_compat import output_cache

FIXTURES = Path(__file__).parent / "fixtures" / "official_pmod"
CASES = {"A": "pmod-llava-v1.5-tiny", "B": "pmod-llava-next-tiny"}
pytestmark = pytest.mark.compat


def decode_pixels(case: str, lut: torch.Tensor) -> torch.Tensor:
    codes = torch.from_numpy(np.array(Image.open(FIXTURES / f"case_{case}_pixel_codes.png"))).long()
    crops = codes.shape[0] // 336
    codes = codes.view(crops, 336, 336, 3).permute(0, 3, 1, 2)
    pixels = lut[torch.arange(3).view(3, 1, 1), codes]
    return pixels if case == "A" else pixels[None]


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """The official folders (with their sibling tiny_clip) plus a tokenizer: they ship none, the loader needs one."""
    root = tmp_path_factory.mktemp("official") / "official_pmod"
    shutil.copytree(FIXTURES, root)
    for folder in CASES.values():
        for item in Path(tiny_models.llm).iterdir():
            if item.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(item, root / folder / item.name)
    return root


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, checkpoints):
    name = request.param
    _, model, _, _ = load_pretrained_model(str(checkpoints / CASES[name]), dtype=torch.float32)
    tensors = load_file(str(FIXTURES / f"case_{name}.safetensors"))
    meta = json.loads((FIXTURES / f"case_{name}.json").read_text())
    pixels = decode_pixels(name, tensors["pixel_lut"])
    return name, model, tensors, meta, pixels


def run_recording_selections(model, **inputs):
    """Forward pass that records which tokens every p-MoD layer kept."""
    kept = {}
    original = pmod.layer.select_tokens

    def recording(router_logits, target_mask, valid_mask, plan):
        selection = original(router_logits, target_mask, valid_mask, plan)
        kept[len(kept)] = selection.kept[0].nonzero().flatten()
        return selection

    pmod.layer.select_tokens = recording
    try:
        with torch.no_grad():
            output = model(**inputs)
    finally:
        pmod.layer.select_tokens = original
    return output, kept


def test_inputs_embeds_and_target_mask(case):
    _, model, tensors, _, pixels = case
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(
            tensors["input_ids"], None, None, pixels, tensors["image_sizes"].tolist()
        )
    torch.testing.assert_close(prepared.inputs_embeds, tensors["inputs_embeds"], atol=1e-5, rtol=0)
    assert torch.equal(prepared.target_mask, tensors["mod_target_mask"])


def test_logits_kept_tokens_and_kv_lengths(case):
    name, model, tensors, meta, pixels = case
    output, kept = run_recording_selections(
        model, input_ids=tensors["input_ids"], images=pixels, image_sizes=tensors["image_sizes"].tolist(), use_cache=True
    )
    text = tensors["text_positions"]
    torch.testing.assert_close(output.logits[0, text], tensors["logits_text"][0], atol=1e-4, rtol=0)

    argmax = output.logits[0].argmax(-1)
    expected = tensors["logits_argmax"].long()
    near_ties = set(meta["logits_argmax_near_ties"]["positions"])
    mismatches = {int(i) for i in (argmax != expected).nonzero().flatten()}
    assert mismatches <= near_ties

    mod_layers = meta["mod_layer_indices"]
    assert len(kept) == len(mod_layers)
    text_positions = set(text.tolist())
    for order, layer in enumerate(mod_layers):
        vision_kept = [p for p in kept[order].tolist() if p not in text_positions]
        reference = tensors[f"kept_vision_positions.layer{layer:02d}"].long().tolist()
        assert vision_kept == reference, f"case {name}, layer {layer}"

    cache = output_cache(output)
    kv_lengths = [cache.layers[i].get_seq_length() for i in range(32)]
    assert kv_lengths == tensors["kv_len_after_prefill"].tolist()


def test_greedy_generation(case):
    _, model, tensors, meta, pixels = case
    generated = model.generate(
        tensors["input_ids"], images=pixels, image_sizes=tensors["image_sizes"].tolist(),
        max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
    )
    assert generated.sequences[0].tolist() == tensors["generated_tokens"].tolist()
    cache = output_cache(generated)
    assert [cache.layers[i].get_seq_length() for i in range(32)] == meta["kv_len_after_generate"]


def test_dense_logits_without_routing(case):
    _, model, tensors, _, _ = case
    with torch.no_grad():
        logits = model(inputs_embeds=tensors["inputs_embeds"], use_cache=False).logits
    torch.testing.assert_close(
        logits[0, tensors["text_positions"]], tensors["dense_logits_text"][0], atol=1e-4, rtol=0
    )


def test_auto_model_loads_official_layout_after_importing_llava():
    """In a fresh interpreter: `import llava` is all AutoModelForCausalLM needs."""
    script = (
        "import sys, torch, llava\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "state = model.state_dict()\n"
        "print(type(model).__name__, 'model.layers.8.decoder_layer.self_attn.q_proj.weight' in state,\n"
        "      'model.layers.8.router.router.bias' in state, 'model.layers.7.self_attn.q_proj.weight' in state)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(FIXTURES / CASES["A"])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["PmodLlavaLlamaForCausalLM", "True", "True", "True"]

"""Dense and p-MoD transformers-native VLMs (Qwen2.5-VL, LLaVA-OneVision) at a preset's shapes with random
weights, and the prompts they are benchmarked on.

Token counts come from ``pmod.accounting.PRESETS`` (``qwen2.5-vl-7b``: one 896 x 896 image, 1024 visual tokens;
``llava-onevision-7b``: one 768 x 768 image, 3699), both divided by ``scale`` for the CPU-sized presets, so
every preset keeps the 7B prompt's share of visual tokens.

Only the LLM is timed. The prompts hold the image placeholder id (``config.image_token_id``) where the image's
features would stand, and no pixels, so the vision tower never runs (the paper's convention; the towers here
are small random stand-ins) and p-MoD routes exactly those positions, as it routes a real image's:

* LLaVA-OneVision takes ``input_ids`` alone: without ``pixel_values`` the placeholders keep their token
  embedding, and positions are 1-D as for any text.
* Qwen2.5-VL computes its M-RoPE positions from ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``
  (``get_rope_index``), none of which needs pixels. The prompts carry the grid of the image the placeholders
  stand for (``2s x 2s`` patches of 14 px, merged 2 x 2 into ``s x s`` tokens), so every position, and the
  rope offset that generation continues from, is the one that image would get.

The dense model is built on the device; the p-MoD model is built on the meta device, pointed at the dense
model's weight tensors and made p-MoD by ``pmod.hf.apply_pmod`` with random routers (zero routers tie), so
both compute with identical weights and a 7B pair costs one model's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

from benchmarks.models import DEFAULT_SCHEDULE, TINY_LLM, set_module_tensor
from llava.constants import IGNORE_INDEX
from pmod.accounting import PRESETS as ACCOUNTING_PRESETS
from pmod.accounting import ModelShape
from pmod.hf import apply_pmod

PARTS = ("prefill", "decode", "uneven", "cache", "train", "kv")
REFUSED_PARTS = {
    "full": "the vision tower here is a small random stand-in, so a whole-model time would not be the released "
            "model's",
    "layer": "it times pmod.layer's routed layer, which the LLaVA presets measure and pmod.hf reuses unchanged",
    "attention": "it compares layouts of pmod.layer's routed layer, which the LLaVA presets measure and pmod.hf "
                 "reuses unchanged",
    "packing": "padding-free training (--packing) is built for our LLaVA class only",
    "uneven_prefill": "it switches our LLaVA class between its kept-token layouts; pmod.hf runs the same layer code",
    "compiled": "the static cache with compiled decoding is built for our LLaVA class; pmod.hf generates with the "
                "dynamic PmodCache",
}
QWEN, ONEVISION = "qwen2_5_vl", "llava_onevision"
PAD_ID, BOS_ID, EOS_ID, FIRST_TEXT_ID = 0, 1, 2, 3
ROPE_THETA = 1e6  # Qwen2-7B's

# Qwen2-7B's proportions at CPU size: MLP ~5.3 x hidden, grouped-query attention.
SMALL_QWEN2 = ModelShape(hidden_size=256, intermediate_size=1344, num_layers=8, num_heads=8, num_kv_heads=2,
                         vocab_size=32000)


@dataclass(frozen=True)
class HfPreset:
    """A transformers VLM ``family`` with ``llm`` shapes, on ``pmod.accounting.PRESETS[source]``'s prompt with
    its text and visual token counts divided by ``scale``."""

    name: str
    family: str
    source: str
    llm: ModelShape
    scale: int = 1
    schedule: str = DEFAULT_SCHEDULE
    router_factor: float = 0.5

    def __post_init__(self) -> None:
        if self.family == QWEN and math.isqrt(self.n_vision) ** 2 != self.n_vision:
            raise ValueError(f"{self.name}: {self.n_vision} Qwen visual tokens are not a square image grid")

    @property
    def n_text(self) -> int:
        return round(ACCOUNTING_PRESETS[self.source].n_text / self.scale)

    @property
    def n_vision(self) -> int:
        return round(ACCOUNTING_PRESETS[self.source].n_vision / self.scale)

    @property
    def n_tokens(self) -> int:
        return self.n_text + self.n_vision

    @property
    def vision_unit(self) -> int:
        """Visual tokens per row of Qwen's merged image grid (a smaller image drops whole rows); 1 for OneVision."""
        return math.isqrt(self.n_vision) if self.family == QWEN else 1

    def describe_vision(self) -> str:
        scale = f" / {self.scale}" if self.scale > 1 else ""
        grid = f", positions of a {self.vision_unit} x {self.vision_unit} merged grid" if self.family == QWEN else ""
        return (f"transformers {self.family}, vision tower not run: {self.n_vision} image placeholder ids "
                f"(pmod.accounting {self.source}{scale}{grid})")


def _preset(name: str, family: str, source: str, llm: ModelShape | None = None, scale: int = 1) -> HfPreset:
    return HfPreset(name, family, source, llm or ACCOUNTING_PRESETS[source].shape, scale)


HF_PRESETS = {preset.name: preset for preset in (
    _preset("tiny-qwen2.5-vl", QWEN, "qwen2.5-vl-7b", TINY_LLM, scale=16),
    _preset("tiny-llava-onevision", ONEVISION, "llava-onevision-7b", TINY_LLM, scale=16),
    _preset("small-qwen2.5-vl", QWEN, "qwen2.5-vl-7b", SMALL_QWEN2, scale=4),
    _preset("small-llava-onevision", ONEVISION, "llava-onevision-7b", SMALL_QWEN2, scale=4),
    _preset("qwen2.5-vl-7b", QWEN, "qwen2.5-vl-7b"),
    _preset("llava-onevision-7b", ONEVISION, "llava-onevision-7b"),
)}


def vlm_config(preset: HfPreset):
    """The family's transformers config: ``llm`` as its text model, a small vision tower, and the visual ids
    (image, video, vision start, vision end) as the last four ids of the vocabulary."""
    llm = preset.llm
    image, video, start, end = range(llm.vocab_size - 4, llm.vocab_size)
    text = dict(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    if preset.family == QWEN:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=llm.hidden_size)
        return Qwen2_5_VLConfig(text_config=dict(text, rope_parameters={**rope, "mrope_section": _mrope(llm)}),
                                vision_config=vision, image_token_id=image, video_token_id=video,
                                vision_start_token_id=start, vision_end_token_id=end)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)
    return LlavaOnevisionConfig(text_config=Qwen2Config(**text, rope_parameters=rope), vision_config=vision,
                                image_token_id=image, video_token_id=video)


def _mrope(llm: ModelShape) -> list[int]:
    """Temporal / height / width rotary sections in Qwen2.5-VL-7B's proportion ([16, 24, 24] of 64)."""
    half = llm.head_dim // 2
    return [half // 4, *[(half - half // 4) // 2] * 2]


@dataclass
class HfPair:
    """The p-MoD model and its dense twin (same weight tensors), ready for one device and dtype."""

    preset: HfPreset
    pmod: torch.nn.Module
    dense: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    @property
    def schedule(self):
        return self.pmod.pmod_schedule

    def inputs(self, batch: int, uneven: bool = False) -> PromptInputs:
        return prompt_inputs(self, batch, uneven=uneven)


def build_hf_pair(preset: HfPreset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> HfPair:
    """Dense model on ``device`` in ``dtype`` (no CPU copy); its p-MoD twin shares every tensor but the routers."""
    torch.manual_seed(seed)
    with device:
        dense = _build(preset, dtype)
    with torch.device("meta"):
        twin = _build(preset, dtype)
    _share_tensors(twin, dense)
    torch.manual_seed(seed + 1)
    pmod = apply_pmod(twin, schedule=preset.schedule, router_factor=preset.router_factor, zero_init=False)
    for model in (dense, pmod):
        _generate_every_token(model)
    return HfPair(preset, pmod, dense, device, dtype)


def _build(preset: HfPreset, dtype: torch.dtype):
    """A fresh config per model: ``from_config`` keeps the config object, and apply_pmod writes into it."""
    return AutoModelForImageTextToText.from_config(vlm_config(preset), attn_implementation="sdpa", dtype=dtype).eval()


def _share_tensors(twin: torch.nn.Module, source: torch.nn.Module) -> None:
    """Point the meta-device ``twin`` (same class and config) at ``source``'s parameters and buffers, under
    every name that reaches them (tied weights included)."""
    parameters = dict(source.named_parameters(remove_duplicate=False))
    buffers = dict(source.named_buffers(remove_duplicate=False))
    for name, _ in list(twin.named_parameters(remove_duplicate=False)):
        set_module_tensor(twin, name, parameters[name], is_parameter=True)
    for name, _ in list(twin.named_buffers(remove_duplicate=False)):
        set_module_tensor(twin, name, buffers[name], is_parameter=False)


def _generate_every_token(model) -> None:
    """Random weights would end rows at a random EOS: no EOS, so every run makes exactly the tokens asked for."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID


@dataclass
class PromptInputs:
    """Token ids of one image per row with its placeholders in place, as the family's processor returns them.

    ``attention_mask`` is None when every row is the full prompt; uneven rows are left-padded.
    """

    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX on placeholders and padding
    attention_mask: torch.Tensor | None
    extra: dict  # Qwen: mm_token_type_ids and image_grid_thw, for M-RoPE positions

    def model_kwargs(self, is_pmod: bool) -> dict:
        """The same for both models (``is_pmod`` as for LlmInputs): p-MoD finds its targets in ``input_ids``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extra}


def vision_counts(preset: HfPreset, batch: int, uneven: bool = False) -> list[int]:
    """Visual tokens per row: with ``uneven``, row b drops b / (2 B) of them (in whole grid rows for Qwen)."""
    unit = preset.vision_unit
    return [preset.n_vision - (preset.n_vision * row // (2 * batch)) // unit * unit if uneven else preset.n_vision
            for row in range(batch)]


def prompt_inputs(pair: HfPair, batch: int, seed: int = 0, uneven: bool = False) -> PromptInputs:
    preset, config = pair.preset, pair.dense.config
    generator = torch.Generator().manual_seed(seed)
    counts = vision_counts(preset, batch, uneven)
    rows = [_prompt_row(preset, config, count, generator) for count in counts]
    ids = torch.full((batch, preset.n_tokens), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, preset.n_tokens - len(row):] = torch.tensor(row)
        mask[index, preset.n_tokens - len(row):] = 1
    placeholders = ids == config.image_token_id
    labels = ids.masked_fill(placeholders | (mask == 0), IGNORE_INDEX)
    extra = {}
    if preset.family == QWEN:
        side = preset.vision_unit
        extra = {"mm_token_type_ids": placeholders.long(),
                 "image_grid_thw": torch.tensor([[1, 2 * count // side, 2 * side] for count in counts])}
    return PromptInputs(ids.to(pair.device), labels.to(pair.device), mask.to(pair.device) if uneven else None,
                        {name: value.to(pair.device) for name, value in extra.items()})


def _prompt_row(preset: HfPreset, config, n_vision: int, generator: torch.Generator) -> list[int]:
    """Text, then the image (Qwen wraps it in vision start / end tokens, which count as text), then text."""
    image = [config.image_token_id] * n_vision
    if preset.family == QWEN:
        image = [config.vision_start_token_id, *image, config.vision_end_token_id]
    n_words = preset.n_text - (len(image) - n_vision)
    words = torch.randint(FIRST_TEXT_ID, config.image_token_id, (n_words,), generator=generator).tolist()
    before = preset.n_text // 4  # system turn and user tag
    return words[:before] + image + words[before:]

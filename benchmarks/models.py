"""Dense and p-MoD LLaVA models at a preset's shapes with random weights, and their benchmark inputs.

The dense model shares every weight tensor with the p-MoD model (it is built on the meta device and then
pointed at the p-MoD model's tensors), so both run the same numbers and a 7B pair costs one model's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass, field
from functools import cache

import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model import (
    LlavaConfig,
    LlavaLlamaForCausalLM,
    PmodLlavaConfig,
    PmodLlavaLlamaForCausalLM,
)
from pmod.accounting import VICUNA_7B, ModelShape, VisionTowerShape
from pmod.routing import TokenCounts

CLIP_L_336 = "openai/clip-vit-large-patch14-336"
DEFAULT_SCHEDULE = "shiftedcos_decay_0.85_0.15"
TEXT_BEFORE_IMAGE = 35  # vicuna_v1 system prompt and "USER:" come before the image in LLaVA prompts


@dataclass(frozen=True)
class TowerSpec:
    """A CLIP ViT: the released CLIP-L/14-336 (built from its known config) or a small random one."""

    image_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    patch_size: int = 14
    known_name: str | None = None

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def accounting_shape(self) -> VisionTowerShape:
        return VisionTowerShape(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                                num_layers=self.num_layers, tokens_per_tile=self.tokens_per_tile + 1,
                                patch_size=self.patch_size)


@dataclass(frozen=True)
class BenchPreset:
    """LLM and tower shapes plus the prompt: ``n_text`` text tokens around one image of ``n_tiles`` tiles.

    ``n_tiles`` 1 is LLaVA-1.5 (one 336 px tile); 5 is LLaVA-NeXT's 2x2 anyres grid plus the base tile,
    merged with ``spatial`` (no unpadding, no newline), i.e. exactly 5 x tokens_per_tile vision tokens.
    """

    name: str
    llm: ModelShape
    tower: TowerSpec
    n_text: int
    n_tiles: int
    schedule: str = DEFAULT_SCHEDULE
    router_factor: float = 0.5
    notes: str = field(default="", compare=False)

    @property
    def n_vision(self) -> int:
        return self.n_tiles * self.tower.tokens_per_tile

    @property
    def n_tokens(self) -> int:
        return self.n_text + self.n_vision

    @property
    def anyres(self) -> bool:
        return self.n_tiles > 1


CLIP_L = TowerSpec(image_size=336, hidden_size=1024, num_layers=24, intermediate_size=4096, known_name=CLIP_L_336)
TINY_TOWER = TowerSpec(image_size=56, hidden_size=32, num_layers=2, intermediate_size=64)
SMALL_TOWER = TowerSpec(image_size=224, hidden_size=64, num_layers=2, intermediate_size=128)
TINY_LLM = ModelShape(hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=2, vocab_size=1000)
SMALL_LLM = ModelShape(hidden_size=256, intermediate_size=688, num_layers=8, num_heads=8, num_kv_heads=8,
                       vocab_size=32000)

PRESETS = {
    "tiny": BenchPreset("tiny", TINY_LLM, TINY_TOWER, n_text=24, n_tiles=5, notes="CI smoke test (--quick)"),
    "small-llava-1.5": BenchPreset("small-llava-1.5", SMALL_LLM, SMALL_TOWER, n_text=64, n_tiles=1),
    "small-llava-next": BenchPreset("small-llava-next", SMALL_LLM, SMALL_TOWER, n_text=64, n_tiles=5),
    "llava-1.5-7b": BenchPreset("llava-1.5-7b", VICUNA_7B, CLIP_L, n_text=64, n_tiles=1),
    "llava-next-7b": BenchPreset("llava-next-7b", VICUNA_7B, CLIP_L, n_text=64, n_tiles=5),
}


@dataclass
class ModelPair:
    """The p-MoD model and its dense twin (same weight tensors), ready for one device and dtype."""

    preset: BenchPreset
    pmod: PmodLlavaLlamaForCausalLM
    dense: LlavaLlamaForCausalLM
    device: torch.device
    dtype: torch.dtype

    @property
    def schedule(self):
        return self.pmod.get_model().schedule

    def inputs(self, batch: int, uneven: bool = False) -> LlmInputs:
        return llm_inputs(self, batch, uneven=uneven)


def build_pair(preset: BenchPreset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ModelPair:
    """Build the p-MoD model directly on ``device`` in ``dtype`` (no CPU copy), then its dense twin."""
    base = _config_kwargs(preset)
    pmod_config = PmodLlavaConfig(
        **base, mod_target_layers=preset.schedule, mod_router_factor=preset.router_factor,
        mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True, mod_special_init=False, mod_target_token_type="vision_all",
    )
    torch.manual_seed(seed)
    with device, _default_dtype(dtype):
        pmod = PmodLlavaLlamaForCausalLM(pmod_config).eval()
    with torch.device("meta"):
        dense = LlavaLlamaForCausalLM(LlavaConfig(**base)).eval()
    _share_tensors(dense, pmod)
    return ModelPair(preset, pmod, dense, device, dtype)


def reducer_of(model):
    """The training-free reducer a LLaVA model runs under (None: p-MoD, dense, or a transformers-native model)."""
    language_model = model.get_model() if hasattr(model, "get_model") else None
    return getattr(language_model, "reducer", None)


def with_reducer(pair: ModelPair, spec: str) -> ModelPair:
    """The pair with the p-MoD side replaced by the dense model (same tensors) under a training-free reducer."""
    from llava.model.reduce import apply_reducer

    with torch.device("meta"):
        dense = LlavaLlamaForCausalLM(LlavaConfig(**_config_kwargs(pair.preset))).eval()
    _share_tensors(dense, pair.pmod)
    return dataclasses.replace(pair, pmod=apply_reducer(dense, spec))


def _config_kwargs(preset: BenchPreset) -> dict:
    llm, tower = preset.llm, preset.tower
    kwargs = {
        "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "initializer_range": 0.02, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "attn_implementation": "sdpa", "use_cache": True,
        "mm_vision_tower": tower.known_name or _small_tower_dir(tower), "mm_hidden_size": tower.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "tokenizer_padding_side": "right",
    }
    if preset.anyres:
        side = 2 * tower.image_size
        kwargs.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial", image_grid_pinpoints=[[side, side]])
    return kwargs


@cache
def _small_tower_dir(tower: TowerSpec) -> str:
    """A random CLIP with an image processor, saved once per process (the tower is built from a folder)."""
    from llava.tiny_models import build_tiny_clip

    folder = tempfile.mkdtemp(prefix="pmod-bench-clip-")
    build_tiny_clip(folder, image_size=tower.image_size, patch_size=tower.patch_size, hidden=tower.hidden_size,
                    layers=tower.num_layers)
    return folder


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _share_tensors(dense: torch.nn.Module, pmod: torch.nn.Module) -> None:
    """Point the meta-device dense model at the p-MoD model's parameters and buffers (names minus the wrapper)."""
    parameters = {
        name.replace(".decoder_layer.", "."): p for name, p in pmod.named_parameters() if ".router." not in name
    }
    buffers = {name.replace(".decoder_layer.", "."): b for name, b in pmod.named_buffers()}
    for name, _ in list(dense.named_parameters()):
        set_module_tensor(dense, name, parameters.pop(name), is_parameter=True)
    for name, _ in list(dense.named_buffers()):
        set_module_tensor(dense, name, buffers[name], is_parameter=False)
    if parameters:
        raise RuntimeError(f"p-MoD parameters without a dense counterpart: {sorted(parameters)[:5]}")


def set_module_tensor(root: torch.nn.Module, name: str, value: torch.Tensor, is_parameter: bool) -> None:
    owner_name, _, attribute = name.rpartition(".")
    owner = root.get_submodule(owner_name)
    if is_parameter:
        owner._parameters[attribute] = value
    else:
        owner._buffers[attribute] = value


@dataclass
class LlmInputs:
    """Embeddings straight into the LLM: ``n_text`` text tokens with the vision block after the system prompt.

    ``attention_mask`` is None when every row is the full prompt; uneven rows are left-padded, as batched
    evaluation pads its prompts.
    """

    inputs_embeds: torch.Tensor  # [B, L, D]
    target_mask: torch.Tensor  # [B, L] bool
    counts: TokenCounts
    labels: torch.Tensor  # [B, L], IGNORE_INDEX on vision tokens
    attention_mask: torch.Tensor | None = None  # [B, L] bool

    def routing(self) -> dict:
        return {"mod_target_mask": self.target_mask, "token_counts": self.counts}

    def model_kwargs(self, is_pmod: bool) -> dict:
        """The LLM's inputs; p-MoD also takes its routing targets."""
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                **(self.routing() if is_pmod else {})}


def llm_inputs(pair: ModelPair, batch: int, seed: int = 0, uneven: bool = False) -> LlmInputs:
    """``uneven``: row b has ``b / (2 B)`` fewer vision tokens (left-padded), so its p-MoD layers keep fewer."""
    preset = pair.preset
    generator = torch.Generator().manual_seed(seed)
    length, start = preset.n_tokens, min(TEXT_BEFORE_IMAGE, preset.n_text)
    embeds = torch.randn(batch, length, preset.llm.hidden_size, generator=generator) * 0.02
    targets = torch.zeros(batch, length, dtype=torch.bool)
    mask = torch.ones(batch, length, dtype=torch.bool)
    drops = [preset.n_vision * row // (2 * batch) if uneven else 0 for row in range(batch)]
    for row, drop in enumerate(drops):
        mask[row, :drop] = False
        targets[row, drop + start:start + preset.n_vision] = True
    labels = torch.randint(3, preset.llm.vocab_size, (batch, length), generator=generator)
    labels[targets | ~mask] = IGNORE_INDEX
    counts = TokenCounts(tuple(preset.n_vision - d for d in drops), tuple(length - d for d in drops))
    return LlmInputs(embeds.to(pair.device, pair.dtype), targets.to(pair.device), counts, labels.to(pair.device),
                     mask.to(pair.device) if uneven else None)


@dataclass
class PixelInputs:
    """Token ids with one image placeholder, and the pixels of that image (all its tiles)."""

    input_ids: torch.Tensor
    images: torch.Tensor | list[torch.Tensor]
    image_sizes: list[tuple[int, int]] | None

    def kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "images": self.images, "image_sizes": self.image_sizes}


def pixel_inputs(pair: ModelPair, batch: int, seed: int = 0) -> PixelInputs:
    preset = pair.preset
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, preset.llm.vocab_size, (batch, preset.n_text + 1), generator=generator)
    ids[:, min(TEXT_BEFORE_IMAGE, preset.n_text)] = IMAGE_TOKEN_INDEX
    size = preset.tower.image_size
    pixels = torch.randn(batch, preset.n_tiles, 3, size, size, generator=generator).to(pair.device, pair.dtype)
    if not preset.anyres:
        return PixelInputs(ids.to(pair.device), pixels[:, 0], None)
    return PixelInputs(ids.to(pair.device), list(pixels), [(2 * size, 2 * size)] * batch)

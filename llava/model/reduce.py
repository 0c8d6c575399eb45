"""Training-free vision-token reduction (FastV, PyramidDrop, random, uniform, VisionZip) on a dense LLaVA model.

``apply_reducer(model, "fastv_k2_keep0.25")`` turns a loaded dense LLaVA model, in place, into one that runs
the p-MoD forward without routers: the reducer's layers process only the vision tokens it keeps (see
``pmod.reducers``), generation keeps a compact KV cache for those layers, and ``last_routing_stats`` reports
the kept tokens per layer, as for p-MoD. The weights and their names are untouched.
"""

from __future__ import annotations

import torch

from llava.mm_utils import is_anyres
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM, LlavaLlamaModel
from llava.model.language_model.pmod_llama import PmodLlavaLlamaForCausalLM, PmodLlavaLlamaModel
from llava.model.visionzip import visionzip_features
from pmod.reducers import REDUCER_CONFIG_KEY, ReducerSpec, parse_reducer


class ReducedLlavaLlamaModel(PmodLlavaLlamaModel):
    """A dense LLaVA decoder whose forward drops vision tokens by ``self.reducer``."""


class ReducedLlavaLlamaForCausalLM(PmodLlavaLlamaForCausalLM):
    """A dense LLaVA model with a training-free reducer; built only by :func:`apply_reducer`."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VisionZip shrinks each image's features before the projector; the other reducers act in the LLM."""
        reducer = self.get_model().reducer
        if not reducer.merges_before_llm:
            return super().encode_images(images)
        features = visionzip_features(self.get_vision_tower(), images, reducer.dominant, reducer.contextual)
        return self.get_model().mm_projector(features)

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("a reducer is applied at load time (reducer=...), not saved: save the dense model")


def apply_reducer(model: LlavaLlamaForCausalLM, spec: str | ReducerSpec) -> ReducedLlavaLlamaForCausalLM:
    """Give a dense LLaVA model (``llava_llama``) the reducer ``spec``, or replace the one it has; returns the
    same object."""
    spec = parse_reducer(spec) if isinstance(spec, str) else spec
    if type(model) not in (LlavaLlamaForCausalLM, ReducedLlavaLlamaForCausalLM):
        raise TypeError(
            f"reducer {spec.name}: needs a dense LLaVA model (llava_llama), got {type(model).__name__}; p-MoD "
            "checkpoints already drop tokens by their own routers"
        )
    config = model.config
    if spec.merges_before_llm and is_anyres(getattr(config, "image_aspect_ratio", None)):
        raise NotImplementedError(f"reducer {spec.name}: VisionZip's AnyRes layout (every crop zipped on its own, "
                                  "no unpadding or newline tokens) is not implemented; use it with pad/square images")
    schedule = spec.schedule(config.num_hidden_layers)
    model.__class__ = ReducedLlavaLlamaForCausalLM
    language_model = model.get_model()
    language_model.__class__ = ReducedLlavaLlamaModel
    language_model.schedule = schedule
    language_model.reducer = spec
    language_model.last_routing_stats = None
    setattr(config, REDUCER_CONFIG_KEY, spec.name)
    config.mod_target_layer_indices = list(schedule.mod_layers) if schedule else []  # layers PmodCache keeps compact
    return model


def remove_reducer(model: ReducedLlavaLlamaForCausalLM) -> LlavaLlamaForCausalLM:
    """The dense model back (same object, same weights): e.g. to time dense and reduced in one process."""
    if type(model) is not ReducedLlavaLlamaForCausalLM:
        raise TypeError(f"remove_reducer needs a model given a reducer by apply_reducer, got {type(model).__name__}")
    model.__class__ = LlavaLlamaForCausalLM
    language_model = model.get_model()
    language_model.__class__ = LlavaLlamaModel
    for name in ("schedule", "reducer", "last_routing_stats"):
        delattr(language_model, name)
    for key in (REDUCER_CONFIG_KEY, "mod_target_layer_indices"):
        delattr(model.config, key)
    return model

"""p-MoD for transformers' own VLM classes: ``apply_pmod`` on a loaded model, ``from_pretrained`` to reload one.

``apply_pmod`` writes the official ``mod_*`` settings into the text config, turns the scheduled decoder layers
into their p-MoD variants (a router each) and gives the model the p-MoD subclass of its own class
(``Pmod<Class>``), whose ``forward`` opens a :class:`ForwardSession` per call: at prefill it routes the tokens
the model marks as image / video tokens (host counts once per batch); later steps run the compact layers
against their shorter :class:`PmodCache`. ``generate`` starts from a PmodCache. ``save_pretrained`` keeps the
settings and the routers; ``from_pretrained`` builds the p-MoD class from them and loads everything.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from pmod.cache import PmodCache
from pmod.hf.families import PMOD_PREFIX, base_architecture, text_layers, visual_token_ids
from pmod.hf.layers import PmodState, make_pmod_layer
from pmod.hf_compat import cache_kwargs, pop_cache
from pmod.reducers import REDUCER_CONFIG_KEY, ReducerSpec, parse_reducer
from pmod.routing import TokenRouter, zero_linear
from pmod.session import ForwardSession, check_mask_width, routing_inputs
from pmod.settings import MOD_CONFIG_KEYS, validate_mod_config
from pmod.weight_norm import parse_weight_norm

DEFAULTS = dict(mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1",
                mod_bias_enabled=True, mod_special_init=True, mod_target_token_type="vision_all")


def apply_pmod(model, schedule: str = DEFAULTS["mod_target_layers"], router_factor: float = 0.5,
               weight_norm: str = DEFAULTS["mod_weight_norm"], bias: bool = True, zero_init: bool = True,
               target: str = "vision_all"):
    """Make a loaded transformers VLM a p-MoD model, in place (and return it).

    ``schedule``, ``router_factor``, ``weight_norm`` are the official ``--mod_target_layers``,
    ``--mod_router_factor`` and ``--mod_weight_norm``; ``zero_init`` routers (``--mod_special_init``) make the
    p-MoD model compute exactly what the dense model does until trained, when every token is kept.
    ``target`` is ``vision_all`` (image and video tokens) or ``all``.
    """
    base_architecture(model)
    if getattr(model, "pmod_state", None) is not None:
        raise RuntimeError("this model already has p-MoD layers")
    if target not in ("vision_all", "all"):
        raise ValueError(f"target {target!r}: use vision_all or all")
    settings = dict(mod_target_layers=schedule, mod_router_factor=router_factor, mod_weight_norm=weight_norm,
                    mod_bias_enabled=bias, mod_special_init=zero_init, mod_target_token_type=target)
    text_config = model.config.get_text_config()
    for key, value in settings.items():
        setattr(text_config, key, value)
    _build_pmod(model)
    for layer in text_layers(model):
        if hasattr(layer, "router") and zero_init:
            zero_linear(layer.router.router)
    return model


def _build_pmod(model) -> None:
    """Routers on the scheduled layers and the p-MoD subclass, from the ``mod_*`` keys of the text config."""
    text_config = model.config.get_text_config()
    schedule = validate_mod_config(text_config)
    if 0 in schedule.mod_layers:
        raise ValueError("p-MoD on transformers' VLMs keeps layer 0 dense (transformers sizes its masks and "
                         "positions by layer 0's cache): choose a schedule or a router factor with layer 0 dense")
    layers = text_layers(model)
    state = PmodState()
    weight_norm = parse_weight_norm(text_config.mod_weight_norm)
    for index in schedule.mod_layers:
        layer = layers[index]
        reference = layer.input_layernorm.weight
        router = TokenRouter(text_config.hidden_size, bool(text_config.mod_bias_enabled),
                             bool(text_config.mod_special_init))
        router.to(device=reference.device, dtype=reference.dtype)
        make_pmod_layer(layer, router, weight_norm, state)
    model.__class__ = pmod_class(type(model))
    model.pmod_state = state
    model.pmod_schedule = schedule


_MODEL_CLASSES: dict[type, type] = {}


def pmod_class(base: type) -> type:
    """``Pmod<Class>``: the VLM class with a forward that routes and a generate that starts a PmodCache."""
    if base.__name__.startswith(PMOD_PREFIX):
        return base
    if base not in _MODEL_CLASSES:

        def __init__(self, config, *args, **kwargs):
            """Built from a saved p-MoD config (``from_pretrained``): routers exist before the weights load."""
            base.__init__(self, config, *args, **kwargs)
            _build_pmod(self)

        @functools.wraps(base.forward)  # generate() validates its model kwargs against this signature
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, cache=None, use_cache=None,
                    inputs_embeds=None, **kwargs):
            session, cache, use_cache = _open_session(self, input_ids, inputs_embeds, attention_mask,
                                                      pop_cache({"cache": cache, "past_key_values": past_key_values}),
                                                      use_cache, kwargs)
            output = base.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, **cache_kwargs(cache), **kwargs)
            session.finish()
            return output

        def save_pretrained(self, *args, **kwargs):
            if getattr(self, "pmod_reducer", None) is not None:
                raise NotImplementedError("a reducer is applied at load time (reducer=...), not saved: save the "
                                          "dense model")
            return base.save_pretrained(self, *args, **kwargs)

        def generate(self, *args, **kwargs):
            """``generate`` with a PmodCache (or the caller's cache, to continue a conversation)."""
            if kwargs.get("cache_implementation") is not None:
                raise NotImplementedError(
                    f"cache_implementation={kwargs['cache_implementation']!r}: pmod.hf models generate with the "
                    "dynamic PmodCache; the static cache (compiled decoding) is built for our LLaVA models")
            cache = pop_cache(kwargs)
            if cache is None and kwargs.get("use_cache", True) is not False:
                cache = PmodCache(config=self.config.get_text_config())
            return base.generate(self, *args, **cache_kwargs(cache), **kwargs)

        name = f"{PMOD_PREFIX}{base.__name__}"
        _share_checkpoint_layout(base, name)
        _MODEL_CLASSES[base] = type(name, (base,), {
            "__init__": __init__, "forward": forward, "generate": generate, "save_pretrained": save_pretrained,
            "__doc__": f"{base.__name__} with p-MoD layers (pmod.hf); reload with pmod.hf.from_pretrained.",
        })
    return _MODEL_CLASSES[base]


def apply_reducer(model, spec: str | ReducerSpec):
    """Give a dense transformers VLM a training-free reducer (``pmod.reducers``: FastV, PyramidDrop, random,
    uniform), in place (and return it). VisionZip and reducers that touch layer 0 are refused, with the reason."""
    spec = parse_reducer(spec) if isinstance(spec, str) else spec
    base_architecture(model)
    if getattr(model, "pmod_state", None) is not None:
        raise TypeError(f"reducer {spec.name}: needs a dense model; this one already has p-MoD layers or a reducer")
    if spec.merges_before_llm:
        raise NotImplementedError(f"reducer {spec.name}: VisionZip runs on our LLaVA checkpoints' CLIP tower only "
                                  "(llava.model.reduce); transformers' own vision towers are not wired")
    text_config = model.config.get_text_config()
    schedule = spec.schedule(text_config.num_hidden_layers)
    first = min(schedule.mod_layers[0], *(drop + spec.score_layer_offset for drop in spec.drop_layers))
    if schedule.is_mod(0):
        raise ValueError(f"reducer {spec.name}: transformers' VLMs keep layer 0 dense (masks and positions are sized "
                         "by layer 0's cache); start it at layer 1 or later (e.g. _layer1)")
    setattr(text_config, REDUCER_CONFIG_KEY, spec.name)
    text_config.mod_target_layer_indices = list(schedule.mod_layers)  # the layers PmodCache keeps compact
    state = PmodState()
    for layer in list(text_layers(model))[first:]:
        make_pmod_layer(layer, None, None, state)
    model.__class__ = pmod_class(type(model))
    model.pmod_state, model.pmod_schedule, model.pmod_reducer = state, schedule, spec
    return model


def _share_checkpoint_layout(base: type, name: str) -> None:
    """Save and load class ``name`` with the weight names of ``base``'s checkpoints.

    transformers renames weights between a checkpoint and the module tree by class name or model type, and
    skips classes defined outside transformers unless registered: unregistered, a p-MoD model would save under
    other names than the hub layout its base class uses.
    """
    mapping = get_checkpoint_conversion_mapping(base.__name__) or get_checkpoint_conversion_mapping(
        base.config_class.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


def _open_session(model, input_ids, inputs_embeds, attention_mask, cache, use_cache, kwargs):
    """The forward's session (routing at prefill), made current for the model's p-MoD layers."""
    text_config = model.config.get_text_config()
    use_cache = text_config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
        cache = PmodCache(config=text_config)
    reference = input_ids if input_ids is not None else inputs_embeds
    length = reference.shape[1]
    past_length = cache.get_seq_length() if cache is not None else 0
    check_mask_width(attention_mask, cache, past_length, length)
    routing = None
    if past_length == 0 and input_ids is not None:
        routing = routing_inputs(cache, 0, length, _targets(model, input_ids), attention_mask, None)
    elif past_length > 0 and any(kwargs.get(name) is not None for name in ("pixel_values", "pixel_values_videos")):
        raise NotImplementedError("p-MoD routes vision tokens at prefill only: images or videos cannot continue a "
                                  "filled cache. Start a new prompt (without the cache).")
    like = torch.empty(*reference.shape[:2], 0, dtype=model.dtype, device=reference.device)
    session = ForwardSession(text_config, model.pmod_schedule, cache, attention_mask, like, past_length, routing,
                             getattr(model, "pmod_reducer", None))
    model.pmod_state.session = session
    return session, cache, use_cache


def _targets(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the tokens p-MoD may skip (image / video placeholders, or every token for target 'all')."""
    if getattr(model.config.get_text_config(), "mod_target_token_type", "vision_all") == "all":
        return torch.ones_like(input_ids, dtype=torch.bool)
    ids = torch.tensor(visual_token_ids(model.config), device=input_ids.device)
    return torch.isin(input_ids, ids)


def has_pmod_settings(config) -> bool:
    """Whether a (VLM) config holds p-MoD settings, i.e. was saved from a p-MoD model."""
    return getattr(config.get_text_config(), "mod_target_layers", None) is not None


def load_vlm(path: str | Path, **kwargs):
    """A supported checkpoint as it was saved: p-MoD (``from_pretrained``) or dense (transformers' own class)."""
    config = AutoConfig.from_pretrained(path)
    if has_pmod_settings(config):
        return from_pretrained(path, **kwargs)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    base_architecture(model)
    return model


def from_pretrained(path: str | Path, **kwargs):
    """Load a p-MoD checkpoint saved from a ``pmod.hf`` model (routers included), in its p-MoD class."""
    config = AutoConfig.from_pretrained(path)
    if not has_pmod_settings(config):
        raise ValueError(f"{path}: no p-MoD settings in its config; for a dense checkpoint load it with "
                         "transformers and call pmod.hf.apply_pmod(model, ...)")
    name = (config.architectures or [""])[0].removeprefix(PMOD_PREFIX)
    base = getattr(transformers, name, None)
    if base is None:
        raise ValueError(f"{path}: architecture {config.architectures} is not a transformers class")
    base_architecture(base)
    return pmod_class(base).from_pretrained(path, config=config, **kwargs)


def pmod_settings(model) -> dict:
    """The model's ``mod_*`` settings (from its text config)."""
    text_config = model.config.get_text_config()
    return {key: getattr(text_config, key, None) for key in MOD_CONFIG_KEYS}

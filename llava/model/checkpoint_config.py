"""Which config a checkpoint folder needs, decided by its config.json (never by the folder's name).

Our checkpoints and the official p-MoD releases say ``llava_llama`` / ``pmod_llava_llama``. The LLaVA releases
(liuhaotian LLaVA-1.5 / 1.6 and the many fine-tunes made with the official LLaVA code) carry older names:
``"model_type": "llava"``, which transformers now maps to its own, differently laid-out ``LlavaConfig``, or
``"llava_mistral"``, with ``"architectures": ["LlavaLlamaForCausalLM"]`` / ``["LlavaMistralForCausalLM"]``.
Their flat Llama config with ``mm_*`` keys is exactly ours, so they load as our dense LLaVA class.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from llava.model.language_model.llava_llama import LlavaConfig

OUR_MODEL_TYPES = ("llava_llama", "pmod_llava_llama")
# model_type -> architecture names the official LLaVA code wrote for a Llama-layout language model
LLAVA_CODE_RELEASES = {
    "llava": ("LlavaLlamaForCausalLM",),
    "llava_mistral": ("LlavaMistralForCausalLM",),
}
UNSUPPORTED_LLAVA_CODE = {"llava_mpt": "MPT", "llava_qwen": "Qwen2", "llava_gemma": "Gemma"}


class CheckpointConfigError(ValueError):
    """A checkpoint's config.json is not one this code base can load."""


def load_checkpoint_config(path: str, **kwargs) -> PretrainedConfig:
    """The config to build ``path``'s model from: ours, a LLaVA release's (as ours), or a plain causal LM's."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, **kwargs)
    except OSError as error:
        where = "a folder without a readable config.json" if Path(path).exists() else \
            "no such folder, and no hub model of that name could be read"
        raise CheckpointConfigError(f"{path}: {where} ({error})") from error
    model_type = config_dict.get("model_type")
    architectures = tuple(config_dict.get("architectures") or ())
    if model_type in OUR_MODEL_TYPES:
        return AutoConfig.from_pretrained(path, **kwargs)
    if model_type in LLAVA_CODE_RELEASES and set(architectures) <= set(LLAVA_CODE_RELEASES[model_type]):
        return released_llava_config(config_dict, path)
    if model_type in UNSUPPORTED_LLAVA_CODE:
        raise CheckpointConfigError(
            f"{path}: a LLaVA checkpoint with a {UNSUPPORTED_LLAVA_CODE[model_type]} language model "
            f"(model_type {model_type!r}); this code base builds LLaVA on Llama-layout models only"
        )
    if model_type and model_type.startswith("llava"):
        raise CheckpointConfigError(
            f"{path}: model_type {model_type!r} with architectures {list(architectures)} is a transformers-native "
            "LLaVA checkpoint (e.g. llava-hf), not one written by the LLaVA code; use it through pmod.hf "
            "(pmod.hf.load_vlm / apply_pmod, python -m llava.train.train_hf, lmms-eval model pmod_hf: "
            "docs/hf_models.md). Loadable here: model_type llava_llama or pmod_llava_llama, "
            "and LLaVA releases (model_type llava / llava_mistral with LlavaLlamaForCausalLM / "
            "LlavaMistralForCausalLM)"
        )
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointConfigError(
            f"{path}: model_type {model_type!r} is neither a LLaVA / p-MoD checkpoint nor a model transformers "
            f"knows ({error})"
        ) from error


def released_llava_config(config_dict: dict, path: str | Path = "") -> LlavaConfig:
    """A LLaVA release's config as our ``llava_llama`` config (same keys; only the type names differ)."""
    if config_dict.get("sliding_window") not in (None, 0):
        raise CheckpointConfigError(
            f"{path}: sliding-window attention ({config_dict['sliding_window']}) is not supported by the Llama-layout "
            "LLaVA class"
        )
    dropped = ("model_type", "sliding_window") + (("rope_scaling",) if config_dict.get("rope_scaling") is None else ())
    converted = {key: value for key, value in config_dict.items() if key not in dropped}
    converted["architectures"] = ["LlavaLlamaForCausalLM"]
    return LlavaConfig.from_dict(converted)

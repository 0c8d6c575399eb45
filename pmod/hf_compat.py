"""Everything that depends on which transformers release is installed, in one place.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache`` in model forwards, model
outputs, ``generate`` and ``create_causal_mask``; the old name only warns there and is dropped when both are
given. Our forwards accept either name from callers and call transformers with the name the installed
release declares, so no release in the supported window warns because of us.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import fields

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

# The releases CI tests (lowest and newest); keep equal to the bound in requirements.txt.
SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.17,<5.25")
INSTALL_HINT = 'pip install -c constraints.txt -e ".[train,eval]"  (or: pip install "transformers{}")'

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` under the name the installed transformers expects."""
    return {CACHE_ARG: cache}


def one_cache(*candidates):
    """The one cache among ``candidates`` that is not None (a caller may use either name, not both)."""
    given = [value for value in candidates if value is not None]
    if any(value is not given[0] for value in given[1:]):
        raise ValueError("pass the cache once, as `cache` or `past_key_values`, not two different ones")
    return given[0] if given else None


def pop_cache(kwargs: dict):
    """The cache passed in ``kwargs`` as ``cache`` or ``past_key_values`` (both names removed)."""
    return one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))


def output_cache(output):
    """The cache of a model or generate output, read without transformers' deprecation warning."""
    return getattr(output, CACHE_ARG)


def set_activation_checkpointing(model, enable: bool) -> None:
    """Non-reentrant checkpointing on or off; transformers 5.24 renamed gradient to activation checkpointing."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enable:
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


# LLaVA-era Trainer flags -> their current names: transformers 5 removed the first two (warmup_steps < 1 is a
# ratio now); 5.24 renamed gradient checkpointing (the old names still work there, with a FutureWarning).
RENAMED_TRAINER_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",
    "--gradient_checkpointing": "--activation_checkpointing",
    "--gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs",
}


def current_trainer_flags(argv: list[str]) -> list[str]:
    """Trainer flags under the installed release's names, so LLaVA's scripts run without warnings, and the
    new names (e.g. ``--activation_checkpointing``) work on releases of the window that predate them."""
    from transformers import TrainingArguments

    known = {f"--{f.name}" for f in fields(TrainingArguments)}
    names = {old: new for old, new in RENAMED_TRAINER_FLAGS.items() if new in known}
    names.update({new: old for old, new in RENAMED_TRAINER_FLAGS.items() if new not in known and old in known})
    renamed = []
    for arg in argv:
        flag, separator, value = arg.partition("=")
        renamed.append(names.get(flag, flag) + separator + value)
    return renamed


def check_transformers_version(version: str | None = None) -> bool:
    """Warn (once per process, at import) when the installed transformers lies outside the tested window."""
    installed = Version(version or transformers.__version__)
    if SUPPORTED_TRANSFORMERS.contains(installed, prereleases=True):
        return True
    warnings.warn(
        f"p-MoD LLaVA is tested with transformers {SUPPORTED_TRANSFORMERS}, found {installed}: the p-MoD cache and "
        f"masks hook into transformers internals that change between releases. Install a tested set with: "
        f"{INSTALL_HINT.format(SUPPORTED_TRANSFORMERS)}",
        UserWarning,
        stacklevel=2,
    )
    return False


check_transformers_version()  # once per process: every entry point (llava, pmod.cache, pmod.layer) imports this

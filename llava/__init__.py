"""LLaVA fork with p-MoD support.

Importing ``llava`` registers ``llava_llama`` and ``pmod_llava_llama`` with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` loads LLaVA and p-MoD checkpoints once this package is imported.
"""

__version__ = "0.1.0"

from llava.model import LlavaLlamaForCausalLM, PmodLlavaLlamaForCausalLM  # noqa: E402,F401  (registers the models)

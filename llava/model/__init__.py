"""LLaVA models; importing this package registers them with AutoConfig / AutoModelForCausalLM."""

from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.language_model.pmod_llama import PmodLlavaConfig, PmodLlavaLlamaForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "PmodLlavaConfig", "PmodLlavaLlamaForCausalLM"]

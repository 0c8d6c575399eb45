"""p-MoD: Mixture-of-Depths for the vision tokens of Llama-family decoders, independent of LLaVA.

Submodules are imported on demand (``pmod.schedule``, ``pmod.weight_norm``, ``pmod.accounting``, ...);
this package file stays import-free so that ``import pmod`` costs nothing.
"""

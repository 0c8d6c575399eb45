"""LLaVA fork with p-MoD support. Kept import-light: submodules load torch/transformers on demand."""

__version__ = "0.1.0"

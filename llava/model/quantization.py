"""8/4-bit weights through bitsandbytes (LLaVA's ``--load-8bit/--load-4bit`` and QLoRA's ``--bits``).

Only the language model's linear layers are quantised: p-MoD routers (one logit per token, ranked against each
other), the projector, the vision tower and ``lm_head`` stay in full precision, as LLaVA keeps its projector.
bitsandbytes kernels need CUDA, so both requirements are checked before any weight is read.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

FULL_PRECISION_MODULES = ("router", "mm_projector", "vision_tower", "lm_head")


class QuantizationUnavailable(ValueError):
    """8/4-bit loading was asked for where it cannot run."""


def bnb_config(bits: int, compute_dtype: torch.dtype, flag: str, double_quant: bool = True,
               quant_type: str = "nf4") -> BitsAndBytesConfig:
    """A BitsAndBytesConfig for ``bits`` (4 or 8); ``flag`` names the option in errors."""
    if bits not in (4, 8):
        raise ValueError(f"{flag}: 4 or 8 bits, got {bits}")
    if not torch.cuda.is_available():
        raise QuantizationUnavailable(f"{flag} needs a CUDA device (bitsandbytes kernels); on CPU load in float32")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise QuantizationUnavailable(f"{flag} needs bitsandbytes: pip install bitsandbytes") from error
    return BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        llm_int8_skip_modules=list(FULL_PRECISION_MODULES),
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
    )

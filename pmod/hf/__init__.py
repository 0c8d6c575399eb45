"""p-MoD for transformers' own VLM classes (LLaVA-HF, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).

    from transformers import Qwen2_5_VLForConditionalGeneration
    from pmod.hf import apply_pmod, from_pretrained

    model = apply_pmod(Qwen2_5_VLForConditionalGeneration.from_pretrained(...), schedule="shiftedcos_decay_0.85_0.15")
    model.save_pretrained("pmod-qwen")            # settings and routers travel with the checkpoint
    model = from_pretrained("pmod-qwen")           # the same p-MoD model again
    model = load_vlm(path)                         # p-MoD or dense, whichever the checkpoint is
    model = apply_reducer(load_vlm(dense), "fastv_k2_keep0.25")   # a training-free reducer on a dense model
"""

from pmod.hf.families import SUPPORTED_ARCHITECTURES
from pmod.hf.model import apply_pmod, apply_reducer, from_pretrained, has_pmod_settings, load_vlm, pmod_settings

__all__ = ["SUPPORTED_ARCHITECTURES", "apply_pmod", "apply_reducer", "from_pretrained", "has_pmod_settings",
           "load_vlm", "pmod_settings"]

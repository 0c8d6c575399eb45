"""Which lmms-eval model of this package evaluates a checkpoint, from its ``config.json`` alone.

``pmod_hf`` for transformers' own VLM classes (LLaVA-HF, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL;
dense or saved by ``pmod.hf``), ``pmod_llava`` for everything else (this package's LLaVA checkpoints and the
released LLaVA / p-MoD ones). ``python -m llava.eval.model_choice CKPT`` prints it; scripts/eval.sh uses it.
"""

import json
import sys
from pathlib import Path

from pmod.hf.families import PMOD_PREFIX, SUPPORTED_ARCHITECTURES


def lmms_model_for(checkpoint: str) -> str:
    """The model name for ``--model`` (a folder, or a hub id whose config.json is cached or downloadable)."""
    from transformers.utils import cached_file

    try:
        config_file = cached_file(checkpoint, "config.json")
        architectures = json.loads(Path(config_file).read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return "pmod_llava"  # the loader reports an unreadable checkpoint with its own, precise error
    if any(name.removeprefix(PMOD_PREFIX) in SUPPORTED_ARCHITECTURES for name in architectures):
        return "pmod_hf"
    return "pmod_llava"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m llava.eval.model_choice CHECKPOINT")
    print(lmms_model_for(sys.argv[1]))

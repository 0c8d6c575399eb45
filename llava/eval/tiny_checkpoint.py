"""An evaluable tiny LLaVA checkpoint (dense or p-MoD, pad or anyres) from the tiny models, without training.

For offline tests and smoke runs of the evaluation (`scripts/eval.sh` with `CKPT=` such a folder).
Weights are random but deterministic (seeded), so answers are reproducible.
"""

import argparse
from types import SimpleNamespace

import torch

from llava.tiny_models import TinyModelPaths, build_tiny_models

PMOD_DEFAULTS = dict(
    mod_target_layers="shiftedcos_decay_0.85_0.15",
    mod_router_factor=0.5,
    mod_weight_norm="tanh_0.2_1",
    mod_bias_enabled=True,
    mod_special_init=False,
    mod_target_token_type="vision_all",
)


def build_tiny_llava_checkpoint(tiny: TinyModelPaths, out_dir: str, pmod: bool = False,
                                image_aspect_ratio: str = "pad", seed: int = 0) -> str:
    """Save a LLaVA-1.5-style (`pad`) or NeXT-style (`anyres`, spatial_unpad) checkpoint to `out_dir`."""
    from transformers import AutoTokenizer

    from llava.model import LlavaLlamaForCausalLM, PmodLlavaLlamaForCausalLM

    if image_aspect_ratio not in ("pad", "anyres"):
        raise ValueError(f"image_aspect_ratio must be pad or anyres, got {image_aspect_ratio!r}")
    anyres = image_aspect_ratio == "anyres"
    vision_args = SimpleNamespace(
        vision_tower=tiny.vision_tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu", mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        pretrain_mm_mlp_adapter=None)
    model_class = PmodLlavaLlamaForCausalLM if pmod else LlavaLlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_pretrained(tiny.llm, dtype=torch.float32)
        model.get_model().initialize_vision_modules(vision_args)
        if pmod:
            model.get_model().initialize_mod_modules(SimpleNamespace(**PMOD_DEFAULTS))
    config = model.config
    config.image_aspect_ratio = image_aspect_ratio
    if anyres:
        tile = model.get_vision_tower().config.image_size
        config.image_grid_pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    tokenizer = AutoTokenizer.from_pretrained(tiny.llm)
    config.tokenizer_model_max_length = tokenizer.model_max_length
    config.tokenizer_padding_side = "right"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--models", required=True, help="folder for (or with) the tiny-llama/ and tiny-clip/ models")
    parser.add_argument("--pmod", action="store_true", help="a p-MoD checkpoint (official default flags)")
    parser.add_argument("--image-aspect-ratio", default="pad", choices=("pad", "anyres"))
    args = parser.parse_args(argv)
    tiny = build_tiny_models(args.models)
    print(build_tiny_llava_checkpoint(tiny, args.out, pmod=args.pmod, image_aspect_ratio=args.image_aspect_ratio))


if __name__ == "__main__":
    main()

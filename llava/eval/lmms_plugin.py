"""lmms-eval entry points (group `lmms_eval.models`, declared in setup.py): register the `pmod_llava` model
(this package's LLaVA checkpoints) and the `pmod_hf` model (transformers' own VLMs, dense or p-MoD).

Only lmms-eval imports this module, so lmms-eval stays an optional dependency of the package.
The model classes themselves are imported lazily by lmms-eval when the model is requested.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="pmod_llava",
    simple_class_path="llava.eval.lmms_adapter.PmodLlava",
    aliases=("pmod", "pmod_llava_llama"),
)

HF_MANIFEST = ModelManifest(
    model_id="pmod_hf",
    simple_class_path="llava.eval.lmms_hf_adapter.PmodHF",
)

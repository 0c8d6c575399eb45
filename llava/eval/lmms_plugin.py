"""lmms-eval entry point (group `lmms_eval.models`, declared in setup.py): registers the `pmod_llava` model.

Only lmms-eval imports this module, so lmms-eval stays an optional dependency of the package.
The model class itself is imported lazily by lmms-eval when the model is requested.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="pmod_llava",
    simple_class_path="llava.eval.lmms_adapter.PmodLlava",
    aliases=("pmod", "pmod_llava_llama"),
)

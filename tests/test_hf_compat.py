"""The supported transformers window, the lock that installs it, and the one place that knows the release.

CI runs these (with the other ``compat`` tests) on the locked set and again on the lowest and the newest
transformers of the window.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO_ROOT, subprocess_env
from packaging.requirements import Requirement
from packaging.version import Version

from pmod.cache import PmodCache
from pmod.hf_compat import CACHE_ARG, SUPPORTED_TRANSFORMERS, one_cache, output_cache, pop_cache

pytestmark = pytest.mark.compat


def requirement_lines(text: str) -> list[Requirement]:
    return [Requirement(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def locked_versions() -> dict[str, Version]:
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", name).lower(): Version(version) for name, version in pins}


def test_requirements_declare_the_window_the_code_checks():
    transformers_req = next(r for r in requirement_lines((REPO_ROOT / "requirements.txt").read_text())
                            if r.name == "transformers")
    assert transformers_req.specifier == SUPPORTED_TRANSFORMERS
    assert any(spec.operator == "<" for spec in SUPPORTED_TRANSFORMERS), "the window needs a tested upper bound"


def test_the_lock_pins_every_dependency_inside_its_declared_range():
    """Every requirement of the package and its extras (as installed) is locked, at a version it allows."""
    locked = locked_versions()
    assert not {name for name in locked if name in ("torch", "torchvision", "pmod-llava")}
    declared = [Requirement(text) for text in importlib.metadata.requires("pmod-llava")]
    assert {r.name for r in declared} >= {"transformers", "lmms-eval", "filelock", "deepspeed", "sentencepiece"}
    for requirement in declared:
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":
            continue  # the torch build is chosen by PMOD_TORCH_PINS, not by the lock
        assert name in locked, f"{requirement.name} is declared but not locked"
        assert requirement.specifier.contains(locked[name], prereleases=True), f"{name} {locked[name]} vs {requirement}"
    assert locked["filelock"] < Version("4.3") and locked["sentencepiece"] < Version("0.2.3")


def test_the_installed_transformers_is_inside_the_window():
    assert Version(transformers.__version__) in SUPPORTED_TRANSFORMERS


def test_cache_argument_name_follows_the_installed_release():
    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert CACHE_ARG == expected


def test_a_cache_may_be_passed_under_either_name_but_only_once():
    first, second = object(), object()
    assert one_cache(None, first) is first and one_cache(first, first) is first and one_cache() is None
    with pytest.raises(ValueError, match="not two different ones"):
        one_cache(first, second)
    kwargs = {"past_key_values": first, "use_cache": True}
    assert pop_cache(kwargs) is first and kwargs == {"use_cache": True}


def test_importing_llava_outside_the_window_warns_once_naming_window_and_fix():
    # transformers replaces its lazy module object on first model import: patch the one that stays.
    script = ("import sys, transformers.models.llama.modeling_llama\n"
              "sys.modules['transformers'].__version__ = '5.99.0'\n"
              "import llava, pmod.cache, pmod.layer, llava.model.builder\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "UserWarning: p-MoD LLaVA is tested with" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert str(SUPPORTED_TRANSFORMERS) in warnings[0] and "found 5.99.0" in warnings[0]
    assert "pip install -c constraints.txt" in warnings[0]


DEPRECATION_SCRIPT = """
import logging, warnings, torch
warnings.simplefilter("error", FutureWarning)
warnings.simplefilter("error", DeprecationWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning, module="importlib._bootstrap")
messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger("transformers").addHandler(Collect())
import sys; sys.path.insert(0, "tests")
from pmod_testing import build_pmod, images_for, mixed_prompts, right_padded
from pmod.hf_compat import output_cache, set_activation_checkpointing
model = build_pmod(sys.argv[1])
prompts = mixed_prompts()
ids, mask = right_padded(prompts)
images = images_for(prompts)
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, images=images, use_cache=True)
    cache = output_cache(out)
    model(input_ids=torch.tensor([[5], [6], [7]]), past_key_values=cache, use_cache=True)
model.generate(ids, attention_mask=mask, images=images, max_new_tokens=3, do_sample=False)
model.generate(ids, attention_mask=mask, images=images, max_new_tokens=2, num_beams=2, do_sample=False)
model.train()
set_activation_checkpointing(model, True)
labels = ids.masked_fill(~mask | (ids < 0), -100)
model(input_ids=ids, attention_mask=mask, images=images, labels=labels).loss.backward()
print("deprecated:", [m for m in messages if "deprecat" in m.lower()])
"""


def test_forward_generate_and_training_raise_no_deprecation_warning(tiny_models):
    result = subprocess.run([sys.executable, "-c", DEPRECATION_SCRIPT, tiny_models.vision_tower], capture_output=True,
                            text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "deprecated: []"


def test_outputs_carry_the_cache_under_the_installed_name(tiny_models):
    from pmod_testing import build_pmod

    model = build_pmod(None)
    out = model(inputs_embeds=torch.randn(1, 5, 64), use_cache=True)
    assert isinstance(output_cache(out), PmodCache)
    assert CACHE_ARG in out.keys()


def test_docs_say_how_to_move_the_window_and_refresh_the_lock():
    install = (REPO_ROOT / "docs" / "install.md").read_text()
    assert "scripts/lock.sh" in install and "constraints.txt" in install
    declared = next(line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                    if line.startswith("transformers"))
    assert f"`{declared}`" in install, f"docs/install.md does not state the window {declared}"
    assert Path(REPO_ROOT / "scripts" / "lock.sh").is_file()


@pytest.mark.parametrize("flag", ["--gradient_checkpointing", "--activation_checkpointing"])
def test_llava_checkpointing_flag_parses_without_a_deprecation_warning(tiny_models, tiny_dataset, tmp_path, flag):
    """LLaVA's scripts pass --gradient_checkpointing, which transformers 5.24 renamed."""
    import warnings

    from llava.train.train import parse_args, uses_activation_checkpointing

    argv = ["--model_name_or_path", tiny_models.llm, "--data_path", tiny_dataset.instruct_json,
            "--output_dir", str(tmp_path), flag, "True", "--use_cpu", "True", "--report_to", "none"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, _, training_args = parse_args(argv)
    assert uses_activation_checkpointing(training_args)


def test_llava_era_trainer_flags_take_their_current_names(tiny_models, tiny_dataset, tmp_path):
    """LLaVA's scripts pass --evaluation_strategy and --warmup_ratio, which transformers 5 removed."""
    from llava.train.train import parse_args

    argv = ["--model_name_or_path", tiny_models.llm, "--data_path", tiny_dataset.instruct_json,
            "--output_dir", str(tmp_path), "--use_cpu", "True", "--report_to", "none",
            "--evaluation_strategy", "no", "--warmup_ratio=0.03"]
    _, _, training_args = parse_args(argv)
    assert training_args.eval_strategy == "no" and training_args.warmup_steps == pytest.approx(0.03)

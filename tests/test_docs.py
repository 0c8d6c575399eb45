"""The docs stay true: every module and script they name exists, README opens with the two commands, the
license is stated, and no internal notes (commit ids, notes to colleagues) are left in user docs."""

from __future__ import annotations

import importlib.util
import re

from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def test_every_python_module_the_docs_run_exists():
    named = {module for doc in DOCS for module in re.findall(r"python -m ([A-Za-z_][\w.]*)", doc.read_text())}
    ours = sorted(m for m in named if m.split(".")[0] in ("llava", "pmod", "benchmarks"))
    assert "llava.serve.gradio_app" in ours and "llava.model.merge_lora" in ours
    missing = [module for module in ours if importlib.util.find_spec(module) is None]
    assert not missing, f"docs run modules that do not exist: {missing}"


def test_every_script_the_docs_name_exists():
    ours = [doc for doc in DOCS if doc.name != "migration.md"]  # that page names LLaVA's and p-MoD's scripts too
    pattern = r"(?:bash |DS_CONFIG=|--deepspeed )(scripts/[\w./-]+\.(?:sh|json))"
    named = {path for doc in ours for path in re.findall(pattern, doc.read_text())}
    assert "scripts/finetune_pmod.sh" in named
    missing = sorted(path for path in named if not (REPO_ROOT / path).is_file())
    assert not missing, f"docs name scripts that do not exist: {missing}"


def test_readme_opens_with_the_two_commands_and_ends_with_citation_and_license():
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "bash scripts/demo.sh" in first_block and "bash scripts/test.sh" in first_block
    assert "@inproceedings{zhang2025pmod" in readme and "arxiv.org/abs/2412.04449" in readme
    license_text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license="Apache-2.0"' in (REPO_ROOT / "setup.py").read_text()


def test_user_docs_hold_no_internal_notes():
    for doc in DOCS:
        text = doc.read_text()
        assert "for the lead" not in text, doc.name
        commits = re.findall(r"\bcommit [0-9a-f]{7,40}\b|\b(?:before|after) [0-9a-f]{7}\b", text)
        assert not commits, f"{doc.name}: {commits}"


def test_the_transformers_vlm_python_example_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    from llava.tiny_hf_models import save_tiny_checkpoint

    code = (REPO_ROOT / "docs" / "hf_models.md").read_text().split("```python", 1)[1].split("```", 1)[0]
    hub_line = 'MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"'
    assert hub_line in code
    checkpoint = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "tiny-qwen")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace(hub_line, f"MODEL = {checkpoint!r}"), "docs/hf_models.md", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "PmodQwen2_5_VLForConditionalGeneration"
    assert (tmp_path / "checkpoints" / "pmod-qwen2.5-vl" / "processor_config.json").exists()
    assert namespace["answer"].shape[1] > namespace["inputs"]["input_ids"].shape[1]

"""Packaging for the p-MoD LLaVA code base (packages ``llava`` and ``pmod``).

The core install needs no torchvision and no flash-attn; training, evaluation and
development tools are extras so that a CPU-only user can install just what they run.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements():
    """Core dependencies live in requirements.txt so pip users and setup.py agree."""
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="pmod-llava",
    version="0.1.0",
    description="p-MoD (progressive Mixture-of-Depths) multimodal LLMs on a LLaVA code base for transformers 5",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llava", "llava.*", "pmod", "pmod.*"]),
    install_requires=read_requirements(),
    extras_require={
        "train": ["deepspeed>=0.15", "wandb"],
        # lmms-eval 0.7.3 imports filelock._api, which filelock 4.3 removed.
        "eval": ["lmms-eval==0.7.3", "filelock<4.3"],
        "demo": ["matplotlib"],
        "web": ["gradio>=6,<7"],
        "dev": ["pytest>=8", "matplotlib", "selenium>=4"],
    },
    entry_points={
        "lmms_eval.models": ["pmod_llava = llava.eval.lmms_plugin:MANIFEST",
                             "pmod_hf = llava.eval.lmms_plugin:HF_MANIFEST"],
    },
)

"""Loading a checkpoint's tokenizer, with an error that names the folder instead of a ``None`` found later.

LLaVA and Vicuna releases ship a SentencePiece ``tokenizer.model`` with a ``tokenizer_config.json`` and no
``tokenizer.json``; transformers converts it through protobuf. When that fails (a sentencepiece build whose
generated code needs a newer protobuf than the one installed), transformers falls back to a tiktoken parser
and reports only that parser's failure, so the real cause is found and named here.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from llava.model.checkpoint_config import load_checkpoint_config

INSTALL_HINT = 'pip install -c constraints.txt -e ".[train,eval]"'


class TokenizerLoadError(ValueError):
    """A checkpoint's tokenizer cannot be loaded."""


def load_tokenizer(source: str, **kwargs):
    """``AutoTokenizer.from_pretrained(source, **kwargs)``, or a TokenizerLoadError saying why and how to fix it.

    The folder's config is read as ``load_pretrained_model`` reads it: given a LLaVA release's
    ``model_type: llava``, AutoTokenizer would otherwise pick the tokenizer class transformers registers for its
    own LLaVA instead of the release's LlamaTokenizer (and drop the newlines of LLaVA's prompts).
    """
    if "config" not in kwargs and (Path(source) / "config.json").is_file():
        kwargs["config"] = load_checkpoint_config(source)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        reason = " ".join(str(error).split())
        message = f"no tokenizer could be loaded from {source} ({type(error).__name__}: {reason})"
        cause = sentencepiece_problem() if (Path(source) / "tokenizer.model").is_file() else None
        if cause:
            message += (f". Its tokenizer.model is a SentencePiece model, which this environment cannot read: {cause}"
                        f". Install the tested versions: {INSTALL_HINT}")
        elif Path(source).is_dir():
            message += (". The folder needs tokenizer.json, or tokenizer.model + tokenizer_config.json "
                        "(a LLaVA stage-1 folder takes its tokenizer from --model-base)")
        raise TokenizerLoadError(message) from error


def sentencepiece_problem() -> str | None:
    """Why SentencePiece models cannot be read here (None when they can)."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return "sentencepiece is not installed"
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (needs a compatible protobuf)
    except Exception as error:  # protobuf raises its own VersionError, or ImportError when missing
        return f"sentencepiece's protobuf code fails to import ({type(error).__name__}: {error})"
    return None

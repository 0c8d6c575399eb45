"""Check that lmms-eval can run before anything expensive starts: `python -m llava.eval.deps`.

lmms-eval imports most of its modules only when an evaluation starts, so a broken dependency (filelock 4.3
removed ``filelock._api``, which lmms-eval 0.7.3 imports) surfaces after the demo or a training run has spent
its time. The demo and ``scripts/eval.sh`` call this check first.
"""

from __future__ import annotations

import sys

INSTALL_HINT = 'pip install -c constraints.txt -e ".[eval]"'
KNOWN_CAUSES = {
    "filelock": 'filelock >= 4.3 removed `filelock._api`, which lmms-eval 0.7.3 imports: pip install "filelock<4.3"',
}


class EvaluationDependencyError(RuntimeError):
    """lmms-eval (or one of its dependencies) cannot be imported."""


def check_lmms_eval() -> None:
    """Import what an lmms-eval run imports; raise one clear error naming the cause and the fix."""
    try:
        import lmms_eval.evaluator  # noqa: F401  (imports the task registry, filelock, datasets, ...)
        from lmms_eval.api.model import lmms  # noqa: F401
    except Exception as error:  # any import-time failure means evaluation cannot run
        cause = next((hint for name, hint in KNOWN_CAUSES.items() if name in str(error)), None)
        message = f"lmms-eval cannot be imported ({type(error).__name__}: {error})."
        if cause:
            message += f" Known cause: {cause}."
        message += f" Install the tested versions from the repository root: {INSTALL_HINT}"
        raise EvaluationDependencyError(message) from error


def main() -> int:
    try:
        check_lmms_eval()
    except EvaluationDependencyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

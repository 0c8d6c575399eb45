"""Check that lmms-eval can run before anything expensive starts: `python -m llava.eval.deps`.

lmms-eval imports some of its dependencies only when an evaluation starts, so a broken one (filelock 4.3
removed ``filelock._api``, which lmms-eval 0.7.3 imports then) surfaces after the demo or a training run has
spent its time. The demo and ``scripts/eval.sh`` call this check first.
"""

from __future__ import annotations

import sys

INSTALL_HINT = 'pip install -c constraints.txt -e ".[eval]"'
KNOWN_CAUSES = {
    "filelock": 'filelock >= 4.3 removed `filelock._api`, which lmms-eval 0.7.3 imports: pip install "filelock<4.3"',
}


class EvaluationDependencyError(RuntimeError):
    """lmms-eval (or one of its dependencies) cannot run."""


def check_lmms_eval() -> None:
    """Import what an lmms-eval run imports and run its first setup step; one clear error naming cause and fix.

    lmms-eval 0.7.3 starts every evaluation with ``_enable_reentrant_filelocks()``, which imports
    ``filelock._api`` and patches filelock's lock class for the process (as any run of it does).
    """
    try:
        import lmms_eval.evaluator as evaluator
        from lmms_eval.api.model import lmms  # noqa: F401

        prepare = getattr(evaluator, "_enable_reentrant_filelocks", None)
        if prepare is not None:
            prepare()
    except Exception as error:  # any failure here means evaluation cannot run
        cause = next((hint for name, hint in KNOWN_CAUSES.items() if name in str(error)), None)
        message = f"lmms-eval cannot run ({type(error).__name__}: {error})."
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

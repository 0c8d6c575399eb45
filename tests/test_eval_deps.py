"""A broken evaluation install is reported before anything expensive runs, naming the cause and the fix."""

from __future__ import annotations

import sys

import pytest
from conftest import run_command

pytest.importorskip("lmms_eval")

from llava.eval import deps  # noqa: E402

pytestmark = pytest.mark.compat


def test_the_installed_lmms_eval_can_run():
    result = run_command([sys.executable, "-m", "llava.eval.deps"])
    assert result.returncode == 0 and result.stderr.strip() == ""


def test_filelock_without_its_private_api_is_named_with_the_fix(monkeypatch):
    """filelock 4.3 removed filelock._api, which lmms-eval 0.7.3 imports when an evaluation starts."""
    import lmms_eval.evaluator

    monkeypatch.setitem(sys.modules, "filelock._api", None)
    monkeypatch.setattr(lmms_eval.evaluator._enable_reentrant_filelocks, "_patched", False, raising=False)
    with pytest.raises(deps.EvaluationDependencyError) as error:
        deps.check_lmms_eval()
    message = str(error.value)
    assert "filelock._api" in message and 'pip install "filelock<4.3"' in message
    assert "pip install -c constraints.txt" in message


def test_the_demo_stops_before_training_when_evaluation_cannot_run(monkeypatch, tmp_path, capsys):
    from llava.demo import run

    def broken():
        raise deps.EvaluationDependencyError("lmms-eval cannot run (ModuleNotFoundError: ...)")

    monkeypatch.setattr(run, "check_lmms_eval", broken)
    monkeypatch.setattr(run, "run_demo", lambda *args: pytest.fail("the demo started"))
    with pytest.raises(SystemExit) as stopped:
        run.main(["--scale", "tiny", "--out", str(tmp_path / "demo")])
    assert stopped.value.code == 1
    assert "demo: lmms-eval cannot run" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()

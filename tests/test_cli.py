"""The CLI wrapper: a user's mistake is one line and exit 2 (3 for a stopped run); a bug keeps its
traceback. In-process (src.cli.run_cli), plus one real script for each."""
import subprocess
import sys

import pytest

from src.cli import run_cli
from src.errors import CheckpointError, ConfigError, DataError, DeviceError, TrainingStopped
from tests.helpers import ENV, ROOT


@pytest.mark.parametrize("error,code", [(ConfigError, 2), (DataError, 2), (DeviceError, 2), (CheckpointError, 2),
                                        (TrainingStopped, 3)])
def test_user_errors_end_in_one_line(error, code, capsys, monkeypatch):
    monkeypatch.delenv("ISQRT_COV_DEBUG", raising=False)

    def main():
        raise error("what went wrong\nsecond line with details")

    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == code
    assert capsys.readouterr().err == "error: what went wrong\n"


def test_bugs_keep_their_traceback():
    def main():
        raise ValueError("a bug below the project, e.g. a MindSpore shape error")

    with pytest.raises(ValueError, match="a bug below"):
        run_cli(main)


def test_scripts_user_error_and_bug(tmp_path):
    user = subprocess.run([sys.executable, f"{ROOT}/train.py", "--epoch_size=zero"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True)
    assert user.returncode == 2 and user.stderr.startswith("error: command line: --epoch_size expects an integer")
    assert "Traceback" not in user.stderr
    # an internal error (a KeyError inside main) keeps its traceback and Python's exit code
    bug = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from src.cli import "
                          "run_cli; run_cli(lambda: {}['missing'])", ROOT], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'missing'" in bug.stderr

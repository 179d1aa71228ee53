"""The suite's process exits with pytest's status, whatever the interpreter's teardown would do."""
import os
import signal
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CRASHES_AT_TEARDOWN = '''import ctypes


class CrashesAtTeardown:  # what a native thread left running can do to the interpreter's teardown
    def __del__(self, string_at=ctypes.string_at):
        string_at(0)  # reads address 0: SIGSEGV


KEPT = CrashesAtTeardown()  # a module global: deleted in the teardown of the modules


def test_passes():
    pass
'''


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          env={**os.environ, "PYTHONPATH": str(TESTS)}, capture_output=True, text=True, timeout=120)


def test_the_exit_status_is_pytests_even_where_the_teardown_crashes(tmp_path):
    (tmp_path / "test_teardown.py").write_text(CRASHES_AT_TEARDOWN)
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert False\n")
    bare = _pytest(tmp_path, "test_teardown.py")
    assert "1 passed" in bare.stdout and bare.returncode == -signal.SIGSEGV  # the crash it guards against
    guarded = _pytest(tmp_path, "-p", "exit_status", "test_teardown.py")
    assert "1 passed" in guarded.stdout and guarded.returncode == 0
    failed = _pytest(tmp_path, "-p", "exit_status", "test_teardown.py", "test_fails.py")
    assert "1 failed, 1 passed" in failed.stdout and failed.returncode == 1
    assert _pytest(tmp_path, "-p", "exit_status", "-k", "no_such_test").returncode == 5  # no tests: a failure

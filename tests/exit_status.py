"""The test process ends with pytest's exit status once pytest and every exit handler are done,
skipping the interpreter's teardown of its modules.

Native threads outlive the tests: Ray 2.60 keeps its GCS client's io thread and gRPC's threads after
ray.shutdown() (a bare `ray.init(); ray.shutdown()` still lists `gcs_client_io_s` in /proc/self/task),
s3fs its event-loop thread. Tearing the modules down under them can crash the process after the
summary line, every test passed (SIGSEGV, exit status 139), failing the run for nothing a test checks.
Loaded by conftest.py; tests/test_exit_status.py checks it.
"""
import atexit
import logging
import os
import sys

_finished = []  # the session, once pytest has finished it


def pytest_sessionfinish(session) -> None:
    _finished.append(session)


def _exit() -> None:
    """Registered at import, before any test runs, so it runs after every exit handler registered later
    (Ray's, MLflow's, pytest's temporary folders')."""
    if not _finished:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_finished[-1].exitstatus))


atexit.register(_exit)

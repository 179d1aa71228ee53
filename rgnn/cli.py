"""What every command does with a user's mistake (a bad value, a missing file, a refused or unreachable
store): one line naming it on stderr and exit status 1, never a traceback."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")

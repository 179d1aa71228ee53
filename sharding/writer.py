"""Where the sharding job's bytes go: whole files or nothing, to a local folder or an object store.

Every file the job writes (a shard, the manifest) goes through `rgnn.io.storage`: a local file is
written under a temporary name beside the target, fsynced and renamed onto it when complete; an
object (`s3://...`) is written to a local temporary file and uploaded once when complete, and an
object store shows an object only whole. A reader or a resumed job never sees half a file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import BinaryIO, Callable, Iterator

from rgnn.io import storage


class _HashingStream:
    """A write-only stream that passes bytes through and keeps their sha256 and count."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def write_atomic(path: str, fill: Callable[[BinaryIO], None]) -> tuple[str, int]:
    """Write a file whole or not at all (`rgnn.io.storage.atomic_write`).

    Args:
        path: the target (a local path or an object-store URI).
        fill: called with a binary stream; writes the file's contents to it.

    Returns:
        (sha256 hex digest, size in bytes) of what was written (for an object: what was uploaded,
        its size checked against the store's).
    """
    streams = []

    def write(f: BinaryIO) -> None:
        streams.append(_HashingStream(f))
        fill(streams[-1])

    storage.atomic_write(path, write)
    return streams[-1].sha256.hexdigest(), streams[-1].bytes


def remove_stale_temps(folder: str) -> list[str]:
    """Delete what killed writers left behind (`.*.tmp`) in a local `folder`; returns what was deleted.
    An object store holds none: an upload that does not complete leaves no object."""
    if storage.is_uri(folder) or not os.path.isdir(folder):
        return []
    stale = [os.path.join(folder, n) for n in os.listdir(folder) if storage.is_temp(n)]
    for p in stale:
        with contextlib.suppress(OSError):
            os.remove(p)
    return stale


LOCK = ".build.lock"


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[None]:
    """Hold a local `folder`'s build lock: a second job started on the same folder stops with a clear
    error instead of deleting the first one's temporary files.

    An object store (`s3://...`) has no such lock, and this one (flock on a local file) cannot guard
    it: there it is skipped, and two jobs writing the same prefix at once are the user's to avoid.
    Each shard and manifest still lands whole (one upload each), but the manifest is the last
    writer's, and a resume checks every shard it lists.

    Raises:
        RuntimeError: another job holds the lock.
    """
    if storage.is_uri(folder):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK), "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another sharding job is writing {folder} (it holds {os.path.join(folder, LOCK)}); "
                               "wait for it to finish or stop it, then run this again") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

"""Where the sharding job's bytes go: whole files or nothing, through fsspec.

Every file the job writes (a shard, the manifest) goes through `write_atomic`: the bytes go to a
temporary name beside the target and are renamed onto it when complete, so a reader or a resumed
job never sees half a file. Paths are local paths or fsspec URLs; on a local (or shared POSIX)
file system the rename is atomic. An object store (`s3://...`, with its fsspec package installed)
works through the same call: there `mv` is copy-and-delete, and an object appears whole anyway.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import uuid
from typing import BinaryIO, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


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
    """Write a file whole or not at all.

    Args:
        path: the target (a local path or an fsspec URL).
        fill: called with a binary stream; writes the file's contents to it.

    Returns:
        (sha256 hex digest, size in bytes) of what was written.
    """
    fs, target = fsspec.core.url_to_fs(str(path))
    tmp = f"{target}{TMP_MARK}{uuid.uuid4().hex[:12]}"  # unique: a presumed-dead writer cannot collide
    fs.makedirs(posixpath.dirname(target) or ".", exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            stream = _HashingStream(f)
            fill(stream)
            if isinstance(fs, LocalFileSystem):  # on disk before the rename makes it visible
                f.flush()
                os.fsync(f.fileno())
        fs.mv(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(tmp)
        raise
    return stream.sha256.hexdigest(), stream.bytes


def write_bytes_atomic(path: str, data: bytes) -> tuple[str, int]:
    """`write_atomic` for bytes already in memory (the manifest)."""
    return write_atomic(path, lambda f: f.write(data))


def remove_stale_temps(folder: str) -> list[str]:
    """Delete what killed writers left behind (`*.tmp-*`) in `folder`; returns what was deleted."""
    fs, root = fsspec.core.url_to_fs(str(folder))
    if not fs.exists(root):
        return []
    stale = [p for p in fs.ls(root, detail=False) if TMP_MARK in posixpath.basename(p)]
    for p in stale:
        with contextlib.suppress(OSError):
            fs.rm(p)
    return stale


LOCK = ".build.lock"


@contextlib.contextmanager
def exclusive(folder: str) -> Iterator[None]:
    """Hold `folder`'s build lock (a local folder; an object store has no lock): a second job started
    on the same folder stops with a clear error instead of deleting the first one's temporary files.

    Raises:
        RuntimeError: another job holds the lock.
    """
    fs, root = fsspec.core.url_to_fs(str(folder))
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK), "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another sharding job is writing {folder} (it holds {os.path.join(root, LOCK)}); "
                               "wait for it to finish or stop it, then run this again") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

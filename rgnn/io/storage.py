"""Storage locations: a local path or an object-store URI (`s3://bucket/prefix`), one layer for both.

Every place the project reads or writes shards, manifests, checkpoints and run files goes through
these helpers, so each of `--out`, `--shards`, `--storage`, `--init-checkpoint` and `--checkpoint`
takes either. A location is kept as a `Path` when local and as a `str` when a URI (`location`),
and `join` / `parent` keep that kind.

The layer is fsspec (with s3fs for `s3://`: `pip install -e '.[s3]'`): the shard reader already
streams through it, its file objects are what tarfile, torch.save and torch.load take, and one call
(`fsspec.core.url_to_fs`) serves local paths and every store fsspec knows. pyarrow.fs is what Ray
Train uses for its own `storage_path`; that stays Ray's business: it is handed the URI as it is.
Both read the standard AWS environment: AWS_ENDPOINT_URL (an S3-compatible server),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (or a profile, AWS_PROFILE).

Writes are whole or nothing. A local file goes to a temporary name beside the target, is flushed,
fsynced and renamed over it, and its folder fsynced. An object is first written to a local temporary
file, then uploaded once (one PUT, or one multipart upload for big files): an object store shows an
object only once its upload completes, so no rename is needed (nor possible: `mv` there is a copy).

Errors name the location: a missing object, file or bucket is a FileNotFoundError, missing or refused
credentials a PermissionError, an unreachable endpoint a ConnectionError.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlparse

import fsspec

from rgnn.io.redaction import USERINFO, redact, scrub

BLOCK = 1 << 20  # bytes per read when streaming a copy
TMP_SUFFIX = ".tmp"  # local temporary files are `.<name>.<random>.tmp` beside their target


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (an object store, or any fsspec URL), False for a local path."""
    return "://" in str(path)


def location(path: str | Path) -> Path | str:
    """A local path as an expanded `Path`, a URI as a `str` without a trailing `/`."""
    return str(path).rstrip("/") if is_uri(path) else Path(path).expanduser()


def join(base: str | Path, *names: str) -> Path | str:
    """`base/name/...`, of the same kind as `location(base)`."""
    base = location(base)
    return base.joinpath(*names) if isinstance(base, Path) else "/".join([base, *names])


def parent(path: str | Path) -> Path | str:
    """The folder holding `path`, of the same kind as `location(path)`."""
    path = location(path)
    return path.parent if isinstance(path, Path) else path.rsplit("/", 1)[0]


def basename(path: str | Path) -> str:
    """The last part of a path or URI ("s3://b/shards/train2017" -> "train2017")."""
    return str(location(path)).rsplit("/", 1)[-1]


def _botocore_error(e: BaseException, *names: str) -> bool:
    errors = sys.modules.get("botocore.exceptions")  # loaded whenever s3fs is in use
    return errors is not None and isinstance(e, tuple(getattr(errors, n) for n in names))


@contextlib.contextmanager
def errors(path: str | Path) -> Iterator[None]:
    """Re-raise what the store raises inside the block as an error that names `path`.

    Raises:
        FileNotFoundError: no such file, object or bucket.
        PermissionError: no credentials, or the store refuses them.
        ConnectionError: the store's endpoint does not answer.
        ImportError: the URI's fsspec package (s3fs for s3://) is not installed.
    """
    shown = redact(str(path))  # never the credentials of a URI's user info
    try:
        yield
    except FileNotFoundError as e:
        bucket = f" (no bucket {urlparse(shown).netloc!r})" if is_uri(path) and "bucket" in str(e).lower() else ""
        raise FileNotFoundError(f"not found: {shown}{bucket}") from None
    except PermissionError as e:
        raise PermissionError(f"access denied to {shown}: {scrub(str(e), str(path))}") from None
    except ImportError as e:
        raise ImportError(f"{shown}: {e} (for s3:// URIs: pip install -e '.[s3]')") from None
    except Exception as e:
        if _botocore_error(e, "NoCredentialsError", "PartialCredentialsError"):
            raise PermissionError(f"no credentials for {shown}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                  f"(or AWS_PROFILE) ({scrub(str(e), str(path))})") from None
        if _botocore_error(e, "EndpointConnectionError", "ConnectTimeoutError"):
            raise ConnectionError(f"cannot reach the object store of {shown} (AWS_ENDPOINT_URL="
                                  f"{redact(os.environ.get('AWS_ENDPOINT_URL', 'unset'))}): {scrub(str(e), str(path))}") from None
        if redact(str(path)) != str(path) or USERINFO.search(str(e)):  # the store's own message may name them
            raise OSError(f"{shown}: {type(e).__name__}: {scrub(str(e), str(path))}") from None
        raise


def filesystem(path: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, the path within it) of a path or URI, with no stale cached listing of it
    (s3fs caches listings per process; another process may have rewritten the object since)."""
    with errors(path):
        fs, p = fsspec.core.url_to_fs(str(location(path)))
    fs.invalidate_cache(p)
    return fs, p


def exists(path: str | Path) -> bool:
    """A file, an object, or a folder (on an object store: a prefix holding objects)."""
    fs, p = filesystem(path)
    with errors(path):
        return fs.exists(p)


def _kind(path: str | Path) -> str | None:
    """"file", "directory" or None (nothing there); unlike fsspec's isfile / isdir, a refusal of the
    store is an error, not a False."""
    fs, p = filesystem(path)
    try:
        with errors(path):
            return fs.info(p)["type"]
    except FileNotFoundError:
        return None


def isdir(path: str | Path) -> bool:
    """A folder (on an object store: a prefix holding objects)."""
    return _kind(path) == "directory"


def isfile(path: str | Path) -> bool:
    """A file (on an object store: an object)."""
    return _kind(path) == "file"


def size(path: str | Path) -> int:
    """Bytes of a file or object."""
    fs, p = filesystem(path)
    with errors(path):
        return fs.size(p)


def version(path: str | Path) -> str:
    """What changes when the file or object is rewritten: its size and ETag (modification time locally)."""
    fs, p = filesystem(path)
    with errors(path):
        info = fs.info(p)
    return json.dumps([info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))])


def open_read(path: str | Path) -> BinaryIO:
    """A binary file object reading `path` as a stream (an object is fetched in blocks as it is read,
    never copied whole first)."""
    fs, p = filesystem(path)
    with errors(path):
        return fs.open(p, "rb")


def read_bytes(path: str | Path) -> bytes:
    fs, p = filesystem(path)
    with errors(path):
        return fs.cat_file(p)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path | str:
    """`write(f)` the whole content of `path` to a binary stream; a crash leaves the old content or the new,
    never half (see the module docstring: local temp + fsync + rename, or one upload of a local temp file).

    Returns:
        `location(path)`.

    Raises:
        OSError: the upload's size differs from what was written; the errors of `errors`.
    """
    path = location(path)
    local = isinstance(path, Path)
    if local:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent if local else None, prefix=f".{basename(path)}.", suffix=TMP_SUFFIX)
    try:
        if local:  # mkstemp's 0600 would hide checkpoints and shards from the other users of a shared folder
            os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if local:
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        else:
            fs, p = filesystem(path)
            with errors(path):
                fs.put_file(tmp, p)
            if size(path) != os.path.getsize(tmp):
                raise OSError(f"upload of {path} incomplete: {size(path)} of {os.path.getsize(tmp)} bytes")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path | str:
    """`data` written by `atomic_write` (whole or not at all, the upload's size checked)."""
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path | str:
    """Text written as `write_bytes` writes: a reader never sees half a file."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, data) -> Path | str:
    """JSON written as `write_text` writes."""
    return write_text(path, json.dumps(data, indent=2))


def is_temp(name: str) -> bool:
    """A local temporary file of `atomic_write` (what a killed writer leaves behind)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def fetch(path: str | Path, dst: Path, max_bytes: int) -> Path:
    """Copy `path` (a URI, or a local file) to the local file `dst`, unless `dst` already holds this
    version of it (recorded in `dst.version`); written as `atomic_write` writes.

    Raises:
        ValueError: the object holds more than `max_bytes` bytes (nothing is written).
    """
    current = version(path)
    stamp = dst.with_name(dst.name + ".version")
    if dst.is_file() and stamp.is_file() and stamp.read_text() == current:
        return dst
    total = size(path)
    if total > max_bytes:
        raise ValueError(f"{path} holds {total} bytes, more than the {max_bytes} allowed")

    def copy(f: BinaryIO) -> None:
        copied = 0
        with open_read(path) as src:
            for block in iter(lambda: src.read(BLOCK), b""):
                copied += len(block)
                if copied > max_bytes:  # it grew since its size was read
                    raise ValueError(f"{path} holds more than the {max_bytes} bytes allowed")
                f.write(block)

    atomic_write(dst, copy)
    atomic_write(stamp, lambda f: f.write(current.encode()))
    return dst

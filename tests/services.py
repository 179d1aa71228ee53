"""Real servers for the tests, on loopback only (127.0.0.1), each a context manager that stops its
server: an S3-compatible object store (moto's standalone server), PostgreSQL (Debian's package,
run as the `postgres` user when the tests run as root) and an `mlflow server`."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, server: subprocess.Popen, what: str, log: Path | None = None, timeout: float = 120) -> None:
    """Until `url` answers (any HTTP status); fails naming `what` when the server exits or never answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log and log.is_file() else ""
                raise RuntimeError(f"{what} did not start on {url}\n{tail}") from None
            time.sleep(0.3)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process of the machine (Ray retitles its workers:
    `ray::RayTrainWorker...`)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(stat.parent.name)] = (parent, command)
        except (OSError, ValueError, IndexError):  # ended meanwhile
            pass
    return found


def descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    """`roots` and every process below them in `table` (what `processes` returns)."""
    tree = set(roots)
    while more := {pid for pid, (parent, _) in table.items() if parent in tree} - tree:
        tree |= more
    return tree


def stop_process_trees(marks: list[str], grace: float = 10.0) -> None:
    """Stop every process whose command line holds one of `marks`, with all its descendants (SIGTERM, then
    SIGKILL after `grace` seconds): one Ray head's processes, where `ray stop` would stop every Ray of the
    machine (another user's run, an experiment)."""
    table = processes()
    tree = descendants({pid for pid, (_, cmd) in table.items() if pid != os.getpid() and any(m in cmd for m in marks)},
                       table)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in tree):
            time.sleep(0.2)


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """An empty S3-compatible server; yields the standard AWS environment that reaches it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(endpoint, server, "moto_server")
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: install the server (Debian: apt-get install postgresql; "
                           ".ci/run does)")
    return found


@contextmanager
def postgres_server(database: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 holding `database`; yields its SQLAlchemy URI.

    PostgreSQL refuses to run as root: as root the cluster belongs to, and runs as, `postgres`."""
    as_root = os.geteuid() == 0
    user = pwd.getpwnam("postgres") if as_root else None
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    data = Path(tempfile.mkdtemp(prefix="rgnn-pg-"))  # under /tmp: reachable by that user
    if user:
        os.chown(data, user.pw_uid, user.pw_gid)
    port = free_port()
    log = data / "server.log"
    subprocess.run([*prefix, postgres_bin("initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth", "trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    with open(log, "w") as out:
        if user:
            os.chown(log, user.pw_uid, user.pw_gid)
        server = subprocess.Popen([*prefix, postgres_bin("postgres"), "-D", str(data / "db"), "-h", "127.0.0.1",
                                   "-p", str(port), "-k", str(data)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*prefix, postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        subprocess.run([*prefix, postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        database], check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def mlflow_server(backend_store: str, artifacts_destination: str | None, env: dict[str, str] | None = None,
                  log: Path | None = None) -> Iterator[str]:
    """`mlflow server` with that backend store, proxying artifact access to `artifacts_destination`
    (clients need no credentials of the store behind it); yields its URL. Without a destination, `mlflow
    ui --backend-store-uri STORE` as the README opens a SQLite store (artifacts where the runs put them)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "w") if log else subprocess.DEVNULL
    command = ["server", "--artifacts-destination", artifacts_destination, "--serve-artifacts", "--workers", "1"]
    server = subprocess.Popen([str(BIN / "mlflow"), *(command if artifacts_destination else ["ui"]),
                               "--backend-store-uri", backend_store, "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    try:
        wait_http(f"{url}/health", server, "mlflow server", log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        if log:
            out.close()

"""Ray set-up, the one place: join a cluster or start a local Ray.

In sharding/, the lowest of the Ray packages: the sharding job and its command start Ray with it, and
cluster/ and tune/, which build shards through sharding/, import it from here (sharding/ imports
nothing of cluster/).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import ray

ROOT = Path(__file__).resolve().parents[1]
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records its address
ANSWER_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


def _answers(address: str) -> bool:
    """Whether something listens at a Ray address (host:port, ray://host:port or http://host:port)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if not parts.hostname or not parts.port:
        return True  # no port to try: let Ray decide
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=ANSWER_TIMEOUT_S):
            return True
    except OSError:
        return False


def check_address(address: str | None = None) -> str | None:
    """`address`, else RAY_ADDRESS (None if neither is given); ConnectionError, within seconds, when it
    names a head that does not answer (ray.init() would wait minutes on it). Starts nothing."""
    given = address or os.environ.get("RAY_ADDRESS")
    if given and given not in ("auto", "local") and not _answers(given):
        where = "--address" if address else "RAY_ADDRESS"
        raise ConnectionError(f"the Ray cluster at {given} ({where}) does not answer: start its head "
                              f"(ray start --head) or give the address of a running one")
    return given


def _recorded_local_head() -> str | None:
    try:
        return CURRENT_CLUSTER.read_text().strip() or None
    except OSError:
        return None


def init_ray(address: str | None = None, num_cpus: int | None = None, include_dashboard: bool | None = None) -> None:
    """Join `address`, else RAY_ADDRESS or a running local cluster, else start a local Ray
    (a new local one, of `num_cpus` CPUs, when num_cpus is given). A no-op when Ray is initialised.

    A local Ray started here gets this checkout on its workers' PYTHONPATH, so that they import
    the project's packages even where it is not pip-installed (a submitted job ships them with
    --working-dir instead).

    A head that does not answer fails within seconds: `--address` or RAY_ADDRESS naming a dead one is a
    ConnectionError; a local head recorded by `ray start` but killed without `ray stop` is passed over
    for a new local Ray.

    Raises:
        ValueError: num_cpus with an address (the CPUs of a running cluster are not ours to set).
        ConnectionError: the given address does not answer.
    """
    if ray.is_initialized():
        return
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    given = check_address(address)
    if not given and num_cpus is None:
        stale = _recorded_local_head()
        if stale and not _answers(stale):  # a head killed without `ray stop`: ray.init() would wait on it
            log.warning("the local Ray head recorded in %s (%s) is gone: starting a new local Ray", CURRENT_CLUSTER, stale)
            address = "local"
    if num_cpus is None:
        ray.init(address=address, include_dashboard=include_dashboard)
    elif address is None:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard)
    else:
        raise ValueError(f"--num-cpus {num_cpus} applies to a new local Ray, not to --address {address}")

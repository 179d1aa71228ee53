"""Ray set-up, the one place: join a cluster or start a local Ray."""
from __future__ import annotations

import os
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]


def init_ray(address: str | None = None, num_cpus: int | None = None, include_dashboard: bool | None = None) -> None:
    """Join `address`, else RAY_ADDRESS or a running local cluster, else start a local Ray
    (a new local one, of `num_cpus` CPUs, when num_cpus is given). A no-op when Ray is initialised.

    A local Ray started here gets this checkout on its workers' PYTHONPATH, so that they import
    the project's packages even where it is not pip-installed (a submitted job ships them with
    --working-dir instead).

    Raises:
        ValueError: num_cpus with an address (the CPUs of a running cluster are not ours to set).
    """
    if ray.is_initialized():
        return
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if num_cpus is None:
        ray.init(address=address, include_dashboard=include_dashboard)
    elif address is None:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard)
    else:
        raise ValueError(f"--num-cpus {num_cpus} applies to a new local Ray, not to --address {address}")

"""Ray for a search: joining or starting it, and checking its resources against the request.

Kept apart from the engine so that `prepare` can check a local request without importing Ray.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from autopeft.errors import AutopeftError
from autopeft.search.settings import SearchSettings


@contextlib.contextmanager
def ray_session(s: SearchSettings) -> Iterator[dict[str, float]]:
    """Ray for the search, its resources checked against the request before any study is created.

    Joins an already initialised Ray, else connects to `--address` (or $RAY_ADDRESS, as `ray job submit` sets it),
    else starts a new local instance: address "local" never attaches to another instance found on this machine,
    such as one a killed driver left behind. Shuts down only what it started.
    """
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        address = s.address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(address="local", num_cpus=s.local_cpus(), num_gpus=None, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if not address:
                raise
            raise AutopeftError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0][:200]}; "
                                "start it (`ray start --head` on the head node) or drop --address to run on this "
                                "machine") from None
        started = True
    try:
        resources = ray.cluster_resources()
        check_resources(s, resources)
        yield resources
    finally:
        if started:
            ray.shutdown()


def check_resources(s: SearchSettings, resources: dict[str, float]) -> None:
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if s.gpus_per_trial > gpus:
        raise AutopeftError(f"--gpus-per-trial {s.gpus_per_trial:g} is more than the {gpus:g} GPU(s) the Ray "
                            "cluster has; lower it (fractions like 0.5 share a GPU) or add GPU nodes")
    if s.cpus_per_trial > cpus:
        raise AutopeftError(f"--cpus-per-trial {s.cpus_per_trial:g} is more than the {cpus:g} CPU(s) the Ray "
                            "cluster has; lower it")

"""Ray for a search: joining or starting it, and checking its resources against the request.

Kept apart from the engine so that `prepare` can check a local request without importing Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autopeft.errors import AutopeftError
from autopeft.search.settings import SearchSettings


def beside_study(storage_url: str, study: str, suffix: str) -> Path:
    """A file of the study's own: beside its SQLite file (`studies/<study><suffix>`), else `<study><suffix>` in the
    working directory."""
    if storage_url.startswith("sqlite:///"):
        return Path(storage_url.removeprefix("sqlite:///")).with_suffix(suffix)
    return Path.cwd() / f"{study}{suffix}"


def ray_log_path(storage_url: str, study: str) -> Path:
    """Where a search writes Ray's own messages: `<study>.ray.log` beside the study (`beside_study`)."""
    return beside_study(storage_url, study, ".ray.log")


@contextlib.contextmanager
def ray_messages_to(path: Path | None) -> Iterator[None]:
    """Ray's log records (Tune's trial-failure tracebacks among them) and the error messages its cluster publishes
    (a node marked dead) go to the file `path` while the search runs, not to the user's terminal; the search's own
    progress lines say what happened. None: as Ray does by itself."""
    ray_logger = logging.getLogger("ray")
    if path is None or any(getattr(h, "baseFilename", None) == str(path.absolute()) for h in ray_logger.handlers):
        yield  # as Ray does, or already routed there by an enclosing session (the engine's inside `search`)
        return
    import ray._private.worker as ray_worker

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = ray_logger.handlers[:], ray_logger.propagate, getattr(ray_worker, "print_to_stdstream", None)
    ray_logger.handlers, ray_logger.propagate = [handler], False

    def to_log(data: dict, ignore_prefix: bool = False) -> None:  # the cluster's published errors (`(raylet) ...`)
        for line in data.get("lines", []):
            ray_logger.warning("(%s) %s", data.get("pid", ""), line)

    if saved[2] is not None:
        ray_worker.print_to_stdstream = to_log  # read at each call by Ray's error-listener thread
    try:
        yield
    finally:
        ray_logger.handlers, ray_logger.propagate = saved[0], saved[1]
        if saved[2] is not None:
            ray_worker.print_to_stdstream = saved[2]
        handler.close()


# How long Tune waits for a stopped trial's thread to end before it gives up reusing the worker (Ray's default is
# 2 s; a loaded machine missed it, and the search then sat with a trial Tune neither reused nor replaced)
THREAD_TIMEOUT_S = 30


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker of the search gets (the job's runtime environment)."""
    return {"TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(THREAD_TIMEOUT_S))}


@contextlib.contextmanager
def ray_session(s: SearchSettings, log: Path | None = None) -> Iterator[dict[str, float]]:
    """Ray for the search, its resources checked against the request before any study is created; with `log`,
    Ray's messages go to that file (`ray_messages_to`).

    Joins an already initialised Ray, else connects to `--address` (or $RAY_ADDRESS, as `ray job submit` sets it),
    else starts a new local instance: address "local" never attaches to another instance found on this machine,
    such as one a killed driver left behind. Shuts down only what it started.
    """
    with ray_messages_to(log), _ray(s) as resources:
        yield resources


@contextlib.contextmanager
def _ray(s: SearchSettings) -> Iterator[dict[str, float]]:
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                                      runtime_env={"env_vars": worker_env()})
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

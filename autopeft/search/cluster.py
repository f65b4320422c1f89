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
        largest = largest_node(ray.nodes())
        resolve_gpus(s, resources.get("GPU", 0.0))
        check_resources(s, resources, largest)
        yield resources
    finally:
        if started:
            ray.shutdown()


def largest_node(nodes: list[dict]) -> dict[str, float]:
    """The most GPUs and the most CPUs any one live node has: a trial runs on one node, so it must fit there."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    return {key: max((float(r.get(key, 0.0)) for r in alive), default=0.0) for key in ("GPU", "CPU")}


def resolve_gpus(s: SearchSettings, gpus: float) -> None:
    """Fill in `gpus_per_trial` and `concurrency` where they were not given, from the `gpus` Ray has, so that a GPU
    machine or cluster is used whole by default.

    Without GPUs: none per trial, DEFAULT_CONCURRENCY at once. With G GPUs and neither given: `trials_per_gpu` (k)
    trials share each GPU, k·G at once. With `concurrency` c alone: 1/ceil(c/G) of a GPU each (so that c trials fit
    on the G GPUs together). With `gpus_per_trial` g alone: as many at once as fit, floor(G/g)."""
    from autopeft.search.settings import DEFAULT_CONCURRENCY

    if s.gpus_per_trial is None:
        if gpus <= 0:
            s.gpus_per_trial = 0.0
        elif s.concurrency is None:
            s.gpus_per_trial = 1.0 / s.trials_per_gpu
            s.concurrency = int(round(s.trials_per_gpu * gpus))
        else:
            s.gpus_per_trial = 1.0 / -(-s.concurrency // int(gpus)) if gpus >= 1 else float(gpus)
    if s.concurrency is None:
        s.concurrency = max(1, int(gpus // s.gpus_per_trial)) if s.gpus_per_trial > 0 else DEFAULT_CONCURRENCY


def resources_line(s: SearchSettings, resources: dict[str, float]) -> str:
    """How the trials use what Ray has, once `resolve_gpus` chose: one line for the search's header."""
    gpus = resources.get("GPU", 0.0)
    line = (f"{s.concurrency} trial(s) at once, each {s.cpus_per_trial:g} CPU and {s.gpus_per_trial or 0:g} GPU, of "
            f"the {resources.get('CPU', 0.0):g} CPU(s) and {gpus:g} GPU(s) Ray has")
    if not s.gpus_per_trial and gpus > 0:
        line += ("; --gpus-per-trial 0: trials run on the CPU although Ray has GPUs (drop the flag to use them)")
    return line


def check_resources(s: SearchSettings, resources: dict[str, float], largest: dict[str, float] | None = None
                    ) -> None:
    """A trial's request against the cluster: it must fit on one node (`largest`, the most any one node has;
    the cluster's totals where unknown)."""
    largest = largest or {"GPU": resources.get("GPU", 0.0), "CPU": resources.get("CPU", 0.0)}
    gpus, cpus = largest["GPU"], largest["CPU"]
    if (s.gpus_per_trial or 0.0) > gpus:
        where = "any one node of the Ray cluster has" if resources.get("GPU", 0.0) > gpus else "the Ray cluster has"
        raise AutopeftError(f"--gpus-per-trial {s.gpus_per_trial:g} is more than the {gpus:g} GPU(s) {where}; lower "
                            "it (fractions like 0.5 share a GPU) or add larger GPU nodes")
    if s.cpus_per_trial > cpus:
        where = "any one node of the Ray cluster has" if resources.get("CPU", 0.0) > cpus else "the Ray cluster has"
        raise AutopeftError(f"--cpus-per-trial {s.cpus_per_trial:g} is more than the {cpus:g} CPU(s) {where}; "
                            "lower it")

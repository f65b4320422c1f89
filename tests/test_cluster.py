"""A real two-node Ray cluster on this machine: `autopeft search --address` spreads trials over both nodes, and a
trial on a node that is lost runs again on the other.

The test starts a head node and a worker node with `ray start` in a temp dir of its own, and stops exactly the
processes of that cluster by their process ids (found by that temp dir in their command lines).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from procs import driver, ends_cleanly, ray_pids
from safetensors.torch import save_file

from autopeft.backbones import create_backbone

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(marker: str) -> None:
    """SIGTERM the cluster's processes, then SIGKILL what is left after a short grace (SIGTERM alone leaves some)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        for pid in ray_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while ray_pids(marker) and time.time() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def two_nodes(tmp_path: Path) -> Iterator[tuple[int, int, dict]]:
    """A head and a worker node (one CPU each) on 127.0.0.1: yields (head port, the worker's node-manager port, the
    environment for a driver); stops exactly that cluster's processes afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port, worker_port = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "AUTOPEFT_CACHE": str(tmp_path / "c")}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
              "--disable-usage-stats"]
    try:
        head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                              capture_output=True, text=True, timeout=120, env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}",
                                 *common], capture_output=True, text=True, timeout=120, env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield port, worker_port, env
    finally:
        _stop(temp_dir)
        assert not ray_pids(temp_dir)


def _weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
    return weights


def _search(tmp_path: Path, port: int, study: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "autopeft", "search", "--dataset", "digits", "--backbone", "autopeft_test_vit",
            "--weights", str(_weights(tmp_path)), "--budget", "5%", "--concurrency", "2", "--cpus-per-trial", "1",
            "--study", study, "--no-baselines", "--address", f"127.0.0.1:{port}", *flags]


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (by parent ids in /proc)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        out += frontier
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _raylet(node_manager_port: int) -> int:
    """The process id of the raylet of the node started with this node-manager port."""
    pids = [pid for pid in ray_pids(f"--node_manager_port={node_manager_port}") if "raylet" in _cmdline(pid)]
    assert len(pids) == 1, pids
    return pids[0]


def _trial_on(raylet: int) -> str | None:
    """The folder name of the trial a Ray worker below `raylet` holds (its title is `ray::ImplicitFunc...`, Tune's
    function trainable, idle workers are `ray::IDLE`; Tune runs it in a working folder named as the trial's folder
    in the checkpoint storage), else None."""
    for pid in _descendants(raylet)[1:]:
        if _cmdline(pid).startswith("ray::ImplicitFunc"):
            with contextlib.suppress(OSError):
                return os.path.basename(os.readlink(f"/proc/{pid}/cwd"))
    return None


def _checkpointed(storage: Path, trial: str) -> bool:
    """Whether the trial's folder in the checkpoint storage holds its second epoch's checkpoint: the driver has had
    an epoch's time to take in the first (a checkpoint the worker wrote but the driver never heard of is not one a
    re-run starts from)."""
    return any(storage.glob(f"*/{trial}/checkpoint_000001"))


@pytest.mark.slow
def test_a_lost_node_costs_no_trial(tmp_path) -> None:
    """The worker node's raylet and everything under it are SIGKILLed while a trial trains there (a preempted node):
    the trial runs again on the node that is left, from its last epoch checkpoint (in a storage both nodes reach),
    the study ends with all its trials finished, the lost one recorded with its retry, node and resumed epoch, and
    the search's output holds no Python traceback."""
    with two_nodes(tmp_path) as (port, worker_port, env):
        log = tmp_path / "search.log"
        cmd = _search(tmp_path, port, "lost", "--trials", "4", "--epochs", "12", "--no-early-stopping",
                      "--checkpoint-storage", str(tmp_path / "ckpt"), "--max-epochs", "60")
        with driver(cmd, log, cwd=tmp_path, env=env) as proc:
            raylet = _raylet(worker_port)
            # killed once the trial there has checkpointed two epochs (a fixed sleep was too short on a loaded machine)
            deadline = time.time() + 300
            while not ((trial := _trial_on(raylet)) and _checkpointed(tmp_path / "ckpt", trial)):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("no trial checkpointed on the worker node:\n" + log.read_text()[-3000:])
                time.sleep(0.1)
            for pid in _descendants(raylet):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            output = ends_cleanly(proc, log)
    assert "was lost after" in output and "running it again from its last checkpoint (retry 1 of 3" in output, \
        output[-3000:]
    trials = optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path}/studies/lost.db").get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    retried = [t for t in trials if t.user_attrs.get("retries")]
    assert len(retried) == 1 and retried[0].user_attrs["retries"] == 1 and retried[0].user_attrs["lost_nodes"], \
        [t.user_attrs for t in trials]
    assert len(retried[0].user_attrs["curve"]) == 12 and retried[0].user_attrs["resumed_from"] >= 1
    # the epoch cap counts what each run trained: the epochs reported on the lost node, then the re-run's from its
    # checkpoint on (epochs between the checkpoint and the loss are trained twice and counted twice)
    lost_after = int(re.search(r"was lost after (\d+) epoch", output).group(1))
    trained = [t.user_attrs["trained_epochs"] for t in trials]
    assert retried[0].user_attrs["trained_epochs"] == lost_after + 12 - retried[0].user_attrs["resumed_from"], \
        (lost_after, retried[0].user_attrs)
    assert sorted(trained)[:3] == [12, 12, 12] and sum(trained) <= 60, trained
    # the trials ran on both nodes (the lost one on the worker node first), and none on an unknown one
    nodes = {t.user_attrs["node"] for t in trials} | set(retried[0].user_attrs["lost_nodes"])
    assert len(nodes) == 2 and "" not in nodes, nodes
    assert not list((tmp_path / "ckpt").iterdir())  # the run's checkpoints are gone with the run
    # the resumed trial's curve is the one its plan trains straight through, as a 1-CPU trial does
    from autopeft.data import data_config, load_dataset
    from autopeft.plan import PeftPlan
    from autopeft.search.trainable import trial_config
    from autopeft.train import train

    t = retried[0]
    cfg = trial_config(dict(t.user_attrs["hparams"]), 12, 0)
    data = load_dataset("digits", None, augment=cfg.augment, seed=0, **data_config("autopeft_test_vit"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curve: list[float] = []
        train("autopeft_test_vit", PeftPlan.from_dict(t.user_attrs["plan"]), data, cfg,
              weights=str(tmp_path / "w.safetensors"), report=lambda m: curve.append(m["val_acc"]))
    finally:
        torch.set_num_threads(threads)
    assert curve == pytest.approx(t.user_attrs["curve"], abs=1e-9), (curve, t.user_attrs["curve"])


def test_workers_wait_for_a_stopped_trial_long_enough_to_be_reused(monkeypatch) -> None:
    """The search's own Ray gives its workers a 30 s wait for a stopped trial's thread (Ray's 2 s was missed on a
    loaded machine, and Tune then neither reused nor replaced the worker)."""
    import ray

    from autopeft.search.cluster import ray_session
    from autopeft.search.settings import SearchSettings

    monkeypatch.delenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    assert not ray.is_initialized()
    with ray_session(SearchSettings(concurrency=1, cpus_per_trial=1)):
        seen = ray.get(ray.remote(lambda: os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S")).remote())
    assert seen == "30" and not ray.is_initialized()

"""A real two-node Ray cluster on this machine: `autopeft search --address` spreads trials over both nodes.

The test starts a head node and a worker node with `ray start` in a temp dir of its own, and stops exactly the
processes of that cluster by their process ids (found by that temp dir in their command lines).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
from procs import ray_pids
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


@pytest.mark.slow
def test_search_spreads_trials_over_two_nodes(tmp_path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "AUTOPEFT_CACHE": str(tmp_path / "c")}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
              "--disable-usage-stats"]
    try:
        head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                              capture_output=True, text=True, timeout=120, env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                                capture_output=True, text=True, timeout=120, env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]

        torch.manual_seed(0)
        weights = tmp_path / "w.safetensors"
        save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
        proc = subprocess.run(
            [sys.executable, "-m", "autopeft", "search", "--dataset", "digits", "--backbone", "autopeft_test_vit",
             "--weights", str(weights), "--budget", "5%", "--trials", "4", "--epochs", "2", "--grace-epochs", "2",
             "--concurrency", "2", "--cpus-per-trial", "1", "--study", "cluster", "--no-baselines",
             "--address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        trials = optuna.load_study(study_name="cluster",
                                   storage=f"sqlite:///{tmp_path}/studies/cluster.db").get_trials()
        assert len(trials) == 4
        nodes = {t.user_attrs.get("node") for t in trials}
        assert len(nodes) == 2 and "" not in nodes, nodes
    finally:
        _stop(temp_dir)
        assert not ray_pids(temp_dir)

"""`autopeft dashboard` as a real optuna-dashboard server on 127.0.0.1, and `autopeft report`, on a small real search.

One local Ray instance (2 CPUs) runs a 4-trial search on the 3-block test ViT (as tests/test_search.py does); the
dashboard is started as its own process, asked over HTTP, stopped by its process id, and its port checked free.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import ray
import torch
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.cli import main
from autopeft.report import FIGURES, write_report

pytestmark = pytest.mark.slow  # a real search (Ray) and a dashboard process: about a minute on 2 cores

WEIGHTS = Path(tempfile.gettempdir()) / f"autopeft-dash-vit-{os.getpid()}.safetensors"
SEARCH = ["search", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", str(WEIGHTS),
          "--budget", "5%", "--epochs", "2", "--grace-epochs", "1", "--concurrency", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def study_url(tmp_path_factory) -> str:
    """Storage URL of a 4-trial study `dash` from a real search."""
    d = tmp_path_factory.mktemp("dash")
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(WEIGHTS))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    url = f"sqlite:///{d}/dash.db"
    cache = os.environ.get("AUTOPEFT_CACHE")
    os.environ["AUTOPEFT_CACHE"] = str(d / "cache")
    try:
        assert main([*SEARCH, "--trials", "4", "--study", "dash", "--storage", url]) == 0
    finally:
        ray.shutdown()
        WEIGHTS.unlink(missing_ok=True)
        if cache is None:
            os.environ.pop("AUTOPEFT_CACHE", None)
        else:
            os.environ["AUTOPEFT_CACHE"] = cache
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (connections left in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def stop(proc: subprocess.Popen) -> int:
    """Ctrl-C (what the command documents), then SIGTERM, then SIGKILL: this process only, by its pid."""
    for send, grace in ((lambda: proc.send_signal(signal.SIGINT), 20), (proc.terminate, 10), (proc.kill, 10)):
        if proc.poll() is not None:
            break
        send()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode


def test_dashboard_serves_the_study_and_stops_cleanly(study_url, tmp_path) -> None:
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w+")

    def output() -> str:
        log.seek(0)
        return log.read()

    proc = subprocess.Popen(
        [sys.executable, "-m", "autopeft", "dashboard", "--study", "dash", "--storage", study_url, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, studies = time.monotonic() + 120, None
        while studies is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                studies = get_json(f"{base}/api/studies")["study_summaries"]
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert studies is not None, f"the dashboard did not answer (exit {proc.poll()}): {output()[-2000:]}"
        (summary,) = [s for s in studies if s["study_name"] == "dash"]
        assert summary["directions"] == ["maximize", "minimize"]
        detail = get_json(f"{base}/api/studies/{summary['study_id']}")
        assert detail["objective_names"] == ["val_acc", "peft_params"]
        stored = optuna.load_study(study_name="dash", storage=study_url).get_trials()
        assert sorted(t["number"] for t in detail["trials"]) == sorted(t.number for t in stored)
        finished = [t for t in detail["trials"] if t["state"].lower() in ("complete", "pruned", "fail")]
        assert len(finished) == 4  # the search's --trials (baselines it had no room for stay queued)
    finally:
        code = stop(proc)
    text = output()
    assert code == 0, f"exit {code}: {text[-2000:]}"
    assert "Traceback" not in text and f"127.0.0.1:{port}" in text
    assert port_is_free(port)
    with pytest.raises(urllib.error.URLError):
        get_json(f"{base}/api/studies")


def test_dashboard_refuses_a_missing_study(study_url, capsys) -> None:
    assert main(["dashboard", "--study", "nope", "--storage", study_url, "--port", str(free_port())]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_report_of_the_search(study_url, tmp_path) -> None:
    path, n = write_report("dash", study_url, tmp_path / "dash.html")
    html = path.read_text()
    assert n == len(optuna.load_study(study_name="dash", storage=study_url).get_trials())
    assert html.count("Plotly.newPlot(") == len(FIGURES)
    assert "<title>autopeft report · dash · digits · autopeft_test_vit · budget 5%" in html
    assert "lora" in html and 'id="configs"' in html

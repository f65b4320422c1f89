"""A small search on a real PostgreSQL server: `autopeft search --storage postgresql+psycopg://…`.

.ci/run starts a throwaway server on 127.0.0.1 (Debian's packages, see .ci/postgres) and sets AUTOPEFT_TEST_PG to
its URL; without that variable the test is skipped. The URL holds a password: no output line may show it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import optuna
import pytest
import torch
from procs import ray_pids, stop
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.cli import main
from autopeft.search.storage import mask_url

PG = os.environ.get("AUTOPEFT_TEST_PG", "")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PG, reason="AUTOPEFT_TEST_PG is not set (.ci/run starts a PostgreSQL server "
                                                "and sets it to the server's URL)")]


def _password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).password or ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_on_postgresql_stores_every_trial_and_never_shows_the_password(tmp_path, capsys) -> None:
    password = _password(PG)
    assert password, "the test server's URL must hold a password"
    torch.manual_seed(0)
    weights = tmp_path / "vit.safetensors"
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
    study = f"pg-{uuid.uuid4().hex[:8]}"  # the database may hold the studies of earlier runs
    ray_tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp,
           "AUTOPEFT_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "autopeft"]
    dashboard = None
    try:
        search = subprocess.run(
            [*cli, "search", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", str(weights),
             "--budget", "5%", "--trials", "2", "--epochs", "1", "--grace-epochs", "1", "--concurrency", "2",
             "--study", study, "--storage", PG, "--seed", "0"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
        assert search.returncode == 0, search.stderr[-4000:]
        shown = [search.stdout + search.stderr]
        assert mask_url(PG) in search.stderr and mask_url(PG) in search.stdout  # the header and the last line

        trials = optuna.load_study(study_name=study, storage=PG).get_trials()
        assert len(trials) == 2
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        assert all(len(t.user_attrs["curve"]) == t.user_attrs["epochs"] and t.user_attrs["plan"] for t in trials)
        assert all(t.user_attrs.get("driver") for t in trials)

        capsys.readouterr()
        assert main(["results", "--study", study, "--storage", PG]) == 0
        table = capsys.readouterr()
        assert main(["results", "--study", study, "--storage", PG, "--format", "json"]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 2
        assert main(["results", "--study", "no-such-study", "--storage", PG]) == 2
        missing = capsys.readouterr()
        assert mask_url(PG) in missing.err
        shown += [table.out + table.err, missing.out + missing.err]

        port = _free_port()
        dashboard = subprocess.Popen([*cli, "dashboard", "--study", study, "--storage", PG, "--port", str(port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        first = dashboard.stdout.readline()
        shown.append(first)
        assert f"http://127.0.0.1:{port}/" in first and mask_url(PG) in first
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    names = [s["study_name"] for s in json.loads(r.read())["study_summaries"]]
                break
            except OSError:
                assert time.time() < deadline and dashboard.poll() is None, "optuna-dashboard did not answer"
                time.sleep(0.5)
        assert study in names
        for text in shown:
            assert password not in text
    finally:
        if dashboard is not None:
            dashboard.kill()
            dashboard.wait(timeout=30)
        stop(ray_tmp)
        assert not ray_pids(ray_tmp)

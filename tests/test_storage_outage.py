"""A storage outage is waited out ([M] part 3): `storage.retry` waits up to --storage-patience, saying so once;
a real PostgreSQL server of the test's own, stopped for ~30 s mid-study, costs the study no trial."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from procs import driver, ends_cleanly, ray_pids, stop
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.search import storage as st
from autopeft.search.settings import SearchSettings


def _flaky(failures: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return "ok"

    return calls, fn


def test_retry_waits_out_an_outage_and_says_so_once(caplog) -> None:
    calls, fn = _flaky(3)
    with caplog.at_level(logging.WARNING, logger="autopeft.search.storage"):
        assert st.retry(fn, patience_s=30, first_wait_s=0.01) == "ok"
    assert len(calls) == 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "waiting up to 30 s" in lines[0] and "back after" in lines[1]
    assert not st.outage.ongoing


def test_past_its_patience_the_driver_stops_with_one_line_naming_resume() -> None:
    calls, fn = _flaky(10**6)
    started = time.monotonic()
    with pytest.raises(st.StorageUnavailable, match=r"unreachable for \d+ s \(--storage-patience 0.2\).*--resume"):
        st.retry(fn, patience_s=0.2, first_wait_s=0.05)
    assert time.monotonic() - started < 5 and len(calls) >= 2
    st.outage.end()
    wrapped = RuntimeError("Tune stopped")
    wrapped.__cause__ = st.StorageUnavailable("gone")
    assert isinstance(st.storage_unavailable(wrapped), st.StorageUnavailable)
    assert st.storage_unavailable(RuntimeError("other")) is None


def test_a_negative_patience_is_refused() -> None:
    from autopeft.errors import AutopeftError

    with pytest.raises(AutopeftError, match="--storage-patience must be >= 0"):
        SearchSettings(storage_patience=-1)


PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A PostgreSQL cluster of this test's own in a temp dir (Debian's binaries, run as the postgres user)."""

    def __init__(self) -> None:
        self.bin = PG_BIN[-1]
        self.dir = Path(tempfile.mkdtemp(prefix="autopeft-pgo."))
        self.port = _free_port()
        (self.dir / "pw").write_text("outage-test\n")
        shutil.chown(self.dir, "postgres")
        shutil.chown(self.dir / "pw", "postgres")
        self._as_postgres("initdb", "-D", str(self.dir / "data"), "-U", "autopeft", f"--pwfile={self.dir}/pw",
                          "--auth-host=scram-sha-256", "--auth-local=scram-sha-256")
        self.start()
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "autopeft",
                        "autopeft"], env={**os.environ, "PGPASSWORD": "outage-test"}, check=True, timeout=60)
        self.url = f"postgresql+psycopg://autopeft:outage-test@127.0.0.1:{self.port}/autopeft"

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                          f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir}", "start")

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


def _can_run_postgres() -> bool:
    if not PG_BIN or os.geteuid() != 0 or shutil.which("runuser") is None:
        return False
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _can_run_postgres(), reason="needs Debian's PostgreSQL binaries, root and psycopg "
                                                     "(.ci/run installs them)")
def test_a_database_stopped_for_30_s_mid_study_costs_no_trial(tmp_path) -> None:
    server = Server()
    ray_tmp = tempfile.mkdtemp(prefix="ro", dir="/tmp")
    try:
        torch.manual_seed(0)
        weights = tmp_path / "vit.safetensors"
        save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp,
               "AUTOPEFT_CACHE": str(tmp_path / "cache")}
        log = tmp_path / "search.log"
        cmd = [sys.executable, "-m", "autopeft", "search", "--dataset", "digits", "--backbone", "autopeft_test_vit",
               "--weights", str(weights), "--budget", "5%", "--trials", "6", "--epochs", "4", "--no-baselines",
               "--no-early-stopping", "--concurrency", "2", "--study", "outage", "--storage", server.url,
               "--storage-patience", "180"]
        with driver(cmd, log, cwd=tmp_path, env=env, start_new_session=True) as proc:
            deadline = time.time() + 300
            while "trial 0:" not in log.read_text() and "trial 1:" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            server.stop()
            time.sleep(30)
            server.start()
            output = ends_cleanly(proc, log)
        assert "storage is unreachable" in output and "storage is back after" in output, output[-3000:]
        trials = optuna.load_study(study_name="outage", storage=server.url).get_trials()
        assert sorted(t.number for t in trials) == list(range(6)), [(t.number, t.state) for t in trials]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), \
            [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    finally:
        stop(ray_tmp)
        server.remove()
    assert not ray_pids(ray_tmp)


class DropsAfterCreating(optuna.storages.RDBStorage):
    """A real SQLite storage whose connection drops once just after it created a trial: the row is committed, the
    caller sees an error (what a database restarting at that instant does)."""

    drops = 1

    def _create_new_trial(self, study_id, template_trial=None):  # type: ignore[no-untyped-def]
        created = super()._create_new_trial(study_id, template_trial)
        if self.drops:
            self.drops -= 1
            raise sqlalchemy.exc.OperationalError("INSERT INTO trials", {}, ConnectionResetError("connection lost"))
        return created


def test_an_ask_the_storage_dropped_leaves_no_trial_that_counts(tmp_path, monkeypatch) -> None:
    """The searcher's ask fails after its trial was created and is asked again: the study holds one running trial
    that counts (the one the searcher holds), the other is closed uncounted with its reason."""
    from optuna.trial import TrialState

    import autopeft.bundled  # noqa: F401  (registers the bundled backbone, whose weights ship)
    from autopeft.search import prepare
    from autopeft.search.engine import SamplePlan, _searcher_class, create_or_resume, tally

    url = f"sqlite:///{tmp_path}/studies.db"
    prep = prepare(SearchSettings(study="drop", dataset="digits", backbone="autopeft_tiny_vit", budget="2%",
                                  storage=url, trials=4, baselines=False, objectives="acc"))
    study, _ = create_or_resume(prep)
    searcher = _searcher_class()(space=SamplePlan(prep.space, prep.spec, prep.budget, 3), metric="val_acc",
                                 mode="max", study_name="drop", storage=DropsAfterCreating(url), max_epochs=3,
                                 target=4)
    monkeypatch.setattr(st, "STORAGE_PATIENCE_S", 30.0)
    assert searcher.suggest("t0") is not None
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2 and tally(trials) == (0, 1), [(t.number, t.state) for t in trials]
    abandoned = [t for t in trials if t.state == TrialState.FAIL]
    assert abandoned and "storage was unreachable" in abandoned[0].user_attrs["fail_reason"]
    assert searcher.running_trial_ids() == [t._trial_id for t in trials if t.state == TrialState.RUNNING]

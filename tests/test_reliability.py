"""Reliability of the search: failing trials, kill -9 of the driver and resume, several writers on one SQLite study.

The searches run on the 3-block test ViT with stand-in weights (fast). The kill -9 test runs `autopeft search` as
separate processes (the killed driver, then two drivers resuming at once), each with its own local Ray instance under
a temp dir of the test's, and stops exactly the Ray processes those drivers leave behind, by their process ids.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
import ray
import torch
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.cli import main
from autopeft.search.liveness import ATTR_DRIVER

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))
import flaky_data  # noqa: E402
from procs import ray_pids, stop  # noqa: E402

COMMON = ["--dataset", "digits", "--backbone", "autopeft_test_vit", "--budget", "5%", "--seed", "0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit.safetensors"
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(path))
    return str(path)


def _env(tmp: Path, ray_tmp: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "AUTOPEFT_CACHE": str(tmp / "cache"),
            "RAY_TMPDIR": ray_tmp, "PYTHONWARNINGS": "ignore"}


def _states(db: Path) -> dict[str, int]:
    """Trial counts by state, read with plain sqlite3 while drivers write (read-only, no Optuna set-up)."""
    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            return dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}


def _wait_for(db: Path, proc: subprocess.Popen, log: Path, ready, timeout: float = 480) -> dict[str, int]:
    deadline = time.time() + timeout
    while True:
        counts = _states(db)
        if ready(counts):
            return counts
        assert proc.poll() is None, f"driver ended early ({proc.returncode}): {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting; states {counts}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _trials(db: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return sorted(optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials(), key=lambda t: t.number)


FINISHED = ("COMPLETE", "PRUNED")


@pytest.mark.slow
def test_kill_9_of_the_driver_then_two_drivers_resume_at_once(tmp_path, weights) -> None:
    """kill -9 of a driver with trials finished and running, its Ray processes left alive; then two drivers resume
    the study at the same time, writing to the one SQLite file. Finished trials are kept exactly; each trial left
    running is marked failed and re-run once; the study ends at the requested count with no trial lost or taken
    twice; both drivers add trials and neither takes the other's running trials for interrupted."""
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = _env(tmp_path, ray_tmp)
    args = [sys.executable, "-m", "autopeft", "search", *COMMON, "--weights", weights, "--trials", "7",
            "--epochs", "2", "--grace-epochs", "2", "--study", "k"]
    db = tmp_path / "studies" / "k.db"
    logs = [tmp_path / name for name in ("killed.log", "b.log", "c.log")]
    groups: set[int] = set()
    try:
        with logs[0].open("w") as out:
            driver = subprocess.Popen([*args, "--concurrency", "2"], cwd=tmp_path, env=env, stdout=out, stderr=out,
                                      start_new_session=True)
        groups.add(driver.pid)
        _wait_for(db, driver, logs[0], lambda c: sum(c.get(s, 0) for s in FINISHED) >= 2 and c.get("RUNNING", 0))
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        killed_at = time.time()
        before = {t.number: t for t in _trials(db, "k")}
        running = [n for n, t in before.items() if t.state.name == "RUNNING"]
        finished = {n: t for n, t in before.items() if t.state.name in FINISHED}
        assert running and len(finished) >= 2
        leftovers = ray_pids(ray_tmp, groups)  # the killed driver's Ray processes outlive it

        resumes = []
        for log in logs[1:]:
            with log.open("w") as out:
                resumes.append(subprocess.Popen([*args, "--concurrency", "1", "--resume"], cwd=tmp_path, env=env,
                                                stdout=out, stderr=out, start_new_session=True))
            groups.add(resumes[-1].pid)
        for proc, log in zip(resumes, logs[1:], strict=True):
            assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        print(f"kill -9 with {len(running)} trial(s) running and {len(finished)} finished; {len(leftovers)} Ray "
              f"processes of the killed driver alive during the resumes; both resumes done "
              f"{time.time() - killed_at:.1f}s after the kill")
    finally:
        stop(ray_tmp, groups)
        assert not ray_pids(ray_tmp, groups)

    texts = [log.read_text() for log in logs[1:]]
    assert not any("database is locked" in t or "Traceback" in t for t in texts), texts
    after = _trials(db, "k")
    assert [t.number for t in after] == list(range(len(after)))  # one row per trial
    assert not [t.number for t in after if t.state.name in ("RUNNING", "WAITING")]
    # both stop at 7 finished trials; one more only when both asked in the same instant
    assert 7 <= sum(t.state.name in FINISHED for t in after) <= 8
    for n, t in finished.items():  # what finished before the kill is kept exactly
        kept = after[n]
        assert (kept.state, kept.values, kept.params, kept.user_attrs) == (t.state, t.values, t.params, t.user_attrs)
    for n in running:  # what ran at the kill is marked failed and re-run once, with the same configuration
        dead = after[n]
        assert dead.state.name == "FAIL" and dead.user_attrs.get("interrupted") is True
        assert "interrupted" in dead.user_attrs["fail_reason"]
        reruns = [t for t in after if t.user_attrs.get("rerun_of") == n]
        assert len(reruns) == 1 and reruns[0].state.name in FINISHED
        if "hparams" in dead.user_attrs:  # its draw had finished (hparams are set last): the same configuration
            assert reruns[0].params == dead.params and reruns[0].user_attrs["plan"] == dead.user_attrs["plan"]
        else:  # killed while its plan was being drawn (seen on a loaded machine): nothing trained, a fresh draw
            assert reruns[0].user_attrs.get("plan") and not dead.user_attrs.get("curve")
    assert sorted(t.number for t in after if t.user_attrs.get("interrupted")) == sorted(running)
    new = [t for t in after if t.number not in finished and t.number not in running]
    assert len({t.user_attrs[ATTR_DRIVER]["pid"] for t in new}) == 2, "both resuming drivers add trials"
    for t in after:
        if t.state.name in FINISHED:
            assert len(t.user_attrs["curve"]) == t.user_attrs["epochs"], t.number
    # every trial a driver reported done is stored with the accuracy it reported
    reported = {int(n): float(acc) for text in texts
                for n, acc in re.findall(r"trial (\d+): done val_acc ([\d.]+)", text)}
    assert reported
    for n, acc in reported.items():
        assert after[n].state.name == "COMPLETE" and abs(after[n].values[0] - acc) < 1e-4


def test_concurrent_writers_never_take_one_trial_twice(tmp_path) -> None:
    """Two processes ask, annotate and tell trials on one SQLite study at once, taking 24 enqueued trials first:
    no trial is taken twice, no write fails, no row is lost (without BEGIN IMMEDIATE: 2-4 of 50 taken twice)."""
    from autopeft.search import storage as st

    url = f"sqlite:///{tmp_path / 'hammer.db'}"
    study = optuna.create_study(study_name="h", storage=st.open_storage(url), directions=["maximize", "minimize"])
    for i in range(24):
        study.enqueue_trial({"x": i / 24})
    code = (f"import sys, json; sys.path.insert(0, {str(PLUGINS)!r}); import hammer; "
            "print(json.dumps(hammer.main(sys.argv[1], 'h', 15)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout))
    assert outs[0]["errors"] == [] and outs[1]["errors"] == []
    a, b = set(outs[0]["numbers"]), set(outs[1]["numbers"])
    assert len(a) == len(b) == 15 and not a & b
    trials = optuna.load_study(study_name="h", storage=url).get_trials()
    assert len(trials) == 30 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(t.number for t in trials) == sorted(a | b)


@pytest.fixture
def ray_with_plugins():
    """A local Ray whose workers import tests/plugins/flaky_data (the trials load the `flaky` dataset there)."""
    flaky_data.register()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"},
                          "worker_process_setup_hook": "flaky_data.register"})
    yield
    ray.shutdown()


def test_failing_trials_are_recorded_with_their_reason_and_the_study_goes_on(tmp_path, monkeypatch, capsys,
                                                                            weights, ray_with_plugins) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "flaky"
    root.mkdir()
    # the driver's own check loads the dataset first; then four trials: three fail, one trains
    (root / "script.json").write_text(json.dumps(["ok", "raise", "nan", "oom", "ok"]))
    args = ["search", "--dataset", "flaky", "--data-root", str(root), "--backbone", "autopeft_test_vit", "--weights",
            weights, "--budget", "5%", "--trials", "4", "--epochs", "1", "--grace-epochs", "1", "--concurrency", "2",
            "--study", "f", "--seed", "0"]
    assert main(args) == 0
    trials = _trials(tmp_path / "studies" / "f.db", "f")
    assert len(trials) == 4
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 3 and sum(t.state.name == "COMPLETE" for t in trials) == 1
    reasons = sorted(t.user_attrs["fail_reason"] for t in failed)
    assert any(r.startswith("ValueError: simulated failure in the data pipeline") for r in reasons), reasons
    assert any(r.startswith("diverged: the loss became nan") for r in reasons), reasons
    assert any(r.startswith("out of memory: CUDA out of memory") and "lower the batch size" in r
               for r in reasons), reasons
    capsys.readouterr()
    url = f"sqlite:///{tmp_path / 'studies' / 'f.db'}"
    assert main(["results", "--study", "f", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "3 failed" in table and "1 complete" in table
    assert main(["results", "--study", "f", "--storage", url, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["fail_reason"] for r in rows if r["status"] == "FAIL") == reasons


def test_only_trials_whose_driver_is_gone_count_as_interrupted(tmp_path) -> None:
    """This machine's drivers are checked by process, other machines' by heartbeat age; unstamped trials are
    orphans (once they are older than the instant between asking and stamping)."""
    from autopeft.search import storage as st
    from autopeft.search.engine import requeue_interrupted
    from autopeft.search.liveness import interrupted, this_driver

    study = optuna.create_study(study_name="l", storage=st.open_storage(f"sqlite:///{tmp_path / 'l.db'}"))
    elsewhere = {"machine": "another-host/boot", "pid": 1, "start": "1"}
    unstamped = study.ask()
    other_silent = study.ask()
    other_silent.set_user_attr(ATTR_DRIVER, elsewhere)
    other_beating = study.ask()
    other_beating.set_user_attr(ATTR_DRIVER, elsewhere)
    study._storage.record_heartbeat(other_beating._trial_id)
    mine = study.ask()
    mine.set_user_attr(ATTR_DRIVER, this_driver())
    dead = study.ask()
    dead.set_user_attr(ATTR_DRIVER, {**this_driver(), "start": "0"})  # this pid, another start: a reused pid
    numbers = lambda trials: sorted(t.number for t in trials)  # noqa: E731
    assert numbers(interrupted(study)) == [unstamped.number, other_silent.number, dead.number]
    assert numbers(interrupted(study, unstamped_after_s=60)) == [other_silent.number, dead.number]
    # a resuming driver looks again after settle_s: a trial stamped meanwhile is another live driver's
    stamper = threading.Timer(0.3, lambda: unstamped.set_user_attr(ATTR_DRIVER, this_driver()))
    stamper.start()
    assert numbers(interrupted(study, settle_s=1.0)) == [other_silent.number, dead.number]
    stamper.join()
    unstamped.set_user_attr(ATTR_DRIVER, "")  # unstamped again (not a driver mapping): an orphan once more
    assert numbers(interrupted(study, settle_s=0.1)) == [unstamped.number, other_silent.number, dead.number]
    assert other_beating.number in numbers(interrupted(study, grace_s=-1))  # a heartbeat older than the grace
    assert sorted(requeue_interrupted(study)) == [unstamped.number, other_silent.number, dead.number]
    assert requeue_interrupted(study) == []  # once
    states = {t.number: t.state.name for t in study.get_trials()}
    assert [states[n] for n in (unstamped.number, other_beating.number, mine.number, dead.number)] == \
        ["FAIL", "RUNNING", "RUNNING", "FAIL"]
    assert sum(s == "WAITING" for s in states.values()) == 3

"""Run many `autopeft` command lines cheaply, each in a process of its own.

`python -m autopeft COMMAND` spends ~7 CPU-seconds importing torch, timm and optuna before it can act; a table of 35
bad inputs would spend minutes there. This script is started once as a subprocess (a fresh interpreter, not
the pytest process): it imports autopeft once, then forks one child per command line. Each child runs the package's
real `__main__` (as `python -m autopeft ARGS` does) in its own working directory, with its stdout and stderr in
files, and ends like an interpreter: the exit status of `sys.exit`, or 1 and a traceback on an uncaught exception.

    results = run_cli([Call(["search", "--budget", "abc"], cwd="/tmp/x")], env=os.environ)

Protocol (script mode): a JSON list of {argv, cwd, env} on stdin; a JSON list of {rc, out, err} on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Call:
    """One command line (without the program name), where it runs, and extra environment variables."""

    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float = 0.0


def run_cli(calls: list[Call], env: dict[str, str], jobs: int = 2, timeout: float = 600) -> list[Result]:
    """Run every call through `python -m autopeft`'s code path in forked children; results in the calls' order."""
    payload = json.dumps([{"argv": c.argv, "cwd": c.cwd, "env": c.env} for c in calls])
    proc = subprocess.run([sys.executable, __file__, str(jobs)], input=payload, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cli_fork failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return [Result(**r) for r in json.loads(proc.stdout)]


def _child(call: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become `python -m autopeft ARGV` in `cwd`, then exit without returning."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(call["cwd"])
        os.environ.update(call["env"])
        sys.argv = ["autopeft", *call["argv"]]
        try:
            runpy.run_module("autopeft", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  what the interpreter would print for an uncaught exception
            traceback.print_exc()
        atexit._run_exitfuncs()  # what the interpreter runs at exit (ray registers its shutdown there)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(jobs: int) -> None:
    calls = json.loads(sys.stdin.read())
    # import what the command lines need once, before forking (not Ray: it starts threads)
    import autopeft.cli

    autopeft.cli.build_parser()
    for name in ("autopeft.data", "autopeft.search", "autopeft.search.engine", "autopeft.search.results",
                 "autopeft.space", "autopeft.export", "autopeft.recipe", "autopeft.train", "autopeft.report",
                 "pandas", "sklearn.datasets", "scipy.io", "psycopg"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    tmp = Path(tempfile.mkdtemp(prefix="cli-fork-"))
    results: list[dict | None] = [None] * len(calls)
    running: dict[int, tuple[int, float]] = {}
    pending = list(enumerate(calls))

    def reap() -> None:
        pid, status = os.wait()
        i, started = running.pop(pid)
        results[i] = {"rc": os.waitstatus_to_exitcode(status), "seconds": round(time.perf_counter() - started, 2),
                      "out": (tmp / f"{i}.out").read_text(errors="replace"),
                      "err": (tmp / f"{i}.err").read_text(errors="replace")}

    while pending or running:
        while pending and len(running) < jobs:
            i, call = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(call, str(tmp / f"{i}.out"), str(tmp / f"{i}.err"))
            running[pid] = (i, time.perf_counter())
        reap()
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(json.dumps(results))


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

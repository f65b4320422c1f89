"""Finding and stopping the Ray processes a test's own `autopeft search` drivers started, by their process ids.

A driver run with RAY_TMPDIR=<a temp dir of the test's> starts a Ray instance whose processes name that dir in their
command lines; a driver started with `start_new_session=True` leads a process group of its own. Either identifies
exactly the test's processes (never `ray stop` or a broad pkill: other Ray instances may run on the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def ray_pids(marker: str, groups: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Processes with `marker` in their command line or in one of the process `groups`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            group = os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
        if marker in cmdline or group in groups:
            pids.append(int(proc.name))
    return pids


def stop(marker: str, groups: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGTERM those processes, then SIGKILL what is left after a short grace (SIGTERM alone leaves some)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        for pid in ray_pids(marker, groups):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while ray_pids(marker, groups) and time.time() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def driver(cmd: list[str], log: Path, **popen: object) -> Iterator[subprocess.Popen]:
    """`cmd` running with its stdout and stderr in `log`; killed if it still runs when the block ends."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)  # type: ignore[call-overload]
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def ends_cleanly(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """Wait for `proc`; its exit code is 0 and its output (returned) holds no Python traceback."""
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    return output

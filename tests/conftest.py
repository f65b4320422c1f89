"""Shared test settings: offline hub, few threads, deterministic seeds."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# the suite's searches run random-weight test backbones, whose trials are often at chance: the `diverged` stop would
# fail them (tests/test_rates.py checks the stop itself, with it on)
os.environ.setdefault("AUTOPEFT_STOP_DIVERGED", "0")
if "AUTOPEFT_PIXEL_CACHE" not in os.environ:  # the suite's decoded images stay out of the user's store
    os.environ["AUTOPEFT_PIXEL_CACHE"] = tempfile.mkdtemp(prefix="autopeft-test-pixels-")
    atexit.register(shutil.rmtree, os.environ["AUTOPEFT_PIXEL_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second thread only waits
    for the first (and for other processes on the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

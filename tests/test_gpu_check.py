"""benchmarks/gpu_check.py: its --smoke run (every part's code path on the CPU) with ray, optuna, sqlalchemy and
plotly made unimportable, as they are on the GPU machine; a part that fails is recorded and the run goes on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]

# imported first by every Python process started with this folder on PYTHONPATH (the check's workers too): each
# attempt to import a forbidden package is logged, then refused
GUARD = '''
import importlib.abc, os, sys

FORBIDDEN = {forbidden!r}


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            with open(os.environ["GPU_CHECK_GUARD_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{{name}} is not installed on the GPU machine")
        return None


sys.meta_path.insert(0, _Refuse())
'''


def _numbers(*values: object) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_smoke_runs_every_part_without_the_forbidden_packages(tmp_path: Path) -> None:
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD.format(forbidden=set(gpu_check.FORBIDDEN)))
    attempts = tmp_path / "attempts.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPU_CHECK_GUARD_LOG": str(attempts),
           "PYTHONPATH": os.pathsep.join((str(guard), str(ROOT)))}
    # the guard works: a forbidden import fails in a process started like the check's
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed on the GPU machine" in probe.stderr
    attempts.unlink()

    out = tmp_path / "check.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not attempts.exists(), f"imported on the check's path: {attempts.read_text()}"
    assert seconds < 180, f"the smoke run took {seconds:.0f} s (it is meant to take under a minute)"

    report = json.loads(out.read_text())
    for key in ("a_methods", "b_data_path", "c_precision", "d_concurrency", "e_memory"):
        assert "error" not in report[key], (key, report[key])
    a = report["a_methods"]
    assert a["failed"] == []
    assert {r["method"] for r in a["rows"]} >= {"full", "lora", "linear", "vpt_deep", "prefix"}
    assert all(_numbers(r["step_ms"], r["images_per_s"], r["time_vs_full"]) for r in a["rows"])
    b = report["b_data_path"]
    assert [r["epoch"] for r in b["epochs"]] == [1, 2] and [r["epoch"] for r in b["data_only"]] == [1, 2]
    assert all(_numbers(r["images_per_s"], r["busy_share"], r["data_wait_share"]) for r in b["epochs"])
    assert _numbers(b["model_images_per_s"], b["later_busy_share"], *(r["images_per_s"] for r in b["data_only"]))
    c = report["c_precision"]
    assert {(x["precision"], x["cached_blocks"] > 0) for x in c["cases"]} == {
        ("bf16", True), ("bf16", False), ("fp16", True), ("fp16", False)}
    # on the CPU both invariants hold exactly as tests/test_precision.py holds them: the check must see that too
    assert c["ok"], c["cases"]
    d = report["d_concurrency"]
    assert [r["processes"] for r in d["runs"]] == [1, 2]
    assert all(_numbers(r["summed_images_per_s"], r["vs_one"]) and r["summed_images_per_s"] > 0 for r in d["runs"])
    e = report["e_memory"]
    assert [x["raised_from"] for x in e["cases"]] == ["on_step", "report"]
    assert all(_numbers(x["diff_mb"]) for x in e["cases"]) and e["ok"] is None  # RSS on the CPU: not judged
    assert len(report["targets"]) == 5 and {t["result"] for t in report["targets"]} <= {"PASS", "FAIL", "n/a"}
    for heading in ("(a) methods", "(b) data path", "(c) precision", "(d) concurrent", "(e) memory", "Targets:",
                    "| full |", "| bf16 | cacheable"):
        assert heading in proc.stdout
    print(f"smoke run: {seconds:.1f} s")


def test_a_failing_part_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def broken(check: gpu_check.Check) -> dict:
        raise RuntimeError("deliberately broken")

    monkeypatch.setattr(gpu_check, "part_a", broken)
    monkeypatch.setattr(gpu_check, "part_b", lambda check: {"epochs": [], "later_busy_share": 0.95})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--parts", "ab", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["a_methods"]["error"] == "RuntimeError: deliberately broken"
    assert "deliberately broken" in report["a_methods"]["traceback"]
    assert report["b_data_path"]["later_busy_share"] == 0.95 and "c_precision" not in report
    results = {t["target"].split(" ")[0]: t["result"] for t in report["targets"]}
    assert results["every"] == "n/a" and results["GPU"] == "PASS"
    text = capsys.readouterr().out
    assert "(a) methods: ERROR RuntimeError: deliberately broken" in text and "Targets:" in text


def test_targets_judge_the_issue_thresholds() -> None:
    report = {"settings": {"smoke": False, "device": "cuda"},
              "a_methods": {"slowest_frozen_vs_full": 0.71, "slowest_frozen": "ssf", "over_target": ["ssf"]},
              "b_data_path": {"later_busy_share": 0.9},
              "c_precision": {"ok": True},
              "d_concurrency": {"most": 4, "most_vs_one": 1.99},
              "e_memory": {"ok": False}}
    got = [t["result"] for t in gpu_check.targets(report)]
    assert got == ["FAIL", "PASS", "FAIL", "PASS", "FAIL"]
    assert "ssf" in gpu_check.targets(report)[0]["note"]

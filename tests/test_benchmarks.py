"""The benchmark harness: argument handling, the equal-compute bookkeeping, the targets, one tiny end-to-end cell."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not of the installed package

from autopeft.records import TrialRecord  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402
from benchmarks.compare import CellConfig, _asha_mean_epochs, epochs_to_reach, run_cell, within_epochs  # noqa: E402
from benchmarks.report import aggregate, markdown  # noqa: E402

# -- argument handling: one line, exit 2, nothing written ----------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [],
    ["--quick", "--full"],
    ["--quick", "--suite", "imagenet"],
    ["--quick", "--workers", "two"],
])
def test_bad_flags_exit_2_with_one_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_run.main([*argv, "--out", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmarks.run: error:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, says", [
    (["--suite", "vtab1k"], "needs --data-root"),
    (["--suite", "vtab1k", "--data-root", "{tmp}"], "VTAB-1k task(s) missing"),
    (["--data-root", "{tmp}/nowhere"], "is not a folder"),
    (["--tasks", "cifar10"], "not in the mini suite"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--weights", "{tmp}/none.safetensors"], "is not a file"),
    (["--out", "{tmp}"], "is a folder"),
])
def test_bad_input_exits_2_before_writing(extra, says, tmp_path, capsys):
    results = sorted(p.name for p in bench_run.RESULTS.glob("*")) if bench_run.RESULTS.exists() else []
    argv = ["--quick", *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r.json")]
    for mode in ("--quick", "--full"):
        argv[0] = mode
        assert bench_run.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []
    assert (sorted(p.name for p in bench_run.RESULTS.glob("*")) if bench_run.RESULTS.exists() else []) == results


def test_vtab1k_suite_resolves_against_the_noah_layout(tmp_path):
    from benchmarks.suite import get_mode

    full = get_mode("vtab1k", quick=False)
    assert len(full.tasks) == 19 and full.backbone == "vit_base_patch16_224" and len(full.seeds) == 3
    quick = get_mode("vtab1k", quick=True)
    for task in quick.tasks:
        folder = tmp_path / "vtab-1k" / task.split("/", 1)[1]
        folder.mkdir(parents=True)
        for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
            (folder / name).write_text("")
    args = bench_run.parse(["--quick", "--suite", "vtab1k", "--data-root", str(tmp_path)])
    assert bench_run.resolve(args).tasks == quick.tasks
    args = bench_run.parse(["--full", "--suite", "vtab1k", "--data-root", str(tmp_path)])
    with pytest.raises(Exception, match="17 VTAB-1k task"):
        bench_run.resolve(args)


def test_mini_full_grid_is_the_issue_grid():
    from benchmarks.suite import MINI_TASKS, get_mode

    full = get_mode("mini", quick=False)
    assert full.tasks == MINI_TASKS and full.budgets == ("0.5%", "1%", "2%") and full.seeds == (0, 1, 2)
    assert full.epochs >= 30 and len(full.lrs) >= 3 and min(full.lrs) <= 3e-4 and max(full.lrs) >= 1e-2


# -- bookkeeping ---------------------------------------------------------------------------------------------------


def _rec(number, epochs, val, params=10, max_epochs=4):
    return TrialRecord(number=number, plan={}, peft_params=params, val_acc=val, epochs=epochs, max_epochs=max_epochs,
                       status="COMPLETE" if epochs == max_epochs else "PRUNED")


def test_within_epochs_cuts_in_trial_order():
    records = [_rec(2, 4, 0.5), _rec(0, 4, 0.6), _rec(1, 1, 0.2), _rec(3, 4, 0.9)]
    assert [r.number for r in within_epochs(records, 9)] == [0, 1, 2]
    assert [r.number for r in within_epochs(records, 8)] == [0, 1]
    assert within_epochs(records, 3) == []


def test_epochs_to_reach_counts_only_eligible_trials_under_budget():
    records = [_rec(0, 1, 0.95), _rec(1, 4, 0.7), _rec(2, 4, 0.9, params=1000), _rec(3, 4, 0.81), _rec(4, 4, 0.99)]
    # trial 0 was stopped early (low fidelity) and trial 2 is over budget: neither counts, their epochs do
    assert epochs_to_reach(records, 0.8, limit=100) == 13
    assert epochs_to_reach(records, 0.999, limit=100) is None


def test_asha_mean_epochs():
    assert _asha_mean_epochs(6, 2, 2) == pytest.approx(0.5 * 2 + 0.25 * 4 + 0.25 * 6)
    assert _asha_mean_epochs(5, 5, 2) == pytest.approx(5)  # grace = max: no stopping


def _cell(task, seed, search, hand, ratio):
    arm = {"best_val": 0.5, "hypervolume": 0.4, "epochs": 10}
    return {"task": task, "budget": "0.5%", "seed": seed, "compute_epochs": 10,
            "arms": {"search": dict(arm, test=search), "random": dict(arm, test=0.5),
                     "handpicked": dict(arm, test=hand), "full": dict(arm, test=0.9),
                     "linear": dict(arm, test=0.3)},
            "search_epochs_to_random_best_ratio": ratio}


def test_targets_from_cells():
    cells = [_cell("a", 0, 0.62, 0.60, 0.3), _cell("a", 1, 0.64, 0.60, 0.5), _cell("b", 0, 0.70, 0.71, 0.2)]
    s = aggregate(cells, ["0.5%"])
    # task a gains 3 points (mean of 2 and 4), task b loses 1: the suite mean is +1 point
    assert s["targets"]["gain_at_0.5pct"] == pytest.approx(0.01)
    assert s["targets"]["gain_met"] is True
    assert s["targets"]["epoch_ratio_mean_of_reached"] == pytest.approx(1 / 3)
    assert s["targets"]["epoch_ratio_met"] is True
    cells[2]["search_epochs_to_random_best_ratio"] = None  # never reached in one cell: missed
    cells[2]["arms"]["search"]["test"] = 0.69
    s = aggregate(cells, ["0.5%"])
    assert s["targets"]["gain_met"] is False and s["targets"]["epoch_ratio_met"] is False
    text = markdown({"meta": {"command": "x", "started": "t", "machine": {"machine": "m", "cpus": 2, "gpu": None,
                                                                         "load_before": [1, 2, 3]},
                              "backbone": {"name": "b"}, "versions": {}}, "summary": s, "speed": None})
    assert "missed" in text and "| a | 0.5% |" in text


# -- one tiny end-to-end cell (test ViT, Ray with 2 CPUs, 2 search trials) -------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # a real search on Ray (2 trials) plus the in-process arms: about 45 s on 2 busy cores
def test_one_cell_end_to_end(ray_instance, tmp_path, monkeypatch):
    from autopeft.backbones import create_backbone

    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
    c = CellConfig(task="digits", budget="0.5%", seed=0, backbone="autopeft_test_vit", epochs=1, lrs=(1e-2,),
                   weights=str(weights), grace_epochs=1, concurrency=2, references=("linear",), search_trials=2)
    out = run_cell(c, None, str(tmp_path), log=lambda m: None)
    arms = out["arms"]
    assert set(arms) == {"search", "random", "handpicked", "linear"}
    n_hand = arms["handpicked"]["trials"]
    assert n_hand >= 2 and out["compute_epochs"] == n_hand  # R = baselines × 1 lr × 1 epoch
    assert arms["random"]["trials"] == n_hand and arms["random"]["epochs"] == n_hand  # equal compute, no stopping
    assert 1 <= arms["search"]["trials"] <= 2 and arms["search"]["epochs"] <= out["compute_epochs"]
    for name in ("search", "random", "handpicked", "linear"):
        a = arms[name]
        assert 0.0 <= a["best_val"] <= 1.0 and 0.0 <= a["test"] <= 1.0
        assert a["best"]["peft_params"] <= (out["budget_params"] if name != "linear" else 0)
    assert 0.0 <= arms["search"]["hypervolume"] <= 1.0
    json.dumps(out)  # what run.py writes
    assert math.isfinite(arms["handpicked"]["hypervolume"])


def test_tasks_flag_picks_any_suite_task_in_either_mode():
    for mode in ("--quick", "--full"):
        resolved = bench_run.resolve(bench_run.parse([mode, "--tasks", "digits"]))
        assert resolved.tasks == ("digits",)

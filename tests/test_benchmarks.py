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


# -- the standard grid of [I] (benchmarks/standard.py): statistics, allocation, cache ------------------------------

from benchmarks import standard as std  # noqa: E402
from benchmarks.standard_stats import (  # noqa: E402
    best_so_far,
    bootstrap_ci,
    mean_curve,
    reach_ratio,
    summarise,
    targets,
)


def test_bootstrap_interval_known_cases():
    assert bootstrap_ci([0.02, 0.02, 0.02]) == pytest.approx((0.02, 0.02, 0.02))
    # two cells 0 and 2: resampled means are 0 (p 1/4), 1 (1/2), 2 (1/4), so the 95 % interval is [0, 2]
    mean, lo, hi = bootstrap_ci([0.0, 2.0], resamples=10_000, seed=0)
    assert (mean, lo, hi) == pytest.approx((1.0, 0.0, 2.0))
    assert bootstrap_ci([0.0, 1.0, 5.0], seed=3) == bootstrap_ci([0.0, 1.0, 5.0], seed=3)  # seeded
    mean, lo, hi = bootstrap_ci([0.01 * i for i in range(20)])
    assert lo < mean < hi and mean == pytest.approx(0.095)


def test_handpicked_arm_gets_exactly_n_runs_over_methods_and_the_shared_lr_prior():
    names = ["lora", "adapter", "adaptformer", "vpt_deep", "linear"]
    alloc = std.allocate_handpicked(names, 8, 1e-4, 1e-2)
    assert len(alloc) == 8
    counts = {n: sum(1 for m, _ in alloc if m == n) for n in names}
    assert counts == {"lora": 2, "adapter": 2, "adaptformer": 2, "vpt_deep": 1, "linear": 1}
    assert [r for m, r in alloc if m == "lora"] == pytest.approx([1e-3, 1e-2])  # a decade apart from the top
    assert [r for m, r in alloc if m == "linear"] == pytest.approx([1e-2])
    assert all(1e-4 <= r <= 1e-2 for _, r in alloc)
    assert std.allocate_handpicked(names, 8, 1e-4, 1e-2) == alloc  # deterministic
    assert [m for m, _ in std.allocate_handpicked(names, 3, 1e-4, 1e-2)] == names[:3]
    assert len(std.allocate_handpicked(names, 10, 1e-4, 1e-2)) == 10
    assert std.lr_points(3, 1e-4, 1e-2) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert len(set(std.lr_points(4, 1e-4, 1e-2))) == 4  # more than the decades: log-even points, ends included
    assert len(std.allocate_handpicked(names, 23, 1e-4, 1e-2)) == 23
    assert std.allocate_handpicked([], 8, 1e-4, 1e-2) == []


def test_the_hand_picked_rates_do_not_follow_the_search_spaces_lr_scale_range() -> None:
    from types import SimpleNamespace

    import benchmarks.standard as std

    shipped = SimpleNamespace(low=0.25, high=1.5)  # the shipped spaces' lr_scale range since [P] part 2
    c = std.StandardConfig()
    assert std.scale_points(2, *std.hand_rate_range(c, "lr_scale", shipped)) == [0.5, 2.0]
    assert std.scale_points(1, *std.hand_rate_range(c, "lr_scale", shipped)) == [1.0]
    as_before = std.StandardConfig(hand_scale_range=None)  # the rows before `filled-start`
    assert std.scale_points(2, *std.hand_rate_range(as_before, "lr_scale", shipped)) == [0.391, 0.958]
    absolute = SimpleNamespace(low=1e-4, high=1e-2)
    assert std.hand_rate_range(c, "lr", absolute) == (1e-4, 1e-2)


def test_filled_hand_picked_plans_are_each_methods_largest_configuration_under_the_budget():
    """[P] part 1's fair yardstick: each sized baseline at the most parameters it can reach under the budget over
    every size and placement (checked by brute force here), never fewer than the search's ladder baseline."""
    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.methods import get_method, make_spec
    from autopeft.plan import PeftPlan
    from autopeft.search.baselines import BASELINES, PLACEMENTS, baseline_plans, filled_plans

    spec = backbone_spec("autopeft_tiny_vit")
    limit = parse_budget("1%", spec).limit
    filled, ladder = dict(filled_plans(spec, limit)), dict(baseline_plans(spec, limit))
    assert list(filled) == list(ladder)  # the same methods, in baseline order
    for b in BASELINES:
        if b.name not in filled:
            continue
        size_option = get_method(b.method).size_option
        count = filled[b.name].count(spec)
        assert count <= limit and count >= ladder[b.name].count(spec)
        if size_option is None:
            assert filled[b.name] == ladder[b.name]
            continue
        best = 0
        for where in PLACEMENTS.get(b.method, ({},)):
            for size in range(1, 200):
                n = PeftPlan.single(make_spec(b.method, {**b.options, **where, size_option: size}),
                                    range(spec.num_blocks)).count(spec)
                if n <= limit:
                    best = max(best, n)
        assert count == best, (b.name, filled[b.name].short(), count, best)
    assert sum(p.count(spec) for p in filled.values()) > 1.3 * sum(p.count(spec) for p in ladder.values())


def test_arm_rows_keep_every_curve_the_epochs_at_chance_and_the_picks_parts():
    from autopeft.methods import make_spec
    from autopeft.plan import PeftPlan
    from autopeft.records import TrialRecord

    two = PeftPlan(blocks={0: (make_spec("lora"),), 1: (make_spec("bitfit"),)}).to_dict()
    curves = [[0.10, 0.12, 0.14], [0.10, 0.50, 0.70], [0.09]]
    records = [TrialRecord(number=i, plan=two, peft_params=10, val_acc=c[-1], curve=c, epochs=len(c),
                           max_epochs=3) for i, c in enumerate(curves)]
    row, best = std._arm_row(std.CellArm(records), limit=100, chance=0.15)
    assert row["curves"] == curves and row["epochs"] == 7
    assert row["chance_epochs"] == 4  # the first run (3 epochs) and the one stopped after one, not the learner
    assert best.number == 1 and row["best"]["parts"] == 2
    assert not std.at_chance([], 0.15) and std.at_chance([0.15], 0.15)


def test_cache_hits_when_nothing_changes_and_misses_when_a_setting_does(tmp_path, monkeypatch):
    job = dict(task="mnist5k_fs", backbone="b", weights="/x/w.safetensors", data_root=None, data_seed=0, seed=0,
               epochs=15, plan={"blocks": {}}, hparams={"lr": 1e-3, "batch_size": 32})
    ctx = {"backbone": "b", "weights_sha256": "aa", "code": "c1", "torch": "t"}
    calls = []

    def fake(j):
        calls.append(j)
        return {"status": "COMPLETE", "curve": [0.5], "test_acc": 0.4, "seconds": 1.0}

    monkeypatch.setattr(std, "run_job", fake)
    cache = std.RunCache(tmp_path, ctx)
    std.run_cached([job, dict(job)], None, cache)
    assert len(calls) == 1 and cache.misses == 1 and cache.hits == 0  # the same job twice runs once
    again = std.RunCache(tmp_path, dict(ctx))
    assert std.run_cached([job], None, again)[0]["test_acc"] == 0.4 and again.hits == 1 and len(calls) == 1
    assert again.key(dict(job, weights="/elsewhere/w.safetensors")) == again.key(job)  # the sha counts, not the path
    changed = [dict(job, epochs=16), dict(job, seed=1), dict(job, data_seed=1), dict(job, task="fmnist_count_fs"),
               dict(job, hparams={"lr": 2e-3, "batch_size": 32}), dict(job, plan={"blocks": {"0": []}}),
               dict(job, final=True)]
    assert len({again.key(j) for j in changed} | {again.key(job)}) == len(changed) + 1
    for other in ({"code": "c2"}, {"weights_sha256": "bb"}, {"backbone": "b2"}):
        assert std.RunCache(tmp_path, {**ctx, **other}).get(job) is None
    assert std.RunCache(None, ctx).get(job) is None  # --no-cache


def test_best_so_far_curves_averaged_and_epochs_to_reach_random_best():
    # (epochs, val or None): a None is a record that does not count (stopped early, failed, over budget)
    assert best_so_far([(2, 0.5), (1, None), (2, 0.7), (2, 0.6)], 6) == [None, None, 0.5, 0.5, 0.5, 0.7, 0.7]
    assert best_so_far([(4, 0.9), (4, 0.95)], 6)[-1] == 0.9  # the second record ends past the horizon
    a, b = [None, 0.2, 0.4, 0.4], [None, None, 0.6, 0.8]
    assert mean_curve([a, b]) == pytest.approx([None, None, 0.5, 0.6])
    random = [None, None, None, None, 0.5, 0.5, 0.5, 0.5, 0.6]  # random's final best 0.6 after 8 epochs
    search = [None, 0.3, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7]
    r = reach_ratio(search, random)
    assert r["search_epochs"] == 2 and r["random_epochs"] == 8 and r["ratio"] == pytest.approx(0.25)
    assert reach_ratio([None] * 9, random)["ratio"] is None


def _std_cell(task, seed, search, random, hand, parts=2):
    trace = [(2, 0.5), (2, 0.6)]
    return {"task": task, "seed": seed, "horizon": 4,
            "arms": {"search": {"test": search, "best_val": 0.6, "trace": [(1, 0.6), (1, None), (2, 0.7)],
                                "epochs": 4, "chance_epochs": 1, "best": {"parts": parts}},
                     "random": {"test": random, "best_val": 0.6, "trace": trace, "epochs": 4, "chance_epochs": 2},
                     "handpicked": {"test": hand, "best_val": 0.6, "trace": trace, "epochs": 4,
                                    "chance_epochs": 0}}}


def test_standard_summary_pairs_cells_and_reports_targets():
    cells = [_std_cell("a", 0, 0.62, 0.60, 0.60), _std_cell("a", 1, 0.64, 0.61, 0.60, parts=5),
             _std_cell("b", 0, 0.70, 0.70, 0.71)]
    s = summarise(cells, resamples=2000)
    assert s["chance_share"] == pytest.approx({"search": 0.25, "random": 0.5, "handpicked": 0.0})
    assert s["search_picks_few_parts"] == pytest.approx(2 / 3)
    d = s["search_minus_handpicked"]
    assert d["mean"] == pytest.approx((0.02 + 0.04 - 0.01) / 3)
    assert d["per_task"] == pytest.approx({"a": 0.03, "b": -0.01})
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert s["random_minus_handpicked"]["per_cell"] == pytest.approx([0.0, 0.01, -0.01])
    assert s["reach"]["ratio"] == pytest.approx(0.25)  # search holds 0.6 after 1 of random's 4 epochs
    t = targets(s)
    assert t["worst_task_met"] is True and t["epoch_ratio_met"] is True and t["gain_met"] is False  # +1.7 pts, CI < 0
    text = std_markdown({"rows": {"before": {"meta": {"started": "2026-12-01T10:00", "complete": True,
                                                      "wall_s": 60}, "summary": s, "targets": t}}})
    assert "| before |" in text and "gain missed" in text and "+1.7" in text
    assert "| 25 / 50 / 0 | 67 % | ladder |" in text  # epochs at chance, picks of ≤ 3 parts, the older yardstick
    for c in cells:  # the fewest-parts pick: 1 point under the val pick in every cell, on every arm
        for arm in c["arms"].values():
            arm["fewest_pick"] = {"test": arm["test"] - 0.01, "parts": 1}
    s = summarise(cells, resamples=2000)
    assert s["fewest_minus_pick"]["search"]["mean"] == pytest.approx(-0.01) and s["fewest_parts_share"] == 1.0
    assert "Fewer parts at no cost" in std_markdown({"rows": {"r": {"meta": {}, "summary": s}}})


def std_markdown(doc):
    from benchmarks.standard_stats import markdown as md

    return md(doc)


@pytest.mark.parametrize("argv, says", [
    (["--standard"], "needs --label"),
    (["--standard", "--label", "a b"], "must be letters"),
    (["--standard", "--label", "x", "--suite", "vtab1k"], "mini suite only"),
    (["--standard", "--label", "x", "--tasks", "cifar10"], "not in the mini suite"),
    (["--standard", "--label", "x", "--workers", "0"], "--workers must be >= 1"),
    (["--quick", "--label", "x"], "belong to --standard"),
    (["--quick", "--no-search-cap"], "belong to --standard"),
    (["--quick", "--search-set", "objectives=acc"], "belong to --standard"),
    (["--standard", "--label", "x", "--search-space", "nope"], "nope"),
    (["--standard", "--label", "x", "--select", "cv:1"], "--select 'cv:1' is not valid"),
    (["--standard", "--label", "x", "--select-top", "0"], "--select-top must be >= 1"),
    (["--quick", "--select", "cv:3"], "belong to --standard"),
])
def test_standard_bad_input_exits_2_with_one_line(argv, says, tmp_path, capsys):
    assert bench_run.main([*argv, "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_derived_space_changes_only_the_batch_size(tmp_path):
    from autopeft.space import load_space

    path = std.derived_space(std.STANDARD, tmp_path)
    ours, shipped = dict(load_space(str(path)).training), dict(load_space("unified").training)
    assert ours["batch_size"].value == 32 and set(ours) == set(shipped)
    assert all(repr(ours[k]) == repr(shipped[k]) for k in shipped if k != "batch_size")
    assert std.derived_space(std.STANDARD, tmp_path) == path  # named by content: the same file again
    other = std.derived_space(std.STANDARD, tmp_path, "compact")  # the search arm's own space (--search-space)
    assert load_space(str(other)).mode == "depth" and dict(load_space(str(other)).training)["batch_size"].value == 32


def test_derived_space_takes_changes_of_the_search_arms_space(tmp_path):
    """`--search-space-set`: a dotted key of the space file and a YAML value change the search arm's copy of a
    shipped space, and nothing else of it."""
    from autopeft.space import load_space

    plain = load_space(str(std.derived_space(std.STANDARD, tmp_path)))
    changes = (("training.lr_scale", "{low: 0.25, high: 4.0, log: true}"), ("fill", "[0.5, 1.0]"))
    path = std.derived_space(std.STANDARD, tmp_path, "unified", changes)
    changed = load_space(str(path))
    ours, shipped = dict(changed.training), dict(plain.training)
    assert (ours["lr_scale"].low, ours["lr_scale"].high) == (0.25, 4.0) and changed.fill.values == (0.5, 1.0)
    assert plain.fill is None and all(repr(ours[k]) == repr(shipped[k]) for k in shipped if k != "lr_scale")
    assert changed.slots == plain.slots and changed.methods == plain.methods and path.name != "unified"


@pytest.mark.parametrize("change, says", [
    ("fill=[1.5]", "fill"),                           # the space's own check, before any arm runs
    ("training.lr_scale", "give KEY=VALUE"),          # no value
    ("name.x=1", "is not a section"),                 # a path through a value
    ("fill=[0.5, 1", "not YAML"),
])
def test_bad_search_space_changes_exit_2_before_anything_runs(change, says, tmp_path, capsys) -> None:
    argv = ["--standard", "--label", "x", "--search-space-set", change, "--out", str(tmp_path / "r.json")]
    assert bench_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pair, says", [
    ("objectivs=acc", "KEY one of"),            # a typo names the valid keys
    ("epochs=3", "KEY one of"),                 # the grid's own settings are not the search arm's to change
    ("max_epochs=50", "KEY one of"),            # the grid caps the search at its compute itself
    ("select=cv:3", "KEY one of"),              # the grid's --select picks for every arm alike
    ("grace_epochs=two", "takes a whole number"),
    ("objectives=acc,foo", "--objectives 'acc,foo' is not valid"),
])
def test_bad_search_settings_exit_2_before_anything_runs(pair, says, tmp_path, capsys) -> None:
    assert bench_run.main(["--standard", "--label", "x", "--search-set", pair, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_search_settings_are_typed_as_the_fields() -> None:
    from benchmarks.standard_cli import search_settings

    assert search_settings(["objectives=acc", "grace_epochs=3", "early_stopping=false", "reduction_factor=3"]) == (
        ("objectives", "acc"), ("grace_epochs", 3), ("early_stopping", False), ("reduction_factor", 3))
    # a field whose default is None takes its annotated type; a tuple field its text (the settings parse it)
    assert search_settings(["warm_start=other", "baseline_lr_scales=0.5,2"]) == (
        ("warm_start", "other"), ("baseline_lr_scales", "0.5,2"))


def test_grid_cross_validation_scores_each_arms_top_trials_in_fold_runs(tmp_path, monkeypatch) -> None:
    """`--select cv:2 --select-top 2`: an arm's two best by val get their fold accuracies (the fold runs of
    `autopeft search --select cv:K`, as cached jobs); the others stay unscored; the pick is then by CV."""
    from dataclasses import replace

    from autopeft.backbones import create_backbone
    from autopeft.methods import make_spec
    from autopeft.pareto import best_under_budget
    from autopeft.plan import PeftPlan
    from autopeft.records import TrialRecord

    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(weights))
    plans = [PeftPlan.single(make_spec("bitfit", {}), range(3)).to_dict(), PeftPlan().to_dict()]
    records = [TrialRecord(number=i, plan=plans[i % 2], peft_params=100 * (i % 2 == 0), val_acc=v, epochs=1,
                           max_epochs=1) for i, v in enumerate([0.5, 0.9, 0.7])]
    arm = std.CellArm(records, {i: {"lr_scale": 1.0} for i in range(3)})
    c = replace(std.STANDARD, epochs=1, select="cv:2", select_top=2, backbone="autopeft_test_vit")
    base = dict(task="digits", backbone="autopeft_test_vit", weights=str(weights), data_root=None, data_seed=0,
                seed=0, epochs=1)
    cache = std.RunCache(tmp_path / "runs", {"t": 1})
    scored, epochs = std.cross_validated(c, arm, base, 1000, None, cache)
    assert epochs == 4 and cache.misses == 4
    assert [len(r.cv_accs) for r in scored] == [0, 2, 2]
    assert best_under_budget(scored, 1000).number in (1, 2)
    again, _ = std.cross_validated(c, arm, base, 1000, None, cache)  # cached: the same fold accuracies
    assert cache.hits == 4 and [r.cv_accs for r in again] == [r.cv_accs for r in scored]


def test_methods_throughput_targets_name_every_miss() -> None:
    import argparse

    from benchmarks.methods_throughput import CONFIGS, table

    times = {"full": 1.0, "fact_tt r=8": 0.70, "lora r=1 q,k,v,proj,fc1,fc2": 0.66, "vpt_deep n=10": 0.80,
             "ssf": 0.76}
    best = {"full": 1.0, "fact_tt r=8": 0.72}

    def rows() -> list[dict]:
        return [{"label": label, "params": 1, "step_ms": 1000 * times.get(label, 0.6),
                 "time_vs_full": times.get(label, 0.6), "best_ms": 1.0, "best_vs_full": best.get(label, 0.6),
                 "peak_mb": 1.0, "mem_vs_full": 1.0} for label, _, _ in CONFIGS]

    args = argparse.Namespace(device="cpu", threads=2, rounds=3, steps=4, clock="cpu")
    text = table(rows(), args)
    assert "3 interleaved rounds × 4 steps, process CPU time" in text
    assert "By medians: frozen-backbone methods ≤ 0.75× full fine-tuning: missed by ssf (0.760×), vpt_deep n=10 " \
           "(0.800×); slowest vpt_deep n=10." in text
    assert "By fastest steps: frozen-backbone methods ≤ 0.75× full fine-tuning: met by all; slowest fact_tt r=8." \
           in text
    assert "By medians: FacT-TT (1 parameters) vs LoRA on the same six matrices (1): 0.700× vs 0.660× full " \
           "(target ≤ LoRA + 0.05: met)." in text
    assert "By fastest steps: FacT-TT (1 parameters) vs LoRA on the same six matrices (1): 0.720× vs 0.600× full " \
           "(target ≤ LoRA + 0.05: missed)." in text


def test_epoch_rank_correlation_reads_the_stored_curves():
    """Per epoch, Spearman between that epoch's val and the final val over a cell's full-length runs: 1 where the
    order is the final one already, -1 where it is reversed; cells with fewer than 4 full runs are left out."""
    from benchmarks.standard_stats import epoch_rank_correlation

    curves = [[0.4, 0.1, 0.5], [0.3, 0.2, 0.6], [0.2, 0.3, 0.7], [0.1, 0.4, 0.8], [0.9]]  # the last: stopped early
    cell = {"arms": {"random": {"curves": curves[:2]}, "handpicked": {"curves": curves[2:]}}}
    small = {"arms": {"random": {"curves": curves[:3]}, "handpicked": {"curves": []}}}
    rho = epoch_rank_correlation([cell, small])
    assert rho == pytest.approx([-1.0, 1.0, 1.0])
    assert epoch_rank_correlation([small]) == []


def test_two_rows_pair_by_cell() -> None:
    from benchmarks.standard_stats import paired_rows

    def row(values, arm="search"):
        return {"cells": [{"task": "t", "seed": s, "arms": {arm: {"test": v}}} for s, v in values.items()]}

    doc = {"rows": {"a": row({0: 0.70, 1: 0.80, 2: 0.90}), "b": row({1: 0.75, 2: 0.80, 3: 0.10}),
                    "h": row({0: 0.5, 1: 0.5}, arm="handpicked")}}
    r = paired_rows(doc, "a", "b")
    assert r["cells"] == 2 and r["mean"] == pytest.approx(0.075)  # seeds 1 and 2 only: +0.05, +0.10
    assert paired_rows(doc, "a", "h", "search", "handpicked")["mean"] == pytest.approx(0.25)
    with pytest.raises(SystemExit, match="no row 'x'"):
        paired_rows(doc, "a", "x")
    # a side of two rows (one engine run twice) is their mean by cell, over the cells both finished
    r = paired_rows(doc, "a", "a,b")
    assert r["cells"] == 2 and r["mean"] == pytest.approx(0.0375)  # seeds 1, 2: (0.80 − 0.775) and (0.90 − 0.85)
    with pytest.raises(SystemExit, match="no row 'x'"):
        paired_rows(doc, "a", "b,x")

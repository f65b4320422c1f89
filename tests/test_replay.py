"""benchmarks/replay.py: the parameter closed forms against PETL_Vision's final.csv, the categorical space and its
snap, and an end-to-end replay on a tiny synthetic table in the same format."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import replay as rp

TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "petl_vision_vtab1k"


@pytest.mark.skipif(not (TABLE / "final.csv").is_file(), reason="PETL_Vision's table is not on this machine")
def test_closed_forms_match_final_csv() -> None:
    final = pd.read_csv(TABLE / "final.csv")
    checks = rp.check_closed_forms(final)
    assert set(checks) == set(rp.CLOSED_FORMS)  # every method of the table has a closed form
    for method, c in checks.items():
        assert c["matched"] == c["rows"] == 10, (method, c["mismatches"])
    assert rp.BACKBONE_PARAMS == 85_798_656 == int(final.loc[final["method"] == "full", "inserted_parameters"].iloc[0])
    # the size knob moves the count: each method's chosen sizes span more than one value where the grid has them
    for method, knob in [("lora", "lora_bottleneck"), ("fact_tk", "fact_dim"), ("vpt_deep", "vpt_num")]:
        assert len({rp.inserted_parameters(method, {knob: v}) for v in (8, 16, 32)}) == 3


def _row(task: str, method: str, config: dict, val: float) -> dict:
    return {"task": task, "method": method, "config": json.dumps(config), "val_top1": val, "val_loss": 0.0,
            "train_top1": 100.0, "train_loss": 0.0}


def write_table(folder: Path) -> Path:
    """3 tasks; LoRA (ranks 1 and 8 in budget, 64 over it), BitFit, VPT-shallow with a hole in its grid, and a
    method with no closed form. Each task's best in-budget configuration is a different one."""
    rows = []
    best = {"t0": ("lora", 8, 1e-3), "t1": ("bitfit", None, 1e-2), "t2": ("vpt_shallow", 10, 1e-3)}
    for task, (bm, bsize, blr) in best.items():
        for lr in (1e-3, 1e-2):
            for wd in (1e-4, 1e-3):
                for r in (1, 8, 64):
                    hit = bm == "lora" and r == bsize and lr == blr and wd == 1e-4
                    rows.append(_row(task, "lora", {"lora_bottleneck": r, "lr": lr, "wd": wd},
                                     99.0 if r == 64 else 90.0 if hit else 60.0 + r + 10 * lr))
                hit = bm == "bitfit" and lr == blr and wd == 1e-4
                rows.append(_row(task, "bitfit", {"lr": lr, "wd": wd}, 90.0 if hit else 55.0))
                for n in (5, 10, 50):
                    if (n, lr, wd) == (50, 1e-2, 1e-3):
                        continue  # a hole: the sampler may suggest it, the replay snaps it
                    hit = bm == "vpt_shallow" and n == bsize and lr == blr and wd == 1e-4
                    rows.append(_row(task, "vpt_shallow", {"vpt_num": n, "lr": lr, "wd": wd}, 90.0 if hit else 50.0))
                rows.append(_row(task, "mystery", {"lr": lr, "wd": wd}, 100.0))
    pd.DataFrame(rows).to_csv(folder / "tuning.csv", index=False)
    return folder


def test_load_budget_and_exclusions(tmp_path: Path) -> None:
    tuning, meta = rp.load(write_table(tmp_path), 0.005)
    assert meta["excluded_methods"] == {"mystery": "no closed form for its parameter count"}
    kept = tuning[tuning["in_budget"]]
    assert set(kept["method"]) == {"lora", "bitfit", "vpt_shallow"}
    assert set(kept.loc[kept["method"] == "lora", "cfg"].map(lambda c: c["lora_bottleneck"])) == {1, 8}
    assert meta["closed_forms"] == {}  # no final.csv: nothing to check against


def test_space_snaps_a_missing_combination(tmp_path: Path) -> None:
    tuning, _ = rp.load(write_table(tmp_path), 0.005)
    space = rp.Space.of(tuning[tuning["in_budget"] & (tuning["task"] == "t2")])
    assert space.names[("lora", "lr")] == "lr"  # the same values in every method: one shared parameter
    assert space.names[("vpt_shallow", "vpt_num")] == "vpt_num"
    key = space.snap("vpt_shallow", {"vpt_num": 50, "lr": 1e-2, "wd": 1e-3})
    method, config = space.configs[key]
    # one knob must differ; the nearest by |log ratio| moves vpt_num 50 -> 10 (x5), not lr or wd (x10)
    assert method == "vpt_shallow" and config == {"vpt_num": 10, "lr": 1e-2, "wd": 1e-3}
    assert space.nearest("lora", {"lora_bottleneck": 8, "lr": 1e-3, "wd": 1e-4}) in space.configs
    assert space.nearest("adaptformer", {"adapter_bottleneck": 8}) is None


def test_enqueued_portfolio_comes_first(tmp_path: Path) -> None:
    tuning, _ = rp.load(write_table(tmp_path), 0.005)
    space = rp.Space.of(tuning[tuning["in_budget"] & (tuning["task"] == "t1")])
    best = max(space.values, key=space.values.__getitem__)
    curve, distinct = rp.run_arm(space, rp.make("tpe", 0, 1), 5, enqueue=[best])
    assert curve == [space.best] * 5 and distinct[0] == 1
    curve, _ = rp.run_arm(space, rp.make("random", 0, 0), 50, target=space.best, horizon=3)
    assert len(curve) >= 3 and curve[-1] == space.best and rp.evals_to(curve, space.best) <= len(curve)


def test_replay_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_table(tmp_path)
    out = tmp_path / "replay.json"
    rp.main(["--table", str(table), "--seeds", "2", "--k", "2", "--max-evals", "25", "--random-max", "60",
             "--ns", "1", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| t0 |" in printed and "Target" in printed and not out.exists()  # no --write: nothing written
    result = rp.replay(table, seeds=2, k=2, max_evals=25, random_max=60, ns=(1, 5), portfolio_ks=3)
    assert set(result["tasks"]) == {"t0", "t1", "t2"}
    for task, e in result["tasks"].items():
        assert e["best_val"] == 90.0 and e["configs"] == 2 * 2 * 2 + 4 + 11  # lora r<=8, bitfit, vpt minus the hole
        assert e["best_val_any_budget"] == 100.0  # the excluded method's and over-budget rows are not the target
        for arm in ("random", "tpe", "portfolio+tpe"):
            a = e["arms"][arm]
            assert len(a["evals_to_tol"]["per_seed"]) == 2
            assert a["best_after"]["1"] <= a["best_after"]["5"] <= 90.0
        # built from the other two tasks, whose bests are the other two methods' configurations
        members = [json.loads(k)["method"] for k in result["portfolios"]["regret"][task][:2]]
        assert sorted(members) == sorted(m for t, m in (("t0", "lora"), ("t1", "bitfit"), ("t2", "vpt_shallow"))
                                         if t != task)
    text = rp.markdown(result)
    assert "**met**" in text or "**missed**" in text
    unbudgeted = rp.replay(table, seeds=1, k=1, budget_share=None, max_evals=10, random_max=10, ns=(1,),
                           portfolio_ks=1)
    assert unbudgeted["tasks"]["t0"]["configs"] == 3 * 4 + 4 + 11 and unbudgeted["tasks"]["t0"]["best_val"] == 99.0
    assert "no budget filter" in rp.markdown(unbudgeted)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n## Other\n\nkeep\n")
    rp.write_section("first", md)
    rp.write_section("second", md)
    assert md.read_text() == f"# B\n\n## Other\n\nkeep\n\n## {rp.SECTION}\n\nsecond\n"


def test_baseline_members_are_autopeft_baselines_as_the_tables_configurations(tmp_path: Path) -> None:
    """The baselines+TPE arm starts with autopeft's own baselines: the largest in-budget LoRA (rank 8; 64 is over
    the budget) at the rate nearest LoRA's own (1e-3 against 1e-2) and weight decay 1e-4, then BitFit; methods the
    table lacks are skipped. `--methods` keeps only the named methods' rows, and names an unknown one."""
    tuning, _ = rp.load(write_table(tmp_path), 0.005)
    space = rp.Space.of(tuning[(tuning["task"] == "t0") & tuning["in_budget"]])
    members = [space.configs[k] for k in rp.baseline_members(space)]
    assert members == [("lora", {"lora_bottleneck": 8, "lr": 1e-3, "wd": 1e-4}), ("bitfit", {"lr": 1e-3, "wd": 1e-4})]
    only, _ = rp.load(tmp_path, 0.005, ["bitfit", "lora"])
    assert set(only["method"]) == {"bitfit", "lora"}
    with pytest.raises(ValueError, match="nope"):
        rp.load(tmp_path, 0.005, ["nope"])


SAMPLER_ARMS = ("baselines+random", "baselines+tpe", "baselines+tpe-indep", "baselines+tpe-nogroup",
                "baselines+tpe-gamma", "baselines+gp", "portfolio+tpe", "portfolio+gp", "portfolio+random", "tpe-gamma")


def test_arms_compare_samplers_after_the_same_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--arms: every sampler runs after either start; each START+SAMPLER arm enqueues the same start as
    START+tpe (its first evaluations are the start's members), and the summary gives totals and ratios per arm."""
    table = write_table(tmp_path)
    calls: list[tuple[str, list[str], list[str]]] = []
    run_arm = rp.run_arm

    def traced(space: rp.Space, sampler: object, max_evals: int, enqueue: list[str] = (), *args: object,
               **kwargs: object) -> tuple[list[float], list[int]]:
        trace: list[str] = []
        out = run_arm(space, sampler, max_evals, enqueue, *args, trace=trace, **kwargs)  # type: ignore[arg-type]
        calls.append((type(sampler).__name__, list(enqueue), trace))
        return out

    monkeypatch.setattr(rp, "run_arm", traced)
    arms = ("random", *SAMPLER_ARMS, "baselines+tpe")
    result = rp.replay(table, seeds=1, k=2, max_evals=12, random_max=12, ns=(1, 5), portfolio_ks=2, arms=arms)
    arms = ("random", *SAMPLER_ARMS)  # baselines+tpe named twice runs once
    assert result["settings"]["arms"] == list(arms)
    assert len(calls) == 3 * len(arms)  # 3 tasks, 1 seed
    for i, task in enumerate(result["tasks"]):
        e = result["tasks"][task]
        by_arm = dict(zip(arms, calls[i * len(arms):(i + 1) * len(arms)], strict=True))
        assert set(e["arms"]) == set(arms)
        for arm, (_, enqueue, trace) in by_arm.items():
            start = arm.split("+")[0] if "+" in arm else None
            assert enqueue == {"baselines": e["baselines"], "portfolio": e["portfolio"], None: []}[start], arm
            assert enqueue == by_arm[f"{start}+tpe"][1] if start else not enqueue
            assert trace[:len(enqueue)] == enqueue and len(trace) >= 5  # the start first, then the sampler
        assert {kind for kind, _, _ in by_arm.values()} == {"RandomSampler", "RepairedTPE", "GPSampler"}
    per_arm = result["summary"]["per_arm"]
    assert list(per_arm) == list(arms) and set(result["summary"]["totals"]) == set(arms)
    for arm, a in per_arm.items():
        assert a["total"] == pytest.approx(sum(e["arms"][arm]["evals_to_tol"]["mean"]
                                               for e in result["tasks"].values()))
        assert a["total_ci95"][0] <= a["total"] <= a["total_ci95"][1] and a["seeds"] == 3
        assert a["ratio_of_totals_to_random"] == pytest.approx(a["total"] / per_arm["random"]["total"])
        assert a["ratio_of_totals_to_baselines+tpe"] == pytest.approx(a["total"] / per_arm["baselines+tpe"]["total"])
        assert a["best_after_mean"]["1"] <= a["best_after_mean"]["5"] <= 90.0
    assert per_arm["random"]["ratio_of_totals_to_random"] == 1.0
    assert "ratio_per_task" not in result["summary"]  # the portfolio's measurement needs the four default arms
    text = rp.markdown(result)
    assert "baselines+gp" in text and "| t0 |" in text and "Target" not in text


def test_samplers_and_default_arms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The variants differ from the engine's TPE in the one setting each names; GP's random start is 4 trials after
    the enqueued ones; the default --arms leave the summary as before; an unknown arm is one clear error."""
    tpe = rp.sampler("tpe", 0, 3)
    assert (tpe._multivariate, tpe._group, tpe._n_startup_trials) == (True, True, 7)
    indep, nogroup, gamma = (rp.sampler(n, 0, 3) for n in ("tpe-indep", "tpe-nogroup", "tpe-gamma"))
    assert (indep._multivariate, indep._group, indep._n_startup_trials) == (False, False, 7)
    assert (nogroup._multivariate, nogroup._group) == (True, False)
    assert gamma._gamma is rp.quarter_gamma and rp.quarter_gamma(10) == 3 and tpe._gamma is None
    assert rp.sampler("gp", 0, 3)._n_startup_trials == 7
    assert rp.parse_arm("baselines+tpe-gamma") == ("baselines", "tpe-gamma") and rp.parse_arm("gp") == (None, "gp")
    for bad in ("nope", "baselines+nope", "scratch+tpe", "+tpe", "baselines+"):
        with pytest.raises(rp.AutopeftError, match="unknown arm"):
            rp.parse_arm(bad)
    table = write_table(tmp_path)
    with pytest.raises(SystemExit):
        rp.main(["--table", str(table), "--arms", "random,baselines+bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "unknown arm 'baselines+bogus'" in err[-1] and len([line for line in err if "unknown" in line]) == 1
    out = tmp_path / "arms.json"
    rp.main(["--table", str(table), "--seeds", "1", "--k", "1", "--max-evals", "8", "--random-max", "8", "--ns", "1",
             "--arms", "random,portfolio+tpe-indep", "--out", str(out), "--write-json"])
    assert set(json.loads(out.read_text())["summary"]["per_arm"]) == {"random", "portfolio+tpe-indep"}
    default = rp.replay(table, seeds=1, k=1, max_evals=8, random_max=8, ns=(1,), portfolio_ks=1)
    assert "per_arm" not in default["summary"] and "arms" not in default["settings"]
    assert set(default["summary"]["totals"]) == set(rp.ARMS) and "ratio_of_totals_to_baselines" in default["summary"]

"""Search spaces: the shipped files, format validation, define-by-run sampling under budgets, `space show`."""

from __future__ import annotations

import json
import re
import statistics
import warnings
from pathlib import Path

import optuna
import pytest
import timm
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.cli import main
from autopeft.errors import AutopeftError
from autopeft.methods import get_method, list_methods
from autopeft.plan import PeftPlan
from autopeft.space import (
    backbone_flops,
    bind,
    check_feasible,
    list_spaces,
    load_space,
    parse_space,
    plan_overhead,
    repair,
    repaired_params,
    sample_hparams,
    sample_plan,
    suggest_parts,
)
from autopeft.space.format import shipped_dir

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ["adapter", "compact", "lora", "mergeable", "noah", "oneshot", "unified", "vpt"]
BUDGETS = ["0.05%", "0.5%", "2%"]
# 2,000 draws per space on the benchmark backbone (~25 s, optuna's own bookkeeping is most of it); fewer on the tiny
# backbones, whose spaces are the same and whose budgets are tight (so the repair is exercised on most draws anyway).
BACKBONES = [pytest.param("vit_base_patch16_224", 2000, marks=pytest.mark.slow), ("test_vit", 300)]
if timm.is_model("autopeft_tiny_vit"):
    BACKBONES.append(("autopeft_tiny_vit", 300))


def random_study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


def test_shipped_spaces_are_package_data_and_linked_at_the_top() -> None:
    assert set(SHIPPED) <= set(list_spaces())
    top = Path(__file__).resolve().parents[1] / "search_spaces"
    assert top.is_symlink() and top.resolve() == shipped_dir().resolve()
    for name in list_spaces():
        space = load_space(name)
        assert space.name == name and space.description
        assert dict(space.training)["lr_scale"].log and "lr" not in dict(space.training)  # relative to each plan


def test_mergeable_space_has_no_inference_overhead() -> None:
    space = load_space("mergeable")
    assert space.mergeable_only and all(get_method(m).mergeable for m in space.method_names())
    spec = backbone_spec("vit_base_patch16_224")
    study = random_study()
    for _ in range(20):
        trial = study.ask()
        assert plan_overhead(sample_plan(trial, space, spec, parse_budget("2%", spec)), spec) == 0.0
        study.tell(trial, 0.0)


@pytest.mark.parametrize(("backbone", "draws"), BACKBONES)
def test_sampled_plans_fit_every_budget(backbone: str, draws: int) -> None:
    """Each draw is repaired at every budget: 0 over budget, every method reachable at 2 %, budget share reported."""
    spec = backbone_spec(backbone)
    report = []
    for name in SHIPPED:
        space = load_space(name)
        bound = bind(space, spec)
        smallest = bound.total(bound.smallest_parts())
        limits = {}
        for text in BUDGETS:
            budget = parse_budget(text, spec)
            if smallest > budget.limit:
                with pytest.raises(AutopeftError, match=f"at least {smallest:,}"):
                    check_feasible(space, spec, budget)
                report.append(f"{backbone} {name} {text}: infeasible (needs {smallest:,})")
            else:
                check_feasible(space, spec, budget)
                limits[text] = budget.limit
        if backbone == "vit_base_patch16_224":
            assert set(limits) == set(BUDGETS), f"{name} must fit every budget on ViT-B"
        shares = {t: [] for t in limits}
        reached = {t: set() for t in limits}
        study = random_study(seed=len(name))
        for n in range(draws):
            trial = study.ask()
            drawn = suggest_parts(trial, bound)
            for text, limit in limits.items():
                parts = repair(bound, drawn, limit)
                count = bound.total(parts)
                assert count <= limit
                shares[text].append(count / limit)
                reached[text] |= {p.method for p in parts if not p.empty}
                if n % 250 == 0:  # the fast count is PeftPlan.count
                    assert bound.plan(parts).count(spec) == count
            # No study.tell: the random sampler reads no history, and telling copies every trial (~20 % of the time).
        if "2%" in limits:
            assert reached["2%"] == set(bound.methods), f"{name}: unreached at 2%: {set(bound.methods) - reached['2%']}"
        for text, values in shares.items():
            report.append(f"{backbone} {name} {text}: mean share {statistics.mean(values):.2f}, "
                          f"median {statistics.median(values):.2f}, full {max(values):.2f}")
    print("\n" + "\n".join(report))


def test_sample_plan_records_the_repair_as_valid_parameters() -> None:
    spec = backbone_spec("vit_base_patch16_224")
    for name in SHIPPED:
        space = load_space(name)
        bound = bind(space, spec)
        budget = parse_budget("0.05%", spec)
        study = random_study(seed=1)
        for _ in range(30):
            trial = study.ask()
            plan = sample_plan(trial, space, spec, budget)
            assert PeftPlan.from_dict(trial.user_attrs["plan"]) == plan
            assert trial.user_attrs["peft_params"] == plan.count(spec) <= budget.limit
            # The repaired parameters are values of the same distributions and, asked again, give the same plan.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                fixed = optuna.trial.FixedTrial(repaired_params(trial))
                assert bound.plan(suggest_parts(fixed, bound)) == plan
            study.tell(trial, 0.0)


def test_parameter_names_are_stable_and_conditional() -> None:
    spec = backbone_spec("vit_base_patch16_224")
    patterns = {
        "unified": r"block\d+\.(tune|module|tokens)|block\d+\.[a-z_]+\.[a-z]+|global\.(method|vpt_shallow\.length)",
        "noah": r"noah\.(vpt_deep|lora|adapter)\.(depth|length|rank|dim)",
        "lora": r"group[0-3]\.method|group[0-3]\.lora\.(rank|targets)",
        "compact": r"noah\.(vpt_deep|lora|adapter|ln_tune)\.(depth|side|length|rank|dim)",
    }
    for name, pattern in patterns.items():
        study = random_study()
        for _ in range(20):
            trial = study.ask()
            sample_plan(trial, load_space(name), spec, None)
            hparams = sample_hparams(trial, load_space(name))
            assert 0.25 <= hparams["lr_scale"] <= 4.0 and hparams["epochs"] == 100 and "lr" not in hparams
            plan_params = {k for k in trial.params if k not in ("lr_scale", "weight_decay")}
            assert all(re.fullmatch(pattern, k) for k in plan_params), plan_params
            for key in trial.params:  # options are asked only for a method the unit chose
                unit, *rest = key.split(".")
                if len(rest) == 2 and unit != "noah":
                    chosen = {v for k, v in trial.params.items() if k.count(".") == 1 and k.startswith(unit + ".")}
                    assert rest[0] in chosen, key
            study.tell(trial, 0.0)


def test_sampling_is_deterministic_and_tpe_learns_within_budget() -> None:
    spec, space = backbone_spec("test_vit"), load_space("unified")
    budget = parse_budget("2%", spec)

    def plans(seed):
        study = random_study(seed)
        return [sample_plan(study.ask(), space, spec, budget) for _ in range(10)]

    assert plans(3) == plans(3)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))

    def objective(trial):
        sample_plan(trial, space, spec, budget)
        sample_hparams(trial, space)
        return trial.user_attrs["peft_params"] / budget.limit

    study.optimize(objective, n_trials=25)
    assert all(t.user_attrs["peft_params"] <= budget.limit for t in study.trials)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["unified", "noah", "vpt"]), st.integers(1, 8000), st.integers(0, 2**16))
def test_any_budget_is_met_or_refused_up_front(name, limit, seed) -> None:
    spec, space = backbone_spec("test_vit"), load_space(name)
    bound = bind(space, spec)
    need = bound.total(bound.smallest_parts())
    trial = random_study(seed).ask()
    if need > limit:
        with pytest.raises(AutopeftError, match=f"at least {need:,}"):
            sample_plan(trial, space, spec, limit)
        assert trial.params == {}  # refused before anything was asked
    else:
        assert sample_plan(trial, space, spec, limit).count(spec) <= limit


def test_sampled_count_equals_autopeft_params(tmp_path, capsys) -> None:
    spec = backbone_spec("vit_base_patch16_224")
    for name in SHIPPED:
        study = random_study(seed=7)  # one study per space: parameter names mean different things in each
        trial = study.ask()
        plan = sample_plan(trial, load_space(name), spec, parse_budget("0.5%", spec))
        path = tmp_path / f"{name}.yaml"
        plan.save(path)
        assert main(["params", "--backbone", spec.name, "--plan", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["peft_params"] == trial.user_attrs["peft_params"]
        study.tell(trial, 0.0)


def test_binding_drops_what_the_backbone_cannot_take() -> None:
    swin = backbone_spec("autopeft_test_swin")
    bound = bind(load_space("unified"), swin)
    assert not {"convpass", "vpt_deep", "prefix", "vpt_shallow"} & set(bound.methods)
    assert any("convpass dropped" in n for n in bound.notes) and any("slot tokens" in n for n in bound.notes)
    with pytest.raises(AutopeftError, match="no method of space 'vpt' fits"):
        bind(load_space("vpt"), swin)
    small = bind(load_space("noah"), backbone_spec("test_vit"))
    assert small.depths == (3, 6) and "clamped" in small.notes[0]


def test_group_and_depth_insertion(tmp_path) -> None:
    spec = backbone_spec("test_vit")  # 6 blocks
    grouped = parse_space({"insertion": {"mode": "group", "size": 4}, "slots": {"method": ["lora"]}}, "g.yaml")
    assert [t.blocks for t in bind(grouped, spec).templates] == [(0, 1, 2, 3), (4, 5)]
    depth = parse_space({"insertion": {"mode": "depth", "depths": [0, 2, 4], "side": ["first", "last"]},
                         "methods": {"lora": {"rank": [1, 2]}}}, "d.yaml")
    bound = bind(depth, spec)
    study = random_study()
    for _ in range(30):
        trial = study.ask()
        (part,) = suggest_parts(trial, bound)
        d = trial.params["noah.lora.depth"]
        assert ("noah.lora.side" in trial.params) == (d > 0) and ("noah.lora.rank" in trial.params) == (d > 0)
        assert part.placed == (() if d == 0 else tuple(range(d)) if part.side == "first" else tuple(range(6 - d, 6)))
        study.tell(trial, 0.0)
    assert bound.total(bound.smallest_parts()) == 0


BAD_SPACES = [
    ("[1, 2]", "(top level)", "mapping"),
    ("slots: {a: [lora]}\nbogus: 1", "bogus", "unknown key"),
    ("version: 2\nslots: {a: [lora]}", "version", "not supported"),
    ("insertion: sideways\nslots: {a: [lora]}", "insertion.mode", "not one of"),
    ("insertion: {mode: group}\nslots: {a: [lora]}", "insertion.size", "positive whole"),
    ("insertion: {mode: block, size: 2}\nslots: {a: [lora]}", "insertion.size", "not valid for mode block"),
    ("insertion: {mode: depth}\nmethods: {lora: {}}", "insertion.depths", "non-empty list"),
    ("insertion: {mode: depth, depths: [-1]}\nmethods: {lora: {}}", "insertion.depths", ">= 0"),
    ("insertion: {mode: depth, depths: [3], side: middle}\nmethods: {lora: {}}", "insertion.side", "first, last"),
    ("insertion: {mode: depth, depths: [3]}\nslots: {a: [lora]}", "slots", "remove 'slots'"),
    ("methods: {lora: {}}", "slots", "must map slot names"),
    ("slots: {a: [lorax]}", "slots.a", "unknown method 'lorax'"),
    ("slots: {a: [none]}", "slots.a", "only 'none'"),
    ("slots: {a: [lora, lora]}", "slots.a", "listed twice"),
    ("slots: {a: [vpt_shallow]}", "slots.a", "under 'global'"),
    ("slots: {a: [lora]}\nglobal: [none, adapter]", "global", "in a per-block slot"),
    ("slots: {a: [lora], b: [none, lora]}", "slots", "more than one slot"),
    ("slots: {A-1: [lora]}", "slots.A-1", "identifiers"),
    ("slots: {a: [lora]}\nmethods: {lora: {rnak: [1]}}", "methods.lora.rnak", "no option 'rnak'"),
    ("slots: {a: [lora]}\nmethods: {lora: {rank: [0, 4]}}", "methods.lora.rank", "rank must be a positive"),
    ("slots: {a: [lora]}\nmethods: {lora: {rank: [4, 4]}}", "methods.lora.rank", "repeat"),
    ("slots: {a: [lora]}\nmethods: {lora: {rank: [1.5]}}", "methods.lora.rank", "whole number"),
    ("slots: {a: [lora]}\nmethods: {lora: {targets: [[q, x]]}}", "methods.lora.targets", "unknown target"),
    ("slots: {a: [adapter]}\nmethods: {adapter: {position: {low: 1, high: 2}}}", "methods.adapter.position",
     "numeric option"),
    ("slots: {a: [lora]}\nmethods: {lora: {rank: {low: 8, high: 2}}}", "methods.lora.rank", "greater than high"),
    ("slots: {a: [lora]}\nmethods: {lora: {alpha: {low: 0, high: 2, log: true}}}", "methods.lora.alpha", "low > 0"),
    ("slots: {a: [lora]}\nmethods: {lora: {rank: {low: 1, hi: 2}}}", "methods.lora.rank", "unknown range key"),
    ("slots: {a: [lora]}\nmethods: {ssf: {}}", "methods.ssf", "no slot"),
    ("slots: {a: [lora, adapter]}\nmergeable_only: true", "mergeable_only", "adapter"),
    ("slots: {a: [lora]}\ntraining: {Learning-Rate: 0.1}", "training.Learning-Rate", "identifiers"),
    ("slots: {a: [lora]}\ntraining: {lr: {low: 1e-4, high: 1e-2, log: yes, step: 2}}", "training.lr", "cannot be"),
    ("slots: {a: [lora]}\ntraining: {lr: {low: abc, high: 1}}", "training.lr.low", "expected a number"),
    ("slots: {a: [lora]}\ntraining: {lr: [[1, 2]]}", "training.lr", "expected a number, text"),
    ("slots: {a: [lora]}\ntraining: {optimizr: sgd}", "training.optimizr",
     "unknown training key 'optimizr'; valid keys: augment, batch_size,"),
    ("slots: {a: [lora]}\ntraining: {optimizer: adam}", "training.optimizer",
     "optimizer 'adam' is not valid; use one of: adamw, sgd"),
    ("slots: {a: [lora]}\ntraining: {scheduler: [cosine, step]}", "training.scheduler", "scheduler 'step'"),
    ("slots: {a: [lora]}\ntraining: {optimizer: {low: 1, high: 2}}", "training.optimizer", "not a range"),
    ("slots: {a: [lora]}\ntraining: {lr: {low: 0, high: 1}}", "training.lr", "learning rate must be > 0"),
    ("slots: {a: [lora]}\ntraining: {batch_size: {low: 16.5, high: 64}}", "training.batch_size.low", "whole number"),
    ("slots: {a: [lora]}\ntraining: {epochs: 0}", "training.epochs", "epochs must be >= 1"),
    ("slots: {a: [lora]}\ntraining: {augment: 1}", "training.augment", "must be bool"),
]


@pytest.mark.parametrize(("text", "key", "problem"), BAD_SPACES)
def test_invalid_space_files_name_file_key_and_problem(tmp_path, text: str, key: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AutopeftError) as info:
        load_space(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message and "\n" not in message


def test_an_unknown_training_key_is_an_unknown_key() -> None:
    from autopeft.errors import UnknownKey

    with pytest.raises(UnknownKey, match=r"^my.yaml: training.optimizr: unknown training key 'optimizr'"):
        parse_space(yaml.safe_load("slots: {a: [lora]}\ntraining: {optimizr: sgd}"), "my.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_train_with_adamw_and_cosine(name: str) -> None:
    training = dict(load_space(name).training)
    assert training["optimizer"].value == "adamw" and training["scheduler"].value == "cosine"
    assert sample_hparams(optuna.create_study().ask(), load_space(name))["optimizer"] == "adamw"


def test_a_space_optimizer_reaches_the_trial(tmp_path, monkeypatch) -> None:
    """`optimizer: sgd` in a space file trains the trial with SGD: the path `autopeft search --space` takes, from
    the sampled hyper-parameters (engine.SamplePlan) through run_trial to the optimiser, with Ray's report stubbed."""
    from ray import tune
    from safetensors.torch import save_file

    import autopeft.train as train_module
    from autopeft.backbones import create_backbone
    from autopeft.search.engine import SamplePlan
    from autopeft.search.trainable import TrialSettings, run_trial, trial_config

    path = tmp_path / "my.yaml"
    path.write_text("slots: {tune: [lora]}\nmethods: {lora: {rank: 2}}\ntraining: {lr: {low: 1.0e-3, high: 1.0e-2, "
                    "log: true}, epochs: 100, warmup_epochs: 10, optimizer: sgd, scheduler: constant}\n")
    space = load_space(str(path))
    spec = backbone_spec("autopeft_test_vit")
    config = SamplePlan(space, spec, parse_budget("5%", spec), 1)(optuna.create_study().ask())
    cfg = trial_config(config["autopeft"]["hparams"], 1, 0)
    assert (cfg.optimizer, cfg.scheduler, cfg.warmup_epochs, cfg.epochs) == ("sgd", "constant", 0.1, 1)

    built, reports = [], []
    make = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer", lambda params, c: built.append(make(params, c)) or built[-1])
    monkeypatch.setattr(tune, "report", reports.append)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(tmp_path / "w.safetensors"))
    run_trial(config, TrialSettings(dataset="digits", backbone="autopeft_test_vit", epochs=1,
                                    weights=str(tmp_path / "w.safetensors")))
    assert [r.get("fail_reason") for r in reports] == [None] and reports[0]["epoch"] == 1
    assert [type(o) for o in built] == [torch.optim.SGD] and built[0].param_groups[0]["momentum"] == 0.9


def test_space_files_cannot_run_code_and_are_found_by_name_or_path(tmp_path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("slots: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(AutopeftError, match="not valid YAML"):
        load_space(str(path))
    with pytest.raises(AutopeftError, match="shipped spaces: adapter"):
        load_space("nosuchspace")
    with pytest.raises(AutopeftError, match="does not exist"):
        load_space(str(tmp_path / "missing.yaml"))
    copy = tmp_path / "mine.yaml"
    copy.write_text((shipped_dir() / "lora.yaml").read_text())
    assert load_space(str(copy)).methods == load_space("lora").methods
    # yaml's 1e-4 (no dot) is text; the format reads it as the number it means.
    space = parse_space(yaml.safe_load("slots: {a: [lora]}\ntraining: {lr: {low: 1e-4, high: 1e-2, log: true}}"), "x")
    assert dict(space.training)["lr"].low == 1e-4


def test_overhead_estimates() -> None:
    spec = backbone_spec("vit_base_patch16_224")
    assert backbone_flops(spec) == pytest.approx(35.1e9, rel=0.02)  # ViT-B/16: 17.6 GMACs
    # EVA-02 B/14 (timm: 23.2 GMACs at 224 px): global attention over 257 tokens and a SwiGLU MLP whose input
    # projections are twice fc2's input width (counted as windowed attention and a plain MLP: 17.2 GMACs, 26 % low)
    assert backbone_flops(backbone_spec("eva02_base_patch14_224")) == pytest.approx(2 * 23.2e9, rel=0.02)
    for cls in list_methods():
        spec_ = cls()
        flops = spec_.overhead_flops(spec, [0])
        assert (flops > 0) == (not cls.mergeable), cls.name
    lora = PeftPlan.from_dict({"blocks": {"0": [{"method": "lora"}]}})
    vpt = PeftPlan.from_dict({"global": [{"method": "vpt_shallow", "length": 10}]})
    assert plan_overhead(lora, spec) == 0.0
    assert 0.04 < plan_overhead(vpt, spec) < 0.07  # 10 more tokens on 197


def test_space_show(capsys) -> None:
    assert main(["space", "show", "unified", "--backbone", "vit_base_patch16_224", "--budget", "0.5%"]) == 0
    out = capsys.readouterr().out
    for text in ("space unified", "slot tune: none, lora", "smallest plan: 0", "largest plan:", "feasible",
                 "428,993", "vpt_shallow", "blocks 0-11"):
        assert text in out, text
    assert main(["space", "show", "noah", "--backbone", "test_vit", "--budget", "0.5%", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert not info["feasible"] and info["smallest"]["params"] == 1539
    assert {r["method"] for r in info["methods_at_budget"]} == {"vpt_deep", "lora", "adapter"}
    # a depth component "on every place" is on every block: LoRA r=1 on q and v of all 12 blocks of ViT-B/16
    assert main(["space", "show", "compact", "--backbone", "vit_base_patch16_224", "--budget", "1%", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["methods_at_budget"]}
    assert rows["lora"]["everywhere_params"] == 12 * 2 * (768 + 768) and rows["lora"]["min_params"] == 3 * 2 * 1536
    assert main(["space", "show", "nope"]) == 2
    assert "unknown search space" in capsys.readouterr().err
    assert main(["space", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SHIPPED)

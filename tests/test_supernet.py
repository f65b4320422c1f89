"""The one-shot supernet: every sliceable method, built once at a cover of sizes and options, runs any smaller plan
exactly as that plan built alone with the sliced weights, and the sliced weights are the plan's count."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from autopeft.backbones import backbone_spec, create_backbone, is_head_param
from autopeft.errors import AutopeftError
from autopeft.methods import list_methods, make_spec
from autopeft.methods.base import Sliceable
from autopeft.plan import PeftPlan
from autopeft.supernet import Supernet, covers, parameter_count, sites

VIT = "autopeft_test_vit"
SLICEABLE = sorted(c.name for c in list_methods() if c.sliceable)

# the values a space may choose per sliceable method: the cover holds them all
CHOICES: dict[str, dict[str, tuple]] = {
    "lora": {"rank": (1, 2, 4), "targets": (("q", "v"), ("k",), ("q", "k", "v", "proj", "fc1", "fc2")),
             "alpha": (0.0, 3.0)},
    "adapter": {"dim": (1, 3, 5), "position": ("mlp", "attn", "both")},
    "adaptformer": {"dim": (1, 2, 4), "scale": (0.1, 1.0), "input": ("norm", "residual")},
    "convpass": {"dim": (1, 2, 4), "scale": (1.0, 10.0)},
    "prefix": {"length": (1, 2, 5)},
    "vpt_deep": {"length": (1, 3, 5)},
    "vpt_shallow": {"length": (1, 2, 4)},
    "ssf": {"init": ("identity",)},
}


def test_the_sliceable_methods_are_the_ones_this_test_covers() -> None:
    assert SLICEABLE == sorted(CHOICES)
    for name in ("bitfit", "ln_tune", "fact_tt", "full", "partial", "linear"):
        with pytest.raises(AutopeftError, match="cannot run inside a one-shot supernet"):
            make_spec(name).cover({})


def _cover_plan(methods: list[str], num_blocks: int) -> PeftPlan:
    specs = [make_spec(m).cover(CHOICES[m]) for m in methods]
    return PeftPlan(blocks={i: tuple(s for s in specs if s.scope == "block") for i in range(num_blocks)},
                    global_parts=tuple(s for s in specs if s.scope == "global"))


def _draw(rng: random.Random, methods: list[str], num_blocks: int) -> PeftPlan:
    """A plan of some of `methods`, each with options drawn from CHOICES, on random blocks."""
    blocks: dict[int, list] = {}
    global_parts = []
    for m in methods:
        if rng.random() < 0.3:
            continue
        spec = make_spec(m, {k: rng.choice(v) for k, v in CHOICES[m].items()})
        if spec.scope == "global":
            global_parts.append(spec)
            continue
        for i in range(num_blocks):
            if rng.random() < 0.6:
                blocks.setdefault(i, []).append(spec)
    return PeftPlan(blocks={i: tuple(s) for i, s in blocks.items()}, global_parts=tuple(global_parts))


def _base() -> torch.nn.Module:
    torch.manual_seed(123)
    return create_backbone(VIT, num_classes=5).eval()


def _alone(plan: PeftPlan, net: Supernet, supermodel: torch.nn.Module) -> torch.nn.Module:
    """`plan` built alone on the same backbone and head, loaded with the supernet's sliced weights."""
    spec = backbone_spec(VIT)
    model = _base()
    slices: dict = {}
    plan.apply(model, spec, slices)
    model.eval()
    state = net.sliced_state(supermodel, plan)
    named = sites(model)
    loaded = set()
    for (block, method), modules in slices.items():
        for m in modules:
            name = f"{block}/{method}/{named[id(m)]}"
            own = {n for n, _ in m.named_parameters() if not n.startswith("base.")}  # type: ignore[attr-defined]
            assert set(state.get(name, {})) == own, (name, sorted(own), sorted(state.get(name, {})))
            if own:
                m.load_state_dict(state[name], strict=False)  # type: ignore[attr-defined]
                loaded.add(name)
    assert loaded == set(state), set(state) - loaded  # every active slice has its module in the plan built alone
    heads = {n: p for n, p in supermodel.named_parameters() if is_head_param(n)}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_head_param(n):
                p.copy_(heads[n])
    return model


def _supernet(methods: list[str]) -> tuple[Supernet, torch.nn.Module]:
    spec = backbone_spec(VIT)
    cover = _cover_plan(methods, spec.num_blocks)
    model = _base()
    slices: dict = {}
    cover.apply(model, spec, slices)
    torch.manual_seed(5)
    with torch.no_grad():  # trained-looking weights: zero-initialised up-projections would hide slicing errors
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return Supernet(cover, slices), model.eval()


def _inputs() -> torch.Tensor:
    return torch.randn(3, *backbone_spec(VIT).input_size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", SLICEABLE)
def test_a_slice_computes_the_plan_built_alone(method: str) -> None:
    """Each method alone, in a supernet of every sliceable method: at each of its option values, on some blocks,
    with everything else switched off."""
    spec = backbone_spec(VIT)
    net, model = _supernet(SLICEABLE)
    x = _inputs()
    rng = random.Random(method)
    for _ in range(4):
        drawn = make_spec(method, {k: rng.choice(v) for k, v in CHOICES[method].items()})
        plan = PeftPlan.single(drawn, sorted(rng.sample(range(spec.num_blocks), rng.randint(1, spec.num_blocks))))
        net.activate(plan)
        alone = _alone(plan, net, model)
        state = net.sliced_state(model, plan)
        assert parameter_count(state) == plan.count(spec)
        with torch.no_grad():
            torch.testing.assert_close(model(x), alone(x), atol=1e-5, rtol=1e-4)


def test_mixed_slices_compute_their_plans_and_switching_all_off_is_the_backbone() -> None:
    spec = backbone_spec(VIT)
    net, model = _supernet(SLICEABLE)
    x = _inputs()
    rng = random.Random(0)
    for _ in range(6):
        plan = _draw(rng, SLICEABLE, spec.num_blocks)
        net.activate(plan)
        alone = _alone(plan, net, model)
        assert parameter_count(net.sliced_state(model, plan)) == plan.count(spec)
        with torch.no_grad():
            torch.testing.assert_close(model(x), alone(x), atol=1e-5, rtol=1e-4)
    net.activate(PeftPlan())
    plain = _base()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if is_head_param(n):
                p.copy_(dict(model.named_parameters())[n])
        torch.testing.assert_close(model(x), plain(x), atol=1e-6, rtol=1e-5)


def test_a_plan_outside_the_cover_is_refused() -> None:
    net, _ = _supernet(["lora", "adapter"])
    with pytest.raises(AutopeftError, match="cannot run"):
        net.activate(PeftPlan.single(make_spec("lora", {"rank": 8}), [0]))  # rank above the cover's 4
    with pytest.raises(AutopeftError, match="cannot run"):
        net.activate(PeftPlan.single(make_spec("prefix", {"length": 1}), [0]))  # a method the cover lacks
    assert covers(make_spec("lora").cover(CHOICES["lora"]), make_spec("lora", {"rank": 2, "targets": "q,fc2"}))
    assert not covers(make_spec("adapter", {"position": "mlp"}), make_spec("adapter", {"position": "attn"}))


def test_modules_built_outside_a_supernet_run_as_built() -> None:
    """Every Sliceable a plain plan inserts reports its whole self as its slice: nothing changes for a trial."""
    spec = backbone_spec(VIT)
    plan = PeftPlan(blocks={0: tuple(make_spec(m, {k: v[-1] for k, v in CHOICES[m].items()})
                                     for m in SLICEABLE if m != "vpt_shallow")})
    model = _base()
    plan.apply(model, spec)
    sliceables = [m for m in model.modules() if isinstance(m, Sliceable)]
    assert sliceables
    total = sum(t.numel() for m in sliceables for t in m.sliced_state().values())
    assert total == plan.count(spec)


# -- the one-shot strategy's pieces, without Ray -----------------------------------------------------------------


def _job(tmp_path, **changes):
    from autopeft.search.oneshot import SupernetJob

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    if not weights.is_file():
        from safetensors.torch import save_file

        save_file(create_backbone(VIT).state_dict(), str(weights))
    values = dict(dataset="digits", backbone=VIT, space="oneshot", budget_limit=1500, epochs=3, candidates=12,
                  finalists=3, seed=0, weights=str(weights), trial_epochs=3)
    values.update(changes)
    return SupernetJob(**values)


def test_sub_plans_drawn_per_step_fit_the_budget_and_repeat_by_key() -> None:
    from autopeft.search.oneshot import SubPlans
    from autopeft.space import load_space

    spec = backbone_spec(VIT)
    a, b = SubPlans(load_space("oneshot"), spec, 1500, 0), SubPlans(load_space("oneshot"), spec, 1500, 0)
    plans = [a.draw(k) for k in range(40)]
    assert all(p.count(spec) <= 1500 for p in plans)
    assert len({p.to_json() for p in plans}) > 30  # the draws vary
    assert [b.draw(k).to_json() for k in (7, 3, 7)] == [plans[7].to_json(), plans[3].to_json(), plans[7].to_json()]
    assert SubPlans(load_space("oneshot"), spec, 1500, 1).draw(7).to_json() != plans[7].to_json()  # the seed counts


def test_a_resumed_supernet_ends_with_the_weights_of_a_straight_run(tmp_path, monkeypatch) -> None:
    from autopeft.search.oneshot import train_supernet

    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    states: list[dict] = []
    # a copy, as the trial saves it: the optimiser's state in it is the live one's
    straight = train_supernet(_job(tmp_path), report=lambda m: states.append(copy.deepcopy(m.get("state"))))
    assert states[0] is not None and states[0]["epoch"] == 1 and states[-1] is None  # the last epoch keeps none
    resumed = train_supernet(_job(tmp_path), resume=states[0])
    a = {n: p for n, p in straight.run.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.run.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    assert straight.history == [dict(h, seconds=s["seconds"]) for h, s in zip(resumed.history, straight.history,
                                                                               strict=True)]


def test_scoring_ranks_distinct_plans_by_their_slice_accuracy(tmp_path, monkeypatch) -> None:
    from autopeft.plan import PeftPlan
    from autopeft.search.oneshot import score_candidates, train_supernet
    from autopeft.space import bind, load_space
    from autopeft.train import evaluate

    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    job = _job(tmp_path, epochs=1)
    trained = train_supernet(job)
    out = score_candidates(trained, job)
    assert out["scored"] == 12 and 1 <= out["distinct"] <= 12
    finalists = out["finalists"]
    assert len(finalists) == 3 and len({str(f["plan"]) for f in finalists}) == 3
    assert [f["score"] for f in finalists] == sorted((f["score"] for f in finalists), reverse=True)
    spec = backbone_spec(VIT)
    bound = bind(load_space("oneshot"), spec)
    for f in finalists:
        plan = PeftPlan.from_dict(f["plan"])
        assert plan.count(spec) == f["peft_params"] <= job.budget_limit
        # the space's parameters give the same plan again, as the enqueued trial will draw it
        assert bound.plan(bound.parts_of(plan) or []) == plan
        trained.net.activate(plan)
        _, acc = evaluate(trained.run.model, trained.run.eval_src, trained.eval_batch_size)
        assert acc == f["score"]


def test_the_supernet_state_file_round_trips_and_a_damaged_one_is_one_error(tmp_path) -> None:
    from autopeft.search.oneshot import _load_state, _save_state, state_path
    from autopeft.search.settings import SearchSettings

    path = str(tmp_path / "s" / "x.supernet.pt")
    state = {"epoch": 2, "params": {"a": torch.arange(3.0)}, "history": [{"val_acc": 0.5}]}
    _save_state(path, state)
    back = _load_state(path)
    assert back is not None and back["epoch"] == 2 and torch.equal(back["params"]["a"], torch.arange(3.0))
    assert _load_state(str(tmp_path / "none.pt")) is None
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    with pytest.raises(AutopeftError, match="cannot be read.*delete it"):
        _load_state(str(tmp_path / "bad.pt"))
    s = SearchSettings(study="st", strategy="oneshot")
    assert state_path(s, "sqlite:////data/studies/st.db") == "/data/studies/st.supernet.pt"
    assert state_path(SearchSettings(study="st", checkpoint_storage=str(tmp_path)), "postgresql://h/db") == \
        str(tmp_path / "st.supernet.pt")
    assert state_path(SearchSettings(study="st", checkpoint_storage="s3://b/x"), "sqlite:///a.db") is None
    assert state_path(SearchSettings(study="st", checkpoint_every=0), "sqlite:///a.db") is None


def test_default_candidates_cost_one_trial() -> None:
    from autopeft.search.oneshot import FORWARD_SHARE, MAX_CANDIDATES, candidates_for, cost_epochs

    assert candidates_for(15, 200, 200, 5) == 45
    assert candidates_for(100, 800, 200, 5) == 1200
    assert candidates_for(1, 10, 1000, 5) == 5 and candidates_for(100, 10**6, 10, 5) == MAX_CANDIDATES
    assert cost_epochs(15, 45, 200, 200) == pytest.approx(15 + 45 * FORWARD_SHARE) == pytest.approx(30)

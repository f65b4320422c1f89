"""Export -> train -> evaluate/predict round trips on a study built with Optuna's API, and one real search end to end.

The study mimics what `autopeft search` stores (settings attribute, per-trial plan, params, curve, epochs, hparams)
on the 3-block test ViT with stand-in pretrained weights, so the export logic is tested without Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
import yaml
from optuna.distributions import FloatDistribution
from PIL import Image
from safetensors.torch import load_file, save_file

from autopeft.backbones import backbone_spec, create_backbone
from autopeft.budget import parse_budget
from autopeft.cli import main
from autopeft.deploy import evaluate_run, load_model, predict
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.recipe import Recipe, load_data
from autopeft.runs import load_run
from autopeft.train import build_model

VIT = "autopeft_test_vit"
HP = {"lr": 3e-3, "weight_decay": 1e-4, "epochs": 100, "warmup_epochs": 10, "batch_size": 200, "label_smoothing": 0.1,
      "drop_path": 0.1, "optimizer": "adamw"}
# (plan, val_acc, state, epochs run) of trials 0-4; the search fidelity is 2 epochs
TRIALS = [
    (PeftPlan.single(make_spec("lora", {"rank": 2}), range(3)), 0.80, "COMPLETE", 2),  # 768 params
    (PeftPlan.single(make_spec("adapter", {"dim": 4}), range(3)), 0.85, "COMPLETE", 2),  # 876 params
    (PeftPlan.single(make_spec("linear"), []), 0.50, "COMPLETE", 2),  # 0 params
    (PeftPlan.single(make_spec("lora", {"rank": 1}), [2]), 0.95, "PRUNED", 1),
    (PeftPlan.single(make_spec("lora", {"rank": 4}), range(3)), None, "FAIL", 1),
]


def make_study(url: str, name: str, weights: str, trials=TRIALS) -> None:
    spec = backbone_spec(VIT)
    study = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    study.set_user_attr("autopeft", {
        "study": name, "dataset": "digits", "backbone": VIT, "weights": weights, "data_root": None, "budget": "5%",
        "budget_limit": parse_budget("5%", spec).limit, "space": "unified", "epochs": 2, "seed": 0,
        "objectives": ["acc", "params"], "num_classes": 10, "backbone_params": spec.backbone_params})
    for plan, acc, state, epochs in trials:
        n = plan.count(spec)
        attrs = {"plan": plan.to_dict(), "peft_params": n, "percent": 100 * n / spec.backbone_params,
                 "curve": [acc or 0.1] * epochs, "epochs": epochs, "max_epochs": 2, "seconds": 1.0, "hparams": HP}
        if state == "FAIL":
            attrs["fail_reason"] = "ValueError: boom"
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], values=[acc, n] if state == "COMPLETE" else None, user_attrs=attrs,
            params={"lr": 3e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    save_file(create_backbone(VIT).state_dict(), str(d / "w.safetensors"))
    url = f"sqlite:///{d}/s.db"
    make_study(url, "s", str(d / "w.safetensors"))
    make_study(url, "unfinished", str(d / "w.safetensors"), TRIALS[3:])  # one stopped early, one failed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOPEFT_CACHE", str(d / "cache"))
        yield d, url


def export(work, *args: str) -> tuple[int, dict | None, Path]:
    """`autopeft export` of study s into a new file: exit code, the recipe read back (None: none written), path."""
    d, url = work
    out = d / f"r{len(list(d.glob('r*.yaml')))}.yaml"
    rc = main(["export", "--study", "s", "--storage", url, "-o", str(out), *args])
    return rc, (yaml.safe_load(out.read_text()) if out.exists() else None), out


@pytest.fixture(scope="module")
def lora_run(work):
    """The LoRA trial exported, trained 2 epochs with --merge (the final protocol)."""
    d, _ = work
    rc, _, recipe = export(work, "--mergeable")
    assert rc == 0
    assert main(["train", "--config", str(recipe), "--epochs", "2", "--merge", "--out", str(d / "run")]) == 0
    return load_run(d / "run")


@pytest.mark.parametrize(
    "args,trial",
    [([], 1), (["--mergeable"], 0), (["--budget", "800"], 0), (["--pick", "2"], 2), (["--pick", "knee"], None)],
)
def test_export_picks(work, capsys, args, trial) -> None:
    rc, data, _ = export(work, *args)
    assert rc == 0, capsys.readouterr().err
    p = data["provenance"]
    if trial is not None:
        assert p["trial"] == trial
    plan, acc, _, _ = TRIALS[p["trial"]]
    assert PeftPlan.from_dict(data["plan"]) == plan and p["val_acc"] == acc
    assert p["peft_params"] == plan.count(backbone_spec(VIT)) and p["study"] == "s" and p["search_epochs"] == 2
    # the space's schedule (100 epochs, warm-up 10), not the search fidelity, on the final protocol
    assert data["epochs"] == 100 and data["training"]["warmup_epochs"] == 10 and data["protocol"] == "final"
    t = data["training"]
    assert t["lr"] == 3e-3 and t["batch_size"] == 200 and t["drop_path"] == 0.1 and t["optimizer"] == "adamw"
    assert data["split_seed"] == 0 and data["num_classes"] == 10 and "2 epochs" in p["notes"][0]
    assert {"torch", "timm", "autopeft"} <= set(p["versions"]) and p["exported"]


def test_export_epochs_scale_the_warmup(work) -> None:
    rc, data, _ = export(work, "--epochs", "20")
    assert rc == 0 and data["epochs"] == 20 and data["training"]["warmup_epochs"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--pick", "3"], "stopped early after 1 of 2 epochs"),
        (["--pick", "4"], "failed (ValueError: boom)"),
        (["--pick", "9"], "no trial 9"),
        (["--pick", "worst"], "--pick 'worst'"),
        (["--pick", "1", "--mergeable"], "does not merge (adapter"),
        (["--pick", "knee", "--confirm", "2"], "use it with --pick best"),
        (["--budget", "lots"], "budget 'lots' is not valid"),
    ],
)
def test_export_refusals_are_one_line_and_write_nothing(work, capsys, args, needle) -> None:
    before = set(work[0].iterdir())
    rc, data, _ = export(work, *args)
    err = capsys.readouterr().err
    assert rc == 2 and data is None and needle in err and len(err.strip().splitlines()) == 1, err
    assert set(work[0].iterdir()) == before


def test_export_of_a_study_without_eligible_trials(tmp_path, work, capsys) -> None:
    assert main(["export", "--study", "unfinished", "--storage", work[1], "-o", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no full-fidelity trial within 1,622 parameters (2 trials: 0 at full fidelity, 1 stopped early, 1 failed)" \
        in err, err
    assert not (tmp_path / "r.yaml").exists()


def test_export_of_a_missing_study(tmp_path, work, capsys) -> None:
    assert main(["export", "--study", "nope", "--storage", work[1], "-o", str(tmp_path / "r.yaml")]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["export", "--study", "nope", "--storage", f"sqlite:///{tmp_path}/x.db", "-o", "r.yaml"]) == 2
    assert "no study database" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_recipe_builds_the_trials_architecture(work) -> None:
    for number in (0, 1, 2):
        rc, data, _ = export(work, "--pick", str(number))
        recipe = Recipe.from_dict(data)
        ours, _ = build_model(VIT, recipe.plan, recipe.num_classes, pretrained=False)
        trial, _ = build_model(VIT, TRIALS[number][0], 10, pretrained=False)
        shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
        assert shapes(ours) == shapes(trial)
        head = sum(p.numel() for n, p in ours.named_parameters() if n.startswith("head"))
        assert sum(p.numel() for p in ours.parameters() if p.requires_grad) - head == data["provenance"]["peft_params"]


def test_train_merge_evaluate_round_trip(lora_run, capsys) -> None:
    run = lora_run
    assert {p.name for p in run.path.iterdir()} == {"adapter.safetensors", "merged.safetensors", "metrics.json",
                                                     "plan.yaml", "recipe.yaml", "train.log"}
    m = run.metrics
    assert m["protocol"] == "final" and "val_acc" not in m["history"][-1] and m["val_acc"] is None
    assert run.recipe.epochs == 2 and run.recipe.training["warmup_epochs"] == pytest.approx(0.2)
    assert m["provenance"]["trial"] == 0 and 0 <= m["test_acc"] <= 1
    # evaluate reproduces the recorded accuracies exactly, from the adapter and from the merged weights
    assert evaluate_run(run)["acc"] == m["test_acc"]
    assert evaluate_run(run, merged=True)["acc"] == m["merged"]["test_acc"]
    # the merged file is a plain timm state dict, and gives the adapter model's logits
    plain = timm.create_model(VIT, num_classes=10)
    plain.load_state_dict(load_file(str(run.merged)))
    x, _ = load_data(run.recipe).test.batch(list(range(64)))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), load_model(run)(x), atol=1e-5)
    assert main(["evaluate", "--run", str(run.path)]) == 0
    assert "= recorded" in capsys.readouterr().out


@pytest.mark.parametrize("method,options", [("lora", {"rank": 2, "targets": "q,k,v,proj,fc1,fc2"}), ("ssf", {}),
                                            ("fact_tt", {"rank": 2}), ("bitfit", {}), ("ln_tune", {}),
                                            ("partial", {"k": 1}), ("linear", {})])
def test_merged_state_dict_is_plain_timm_with_equal_logits(method, options) -> None:
    from autopeft.deploy import plain_model
    from autopeft.runs import merged_state_dict

    spec = make_spec(method, options)
    model, _ = build_model(VIT, PeftPlan.single(spec, range(3)), 10, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # move every trained part off its identity start
    plain = plain_model(VIT, 10, merged_state_dict(model))  # strict load into timm.create_model
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), model.eval()(x), atol=1e-5)


def test_cached_prefix_run_evaluates_exactly(work) -> None:
    """A linear probe trains on cached block features; the rebuilt full model gives the same test accuracy."""
    d, _ = work
    rc, _, recipe = export(work, "--pick", "2")
    assert main(["train", "--config", str(recipe), "--epochs", "1", "--out", str(d / "probe")]) == 0
    run = load_run(d / "probe")
    assert run.metrics["cached_blocks"] == 3
    assert evaluate_run(run)["acc"] == run.metrics["test_acc"]


def test_merge_is_refused_before_training(work, capsys) -> None:
    d, _ = work
    rc, _, recipe = export(work, "--pick", "1")
    assert main(["train", "--config", str(recipe), "--merge", "--out", str(d / "never")]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged: adapter" in err and len(err.strip().splitlines()) == 1
    assert not (d / "never").exists() and not list(d.glob(".never*"))


def test_config_conflicts_with_plan_flags(work, capsys) -> None:
    rc, _, recipe = export(work, "--pick", "0")
    assert main(["train", "--config", str(recipe), "--method", "lora", "--dataset", "digits"]) == 2
    assert "drop --dataset, --method" in capsys.readouterr().err


def test_seeds_report_mean_and_std(lora_run, tmp_path, capsys) -> None:
    out = tmp_path / "seeds"
    assert main(["train", "--config", str(lora_run.path / "recipe.yaml"), "--epochs", "1", "--seeds", "2",
                 "--out", str(out)]) == 0
    assert "±" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    accs = [summary["seeds"][k]["test_acc"] for k in ("seed0", "seed1")]
    assert summary["n"] == 2 and summary["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert summary["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert [summary["seeds"][k]["seed"] for k in ("seed0", "seed1")] == [0, 1] and (out / "recipe.yaml").is_file()
    assert main(["evaluate", "--run", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["acc"] for r in rows] == accs


def test_predict_preprocesses_like_the_test_split(lora_run, tmp_path) -> None:
    data = load_data(lora_run.recipe)
    paths = []
    for i in range(4):  # digits are 8x8 in [0, 1]; as 8-bit PNGs they differ by quantisation only
        pixels = (data.test.images[i, 0].numpy() * 255).round().astype(np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels, "L").save(paths[-1])
    rows = predict(lora_run, paths, top_k=10)
    x, _ = data.test.batch(list(range(4)))
    with torch.no_grad():
        expected = load_model(lora_run)(x).softmax(-1)
    for row, probs in zip(rows, expected, strict=True):
        got = torch.zeros(10)
        for t in row["top"]:
            got[t["index"]] = t["prob"]
        assert torch.allclose(got, probs, atol=2e-3) and row["top"][0]["name"] == str(row["top"][0]["index"])


def test_predict_on_image_files_is_exact(work, tmp_path) -> None:
    """On a folder dataset, predict's preprocessing is the test split's own pipeline: the same probabilities."""
    rng = np.random.default_rng(0)
    for c, red in (("cat", 200), ("dog", 30)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            pixels[..., 0] = red
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    assert main(["train", "--dataset", str(tmp_path / "imgs"), "--backbone", VIT, "--weights",
                 str(work[0] / "w.safetensors"), "--method", "lora", "--epochs", "1", "--out",
                 str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    test = load_data(run.recipe).test
    rows = predict(run, [p for p, _ in test.samples], top_k=1)
    with torch.no_grad():
        probs = load_model(run)(torch.stack([test[i][0] for i in range(len(test))])).softmax(-1)
    assert [r["top"][0]["prob"] for r in rows] == probs.max(-1).values.tolist()
    assert [r["top"][0]["name"] for r in rows] == [["cat", "dog"][i] for i in probs.argmax(-1).tolist()]


def test_confirm_retrains_the_top_plans_on_val_only(work, monkeypatch) -> None:
    import autopeft.export as export_module

    real = export_module.load_data

    def no_test(recipe):
        data = real(recipe)
        data.test = None  # the selection must never look at the test split
        return data

    monkeypatch.setattr(export_module, "load_data", no_test)
    rc, data, _ = export(work, "--confirm", "2", "--confirm-seeds", "2")
    assert rc == 0
    c = data["provenance"]["confirm"]
    assert c["seeds"] == [1, 2] and c["epochs"] == 2 and c["split"] == "val"
    assert [x["trial"] for x in c["candidates"]] == [1, 0]  # the two best Pareto plans by val accuracy
    means = {x["trial"]: x["mean"] for x in c["candidates"]}
    assert all(len(x["val_acc"]) == 2 for x in c["candidates"])
    assert data["provenance"]["trial"] == c["picked"] == max(means, key=lambda t: (means[t], -t))
    assert data["provenance"]["pick"] == "confirm"


@pytest.mark.slow
def test_search_export_train_merge_evaluate_end_to_end(tmp_path, work) -> None:
    """A real search (Ray Tune + Optuna) on digits, then the user's commands, train in a fresh process."""
    import time

    import ray

    d, _ = work
    start = time.perf_counter()
    url = f"sqlite:///{tmp_path}/e2e.db"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        assert main(["search", "--dataset", "digits", "--backbone", VIT, "--weights", str(d / "w.safetensors"),
                     "--budget", "5%", "--space", "mergeable", "--epochs", "1", "--grace-epochs", "1",
                     "--trials", "2", "--concurrency", "2", "--seed", "0", "--study", "e2e",
                     "--storage", url]) == 0
    finally:
        ray.shutdown()
    print(f"\nsearch {time.perf_counter() - start:.1f}s")
    recipe = tmp_path / "best.yaml"
    assert main(["export", "--study", "e2e", "--storage", url, "--mergeable", "-o", str(recipe)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUTOPEFT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "autopeft", "train", "--config", str(recipe), "--epochs", "2",
                           "--merge", "--out", "runs/best"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "gap" in proc.stdout
    print(f"train {time.perf_counter() - start:.1f}s")
    run = load_run(tmp_path / "runs" / "best")
    trial_acc = run.recipe.provenance["val_acc"]
    print(f"\ntrial {run.recipe.provenance['trial']} val_acc {trial_acc:.4f} -> test_acc {run.metrics['test_acc']:.4f}")
    assert evaluate_run(run)["acc"] == run.metrics["test_acc"]
    assert evaluate_run(run, merged=True)["acc"] == run.metrics["merged"]["test_acc"]
    if {s.name for s in run.recipe.plan.methods()} == {"lora"}:
        assert main(["export-peft", "--run", str(run.path), "-o", str(tmp_path / "peft")]) == 0

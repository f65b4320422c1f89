"""Bad input through the real command line: every case exits 2 with one line on stderr that names the problem and the
fix, prints no traceback and creates nothing (no study rows, no files, no run directories).

Each case runs `python -m autopeft ARGS` in a process of its own and an empty working directory, forked from one
interpreter that imported autopeft once (tests/cli_fork.py): the table costs one import, not one per row. The first
rows also run in fresh interpreters, the plainest form of the command line.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import scipy.io
import torch
import yaml
from cli_fork import Call, run_cli
from PIL import Image
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan
from autopeft.recipe import Recipe

# The payload a malicious pickle runs when it is unpickled without weights_only: it creates this folder.
PWNED = "pwned-by-pickle"


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def _jpeg(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _space(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def a(tmp_path_factory) -> dict[str, str]:
    """The files the bad inputs refer to (weights, data, spaces, recipes, a study), outside the cases' folders."""
    root = tmp_path_factory.mktemp("assets")
    out: dict[str, str] = {"root": str(root), "pwned": str(root / PWNED)}
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(root / "vit.safetensors"))
    save_file(create_backbone("autopeft_test_swin").state_dict(), str(root / "swin.safetensors"))
    torch.save({"weight": _Evil(out["pwned"])}, root / "evil.pth")  # torch's zip format, a pickle inside
    (root / "evil.safetensors").write_bytes(pickle.dumps({"weight": _Evil(out["pwned"])}))  # a raw pickle
    (root / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))  # no header, no tensors
    out.update(vit=str(root / "vit.safetensors"), swin=str(root / "swin.safetensors"),
               evil_pth=str(root / "evil.pth"), evil_st=str(root / "evil.safetensors"),
               junk=str(root / "junk.safetensors"))

    # a finished run whose adapter file was damaged afterwards
    from autopeft.cli import main

    run = root / "run-damaged"
    assert main(["train", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", out["vit"],
                 "--method", "bitfit", "--epochs", "1", "--out", str(run), "--no-cache"]) == 0
    (run / "adapter.safetensors").write_bytes(b"\x08" + (run / "adapter.safetensors").read_bytes()[1:200])
    out["run_damaged"] = str(run)

    # Flowers102 without setid.mat
    flowers = root / "flowers" / "flowers-102"
    (flowers / "jpg").mkdir(parents=True)
    for i in range(1, 5):
        (flowers / "jpg" / f"image_{i:05d}.jpg").write_bytes(_jpeg(i))
    scipy.io.savemat(str(flowers / "imagelabels.mat"), {"labels": np.array([1, 2, 1, 2])})
    out["flowers_root"] = str(root / "flowers")

    # an image folder with one truncated JPEG
    broken = root / "broken"
    for c, cls in enumerate(("cat", "dog")):
        (broken / cls).mkdir(parents=True)
        for i in range(6):
            (broken / cls / f"{i}.jpg").write_bytes(_jpeg(10 * c + i))
    data = _jpeg(99)
    (broken / "dog" / "3.jpg").write_bytes(data[: len(data) // 2])
    out["broken"] = str(broken)

    spaces = root / "spaces"
    spaces.mkdir()
    out["space_syntax"] = _space(spaces / "syntax.yaml", "version: 1\nslots:\n  tune: [none, lora\n")
    out["space_method"] = _space(spaces / "method.yaml", "version: 1\nslots:\n  tune: [none, loraa]\n")
    out["space_empty"] = _space(spaces / "empty.yaml",
                                "version: 1\nslots:\n  tune: [none, lora]\nmethods:\n  lora:\n    rank: []\n")
    out["space_rank0"] = _space(spaces / "rank0.yaml",
                                "version: 1\nslots:\n  tune: [none, lora]\nmethods:\n  lora:\n    rank: [0, 4]\n")
    out["space_length"] = _space(spaces / "length.yaml",
                                 "version: 1\nslots:\n  tokens: [none, vpt_deep]\nmethods:\n  vpt_deep:\n"
                                 "    length: -5\n")
    out["space_import"] = _space(spaces / "import.yaml",
                                 "version: 1\nslots:\n  tune: [none, 'os:system']\n")
    out["space_optimizr"] = _space(spaces / "optimizr.yaml",
                                   "version: 1\nslots:\n  tune: [none, lora]\ntraining:\n  optimizr: sgd\n")
    out["space_adam"] = _space(spaces / "adam.yaml",
                               "version: 1\nslots:\n  tune: [none, lora]\ntraining:\n  optimizer: adam\n")

    recipe = Recipe(backbone="autopeft_test_vit", dataset="digits", epochs=1, weights=out["vit"],
                    plan=PeftPlan.single(make_spec("lora", {"rank": 2}), range(3))).to_dict()
    (root / "version.yaml").write_text(yaml.safe_dump({**recipe, "version": 99}))
    bad_plan = {**recipe, "plan": {"version": 1, "blocks": {"7": [{"method": "lora", "rank": 2}]}}}
    (root / "plan.yaml").write_text(yaml.safe_dump(bad_plan))
    out.update(recipe_version=str(root / "version.yaml"), recipe_plan=str(root / "plan.yaml"))

    # a study whose trials all failed or stopped early
    url = f"sqlite:///{root / 'studies.db'}"
    study = optuna.create_study(study_name="no-complete", storage=url, directions=["maximize", "minimize"])
    study.set_user_attr("autopeft", {"study": "no-complete", "dataset": "digits", "backbone": "autopeft_test_vit",
                                     "budget": "5%", "budget_limit": 500, "objectives": ["acc", "params"],
                                     "epochs": 2, "num_classes": 10, "space": "unified", "seed": 0})
    for state in (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED):
        t = study.ask()
        t.set_user_attr("plan", PeftPlan.single(make_spec("bitfit", {}), range(3)).to_dict())
        t.set_user_attr("peft_params", 100)
        t.set_user_attr("fail_reason", "out of memory")
        study.tell(t, state=state)
    out["db"], out["db_url"] = str(root / "studies.db"), url
    return out


def _search(a: dict[str, str], **flags: str | None) -> list[str]:
    """A small valid `autopeft search` command line with `flags` changed (None drops a flag)."""
    base = {"dataset": "digits", "backbone": "autopeft_test_vit", "weights": a["vit"], "budget": "5%",
            "trials": "2", "epochs": "1", "study": "bad"}
    base.update(flags)
    # --flag=value: argparse would read "-1%" after a space as another option
    return ["search", *(f"--{key.replace('_', '-')}={value}" for key, value in base.items() if value is not None)]


PG_URL = "postgresql+psycopg://autopeft:s3cr3t-pw@127.0.0.1:1/autopeft"
# (id, argv builder, substrings the one line must hold: the problem, and the fix where it has a fixed word)
CASES = [
    ("budget-zero", lambda a: _search(a, budget="0"), ["budget '0'", "greater than zero", "0.5%"]),
    ("budget-negative", lambda a: _search(a, budget="-1%"), ["budget '-1%'", "greater than zero"]),
    ("budget-text", lambda a: _search(a, budget="abc"), ["budget 'abc' is not valid", "150k"]),
    ("budget-over-100", lambda a: _search(a, budget="120%"), ["120%", "exceeds 100 %", "largest budget is 100%"]),
    ("budget-double-percent", lambda a: _search(a, budget="0.5%%"), ["0.5%%", "not valid", "0.5%"]),
    ("budget-infinite", lambda a: _search(a, budget="1e999"), ["1e999", "not a finite number"]),
    ("budget-ambiguous", lambda a: _search(a, budget="0.5"), ["ambiguous", "write 0.5% ", "or 0.5M"]),
    ("budget-space-cannot-fit", lambda a: _search(a, budget="500", space="noah"), ["smallest plan", "500"]),
    ("oneshot-unsliceable-space", lambda a: _search(a, strategy="oneshot", trials=None, space="unified"),
     ["space 'unified'", "bitfit, fact_tt, ln_tune", "cannot run inside a one-shot supernet", "--space oneshot"]),
    ("oneshot-no-sub-plan-fits", lambda a: _search(a, strategy="oneshot", trials=None, space="noah", budget="500"),
     ["smallest plan", "500"]),
    ("oneshot-with-trials", lambda a: _search(a, strategy="oneshot", space="oneshot"), ["--trials", "--finalists"]),
    ("oneshot-finalists-zero", lambda a: _search(a, strategy="oneshot", trials=None, finalists="0"),
     ["--finalists must be >= 1"]),
    ("oneshot-cap-too-small", lambda a: _search(a, strategy="oneshot", trials=None, space="oneshot", epochs="2",
                                                max_epochs="3"), ["--max-epochs 3", "supernet's 2 epochs"]),
    ("unknown-strategy", lambda a: _search(a, strategy="evolution"), ["evolution", "oneshot"]),
    ("unknown-dataset", lambda a: _search(a, dataset="flowers103"), ["unknown dataset 'flowers103'", "flowers102"]),
    ("unknown-backbone", lambda a: _search(a, backbone="vit_nope_patch16", weights=None),
     ["unknown backbone 'vit_nope_patch16'", "vit_*"]),
    ("unknown-method", lambda a: ["train", "--dataset", "digits", "--method", "lorra"], ["lorra", "lora"]),
    ("unknown-space", lambda a: _search(a, space="unifed"), ["unknown search space 'unifed'", "unified"]),
    ("unknown-sampler", lambda a: _search(a, sampler="cmaes"), ["unknown sampler 'cmaes'", "tpe"]),
    ("unknown-objective", lambda a: _search(a, objectives="acc,speed"), ["--objectives 'acc,speed'", "acc,params"]),
    ("argparse-type", lambda a: _search(a, trials="many"), ["--trials", "many", "--help"]),
    ("missing-data-root", lambda a: _search(a, dataset="flowers102", data_root="/nonexistent/autopeft-data"),
     ["Flowers102 not found under /nonexistent/autopeft-data", "setid.mat"]),
    ("flowers-without-setid", lambda a: _search(a, dataset="flowers102", data_root=a["flowers_root"]),
     ["Flowers102 not found", "setid.mat"]),
    ("truncated-jpeg-search", lambda a: _search(a, dataset=a["broken"]), ["3.jpg", "truncated", "replace or delete"]),
    ("truncated-jpeg-train", lambda a: ["train", "--dataset", a["broken"], "--backbone", "autopeft_test_vit",
                                        "--weights", a["vit"], "--method", "bitfit", "--epochs", "2", "--out", "run"],
     ["3.jpg", "truncated", "replace or delete"]),
    ("space-yaml-syntax", lambda a: _search(a, space=a["space_syntax"]), ["syntax.yaml", "not valid YAML"]),
    ("space-unknown-method", lambda a: _search(a, space=a["space_method"]), ["method.yaml", "loraa"]),
    ("space-empty-choices", lambda a: _search(a, space=a["space_empty"]), ["methods.lora.rank", "must not be empty"]),
    ("space-rank-zero", lambda a: _search(a, space=a["space_rank0"]), ["methods.lora.rank", "0"]),
    ("space-negative-length", lambda a: _search(a, space=a["space_length"]), ["vpt_deep.length", "-5"]),
    ("space-names-code", lambda a: _search(a, space=a["space_import"]), ["import.yaml", "os:system"]),
    ("space-unknown-training-key", lambda a: _search(a, space=a["space_optimizr"]),
     ["optimizr.yaml", "training.optimizr", "unknown training key 'optimizr'", "valid keys:", "optimizer"]),
    ("space-bad-optimizer", lambda a: _search(a, space=a["space_adam"]),
     ["adam.yaml", "training.optimizer", "optimizer 'adam' is not valid", "adamw, sgd"]),
    ("train-bad-scheduler", lambda a: ["train", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights",
                                       a["vit"], "--method", "bitfit", "--scheduler", "step", "--out", "run"],
     ["scheduler 'step' is not valid", "cosine, constant"]),
    ("recipe-schema-version", lambda a: ["train", "--config", a["recipe_version"]],
     ["version", "99", "reads recipe version 1"]),
    ("recipe-plan-not-fitting", lambda a: ["train", "--config", a["recipe_plan"]], ["plan.yaml", "7"]),
    ("export-no-complete-trial", lambda a: ["export", "--study", "no-complete", "--storage", a["db_url"],
                                            "-o", "best.yaml"],
     ["no full-fidelity trial", "--resume"]),
    ("export-missing-study", lambda a: ["export", "--study", "ghost", "--storage", a["db_url"], "-o", "best.yaml"],
     ["no study 'ghost'", "no-complete"]),
    ("export-missing-database", lambda a: ["export", "--study", "ghost", "-o", "best.yaml"],
     ["no study database", "--storage"]),
    ("results-missing-study", lambda a: ["results", "--study", "ghost", "--storage", a["db_url"]],
     ["no study 'ghost'"]),
    ("report-missing-study", lambda a: ["report", "--study", "ghost", "--storage", a["db_url"]], ["no study 'ghost'"]),
    ("storage-unreachable", lambda a: _search(a, storage=PG_URL), ["cannot open storage", "***@127.0.0.1:1",
                                                                    "database server"]),
    ("storage-unreachable-results", lambda a: ["results", "--study", "x", "--storage", PG_URL],
     ["cannot open storage", "***@127.0.0.1:1"]),
    ("storage-not-a-url", lambda a: _search(a, storage="studies.db"), ["not a database URL", "sqlite:///"]),
    ("weights-other-architecture-search", lambda a: _search(a, weights=a["swin"]),
     ["swin.safetensors", "could not load weights", "pass a weights file of autopeft_test_vit"]),
    ("weights-other-architecture-train", lambda a: ["train", "--dataset", "digits", "--backbone", "autopeft_test_vit",
                                                    "--weights", a["swin"], "--method", "bitfit", "--out", "run"],
     ["swin.safetensors", "size mismatch"]),
    ("weights-pickle-search", lambda a: _search(a, weights=a["evil_pth"]), ["evil.pth", "weights_only"]),
    ("weights-pickle-as-safetensors-search", lambda a: _search(a, weights=a["evil_st"]),
     ["evil.safetensors", "could not load weights", "pass a weights file of autopeft_test_vit"]),
    ("weights-pickle-train", lambda a: ["train", "--dataset", "digits", "--backbone", "autopeft_test_vit",
                                        "--weights", a["evil_pth"], "--method", "bitfit", "--out", "run"],
     ["evil.pth", "weights_only"]),
    ("weights-junk-train", lambda a: ["train", "--dataset", "digits", "--backbone", "autopeft_test_vit",
                                      "--weights", a["junk"], "--method", "bitfit", "--out", "run"],
     ["junk.safetensors", "could not load weights"]),
    ("adapter-damaged-evaluate", lambda a: ["evaluate", "--run", a["run_damaged"]],
     ["adapter.safetensors", "not a readable safetensors file", "restore it"]),
    ("gpus-above-cluster", lambda a: _search(a, gpus_per_trial="4"), ["--gpus-per-trial 4", "GPU(s)", "lower it"]),
    ("resume-nothing", lambda a: [*_search(a), "--resume"], ["--resume", "no study 'bad'", "without --resume"]),
    ("existing-study-without-resume", lambda a: ["search", "--dataset", "digits", "--study", "no-complete",
                                                 "--storage", a["db_url"]], ["already exists", "--resume"]),
]
# rows that also run in a fresh interpreter
FRESH = ("weights-pickle-train",)


def _snapshot(a: dict[str, str]) -> str:
    """A digest of the asset study database: reading must not change it."""
    return hashlib.sha256(Path(a["db"]).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def outcomes(a, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Every case run once (in parallel pairs), each in an empty folder of its own."""
    cases = tmp_path_factory.mktemp("cases")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "AUTOPEFT_OFFLINE": "1",
           "AUTOPEFT_CACHE": str(home / "cache"), "AUTOPEFT_DATA": str(home / "data"), "PYTHONWARNINGS": "ignore"}
    calls, folders = [], []
    for name, argv, _ in CASES:
        folder = cases / name
        folder.mkdir()
        folders.append(folder)
        calls.append(Call(argv(a), str(folder)))
    before = _snapshot(a)
    results = run_cli(calls, env=env, jobs=2)
    assert _snapshot(a) == before, "a failing command changed the study database"
    fresh = {}
    for name, argv, _ in CASES:
        if name in FRESH:
            folder = cases / f"{name}-fresh"
            folder.mkdir()
            proc = subprocess.run([sys.executable, "-m", "autopeft", *argv(a)], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=300)
            fresh[name] = (folder, proc)
    out = {name: (folder, r) for (name, _, _), folder, r in zip(CASES, folders, results, strict=True)}
    out.update({f"{k}-fresh": (f, type("R", (), {"rc": p.returncode, "err": p.stderr, "out": p.stdout}))
                for k, (f, p) in fresh.items()})
    return out


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,needles", [(n, s) for n, _, s in CASES] + [(f"{n}-fresh", s) for n, _, s in CASES
                                                                           if n in FRESH])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(outcomes, a, name, needles) -> None:
    folder, r = outcomes[name]
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert r.rc == 2, (r.rc, r.err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("autopeft: error: "), r.err[-3000:]
    assert "Traceback" not in r.err and "Traceback" not in r.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "s3cr3t" not in r.err + r.out  # storage passwords are masked
    assert not list(Path(folder).iterdir()), f"{name} created {[p.name for p in Path(folder).iterdir()]}"
    assert not Path(a["pwned"]).exists(), "a pickle offered as weights ran code"

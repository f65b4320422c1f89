"""The command line, run as a user runs it: a real subprocess, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autopeft.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autopeft", *args], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_help_and_version_import_no_heavy_package() -> None:
    """`--help`, `--version` and every command's --help answer without importing torch, timm, optuna or Ray."""
    code = ("import contextlib, io, sys\n"
            "from autopeft.cli import main\n"
            "for argv in (['--version'], ['--help'], ['search', '--help'], ['train', '--help'], ['space', 'show', "
            "'--help'], ['params', '--help'], ['export', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit as exc:\n"
            "            assert exc.code == 0, (argv, exc.code)\n"
            "print(sorted(m for m in ('torch', 'timm', 'optuna', 'ray', 'pandas') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_package_names_load_on_first_use() -> None:
    code = ("import sys, autopeft\n"
            "assert 'torch' not in sys.modules\n"
            "assert 'PeftPlan' in dir(autopeft) and 'PeftPlan' in autopeft.__all__\n"
            "from autopeft import PeftPlan, create_backbone\n"
            "assert PeftPlan.__module__ == 'autopeft.plan' and 'torch' in sys.modules\n"
            "import timm\n"
            "assert 'autopeft_tiny_vit' in timm.list_models('autopeft_*')\n"
            "try:\n"
            "    autopeft.nothing_here\n"
            "except AttributeError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "module 'autopeft' has no attribute 'nothing_here'"


def test_methods_json(capsys) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert len(rows) == 14
    assert by_name["lora"]["mergeable"] and not by_name["adapter"]["mergeable"]
    assert by_name["convpass"]["families"] == ["vit", "eva"] and {"swin", "eva"} <= set(by_name["ssf"]["families"])
    assert {r["category"] for r in rows} == {"partial", "addition"}


def test_params_json_keys(capsys) -> None:
    code = main(["params", "--backbone", "vit_base_patch16_224", "--method", "lora", "--set", "rank=8",
                 "--set", "targets=q,v", "--layers", "0-11", "--num-classes", "102", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peft_params"] == 294_912
    assert out["head_params"] == 768 * 102 + 102
    assert out["backbone_params"] == 85_798_656
    assert out["percent"] == pytest.approx(100 * 294_912 / 85_798_656)


def test_params_from_plan_file(tmp_path, capsys) -> None:
    plan = tmp_path / "p.yaml"
    plan.write_text("blocks:\n  '0': [{method: adapter, dim: 8}]\nglobal: [{method: vpt_shallow, length: 5}]\n")
    assert main(["params", "--backbone", "vit_base_patch16_224", "--plan", str(plan), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peft_params"] == (2 * 768 * 8 + 8 + 768) + 5 * 768


@pytest.mark.parametrize(
    "args,needle",
    [
        (["params", "--backbone", "vit_nope_xx", "--method", "lora"], "unknown backbone 'vit_nope_xx'"),
        (["params", "--backbone", "vit_base_patch16_224", "--method", "lorra"], "unknown method 'lorra'"),
        (["params", "--backbone", "vit_base_patch16_224", "--method", "lora", "--set", "rnak=2"], "unknown option"),
        (["params", "--backbone", "vit_base_patch16_224", "--method", "lora", "--set", "rank"], "KEY=VALUE"),
        (["params", "--backbone", "vit_base_patch16_224", "--method", "lora", "--layers", "0-40"], "blocks 0-11"),
        (["params", "--backbone", "autopeft_test_swin", "--method", "vpt_deep"], "does not support swin"),
        (["params", "--backbone", "vit_base_patch16_224", "--plan", "/nonexistent.yaml"], "does not exist"),
        (["params", "--backbone", "vit_base_patch16_224"], "one of the arguments --method --plan is required"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_embedded_default_study_is_the_same_outside_a_checkout(tmp_path, monkeypatch) -> None:
    """`autopeft search` without arguments runs studies/digits.yaml: from a checkout, and from anywhere else through
    the copy installed with the package (the built-in defaults are a different, larger study)."""
    from pathlib import Path

    from autopeft.data.recipes import EMBEDDED_RECIPE, recipe_file
    from autopeft.search.settings import settings_from

    def _default_recipe() -> str:
        return str(recipe_file(EMBEDDED_RECIPE))

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)
    in_checkout = settings_from(_default_recipe(), {})
    monkeypatch.chdir(tmp_path)
    elsewhere = _default_recipe()
    assert Path(elsewhere).is_file() and Path(elsewhere).parent.parent.name == "autopeft"
    assert settings_from(elsewhere, {}) == in_checkout
    assert (in_checkout.study, in_checkout.trials, in_checkout.epochs) == ("digits", 12, 6)
    assert settings_from(elsewhere, {}) != settings_from(None, {})

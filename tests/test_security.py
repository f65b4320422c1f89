"""Security: weights, adapters and YAML are read without running code, inputs cannot name code to import, the
dashboard stays on this machine unless asked, strings from a study are shown as text (HTML report, terminal), and
storage passwords never reach an output line or the study itself.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState, create_trial

import autopeft
from autopeft.backbones import backbone_spec, create_backbone
from autopeft.cli import main
from autopeft.errors import AutopeftError
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan, load_adapter
from autopeft.search import storage as st
from autopeft.search.settings import SearchSettings

SOURCE = Path(autopeft.__file__).parent
HOSTILE = "<script>alert(1)</script>"


class _Payload:
    """Unpickled without weights_only, this creates the folder `target`."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `X.name(...)` or `name(...)` in autopeft's source."""
    found = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                    found.append((path, node))
    return found


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SOURCE.parent)}:{node.lineno}"


def test_source_reads_weights_and_yaml_only_in_safe_ways() -> None:
    for path, call in _calls("load"):
        func = call.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if owner == "torch":
            flags = {k.arg: k.value for k in call.keywords}
            assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                f"torch.load without weights_only=True at {_where(path, call)}"
        assert owner != "yaml", f"yaml.load at {_where(path, call)}: use yaml.safe_load"
    for unsafe in ("unsafe_load", "full_load", "load_all", "unsafe_load_all"):
        assert not _calls(unsafe), [_where(p, c) for p, c in _calls(unsafe)]
    # pickle only where a dataset format is a pickle by definition (CIFAR's python batches, as torchvision reads
    # them): a data file, never weights, adapters, plans or studies
    pickles = [_where(p, c) for name in ("load", "loads") for p, c in _calls(name)
               if isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", "") == "pickle"]
    assert all(w.startswith("autopeft/data/cifar.py") for w in pickles), pickles
    # code is imported only from autopeft's own fixed lists (the command modules, the package's lazy names), never
    # from an input
    for name in ("import_module", "__import__", "eval", "exec"):
        for path, call in _calls(name):
            if name in ("eval", "exec") and isinstance(call.func, ast.Attribute):
                continue  # model.eval(): a method, not the builtin
            assert name == "import_module" and path.name == "__init__.py" and path.parent.name in ("cli", "autopeft"), \
                f"{name} at {_where(path, call)}"
    assert all(module.startswith("autopeft.") for module in autopeft._LAZY.values())


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_a_pickle_offered_as_weights_is_refused_without_running(tmp_path, suffix) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"w": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=2))
    with pytest.raises(AutopeftError, match="weights_only"):
        create_backbone("autopeft_test_vit", weights=path)
    assert not marker.exists()


def test_a_pickle_offered_as_an_adapter_is_refused_without_running(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), range(3))
    model = plan.apply(create_backbone("autopeft_test_vit"), backbone_spec("autopeft_test_vit"))
    with pytest.raises(Exception):  # noqa: B017  safetensors refuses the file; what matters is that nothing ran
        load_adapter(model, path)
    assert not marker.exists()


def _python_tag(target: Path) -> str:
    """YAML that runs os.mkdir(target) when read with yaml.load / unsafe_load."""
    return f"!!python/object/apply:os.mkdir [{str(target)!r}]\n"


def test_yaml_with_python_tags_is_refused_everywhere(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"version: 1\nslots:\n  tune: {_python_tag(marker)}")
    nested = tmp_path / "nested.yaml"
    nested.write_text(f"budget: 1%\ndataset: {_python_tag(marker)}")
    whole = tmp_path / "whole.yaml"
    whole.write_text(_python_tag(marker))
    for argv in (["search", "--dataset", "digits", "--space", str(tagged)],
                 ["search", "--recipe", str(nested)],
                 ["train", "--config", str(whole)],
                 ["train", "--dataset", "digits", "--plan", str(whole)],
                 ["space", "show", str(tagged)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("autopeft: error:"), (argv, err)
        assert not marker.exists(), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested.yaml", "tagged.yaml", "whole.yaml"]


@pytest.mark.parametrize("kind,text", [
    ("space", "version: 1\nslots:\n  tune: [none, 'subprocess:run']\n"),
    ("space", "version: 1\nslots:\n  tune: [none, lora]\nmethods:\n  lora:\n    __class__: [1]\n"),
    ("recipe", None),
    ("study", "budget: 1%\n__import__: os\n"),
])
def test_spaces_and_recipes_cannot_name_code(tmp_path, monkeypatch, capsys, kind, text) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{kind}.yaml"
    if kind == "recipe":
        plan = {"version": 1, "blocks": {"0": [{"method": "os.system", "command": "true"}]}, "global": []}
        text = yaml.safe_dump({"version": 1, "backbone": "autopeft_test_vit", "dataset": "digits", "epochs": 1,
                               "plan": plan})
    path.write_text(text)
    argv = {"space": ["search", "--dataset", "digits", "--space", str(path)],
            "recipe": ["train", "--config", str(path)], "study": ["search", "--recipe", str(path)]}[kind]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("unknown" in err[0] or "no option" in err[0]), err


def _study(url: str, name: str, reason: str) -> None:
    study = optuna.create_study(study_name=name, storage=st.open_storage(url), directions=["maximize", "minimize"])
    study.set_user_attr(st.STUDY_SETTINGS, {"study": name, "dataset": "digits", "backbone": "autopeft_test_vit",
                                            "budget": "5%", "budget_limit": 2000, "backbone_params": 32448,
                                            "objectives": ["acc", "params"], "epochs": 2, "num_classes": 10})
    plan = PeftPlan.single(make_spec("lora", {"rank": 2}), range(3)).to_dict()
    common = {st.ATTR_PLAN: plan, st.ATTR_PARAMS: 1024, st.ATTR_MAX_EPOCHS: 2, st.ATTR_SECONDS: 1.0}
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.5, 1024.0],
                                 user_attrs={**common, st.ATTR_CURVE: [0.4, 0.5], st.ATTR_EPOCHS: 2,
                                             st.ATTR_BASELINE: "<b>lora</b>"}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={**common, st.ATTR_CURVE: [0.1],
                                                                    st.ATTR_EPOCHS: 1, st.ATTR_REASON: reason}))


def test_the_report_shows_a_hostile_study_name_as_text(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'hostile.db'}"
    _study(url, HOSTILE, "</script><script>alert(2)</script>")
    out = tmp_path / "report.html"
    assert main(["report", "--study", HOSTILE, "--storage", url, "-o", str(out)]) == 0
    html = out.read_text()
    for raw in (HOSTILE, "alert(2)</script>", "<b>lora</b>"):
        assert raw not in html, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_terminal_output_shows_markup_in_study_strings_as_text(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    reason = "RuntimeError: bad [/] input [bold red]shape[/bold red] [/oops]"
    _study(url, "markup", reason)
    assert main(["results", "--study", "markup", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "[/oops]" in out and "[bold red]shape" in out

    from rich.console import Console

    from autopeft.search.progress import SearchProgress

    class _Trial:
        trial_id, config = "t0", {"autopeft": {"peft_params": 10, "number": 0}}

    console = Console(record=True, width=200)
    SearchProgress(2, 2, 100, console)._finish(_Trial(), {"fail_reason": reason, "epoch": 1}, error=False)
    assert reason in console.export_text()


def test_the_dashboard_binds_this_machine_only_unless_asked(tmp_path, monkeypatch, capsys) -> None:
    import optuna_dashboard

    url = f"sqlite:///{tmp_path / 's.db'}"
    _study(url, "d", "x")
    hosts = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, host, port: hosts.append(host))
    assert main(["dashboard", "--study", "d", "--storage", url]) == 0
    assert main(["dashboard", "--study", "d", "--storage", url, "--host", "0.0.0.0"]) == 0
    assert hosts == ["127.0.0.1", "0.0.0.0"]


@pytest.mark.parametrize("url,secret", [
    ("postgresql+psycopg://user:s3cret@db.example:5432/studies", "s3cret"),
    ("postgresql+psycopg://user:p@ss:w/rd@db.example/studies", "p@ss:w/rd"),
    ("mysql+pymysql://root:hunter2@127.0.0.1/optuna?charset=utf8", "hunter2"),
    ("postgresql+psycopg://db.example/studies?user=u&password=t0ps3cret", "t0ps3cret"),
])
def test_storage_passwords_are_masked(url, secret) -> None:
    masked = st.mask_url(url)
    assert secret not in masked and "***" in masked
    assert "db.example" in masked or "127.0.0.1" in masked
    message = f"cannot open storage {url}: connection to {url} failed"
    assert secret not in st.mask_url(message)
    assert st.mask_url("sqlite:////tmp/s.db") == "sqlite:////tmp/s.db"


def test_the_storage_url_is_not_kept_in_the_study(tmp_path) -> None:
    """The study's settings attribute (read by export, report, dashboards) holds no storage URL or cluster address."""

    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget
    from autopeft.search.study_settings import StudySettings

    spec = backbone_spec("autopeft_test_vit")
    search = SearchSettings(backbone="autopeft_test_vit", storage="postgresql+psycopg://u:s3cret@h/db",
                            address="10.0.0.1:6379", warm_storage="postgresql+psycopg://u:s3cret@h/other")
    stored = StudySettings.of(search, spec, parse_budget("5%", spec), num_classes=10).to_stored()
    assert "s3cret" not in repr(stored) and "10.0.0.1" not in repr(stored)


def test_a_cifar_batch_that_names_code_is_refused_without_running(tmp_path) -> None:
    """CIFAR's batches are pickles by format; the reader admits containers and numpy arrays only."""
    from data_fixtures import write_cifar

    from autopeft.data import load_dataset

    folder = write_cifar(tmp_path, 10)
    marker = tmp_path / "ran"
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    with pytest.raises(AutopeftError, match=r"data_batch_3 .*names \w+\.mkdir.*refused, not run"):
        load_dataset("cifar10", tmp_path, input_size=(3, 24, 24))
    assert not marker.exists()

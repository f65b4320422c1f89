"""GPUs by default ([N] part 4): the trials use every GPU Ray has, k to a GPU, and each trial runs on the GPU Ray gave
it. Tested with Ray's logical GPUs (`ray.init(num_gpus=2)` on a CPU machine: Ray assigns their ids and sets
CUDA_VISIBLE_DEVICES per worker as on a GPU node)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import optuna
import pytest
import ray
import torch
from safetensors.torch import save_file

from autopeft.backbones import create_backbone
from autopeft.cli import main
from autopeft.errors import AutopeftError
from autopeft.search import storage as st
from autopeft.search.cluster import check_resources, largest_node, resolve_gpus
from autopeft.search.settings import SearchSettings

WEIGHTS = Path(tempfile.gettempdir()) / f"autopeft-gpu-test-vit-{os.getpid()}.safetensors"


@pytest.mark.parametrize("given,gpus,expected", [
    ({}, 0, (0.0, 2)),  # no GPU: the CPU default
    ({}, 4, (0.5, 8)),  # two to a GPU on every GPU
    ({"trials_per_gpu": 4}, 2, (0.25, 8)),
    ({"concurrency": 8}, 4, (0.5, 8)),  # c trials spread over the GPUs
    ({"concurrency": 6}, 4, (0.5, 6)),  # 2/3 of a GPU would leave one trial per GPU: half fits all six
    ({"concurrency": 2}, 4, (1.0, 2)),  # never more than one GPU each unless asked
    ({"gpus_per_trial": 0.25}, 2, (0.25, 8)),  # as many as fit
    ({"gpus_per_trial": 2.0}, 4, (2.0, 2)),
    ({"gpus_per_trial": 0.0}, 4, (0.0, 2)),  # asked for none: the CPU
    ({"gpus_per_trial": 1.0, "concurrency": 3}, 8, (1.0, 3)),  # both given: as given
])
def test_trials_fill_the_gpus_unless_told_otherwise(given, gpus, expected) -> None:
    s = SearchSettings(**given)
    resolve_gpus(s, float(gpus))
    assert (s.gpus_per_trial, s.concurrency) == pytest.approx(expected)


def test_a_trial_must_fit_on_one_node() -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}} for _ in range(4)]
    nodes.append({"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}})  # a dead node serves nothing
    largest = largest_node(nodes)
    assert largest == {"GPU": 1.0, "CPU": 8.0}
    with pytest.raises(AutopeftError, match="more than the 1 GPU.s. any one node"):
        check_resources(SearchSettings(gpus_per_trial=2.0), {"GPU": 4.0, "CPU": 32.0}, largest)
    with pytest.raises(AutopeftError, match="--cpus-per-trial 12 is more than the 8 CPU.s. any one node"):
        check_resources(SearchSettings(cpus_per_trial=12.0), {"GPU": 4.0, "CPU": 32.0}, largest)
    check_resources(SearchSettings(gpus_per_trial=1.0, cpus_per_trial=8.0), {"GPU": 4.0, "CPU": 32.0}, largest)


def test_ray_client_is_refused_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--address", "ray://127.0.0.1:10001", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Ray Client (ray://) is not supported" in err[0] and "--address auto" in err[0]
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def two_gpu_ray():
    torch.manual_seed(0)
    save_file(create_backbone("autopeft_test_vit").state_dict(), str(WEIGHTS))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    WEIGHTS.unlink(missing_ok=True)


def test_trials_get_the_gpus_and_shares_they_asked_for(tmp_path, monkeypatch, capsys, two_gpu_ray) -> None:
    """No GPU flag on a Ray with 2 GPUs: half a GPU each, four at once (two fit the 2 CPUs), each on a GPU id Ray
    gave it; the header says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    assert main(["search", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", str(WEIGHTS),
                 "--budget", "5%", "--epochs", "1", "--trials", "3", "--no-baselines", "--study", "gpus"]) == 0
    assert "4 trial(s) at once, each 1 CPU and 0.5 GPU, of the 2 CPU(s) and 2 GPU(s) Ray has" in \
        capsys.readouterr().err
    url = f"sqlite:///{tmp_path}/studies/gpus.db"
    settings, records = st.load_records("gpus", url)
    assert (settings.search.gpus_per_trial, settings.search.concurrency) == (0.5, 4)
    trials = optuna.load_study(study_name="gpus", storage=url).trials
    assert len(trials) == 3 and all(r.status == "COMPLETE" for r in records), [r.tags for r in records]
    for t in trials:
        assert len(t.user_attrs[st.ATTR_GPUS]) == 1 and t.user_attrs[st.ATTR_GPUS][0] in ("0", "1"), t.user_attrs


def test_gpus_per_trial_0_says_the_gpus_stay_idle(tmp_path, monkeypatch, capsys, two_gpu_ray) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    assert main(["search", "--dataset", "digits", "--backbone", "autopeft_test_vit", "--weights", str(WEIGHTS),
                 "--budget", "5%", "--epochs", "1", "--trials", "1", "--no-baselines", "--study", "cpu",
                 "--gpus-per-trial", "0"]) == 0
    assert "--gpus-per-trial 0: trials run on the CPU although Ray has GPUs" in capsys.readouterr().err
    trial = optuna.load_study(study_name="cpu", storage=f"sqlite:///{tmp_path}/studies/cpu.db").trials[0]
    assert trial.user_attrs[st.ATTR_GPUS] == []


def test_a_trials_cpus_beyond_its_thread_prepare_its_images() -> None:
    from autopeft.search.engine import trial_settings

    assert SearchSettings().data_workers == 0
    assert SearchSettings(cpus_per_trial=4).data_workers == 3
    assert SearchSettings(cpus_per_trial=4, num_workers=1).data_workers == 1
    with pytest.raises(AutopeftError, match="--num-workers must be >= 0"):
        SearchSettings(num_workers=-1)
    on_gpu = trial_settings(SearchSettings(cpus_per_trial=3, gpus_per_trial=0.5, concurrency=2))
    assert (on_gpu.num_workers, on_gpu.device) == (2, "auto")
    assert trial_settings(SearchSettings(gpus_per_trial=0.0)).device == "cpu"

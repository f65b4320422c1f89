"""Search: settings, validation, the Ray Tune + Optuna engine, and the study's results.

    outcome = search(settings_from("studies/digits.yaml", {"trials": 8}))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from autopeft.backbones import backbone_spec, check_pretrained
from autopeft.budget import parse_budget
from autopeft.data.datasets import check_images
from autopeft.errors import AutopeftError
from autopeft.records import TrialRecord
from autopeft.search import storage as st
from autopeft.search.baselines import baseline_plans
from autopeft.search.settings import SearchSettings, load_recipe, settings_from
from autopeft.search.study_settings import StudySettings, resumed

if TYPE_CHECKING:
    from autopeft.search.engine import Prepared

__all__ = ["Outcome", "SearchSettings", "StudySettings", "load_recipe", "prepare", "search", "settings_from"]


@dataclass
class Outcome:
    settings: StudySettings
    records: list[TrialRecord]
    storage: str


def prepare(s: SearchSettings) -> Prepared:
    """Validate everything a search needs (backbone, budget, space, data, storage) without creating anything."""
    import optuna

    from autopeft.data import data_config, load_dataset
    from autopeft.data.base import dataset_name
    from autopeft.search.baselines import baseline_hparams
    from autopeft.search.engine import Prepared
    from autopeft.space import check_feasible, load_space

    # the storage first (a resumed study's own settings are the base of the rest), then cheap checks, then what
    # reads files (weights, every image)
    st.check_study_name(s.study)
    url = s.storage or st.default_storage(s.study)
    exists = False
    if not url.startswith("sqlite:///") or Path(url[len("sqlite:///"):]).is_file():
        store = st.open_storage(url, create=False)
        exists = s.study in [x.study_name for x in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if s.resume and not exists:
        raise AutopeftError(f"--resume: there is no study '{s.study}' in {st.mask_url(url)} to resume; "
                            "start it without --resume")
    if exists and not s.resume:
        raise AutopeftError(f"study '{s.study}' already exists in {st.mask_url(url)}; pass --resume to continue it "
                            "or choose another --study")
    s.dataset = dataset_name(s.dataset, s.data_root)  # trials run in Ray's working directories, on other nodes
    changes: dict = {}
    if s.resume:
        s, changes = resumed(s, st.read_settings(st.load_study(s.study, url)))
    spec = backbone_spec(s.backbone, s.img_size)
    budget = parse_budget(s.budget, spec)
    space = load_space(s.space)
    check_feasible(space, spec, budget)
    check_local_gpus(s)
    if s.warm_start:
        st.load_study(s.warm_start, s.warm_storage or url)
    check_weights(s.backbone, s.weights, s.img_size)
    data = load_dataset(s.dataset, s.data_root, seed=s.seed, **data_config(s.backbone, s.img_size))
    check_images(data)
    if s.cv_folds is not None:
        from autopeft.data.folds import check_folds

        check_folds(s.cv_folds, len(data.train_full))  # type: ignore[arg-type]  # every split has a length
    trial_search = s.strategy == "trials"  # a one-shot search's trials are its finalists: no baselines
    baselines = baseline_plans(spec, budget.limit) if s.baselines and trial_search and not s.resume else []
    prep = Prepared(settings=s, spec=spec, budget=budget, space=space, storage_url=url,
                    num_classes=data.num_classes, baselines=baselines, train_size=len(data.train),  # type: ignore[arg-type]
                    val_size=len(data.val), changes=changes)  # type: ignore[arg-type]
    baseline_hparams(space, s.baseline_lr_scales)  # scaled rates inside the space's range, before the study exists
    if not trial_search:
        from autopeft.search import oneshot

        oneshot.check(prep)
    return prep


def check_local_gpus(s: SearchSettings) -> None:
    """Without a cluster, GPUs are this machine's: refuse a request above them before Ray even starts (the engine
    checks the cluster's resources again once Ray runs)."""
    import os
    import sys

    if not s.gpus_per_trial or s.address or os.environ.get("RAY_ADDRESS"):
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # a Ray this process already runs (a notebook, a test) says what it has
    import torch

    from autopeft.search.cluster import check_resources

    check_resources(s, {"GPU": float(torch.cuda.device_count()), "CPU": float(s.local_cpus())})


def check_weights(backbone: str, weights: str | None, img_size: int | None = None) -> None:
    """Load the backbone with its pretrained weights (`weights`, a file, or timm's from the hub) once on the driver,
    so unloadable weights fail the search in one line, not every trial one by one. From the hub this also fills the
    local cache the trials on this machine then read."""
    from autopeft.backbones import create_backbone

    check_pretrained(backbone, weights)
    fix = f"pass a weights file of {backbone} (safetensors, timm .npz, or .pth/.bin holding tensors only)"
    if weights is None:
        # a hub miss is its own AutopeftError, naming --weights
        create_backbone(backbone, pretrained=True, img_size=img_size)
        return
    try:
        create_backbone(backbone, weights=weights, img_size=img_size)
    except AutopeftError as exc:
        raise AutopeftError(f"{exc}; {fix}") from None
    except Exception as exc:  # noqa: BLE001  safetensors, numpy and zip readers raise their own types
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise AutopeftError(f"weights file '{weights}' cannot be read ({text}); {fix}") from None


def search(s: SearchSettings, console: Console | None = None) -> Outcome:
    """Run (or resume) a search; return the study's settings and records."""
    from autopeft.search import oneshot
    from autopeft.search.cluster import ray_log_path, ray_session, resources_line
    from autopeft.search.engine import create_or_resume, epoch_cap, run
    from autopeft.search.epoch_cap import EpochCount
    from autopeft.search.selection import cross_validate

    console = console or Console(stderr=True, soft_wrap=True)
    prep = prepare(s)
    s = prep.settings  # on --resume: the study's stored settings with the given changes
    st.set_patience(s.storage_patience)
    from autopeft.search.progress import SearchProgress  # imports Ray (seconds): not before the input is checked
    log = ray_log_path(prep.storage_url, s.study)
    with ray_session(s, log) as resources:  # Ray first: a request the cluster cannot serve fails before the study
        study, remaining = create_or_resume(prep)
        done = s.trials - remaining
        cap, spent = epoch_cap(prep, study)
        capped = f", at most {cap:,} epochs in all" + (f" ({spent:,} spent)" if spent else "") if cap else ""
        console.print(f"study [bold]{s.study}[/] in {escape(st.mask_url(prep.storage_url))}: {escape(s.dataset)} "
                      f"on {s.backbone}, budget {prep.budget.text} = {prep.budget.limit:,} params, space "
                      f"{escape(prep.space.name)}"
                      + (" (one-shot's default; --space chooses another)"
                         if s.strategy == "oneshot" and s.defaulted("space") else "") + ", "
                      + (f"{s.trials} trials × {s.epochs} epochs" if s.strategy == "trials" else
                         f"one-shot: a supernet of {oneshot.supernet_epochs(s)} epochs, "
                         f"{s.candidates or 'one trial worth of'} candidates, "
                         f"{s.trials} finalists × {s.epochs} epochs")
                      + capped
                      + (f" ({done} already finished or running)" if done else "")
                      + (f"; then the top {s.select_top} by val cross-validated in {s.cv_folds} folds (--select)"
                         if s.cv_folds else ""), highlight=False)
        console.print(resources_line(s, resources), highlight=False)
        console.print(f"Ray's own messages: {log}", highlight=False)
        if s.strategy == "oneshot":
            with _storage_outage_as_error():
                oneshot.run_phase(prep, study, console)
            cap, spent = epoch_cap(prep, study)  # with the supernet's compute
        if s.checkpoints_need_storage:
            console.print("trials keep no checkpoints on a cluster without --checkpoint-storage (a path every node "
                          "reaches, or an object-store URI): a trial re-run after a lost node starts over",
                          highlight=False)
        for note in prep.fidelity_notes():
            console.print(f"trials train with {note}", highlight=False)
        progress = SearchProgress(s.trials, s.epochs, prep.budget.limit, console, offset=done, epoch_cap=cap,
                                  spent=spent)
        with _storage_outage_as_error():
            run(prep, study, remaining, callbacks=[progress], epochs=(cap, spent))
        if cap is not None and not EpochCount(progress.spent).room_for_another(cap, running=0):
            console.print(f"the study has spent {progress.spent:,} of its {cap:,} epochs (--max-epochs): done; "
                          "resume with a larger --max-epochs to go on", highlight=False)
        cross_validate(prep, study, console)  # --select cv:K (nothing for --select val)
    settings, records = st.retry(lambda: st.load_records(s.study, prep.storage_url))
    return Outcome(settings=settings, records=records, storage=prep.storage_url)


@contextlib.contextmanager
def _storage_outage_as_error() -> Iterator[None]:
    """A storage that stayed away past --storage-patience becomes its one-line error (for --resume)."""
    try:
        yield
    except Exception as exc:
        unavailable = st.storage_unavailable(exc)
        if unavailable is None:
            raise
        raise unavailable from None

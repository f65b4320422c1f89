"""Search: settings, validation, the Ray Tune + Optuna engine, and the study's results.

    outcome = search(settings_from("studies/digits.yaml", {"trials": 8}))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from autopeft.backbones import backbone_spec, check_pretrained
from autopeft.budget import parse_budget
from autopeft.errors import AutopeftError
from autopeft.records import TrialRecord
from autopeft.search import storage as st
from autopeft.search.baselines import baseline_plans
from autopeft.search.settings import OBJECTIVES, SearchSettings, load_recipe, settings_from

__all__ = ["OBJECTIVES", "Outcome", "SearchSettings", "load_recipe", "prepare", "search", "settings_from"]


@dataclass
class Outcome:
    settings: dict[str, Any]
    records: list[TrialRecord]
    storage: str


def prepare(s: SearchSettings):
    """Validate everything a search needs (backbone, budget, space, data, storage) without creating anything."""
    import optuna

    from autopeft.data import data_config, load_dataset
    from autopeft.search.engine import Prepared
    from autopeft.space import check_feasible, load_space

    st.check_study_name(s.study)
    spec = backbone_spec(s.backbone)
    budget = parse_budget(s.budget, spec)
    space = load_space(s.space)
    check_feasible(space, spec, budget)
    check_pretrained(s.backbone, s.weights)
    data = load_dataset(s.dataset, s.data_root, seed=s.seed, **data_config(s.backbone))
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
    if s.warm_start:
        st.load_study(s.warm_start, s.warm_storage or url)
    baselines = baseline_plans(spec, budget.limit) if s.baselines and not s.resume else []
    return Prepared(settings=s, spec=spec, budget=budget, space=space, storage_url=url,
                    num_classes=data.num_classes, baselines=baselines)


def search(s: SearchSettings, console: Console | None = None) -> Outcome:
    """Run (or resume) a search; return the study's settings and records."""
    from autopeft.search.engine import create_or_resume, run
    from autopeft.search.progress import SearchProgress

    console = console or Console(stderr=True)
    prep = prepare(s)
    study, remaining = create_or_resume(prep)
    done = s.trials - remaining
    console.print(f"study [bold]{s.study}[/] in {st.mask_url(prep.storage_url)}: {s.dataset} on {s.backbone}, budget "
                  f"{prep.budget.text} = {prep.budget.limit:,} params, space {prep.space.name}, {s.trials} trials × "
                  f"{s.epochs} epochs" + (f" ({done} already finished)" if done else ""), highlight=False)
    progress = SearchProgress(s.trials, s.epochs, prep.budget.limit, console, offset=done)
    run(prep, study, remaining, callbacks=[progress])
    settings, records = st.load_records(s.study, prep.storage_url)
    return Outcome(settings=settings, records=records, storage=prep.storage_url)

"""StudySettings: what a study stores about itself, typed and versioned.

The engine writes it once, when it creates the study (`to_stored`, a study user attribute); results, export, report
and the CLI read it back through `StudySettings.from_stored` (storage.read_settings), the one place that knows the
stored formats:

- format 1 (studies written before the format was versioned): the search settings and the budget limit/percent,
  backbone parameter count and number of classes in one flat mapping, no block count, some keys possibly missing
  (the facts derivable from the backbone are then derived from it, here and nowhere else);
- format 2: the same mapping with `format: 2` and `num_blocks`.

A study written by a newer autopeft (a higher format) is refused with one line rather than misread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autopeft.errors import AutopeftError
from autopeft.objectives import Objective, objectives_of
from autopeft.search.settings import SearchSettings

if TYPE_CHECKING:
    from autopeft.backbones import BackboneSpec
    from autopeft.budget import Budget

STUDY_FORMAT = 2
FORMAT_KEY = "format"
# SearchSettings fields a study never stores: where it runs and how it was started (a storage URL may hold a password)
NOT_STORED = ("storage", "resume", "address", "warm_storage", "max_retries",
              "storage_patience", "checkpoint_every", "checkpoint_storage", "stall_floor", "given")
FACTS = ("budget_limit", "budget_percent", "backbone_params", "num_blocks", "num_classes")
# Stored settings `--resume` may change: they hold from the next trial on, and the study keeps each change (CHANGES).
# Every other stored setting defines the study: resuming with another value is refused (`resumed`).
MAY_CHANGE = ("trials", "max_epochs", "concurrency", "gpus_per_trial", "cpus_per_trial", "trials_per_gpu",
              "num_workers", "select", "select_top")
# Settings of how this run of the study runs (never stored as the study's settings), kept in CHANGES when a resume
# gives them
RUN_SETTINGS = ("address", "max_retries", "storage_patience", "checkpoint_every", "checkpoint_storage",
                "stall_floor")


@dataclass(frozen=True)
class StudySettings:
    """A study's search settings and the facts of its backbone and budget, as the study stores them.

    Attributes:
        search: the search settings the study was created with (storage, address and resume are not kept).
        budget_limit: the trainable-parameter limit (head excluded) the budget resolved to.
        budget_percent: the limit as a percentage of the backbone's parameters.
        backbone_params: the backbone's parameters, head excluded.
        num_blocks: the backbone's number of blocks.
        num_classes: classes of the dataset (None when a format-1 study did not record it).
        version: the stored format this was read from (STUDY_FORMAT for a new study).
    """

    search: SearchSettings
    budget_limit: int
    budget_percent: float
    backbone_params: int
    num_blocks: int
    num_classes: int | None = None
    version: int = STUDY_FORMAT

    @classmethod
    def of(cls, search: SearchSettings, spec: BackboneSpec, budget: Budget, num_classes: int) -> StudySettings:
        """The settings of a new study: its search settings with the backbone's and the budget's facts."""
        return cls(search=search, budget_limit=int(budget.limit), budget_percent=float(budget.percent),
                   backbone_params=int(spec.backbone_params), num_blocks=int(spec.num_blocks),
                   num_classes=int(num_classes))

    # -- what readers ask -------------------------------------------------------------------------------------------

    @property
    def objectives(self) -> list[Objective]:
        return objectives_of(self.search.objectives)

    @property
    def metrics(self) -> list[str]:
        """The objectives' metric names (TrialRecord attributes), in the study's order."""
        return [o.metric for o in self.objectives]

    @property
    def front_metrics(self) -> list[str]:
        """The metrics of the study's Pareto front: accuracy and parameters always (a study searched on accuracy
        alone still offers the accuracy/size trade-off of its full-fidelity trials), then any other objective."""
        return list(dict.fromkeys(["val_acc", "peft_params", *self.metrics]))

    @property
    def study(self) -> str:
        return self.search.study

    def percent(self, params: int) -> float:
        """`params` as a percentage of the backbone's parameters (head excluded)."""
        return 100.0 * params / max(self.backbone_params, 1)

    # -- stored form ------------------------------------------------------------------------------------------------

    def to_stored(self) -> dict[str, Any]:
        """The flat mapping kept in the study (JSON types only)."""
        data = dataclasses.asdict(self.search)
        for key in NOT_STORED:
            data.pop(key, None)
        data["objectives"] = list(self.search.objectives)
        data.update({key: getattr(self, key) for key in FACTS})
        data[FORMAT_KEY] = STUDY_FORMAT
        return data

    @classmethod
    def from_stored(cls, data: Any, study: str = "?") -> StudySettings:
        """Settings from what a study stores, in any format this version knows (see the module's docstring)."""
        if not isinstance(data, dict) or not data.get("backbone") or not data.get("dataset"):
            raise AutopeftError(f"study '{study}' holds no autopeft search settings; results, export and report "
                                "read studies made by `autopeft search`")
        version = int(data.get(FORMAT_KEY, 1))
        if version > STUDY_FORMAT:
            raise AutopeftError(f"study '{study}' was written in study format {version} by a newer autopeft (this "
                                f"one reads formats 1-{STUDY_FORMAT}); upgrade autopeft to read it")
        names = {f.name for f in dataclasses.fields(SearchSettings)} - set(NOT_STORED)
        # keys of settings that no longer exist are dropped: nothing could honour them
        values = {k: v for k, v in data.items() if k in names and v is not None}
        values.setdefault("study", study)
        try:
            search = SearchSettings(**values)
        except (TypeError, ValueError, AutopeftError) as exc:
            raise AutopeftError(f"study '{study}': its stored search settings are not readable ({exc})") from None
        facts: dict[str, Any] = {k: data.get(k) for k in FACTS}
        if any(facts[k] is None for k in ("budget_limit", "budget_percent", "backbone_params", "num_blocks")):
            facts.update(_derived(search, facts))
        classes = facts["num_classes"]
        return cls(search=search, budget_limit=int(facts["budget_limit"]),
                   budget_percent=float(facts["budget_percent"]), backbone_params=int(facts["backbone_params"]),
                   num_blocks=int(facts["num_blocks"]), num_classes=None if classes is None else int(classes),
                   version=version)


def _derived(search: SearchSettings, facts: dict[str, Any]) -> dict[str, Any]:
    """The facts a format-1 study may lack, from its backbone's architecture (no weights are read)."""
    from autopeft.backbones import backbone_spec
    from autopeft.budget import parse_budget

    spec = backbone_spec(search.backbone, search.img_size)
    out = {"backbone_params": facts["backbone_params"] or spec.backbone_params,
           "num_blocks": facts["num_blocks"] or spec.num_blocks}
    if facts["budget_limit"] is None:
        budget = parse_budget(search.budget, spec)
        out.update(budget_limit=budget.limit, budget_percent=budget.percent)
    else:
        out.update(budget_limit=facts["budget_limit"],
                   budget_percent=facts["budget_percent"] if facts["budget_percent"] is not None
                   else 100.0 * int(facts["budget_limit"]) / max(int(out["backbone_params"]), 1))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "(none)" if value is None else str(value)


def resumed(given: SearchSettings, stored: StudySettings) -> tuple[SearchSettings, dict[str, Any]]:
    """The settings a resumed study runs with, and what changed.

    The study's stored settings, with the settings that may change (MAY_CHANGE) and how this run runs
    (NOT_STORED) taken from `given` where it gives them (`given.given`; None: every setting is given; a setting
    that may change given as None keeps its stored value, so the stored `max_epochs` is the resumed study's cap).
    A setting that defines the study, given with another value than the stored one, is refused: one line naming
    each with both values, before anything is written.

    Returns:
        (settings, changes): `changes` maps each MAY_CHANGE setting that differs from the stored value, and each
        RUN_SETTINGS setting given, to its new value (the engine records them with the trial they hold from).
    """
    from autopeft.search.storage import mask_url

    names = [f.name for f in dataclasses.fields(SearchSettings) if f.name != "given"]
    keys = set(names) if given.given is None else set(given.given) & set(names)
    old = {n: getattr(stored.search, n) for n in names}
    new = {n: getattr(given, n) for n in names}
    defining = [n for n in names if n not in MAY_CHANGE and n not in NOT_STORED and n != "study"]
    differ = [n for n in defining if n in keys and new[n] != old[n]]
    if differ:
        raise AutopeftError(
            f"--resume: study '{stored.study}' was created with "
            + "; ".join(f"{_flag(n)} {_shown(old[n])} (given: {_shown(new[n])})" for n in differ)
            + "; resume with the stored values (or leave them out), or start another --study")
    # a setting that may change, given as None ("none given": no cap, chosen from the GPUs, ...), keeps its stored value
    changed = {n for n in MAY_CHANGE if n in keys and new[n] is not None}
    values = {n: (new[n] if n in NOT_STORED or n in changed else old[n]) for n in names}
    values["study"] = stored.study
    changes: dict[str, Any] = {n: values[n] for n in MAY_CHANGE if values[n] != old[n]}
    for n in RUN_SETTINGS:
        if n in keys:
            changes[n] = mask_url(values[n]) if isinstance(values[n], str) else values[n]
    try:
        return SearchSettings(**values, given=given.given), changes
    except AutopeftError as exc:  # e.g. a new --max-epochs below the stored --epochs
        raise AutopeftError(f"--resume: {exc}") from None

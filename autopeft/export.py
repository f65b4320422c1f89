"""Study -> Recipe: pick a trial (best under the budget, the Pareto knee, or a number), optionally confirm the top
Pareto plans with fresh seeds, and describe its final training run.

Studies are read through autopeft.search.storage only (no Ray). The recipe trains the space's full schedule (e.g.
100 epochs, VTAB's), not the search fidelity, on the dataset's final protocol (train_full: VTAB train800val200,
Flowers102 train+val), with the trial's hyper-parameters and the study's split seed, so the test set stays unseen.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from autopeft.backbones import backbone_spec
from autopeft.budget import parse_budget
from autopeft.errors import AutopeftError
from autopeft.pareto import accuracy_order, best_under_budget, eligible, knee, pareto_front
from autopeft.recipe import TRAINING_KEYS, Recipe, load_data, train_recipe
from autopeft.records import ATTR_BASELINE, ATTR_REASON, TrialRecord
from autopeft.runs import versions
from autopeft.search import storage as st
from autopeft.search.study_settings import StudySettings

PICKS = ("best", "knee")


@dataclass
class Study:
    """A stored study as export needs it: settings, records and each trial's training hyper-parameters."""

    name: str
    storage: str
    settings: StudySettings
    records: list[TrialRecord]
    hparams: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def objectives(self) -> list[str]:
        """The metrics of the study's Pareto front (knee, confirmation)."""
        return self.settings.front_metrics

    def record(self, number: int) -> TrialRecord:
        for r in self.records:
            if r.number == number:
                return r
        span = f"trials 0-{len(self.records) - 1}" if self.records else "no trials"
        raise AutopeftError(f"study '{self.name}' has no trial {number} (it has {span})")


def read_study(name: str, storage: str | None = None) -> Study:
    url = storage or st.default_storage(name)
    study = st.load_study(name, url)
    settings = st.read_settings(study)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return Study(name=name, storage=url, settings=settings, records=st.records_of(study),
                 hparams={t.number: dict(t.user_attrs.get(st.ATTR_HPARAMS) or {}) for t in trials})


def _blockers(study: Study, record: TrialRecord) -> list[str]:
    """Why the trial's plan does not merge into the study's backbone (at its input size); empty where it does."""
    s = study.settings.search
    try:
        return record.peft_plan.merge_blockers(backbone_spec(s.backbone, s.img_size))
    except AutopeftError as exc:  # a plan that no longer fits the backbone does not merge into it either
        return [str(exc)]


def _merges(study: Study, record: TrialRecord) -> bool:
    return not _blockers(study, record)


def candidates(study: Study, limit: int, mergeable: bool = False) -> list[TrialRecord]:
    """Eligible trials (full fidelity, with a val accuracy) within `limit` parameters (and merging, if asked)."""
    return [r for r in eligible(study.records) if r.peft_params <= limit and (not mergeable or _merges(study, r))]


def _check_trial(study: Study, number: int, limit: int, mergeable: bool) -> TrialRecord:
    r = study.record(number)
    where = f"trial {number} of study '{study.name}'"
    if r.status == "FAIL":
        raise AutopeftError(f"{where} failed ({r.tags.get(ATTR_REASON, 'no reason recorded')}); pick a completed "
                            f"trial (autopeft results --study {study.name})")
    if r.status == "RUNNING":
        raise AutopeftError(f"{where} is still running (or its search was interrupted); pick a finished trial")
    if not r.full_fidelity or r.val_acc is None:
        raise AutopeftError(f"{where} was stopped early after {r.epochs} of {r.max_epochs} epochs; only "
                            f"full-fidelity trials can be exported (autopeft results --study {study.name} --pareto)")
    if r.peft_params > limit:
        raise AutopeftError(f"{where} has {r.peft_params:,} parameters, over the budget of {limit:,}")
    if mergeable and not _merges(study, r):
        raise AutopeftError(f"{where} does not merge ({'; '.join(_blockers(study, r))}); drop --mergeable or pick "
                            "another")
    return r


def pick_trial(study: Study, pick: str, limit: int, mergeable: bool = False) -> TrialRecord:
    """The trial `pick` names: `best` (under `limit`: the highest cross-validation accuracy when the study scored
    trials with `--select cv:K`, else the highest val accuracy), `knee` (of the Pareto front) or a number."""
    if pick.isdigit():
        return _check_trial(study, int(pick), limit, mergeable)
    if pick not in PICKS:
        raise AutopeftError(f"--pick '{pick}' is not valid; use best, knee or a trial number")
    pool = candidates(study, limit, mergeable)
    chosen = best_under_budget(pool, limit) if pick == "best" else knee(pool, study.objectives)
    if chosen is None:
        counts = {s: sum(r.status == s for r in study.records) for s in ("COMPLETE", "PRUNED", "FAIL")}
        full = len(eligible(study.records))
        raise AutopeftError(
            f"study '{study.name}' has no full-fidelity trial within {limit:,} parameters"
            f"{' whose plan merges' if mergeable else ''} ({len(study.records)} trials: {full} at full fidelity, "
            f"{counts['PRUNED']} stopped early, {counts['FAIL']} failed); run more trials with "
            f"`autopeft search --study {study.name} --resume --trials N`")
    return chosen


def recipe_of(study: Study, record: TrialRecord, epochs: int | None = None, pick: str = "best",
              limit: int | None = None) -> Recipe:
    """The final-training recipe of one trial: its plan and hyper-parameters on the space's full schedule."""
    s = study.settings.search
    hp = study.hparams.get(record.number, {})
    search_epochs = s.epochs
    schedule = int(hp.get("epochs") or search_epochs)
    training = {k: v for k, v in hp.items() if k in TRAINING_KEYS}
    training["precision"] = s.precision  # the final run computes at the study's precision, as its trials did
    if s.img_size is not None:  # and at its input size
        training["img_size"] = s.img_size
    recipe = Recipe(backbone=s.backbone, dataset=s.dataset, plan=record.peft_plan, epochs=schedule,
                    weights=s.weights, data_root=s.data_root, num_classes=study.settings.num_classes,
                    protocol="final", split_seed=s.seed, seed=s.seed, training=training)
    notes = []
    if schedule != search_epochs:
        notes.append(f"trials ran {search_epochs} epochs (the search fidelity); this recipe trains the space's "
                     f"schedule of {schedule} epochs (warm-up {hp.get('warmup_epochs', 'default')})")
    if epochs is not None and epochs != recipe.epochs:
        recipe = recipe.with_epochs(epochs)
        warmup = recipe.training.get("warmup_epochs")
        notes.append(f"epochs set to {epochs} by --epochs (warm-up {'default' if warmup is None else f'{warmup:g}'})")
    if not hp:
        notes.append("the study stored no hyper-parameters for this trial; TrainConfig defaults apply")
    provenance = {
        "study": study.name, "storage": st.mask_url(study.storage), "trial": record.number, "pick": pick,
        "val_acc": record.val_acc, "curve": record.curve, "cv_accs": record.cv_accs, "cv_acc": record.cv_acc,
        "peft_params": record.peft_params,
        "percent": study.settings.percent(record.peft_params), "budget": s.budget,
        "budget_limit": limit if limit is not None else study.settings.budget_limit, "space": s.space,
        "search_epochs": search_epochs, "baseline": record.tags.get(ATTR_BASELINE), "hparams": hp,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(), "notes": notes,
    }
    count = recipe.check()
    if count != record.peft_params:
        raise AutopeftError(f"trial {record.number}'s plan counts {count:,} parameters now but "
                            f"{record.peft_params:,} in the study; the methods changed since the search")
    return recipe.replace(provenance=provenance)


def confirm(study: Study, pool: list[TrialRecord], k: int, seeds: int, device: str = "auto",
            log: Callable[[str], None] | None = None) -> tuple[TrialRecord, dict[str, Any]]:
    """Re-train the top-k Pareto plans of `pool` with `seeds` fresh seeds at the search fidelity, on train/val.

    The pick is the highest mean val accuracy (ties: fewer parameters); the test split is never touched.
    """
    if k < 1 or seeds < 1:
        raise AutopeftError(f"--confirm and --confirm-seeds must be >= 1, got {k} and {seeds}")
    front = sorted(pareto_front(pool, study.objectives), key=accuracy_order)
    top = front[:k]
    if not top:
        raise AutopeftError(f"study '{study.name}' has no Pareto plan to confirm")
    base_seed = study.settings.search.seed
    seed_list = [base_seed + 1 + i for i in range(seeds)]  # fresh seeds: the trial's own seed is the lucky one
    search_epochs = study.settings.search.epochs
    results: list[dict[str, Any]] = []
    data_by_augment: dict[bool, Any] = {}
    for r in top:
        recipe = recipe_of(study, r).replace(protocol="search").with_epochs(search_epochs)
        if recipe.augment not in data_by_augment:
            data_by_augment[recipe.augment] = load_data(recipe)
        accs = []
        for seed in seed_list:
            result = train_recipe(recipe.replace(seed=seed), data_by_augment[recipe.augment], test=False,
                                  device=device)
            assert result.val_acc is not None, "a search-protocol run evaluates on val after every epoch"
            accs.append(result.val_acc)
            if log:
                log(f"confirm trial {r.number} seed {seed}: val_acc {accs[-1]:.4f}")
        results.append({"trial": r.number, "search_val_acc": r.val_acc, "peft_params": r.peft_params,
                        "val_acc": accs, "mean": statistics.fmean(accs),
                        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    best = min(results, key=lambda x: (-x["mean"], x["peft_params"], x["trial"]))
    info = {"k": k, "seeds": seed_list, "epochs": search_epochs, "split": "val", "candidates": results,
            "picked": best["trial"]}
    return study.record(best["trial"]), info


def export_recipe(name: str, storage: str | None = None, pick: str = "best", budget: str | None = None,
                  mergeable: bool = False, epochs: int | None = None, confirm_k: int = 0, confirm_seeds: int = 3,
                  device: str = "auto", log: Callable[[str], None] | None = None) -> Recipe:
    """The recipe of the trial `pick` selects in study `name` (see the CLI's `autopeft export`)."""
    study = read_study(name, storage)
    limit = study.settings.budget_limit
    if budget is not None:
        limit = parse_budget(budget, backbone_spec(study.settings.search.backbone,
                                                            study.settings.search.img_size)).limit
    if confirm_k:
        if pick != "best":
            raise AutopeftError("--confirm re-ranks the best Pareto plans by their mean over seeds; use it with "
                                "--pick best (the default)")
        pick_trial(study, "best", limit, mergeable)  # one clear line when nothing is eligible
        record, info = confirm(study, candidates(study, limit, mergeable), confirm_k, confirm_seeds, device, log)
        recipe = recipe_of(study, record, epochs, "confirm", limit)
        return recipe.replace(provenance={**recipe.provenance, "confirm": info})
    record = pick_trial(study, pick, limit, mergeable)
    return recipe_of(study, record, epochs, "trial" if pick.isdigit() else pick, limit)

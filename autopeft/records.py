"""TrialRecord: what one trial produced, as plain data the Pareto and report code work on without Ray or Optuna."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

from autopeft.errors import AutopeftError

if TYPE_CHECKING:
    from autopeft.plan import PeftPlan

STATUSES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")

# The user attributes a stored trial carries (set by the sampler and by the engine when the trial ends), the names
# every writer and reader uses. ATTR_BASELINE and ATTR_REASON also name a record's tags.
ATTR_PLAN, ATTR_PARAMS, ATTR_PERCENT, ATTR_BASELINE = "plan", "peft_params", "percent", "baseline"
ATTR_CURVE, ATTR_EPOCHS, ATTR_MAX_EPOCHS, ATTR_SECONDS = "curve", "epochs", "max_epochs", "seconds"
ATTR_STATUS, ATTR_REASON, ATTR_OVERHEAD, ATTR_HPARAMS = "status", "fail_reason", "overhead", "hparams"
ATTR_NODE, ATTR_WARM_START, ATTR_RERUN_OF = "node", "warm_start", "rerun_of"
ATTR_GPUS = "gpus"  # the ids of the GPUs Ray gave the trial (empty: it ran on the CPU)
# infrastructure failures a trial was re-run after (its worker or node lost; --max-retries), and the nodes lost
ATTR_RETRIES, ATTR_LOST_NODES = "retries", "lost_nodes"
ATTR_SUPERNET_SCORE = "supernet_score"  # a one-shot finalist's val accuracy as a slice of the supernet
ATTR_RESUMED_FROM = "resumed_from"  # the epoch of the checkpoint the trial's last re-run went on from
ATTR_TRAINED = "trained_epochs"  # epochs every run of the trial trained (a re-run after a lost worker included)
# cross-validation results are study user attributes (a finished trial takes no new attributes), one per fold run:
# `cv:<folds>:<trial>:<fold>` -> {"acc": held-out accuracy, "loss": ..., "seconds": ...} or {"fail": reason}
CV_PREFIX = "cv:"


def cv_attr(folds: int, number: int, fold: int) -> str:
    """The study user attribute holding fold `fold` of `folds` of trial `number`."""
    return f"{CV_PREFIX}{folds}:{number}:{fold}"


def cv_results(attrs: dict[str, Any]) -> dict[int, dict[int, dict[int, dict[str, Any]]]]:
    """Every stored fold run of a study's user attributes: trial -> folds -> fold -> its result."""
    out: dict[int, dict[int, dict[int, dict[str, Any]]]] = {}
    for key, value in attrs.items():
        if not key.startswith(CV_PREFIX) or not isinstance(value, dict):
            continue
        try:
            folds, number, fold = (int(x) for x in key[len(CV_PREFIX):].split(":"))
        except ValueError:
            continue
        out.setdefault(number, {}).setdefault(folds, {})[fold] = value
    return out


def cv_accuracies(runs: dict[int, dict[int, dict[str, Any]]]) -> list[float]:
    """A trial's fold accuracies (fold order) for the largest fold count whose every fold ran; [] when none did."""
    for folds in sorted(runs, reverse=True):
        done = runs[folds]
        if all(isinstance(done.get(f, {}).get("acc"), (int, float)) for f in range(folds)):
            return [float(done[f]["acc"]) for f in range(folds)]
    return []


@dataclass
class TrialRecord:
    """One trial of a study.

    Attributes:
        number: the trial number in its study.
        plan: the PeftPlan as a dict (`PeftPlan.to_dict()`), i.e. the plan actually trained (after budget repair).
        peft_params: trainable parameters of the plan, head excluded.
        val_acc: final validation accuracy (0-1); None when the trial reported none.
        curve: validation accuracy after each epoch run.
        epochs: epochs the trial ran.
        max_epochs: epochs of a full-fidelity trial (early-stopped trials ran fewer).
        status: COMPLETE, PRUNED, FAIL or RUNNING.
        seconds: wall-clock cost of the trial.
        overhead: added inference cost relative to the plain backbone (0 for a fully merged plan).
        tags: free labels, e.g. {ATTR_BASELINE: "lora"} or {ATTR_REASON: "out of memory ..."}.
        test_acc: test accuracy when the trial was evaluated on the test split.
        params: the sampled hyper-parameters (optuna parameter names to values).
        cv_accs: held-out accuracy of each cross-validation fold (`--select cv:K`), [] when not cross-validated.
        supernet_score: a one-shot finalist's val accuracy as a slice of the trained supernet (None otherwise).
    """

    number: int
    plan: dict[str, Any]
    peft_params: int
    val_acc: float | None = None
    curve: list[float] = field(default_factory=list)
    epochs: int = 0
    max_epochs: int = 0
    status: str = "COMPLETE"
    seconds: float = 0.0
    overhead: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)
    test_acc: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    cv_accs: list[float] = field(default_factory=list)
    supernet_score: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise AutopeftError(f"trial {self.number}: status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.val_acc is not None and math.isnan(self.val_acc):
            self.val_acc = None

    @property
    def full_fidelity(self) -> bool:
        """Completed and trained for the full number of epochs (early-stopped trials report low-fidelity values)."""
        return self.status == "COMPLETE" and self.epochs >= self.max_epochs

    @property
    def cv_acc(self) -> float | None:
        """Mean held-out accuracy over the cross-validation folds; None when not cross-validated."""
        return math.fsum(self.cv_accs) / len(self.cv_accs) if self.cv_accs else None

    @cached_property
    def peft_plan(self) -> PeftPlan:
        """The plan, parsed once (AutopeftError for a plan this version cannot read)."""
        from autopeft.plan import PeftPlan

        return PeftPlan.from_dict(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        if not isinstance(data, dict):
            raise AutopeftError(f"a trial record must be a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AutopeftError(f"unknown trial record key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        missing = sorted(k for k in ("number", "plan", "peft_params") if k not in data)
        if missing:
            raise AutopeftError(f"trial record lacks {', '.join(missing)}")
        out = dict(data)
        out["curve"] = [float(v) for v in out.get("curve") or []]
        out["tags"] = dict(out.get("tags") or {})
        out["params"] = dict(out.get("params") or {})
        out["cv_accs"] = [float(v) for v in out.get("cv_accs") or []]
        return cls(**out)

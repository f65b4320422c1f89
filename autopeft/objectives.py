"""The objectives a study may optimise: the one table of them (no heavy imports: the CLI reads it early)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from autopeft.errors import AutopeftError


@dataclass(frozen=True)
class Objective:
    """One objective a study may optimise: its command-line name, the metric trials report and records carry (a
    TrialRecord attribute), and its direction."""

    flag: str
    metric: str
    direction: str  # "max" or "min"

    @property
    def study_direction(self) -> Literal["maximize", "minimize"]:
        """The direction as Optuna's studies take it."""
        return "maximize" if self.direction == "max" else "minimize"


# the one table of objectives, by command-line name (`--objectives acc,params`)
OBJECTIVES = {o.flag: o for o in (Objective("acc", "val_acc", "max"), Objective("params", "peft_params", "min"),
                                  Objective("overhead", "overhead", "min"))}
BY_METRIC = {o.metric: o for o in OBJECTIVES.values()}


def objectives_of(flags: Sequence[str]) -> list[Objective]:
    """The objectives named on the command line, in order (one line naming the valid ones for a bad name)."""
    unknown = [f for f in flags if f not in OBJECTIVES]
    if unknown:
        raise AutopeftError(f"unknown objective '{unknown[0]}'; choose from {', '.join(OBJECTIVES)}")
    return [OBJECTIVES[f] for f in flags]

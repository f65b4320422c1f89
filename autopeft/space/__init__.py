"""Search spaces: YAML files -> validated SearchSpace -> (bound to a backbone) -> define-by-run sampling of PeftPlans.

The public API: `load_space` / `list_spaces` / `parse_space` read spaces, `bind` fits one to a backbone,
`check_feasible` fails early when a budget is too small, `sample_plan` / `sample_hparams` draw from an optuna trial,
`describe` summarises a space (`autopeft space show`), `plan_overhead` estimates a plan's inference overhead.
"""

from __future__ import annotations

from autopeft.space.bound import BoundSpace, Part, bind
from autopeft.space.domain import Domain
from autopeft.space.format import NONE, MethodSpace, SearchSpace, Slot, list_spaces, load_space, parse_space
from autopeft.space.overhead import backbone_flops, plan_overhead
from autopeft.space.sampler import (
    check_feasible,
    repair,
    repaired_params,
    sample_hparams,
    sample_parts,
    sample_plan,
    suggest_parts,
)
from autopeft.space.summary import describe

__all__ = [
    "NONE",
    "BoundSpace",
    "Domain",
    "MethodSpace",
    "Part",
    "SearchSpace",
    "Slot",
    "backbone_flops",
    "bind",
    "check_feasible",
    "describe",
    "list_spaces",
    "load_space",
    "parse_space",
    "plan_overhead",
    "repair",
    "repaired_params",
    "sample_hparams",
    "sample_parts",
    "sample_plan",
    "suggest_parts",
]

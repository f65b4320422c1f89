"""Hand-picked baseline plans, each scaled to the budget: the first trials of every study.

Search and hand-picked methods are then compared at equal fidelity in the same study. A baseline takes the largest
size from its ladder that fits the budget; one that cannot fit at its smallest size is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopeft.backbones import BackboneSpec
from autopeft.errors import UnsupportedBackbone
from autopeft.methods import get_method, make_spec
from autopeft.plan import PeftPlan


@dataclass(frozen=True)
class Baseline:
    """A hand-picked method with fixed options and a ladder of sizes for the method's own size option."""

    name: str
    method: str
    options: dict
    sizes: tuple[int, ...] = ()


LADDER = (64, 32, 16, 8, 4, 2, 1)
BASELINES = (
    Baseline("lora", "lora", {"targets": "q,v"}, LADDER),
    Baseline("adapter", "adapter", {"position": "mlp"}, LADDER),
    Baseline("adaptformer", "adaptformer", {"scale": 0.1}, LADDER),
    Baseline("vpt_deep", "vpt_deep", {}, (100, 50, 20, 10, 5, 1)),
    Baseline("ssf", "ssf", {}),
    Baseline("bitfit", "bitfit", {}),
    Baseline("linear", "linear", {}),
)


def _fit(b: Baseline, spec: BackboneSpec, limit: int) -> PeftPlan | None:
    size_option = get_method(b.method).size_option
    if b.sizes and size_option is None:
        raise ValueError(f"baseline {b.name}: method {b.method} has no size option for its ladder")
    for size in b.sizes or (None,):
        options = dict(b.options)
        if size is not None and size_option is not None:
            options[size_option] = size
        plan = PeftPlan.single(make_spec(b.method, options), range(spec.num_blocks))
        try:
            if plan.count(spec) <= limit:
                return plan
        except UnsupportedBackbone:  # the method (at this size) cannot go on this backbone
            return None
    return None


def baseline_plans(spec: BackboneSpec, limit: int) -> list[tuple[str, PeftPlan]]:
    """(name, plan) of every baseline that fits `limit` trainable parameters on this backbone."""
    out = []
    for b in BASELINES:
        plan = _fit(b, spec, limit)
        if plan is not None:
            out.append((b.name, plan))
    return out

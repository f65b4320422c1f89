"""Hand-picked baseline plans, each scaled to the budget: the first trials of every study.

Search and hand-picked methods are then compared at equal fidelity in the same study. A baseline takes the largest
size from its ladder that fits the budget; one that cannot fit at its smallest size is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopeft.backbones import BackboneSpec
from autopeft.errors import AutopeftError
from autopeft.methods import make_spec
from autopeft.plan import PeftPlan


@dataclass(frozen=True)
class Baseline:
    name: str
    method: str
    options: dict
    size_option: str | None = None
    sizes: tuple[int, ...] = ()


LADDER = (64, 32, 16, 8, 4, 2, 1)
BASELINES = (
    Baseline("lora", "lora", {"targets": "q,v"}, "rank", LADDER),
    Baseline("adapter", "adapter", {"position": "mlp"}, "dim", LADDER),
    Baseline("adaptformer", "adaptformer", {"scale": 0.1}, "dim", LADDER),
    Baseline("vpt_deep", "vpt_deep", {}, "length", (100, 50, 20, 10, 5, 1)),
    Baseline("ssf", "ssf", {}),
    Baseline("bitfit", "bitfit", {}),
    Baseline("linear", "linear", {}),
)


def _fit(b: Baseline, spec: BackboneSpec, limit: int) -> PeftPlan | None:
    for size in b.sizes or (None,):
        options = dict(b.options, **({b.size_option: size} if size is not None else {}))
        plan = PeftPlan.single(make_spec(b.method, options), range(spec.num_blocks))
        try:
            if plan.count(spec) <= limit:
                return plan
        except AutopeftError:  # the method does not support this backbone family
            return None
    return None


def baseline_plans(spec: BackboneSpec, limit: int, names: tuple[str, ...] | None = None) -> list[tuple[str, PeftPlan]]:
    """(name, plan) of every baseline that fits `limit` trainable parameters on this backbone."""
    chosen = [b for b in BASELINES if names is None or b.name in names]
    out = []
    for b in chosen:
        plan = _fit(b, spec, limit)
        if plan is not None:
            out.append((b.name, plan))
    return out

"""Hand-picked baseline plans, each scaled to the budget: the first trials of every study.

Search and hand-picked methods are then compared at equal fidelity in the same study. A baseline takes the largest
size from its ladder that fits the budget; one that cannot fit at its smallest size is left out. Its trials train
at the centre of the space's hyper-parameter ranges, once per `--baseline-lr-scales` entry (`baseline_hparams`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autopeft.backbones import BackboneSpec
from autopeft.errors import AutopeftError, UnsupportedBackbone
from autopeft.methods import get_method, make_spec
from autopeft.plan import PeftPlan

if TYPE_CHECKING:
    from autopeft.space import SearchSpace


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


# Where a baseline method may go besides its default (the fair hand-picked arm of the benchmark grid tries each):
# LoRA's targets from the usual q,v up to every linear layer, the adapter after either sub-layer or both
PLACEMENTS: dict[str, tuple[dict[str, Any], ...]] = {
    "lora": ({"targets": "q,v"}, {"targets": "q,k,v"}, {"targets": "q,k,v,proj"},
             {"targets": "q,k,v,proj,fc1,fc2"}),
    "adapter": ({"position": "mlp"}, {"position": "attn"}, {"position": "both"}),
}
LARGEST_SIZE = 4096


def _largest_size(b: Baseline, options: dict[str, Any], spec: BackboneSpec, limit: int) -> PeftPlan | None:
    """The plan of `b` with `options` on every block at the largest size that fits `limit` (counts grow with the
    size: bisection), None when even size 1 does not."""
    size_option = get_method(b.method).size_option
    assert size_option is not None, b.method

    def plan(size: int) -> PeftPlan:
        return PeftPlan.single(make_spec(b.method, {**options, size_option: size}), range(spec.num_blocks))

    try:
        if plan(1).count(spec) > limit:
            return None
    except UnsupportedBackbone:
        return None
    low, high = 1, LARGEST_SIZE  # plan(low) fits; find the last size that does
    while low < high:
        mid = (low + high + 1) // 2
        if plan(mid).count(spec) <= limit:
            low = mid
        else:
            high = mid - 1
    return plan(low)


def filled_plans(spec: BackboneSpec, limit: int) -> list[tuple[str, PeftPlan]]:
    """(name, plan) of every baseline at the largest configuration that fits `limit`: on every block, the size
    (any integer, not the ladder's powers of two) and the placement (`PLACEMENTS`: LoRA's targets, the adapter's
    position) whose count comes closest to the limit, ties to the earlier placement. Methods without a size
    (SSF, BitFit, the linear probe) are as `baseline_plans` has them. The benchmark grid's hand-picked arm trains
    these, so that it spends the budget as a search's picks do."""
    out = []
    for b in BASELINES:
        if get_method(b.method).size_option is None:
            plan = _fit(b, spec, limit)
        else:
            fits = [p for where in PLACEMENTS.get(b.method, ({},))
                    if (p := _largest_size(b, {**b.options, **where}, spec, limit)) is not None]
            plan = max(fits, key=lambda p: p.count(spec), default=None)  # max keeps the first of equal counts
        if plan is not None:
            out.append((b.name, plan))
    return out


def _baseline_params(space: SearchSpace) -> dict[str, Any]:
    """Baselines train at the centre of each searched hyper-parameter range (geometric for log ranges) and at the
    first value of each searched choice (e.g. `optimizer: [adamw, sgd]` -> adamw)."""
    out: dict[str, Any] = {}
    for name, domain in space.training:
        if domain.kind == "choice":
            out[name] = domain.values[0]
        elif domain.kind in ("int", "float"):
            lo, hi = float(domain.low), float(domain.high)
            centre = math.sqrt(lo * hi) if domain.log and lo > 0 else (lo + hi) / 2
            out[name] = int(round(centre)) if domain.kind == "int" else centre
    return out


RATE_KEYS = ("lr_scale", "lr")  # the learning-rate keys a space may search: relative to each plan's rate, absolute


def rate_key(space: SearchSpace) -> str | None:
    """The learning-rate key `space` searches as a range (`lr_scale`, else `lr`), None when it searches neither."""
    training = dict(space.training)
    return next((k for k in RATE_KEYS if k in training and training[k].kind == "float"), None)


def baseline_hparams(space: SearchSpace, scales: tuple[float, ...]) -> list[dict[str, Any]]:
    """The hyper-parameters of each baseline's trials: `_baseline_params` once per entry of `scales`
    (`--baseline-lr-scales`), the searched learning rate (lr_scale, else lr) times that entry. Raises AutopeftError
    when a scaled rate leaves the space's range, or when scales other than 1 are asked of a space that searches no
    learning rate."""
    centre = _baseline_params(space)
    key = rate_key(space)
    if key is None:
        if set(scales) != {1.0}:
            raise AutopeftError(f"--baseline-lr-scales: space '{space.name}' searches no learning-rate range "
                                f"({' or '.join(RATE_KEYS)}); drop the flag or search one")
        return [centre]
    domain, out = dict(space.training)[key], []
    for scale in scales:
        value = centre[key] * scale
        if not (float(domain.low) <= value * (1 + 1e-9) and value <= float(domain.high) * (1 + 1e-9)):
            raise AutopeftError(f"--baseline-lr-scales {scale:g}: {key} {value:g} is outside the space's range "
                                f"{float(domain.low):g} … {float(domain.high):g}")
        out.append({**centre, key: min(max(value, float(domain.low)), float(domain.high))})
    return out

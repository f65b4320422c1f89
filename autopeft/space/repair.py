"""The budget repair: cut a drawn plan until it fits, and, in a space with `fill`, grow it back up to its share of
the budget; both deterministic (design in `autopeft.space.sampler`).

The loop runs for every trial and, in the tests, thousands of times a second, so the cut of a given part is
memoised per bound space and the plan's exact count is kept up to date part by part instead of recounted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from autopeft.errors import AutopeftError
from autopeft.methods import MethodSpec, get_method
from autopeft.space.bound import BoundSpace, Part
from autopeft.space.format import NONE
from autopeft.space.shares import size_values


def shrink(bound: BoundSpace, part: Part) -> Part | None:
    """The smallest cut that lowers `part`'s own count, or None when it is as small as it gets.

    Cuts, in order of preference: one option (or depth, or side) moved to another value of its domain with a lower
    count, the one that keeps the most parameters (ties: the option declared first); else `none` if the place
    offers it; else the place's cheapest setting.
    """
    memo = bound.memo.setdefault("shrink", {})
    if part in memo:
        return memo[part]
    current = bound.count_part(part)
    moves: list[Part] = []
    if part.depth is not None:
        moves += [replace(part, depth=d) for d in bound.depths if d < part.depth]
        moves += [replace(part, side=s) for s in bound.space.sides if s != part.side]
    if not part.empty:
        values = dict(part.values)
        for k, d in bound.methods[part.method].searched():
            moves += [part.with_values(tuple({**values, k: v}.items())) for v in d.candidates(values[k])]
    best, best_count = None, -1
    for move in moves:
        count = bound.count_part(move)
        if best_count < count < current:
            best, best_count = move, count
    if best is None and NONE in part.choices and not part.empty:
        best = replace(part, method=NONE, values=())
    if best is None:
        cheapest = bound.cheapest(part)
        best = cheapest if bound.count_part(cheapest) < current else None
    memo[part] = best
    return best


class Tally:
    """The exact parameter count of a list of parts, updated as one part at a time changes.

    Parts holding the same spec form one group counted together (shared factors count once), and the existing
    weights unfreezing methods open up are counted as a union, exactly as `PeftPlan.count` does.
    """

    def __init__(self, bound: BoundSpace, parts: list[Part]):
        self.bound = bound
        self.specs: list[MethodSpec | None] = [bound.part_spec(p) for p in parts]
        self.placed = [p.placed for p in parts]
        self.members: dict[int, list[int]] = {}
        self.group_value: dict[int, tuple[int, frozenset]] = {}
        self.added = 0
        self.unfrozen: Counter = Counter()
        for i, spec in enumerate(self.specs):
            if spec is not None:
                self.members.setdefault(id(spec), []).append(i)
        for key in self.members:
            self._enter(key)

    def _enter(self, key: int) -> None:
        members = self.members[key]
        spec = self.specs[members[0]]
        assert spec is not None  # only parts that hold a method enter a group
        blocks = self.placed[members[0]] if len(members) == 1 else tuple(
            sorted({b for i in members for b in self.placed[i]}))
        added, unfrozen = self.bound.count_of(spec, blocks)
        self.group_value[key] = (added, unfrozen)
        self.added += added
        self.unfrozen.update(unfrozen)

    def _leave(self, key: int) -> None:
        added, unfrozen = self.group_value.pop(key)
        self.added -= added
        self.unfrozen.subtract(unfrozen)

    def set(self, i: int, part: Part) -> None:
        """Part `i` now holds `part`."""
        old, new = self.specs[i], self.bound.part_spec(part)
        if old is not None:
            key = id(old)
            self._leave(key)
            self.members[key].remove(i)
            if self.members[key]:
                self._enter(key)
            else:
                del self.members[key]
        self.specs[i], self.placed[i] = new, part.placed
        if new is not None:
            key = id(new)
            if key in self.group_value:
                self._leave(key)
            self.members.setdefault(key, []).append(i)
            self._enter(key)

    def total(self) -> int:
        opened = frozenset(k for k, n in self.unfrozen.items() if n > 0)
        return self.added + (self.bound.unfrozen_count(opened) if opened else 0)


def repair(bound: BoundSpace, parts: list[Part], limit: int) -> list[Part]:
    """Cut `parts` until their plan fits `limit`: the part with the most parameters first (ties: the earlier part),
    each time by its smallest useful cut (`shrink`). Deterministic; every repaired value is in its domain."""
    parts = list(parts)
    counts = [bound.count_part(p) for p in parts]
    tally = Tally(bound, parts)
    while tally.total() > limit:
        biggest = max(range(len(parts)), key=counts.__getitem__)  # the first of the biggest
        smaller = shrink(bound, parts[biggest])
        if smaller is None:  # rare: the biggest part is at its floor; try the others, biggest first
            order = sorted(range(len(parts)), key=lambda j: (-counts[j], j))
            other = next((i for i in order if shrink(bound, parts[i]) is not None), None)
            if other is None:  # unreachable once check_feasible passed: the smallest plan fits
                raise AutopeftError(f"space '{bound.space.name}' cannot fit {limit:,} parameters on {bound.spec.name}")
            biggest, smaller = other, shrink(bound, parts[other])
            assert smaller is not None
        parts[biggest], counts[biggest] = smaller, bound.count_part(smaller)
        tally.set(biggest, smaller)
    return parts


def grow(bound: BoundSpace, part: Part) -> Part | None:
    """The smallest step that raises `part`'s own count, `shrink`'s inverse for sizes: its method's size option
    (LoRA's rank, an adapter's dim, a prompt length; `MethodSpec.size_option`), when the space searches it, moved to
    the value of its own domain with the next higher count (ties: the smaller value). None when the part is empty,
    has no searched size or is at its largest: growth never switches a place on, never changes a method, its depth
    or any other option."""
    memo = bound.memo.setdefault("grow", {})
    if part in memo:
        return memo[part]
    best: Part | None = None
    best_count: int | None = None
    option = None if part.empty else get_method(part.method).size_option
    domain = dict(bound.methods[part.method].options).get(option) if option is not None else None
    if option is not None and domain is not None and domain.kind in ("choice", "int"):
        current, values = bound.count_part(part), dict(part.values)
        for v in size_values(domain):
            move = part.with_values(tuple({**values, option: v}.items()))
            count = bound.count_part(move)
            if current < count and (best_count is None or count < best_count):
                best, best_count = move, count
    memo[part] = best
    return best


def fill_up(bound: BoundSpace, parts: list[Part], target: int) -> list[Part]:
    """Grow `parts` towards `target` (a plan at most `target`, as `repair` leaves it): each time the part with the
    fewest parameters (ties: the earlier part) whose smallest step (`grow`) keeps the plan within `target` takes
    it; stops when no part has a step that fits. Deterministic; every grown value is in its domain."""
    parts = list(parts)
    counts = [bound.count_part(p) for p in parts]
    tally = Tally(bound, parts)
    growable = [i for i, p in enumerate(parts) if grow(bound, p) is not None]
    while growable:
        for i in sorted(growable, key=lambda j: (counts[j], j)):
            bigger = grow(bound, parts[i])
            assert bigger is not None
            tally.set(i, bigger)
            if tally.total() <= target:
                parts[i], counts[i] = bigger, bound.count_part(bigger)
                if grow(bound, bigger) is None:
                    growable.remove(i)
                break
            tally.set(i, parts[i])  # this step would pass the target: try the next part
        else:
            break
    return parts

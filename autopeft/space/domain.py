"""Domain: the values one option or hyper-parameter of a search space may take (fixed, choices or a range)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from autopeft.errors import AutopeftError

KINDS = ("fixed", "choice", "int", "float")
Fail = Callable[[str, str], NoReturn]  # fail(key, problem) raises an error naming the file, key and problem


@dataclass(frozen=True)
class Domain:
    """A fixed value, a list of choices, or an int/float range (optionally log-scaled or stepped).

    Values are kept optuna-friendly: tuple-valued method options (e.g. LoRA targets) are stored as comma-joined
    strings such as `"q,v"`, which `make_spec` turns back into tuples.
    """

    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False

    @property
    def searched(self) -> bool:
        return self.kind != "fixed"

    @property
    def value(self) -> Any:
        """The value of a fixed domain."""
        return self.values[0]

    def size(self) -> int | None:
        """Number of distinct values; None for a continuous range."""
        if self.kind in ("fixed", "choice"):
            return len(self.values)
        if self.kind == "int":
            return int((self.high - self.low) // (self.step or 1)) + 1
        return None

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask `trial` (an optuna Trial) for a value under the parameter name `name`."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether the sampler could draw `value` (on a range: within its ends and on its grid)."""
        if self.kind in ("fixed", "choice"):
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.kind == "int" and int(value) != value:
            return False
        step = self.step or (1 if self.kind == "int" else None)
        return step is None or abs((value - self.low) / step - round((value - self.low) / step)) < 1e-9

    def candidates(self, value: Any) -> tuple[Any, ...]:
        """Other values of the domain the budget repair may move `value` to.

        Every other choice of a choice domain; for an int range the values halfway to `low`, a quarter of the way
        and so on (on the range's grid), so a repair of a range takes few steps and each repaired value is one the
        sampler could have drawn.
        """
        if self.kind == "choice":
            return tuple(v for v in self.values if v != value)
        if self.kind == "int":
            step, low, current = int(self.step or 1), int(self.low), int(value)
            out = []
            while current > low:
                current = low + (current - low) // 2 // step * step
                out.append(current)
            return tuple(out)
        if self.kind == "float" and value > self.low:
            return (self.low,)
        return ()

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"= {_fmt(self.value)}"
        if self.kind == "choice":
            return "∈ {" + ", ".join(_fmt(v) for v in self.values) + "}"
        scale = "log-uniform " if self.log else ""
        step = f" step {_fmt(self.step)}" if self.step else ""
        return f"~ {scale}{self.kind} [{_fmt(self.low)}, {_fmt(self.high)}]{step}"


def _fmt(value: Any) -> str:
    if isinstance(value, str) and "," in value:
        return f"[{value}]"
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.0e}"
    return str(value)


def _raise(key: str, problem: str) -> NoReturn:
    raise AutopeftError(f"{key}: {problem}")


def number(value: Any, where: str, integer: bool = False, fail: Fail = _raise) -> float | int:
    """A YAML number, also from a string (PyYAML reads `1e-4` without a dot as a string)."""
    if isinstance(value, bool):
        fail(where, f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            fail(where, f"expected a number, got {value!r}")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(where, f"expected a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            fail(where, f"expected a whole number, got {value!r}")
        return int(value)
    return value


def parse_range(raw: dict, where: str, integer: bool, fail: Fail = _raise) -> Domain:
    """`{low, high, step?, log?}` -> an int or float range Domain; `fail(key, problem)` reports errors."""
    unknown = sorted(map(str, set(raw) - {"low", "high", "step", "log"}))
    if unknown:
        fail(where, f"unknown range key(s) {', '.join(unknown)}; use low, high, step, log")
    if "low" not in raw or "high" not in raw:
        fail(where, "a range needs both 'low' and 'high'")
    low = number(raw["low"], f"{where}.low", integer, fail)
    high = number(raw["high"], f"{where}.high", integer, fail)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        fail(f"{where}.log", f"must be true or false, got {log!r}")
    step = raw.get("step")
    if step is not None:
        step = number(step, f"{where}.step", integer, fail)
        if step <= 0:
            fail(f"{where}.step", f"must be > 0, got {step}")
        if log:
            fail(where, "'step' and 'log' cannot be combined")
    if low > high:
        fail(where, f"low ({low}) is greater than high ({high})")
    if log and low <= 0:
        fail(where, f"a log range needs low > 0, got {low}")
    return Domain(kind="int" if integer else "float", low=low, high=high, step=step, log=log)

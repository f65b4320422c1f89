"""Parameter budgets: "0.5%", "0.2M", "150k" or "150000", parsed once against a backbone into an absolute count.

The budget limits the trainable parameters of a plan excluding the classification head (the head always trains and
is reported apart), as the benchmark tables count them. A percentage is relative to the backbone's parameters
without head and may not exceed 100 % (full fine-tuning fits a 100 % budget). An absolute count may exceed the
backbone (it then constrains nothing), so one recipe's "1M" works on a tiny test backbone too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from autopeft.backbones import BackboneSpec
from autopeft.errors import AutopeftError

_UNITS = {"": 1, "k": 1_000, "m": 1_000_000}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_PATTERN = re.compile(rf"^(?P<num>{_NUMBER})\s*(?P<unit>%|[kKmM]?)$")
_HELP = "write a percentage of the backbone (0.5%) or a parameter count (150000, 150k, 0.2M)"


@dataclass(frozen=True)
class Budget:
    """An absolute limit on trainable parameters (head excluded) for one backbone.

    Attributes:
        limit: the largest allowed number of trainable parameters.
        text: the budget as the user wrote it.
        backbone_params: parameters of the backbone without head (the 100 % reference).
    """

    limit: int
    text: str
    backbone_params: int

    @property
    def percent(self) -> float:
        """The limit as a percentage of the backbone's parameters."""
        return 100.0 * self.limit / self.backbone_params if self.backbone_params else math.inf

    def fits(self, count: int) -> bool:
        return count <= self.limit

    def share(self, count: int) -> float:
        """The fraction of the budget `count` parameters use (1.0 = all of it)."""
        return count / self.limit

    def describe(self) -> str:
        """E.g. `0.5% = 428,993 parameters (0.5000 % of 85,798,656)`."""
        return f"{self.text} = {self.limit:,} parameters ({self.percent:.4f} % of {self.backbone_params:,})"

    def __str__(self) -> str:
        return self.describe()


def parse_budget(text: str, spec: BackboneSpec) -> Budget:
    """Parse a budget against `spec` into an absolute count of trainable parameters (head excluded).

    Args:
        text: `0.5%`, `0.2M`, `150k`, `150000` (also `1.5e5`, `150_000`; units are case-insensitive).
        spec: the backbone the percentage refers to.

    Raises:
        AutopeftError: on anything else, with one line saying what to write instead.
    """
    raw = str(text).strip()
    match = _PATTERN.match(raw.replace("_", ""))
    if not match:
        raise AutopeftError(f"budget '{text}' is not valid; {_HELP}")
    value = float(match["num"])
    unit = match["unit"].lower()
    if not math.isfinite(value):
        raise AutopeftError(f"budget '{text}' is not a finite number; {_HELP}")
    if value <= 0:
        raise AutopeftError(f"budget '{text}' must be greater than zero; {_HELP}")
    if unit == "%":
        if value > 100:
            raise AutopeftError(f"budget '{text}' exceeds 100 % of the backbone; the largest budget is 100%")
        limit = math.floor(value / 100.0 * spec.backbone_params)
    else:
        if unit == "" and not value.is_integer():
            raise AutopeftError(
                f"budget '{text}' is ambiguous; write {raw}% for a percentage or {raw}M for millions of parameters"
            )
        limit = math.floor(value * _UNITS[unit])
    if limit < 1:
        raise AutopeftError(f"budget '{text}' allows no parameter on {spec.name} (it rounds to 0); raise it")
    return Budget(limit=int(limit), text=raw, backbone_params=spec.backbone_params)

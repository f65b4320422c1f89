"""Benchmarks of autopeft (see BENCHMARKS.md); results go to benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` as JSON to `path` (a bare file name goes to benchmarks/results/), replacing it atomically."""
    path = Path(path)
    if path.parent == Path("."):
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path

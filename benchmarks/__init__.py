"""Benchmarks of autopeft (see BENCHMARKS.md); results go to benchmarks/results/."""

from __future__ import annotations

import hashlib
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


def backbone_record(name: str, weights: str | None) -> dict[str, Any]:
    """Name, weights file and its sha256, and (bundled backbone) its recorded Fashion-MNIST test accuracy."""
    out: dict[str, Any] = {"name": name, "weights_file": weights, "weights_sha256": None}
    path = Path(weights) if weights else None
    if path is None and name == "autopeft_tiny_vit":
        from autopeft.bundled import INFO_FILE, WEIGHTS_FILE

        path = WEIGHTS_FILE
        info = json.loads(INFO_FILE.read_text())
        out.update(fashion_mnist_test_accuracy=info.get("test_accuracy"), pretrain_command=info.get("command"),
                   pretrain_date=info.get("date"))
    if path is not None and path.is_file():
        out["weights_file"] = str(path)
        out["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out

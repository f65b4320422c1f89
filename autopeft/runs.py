"""Run directories: one training run's artefacts, written atomically.

    DIR/plan.yaml              the plan that was trained
    DIR/metrics.json           per-epoch curve, the test accuracy measured once, params, seconds, settings
    DIR/adapter.safetensors    plan parameters + head only (load with autopeft.plan.load_adapter)
    DIR/train.log              one line per epoch
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan, save_adapter
from autopeft.train import TrainResult


def versions() -> dict[str, str]:
    from autopeft import __version__

    return {"autopeft": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def check_out_dir(out: str | Path) -> Path:
    """Refuse to write over an existing non-empty directory; return the absolute path."""
    path = Path(out).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AutopeftError(f"output directory {path} already exists and is not empty; pass another --out")
    return path


@contextmanager
def staged_dir(out: Path):
    """Yield a temporary sibling directory that replaces `out` only when the block finishes without error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked by check_out_dir
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_run(out: Path, result: TrainResult, plan: PeftPlan, info: dict) -> None:
    """Write a finished run's artefacts into `out` (a fresh directory)."""
    plan.save(out / "plan.yaml")
    metrics = {
        **info,
        "plan": plan.to_dict(),
        "plan_short": plan.short(),
        "peft_params": result.peft_params,
        "head_params": result.head_params,
        "history": result.history,
        "val_acc": result.val_acc,
        "test_acc": result.test_acc,
        "test_loss": result.test_loss,
        "seconds": result.seconds,
        "cached_blocks": result.cached_blocks,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    save_adapter(result.model, out / "adapter.safetensors", metadata={"format": "autopeft-adapter-1"})
    lines = [f"{info.get('dataset')} on {info.get('backbone')}: {plan.short()} ({result.peft_params:,} params)"]
    for h in result.history:
        val = f" val_loss {h['val_loss']:.4f} val_acc {h['val_acc']:.4f}" if "val_acc" in h else ""
        lines.append(f"epoch {h['epoch']:3d} train_loss {h['train_loss']:.4f}{val} lr {h['lr']:.2e} "
                     f"{h['seconds']:.2f}s")
    if result.test_acc is not None:
        lines.append(f"test_acc {result.test_acc:.4f} (measured once, after the last epoch)")
    (out / "train.log").write_text("\n".join(lines) + "\n")

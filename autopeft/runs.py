"""Run directories: one training run's artefacts, written atomically.

    DIR/recipe.yaml            the recipe that ran (`autopeft train --config DIR/recipe.yaml` runs it again)
    DIR/plan.yaml              the plan that was trained
    DIR/metrics.json           per-epoch curve, the test accuracy measured once, params, seconds, settings
    DIR/adapter.safetensors    plan parameters + head only (load with autopeft.plan.load_adapter)
    DIR/merged.safetensors     with --merge: a plain timm state dict, the plan folded into the backbone weights
    DIR/train.log              one line per epoch

A run of several seeds (`--seeds K`) is a directory of such runs, `seed<S>/`, plus `recipe.yaml` and `summary.json`
(test accuracy per seed, mean ± std).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from autopeft.errors import AutopeftError
from autopeft.plan import PeftPlan, merge_model, save_adapter
from autopeft.recipe import Recipe
from autopeft.train import TrainResult

RECIPE, METRICS, SUMMARY = "recipe.yaml", "metrics.json", "summary.json"
ADAPTER, MERGED = "adapter.safetensors", "merged.safetensors"


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions a result depends on: python, autopeft, torch, timm, and the installed `extra` distributions
    ("absent" when one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from autopeft import __version__

    out = {"autopeft": __version__, "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version()}
    for name in extra:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def check_out_dir(out: str | Path) -> Path:
    """Refuse to write over an existing non-empty directory; return the absolute path."""
    path = Path(out).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AutopeftError(f"output directory {path} already exists and is not empty; pass another --out")
    return path


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
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


def write_run(out: Path, result: TrainResult, plan: PeftPlan, info: dict, recipe: Recipe | None = None) -> None:
    """Write a finished run's artefacts into `out` (a fresh directory)."""
    if recipe is not None:
        recipe.save(out / RECIPE)
    plan.save(out / "plan.yaml")
    metrics = {
        **info,
        "plan": plan.to_dict(),
        "plan_short": plan.short(),
        "peft_params": result.peft_params,
        "head_params": result.head_params,
        "history": result.history,
        # the final protocol has no val curve (TrainResult.val_acc assumes one)
        "val_acc": result.history[-1].get("val_acc") if result.history else None,
        "test_acc": result.test_acc,
        "test_loss": result.test_loss,
        "seconds": result.seconds,
        "cached_blocks": result.cached_blocks,
        "trained_as": {"lr": result.lr, "rates": result.rates, "batch_size": result.batch_size,
                       "drop_path": result.drop_path, "notes": list(result.notes)},
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


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain timm state dict of `model` with its plan merged into the weights (`model` is left as it is)."""
    merged = merge_model(copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format))
    return {k: v.detach().contiguous().clone() for k, v in merged.state_dict().items()}


def write_merged(out: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(state, str(out / MERGED), metadata={"format": "autopeft-merged-1", **(metadata or {})})


def update_metrics(out: Path, **fields: Any) -> None:
    path = out / METRICS
    metrics = json.loads(path.read_text())
    metrics.update(fields)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))


def write_summary(out: Path, runs: dict[str, dict]) -> dict:
    """`summary.json` of a several-seed run: `runs` maps each sub-directory to its metrics."""
    accs = [m["test_acc"] for m in runs.values()]
    summary = {
        "seeds": {name: {"seed": m["config"]["seed"], "test_acc": m["test_acc"]} for name, m in runs.items()},
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,  # sample std over seeds
        "n": len(accs),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


@dataclass
class Run:
    """A finished run directory read back: its recipe and metrics."""

    path: Path
    recipe: Recipe
    metrics: dict[str, Any]

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def merged(self) -> Path:
        return self.path / MERGED


def load_run(path: str | Path) -> Run:
    """A run directory written by `autopeft train`; one line naming what is missing otherwise."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AutopeftError(f"run directory '{path}' does not exist; pass a directory written by `autopeft train`")
    for name in (RECIPE, METRICS, ADAPTER):
        if not (path / name).is_file():
            seeds = seed_runs(path)
            hint = f" (it holds the runs {', '.join(p.name for p in seeds)})" if seeds else ""
            raise AutopeftError(f"run directory '{path}' has no {name}{hint}; pass a directory written by "
                                "`autopeft train`")
    try:
        metrics = json.loads((path / METRICS).read_text())
    except json.JSONDecodeError as exc:
        raise AutopeftError(f"{path / METRICS} is not valid JSON ({exc}); the run directory is damaged") from None
    return Run(path=path, recipe=Recipe.load(path / RECIPE), metrics=metrics)


def seed_runs(path: str | Path) -> list[Path]:
    """The per-seed run directories of a several-seed run (empty for a single run)."""
    path = Path(path)
    found = [p for p in path.glob("seed*") if p.is_dir() and p.name[4:].isdigit() and (p / METRICS).is_file()]
    return sorted(found, key=lambda p: int(p.name[4:]))

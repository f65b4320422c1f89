"""Live progress of a search on the driver: done / running / pruned / failed and the best plan under budget."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.markup import escape

from autopeft.search.epoch_cap import EpochCount
from autopeft.search.trainable import DIVERGED


class SearchProgress(Callback):
    """A Ray Tune callback printing one line per finished trial and a running tally."""

    def __init__(self, total: int, max_epochs: int, budget_limit: int, console: Console | None = None,
                 offset: int = 0, epoch_cap: int | None = None, spent: int = 0):
        self.total, self.max_epochs, self.limit = total, max_epochs, budget_limit
        # --max-epochs, and the epochs spent: the finished trials' and each run of this driver's trials
        self.epoch_cap, self.count = epoch_cap, EpochCount(spent)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.counts = {"done": 0, "pruned": 0, "failed": 0}
        self.offset = offset
        self.best: tuple[float, int, str] | None = None
        self.running: set[str] = set()

    def __getstate__(self) -> dict:  # Ray pickles callbacks with the tuner; a console holds locks
        state = dict(self.__dict__)
        state["console"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.console = self.console or Console(stderr=True, soft_wrap=True)

    @staticmethod
    def _info(trial: Any) -> dict:
        return (trial.config or {}).get("autopeft", {})

    @property
    def spent(self) -> int:
        return self.count.spent

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.count.see(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trial.last_result or {}, error=False)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        node = f"node {r['node']}" if r.get("node") else "its node"
        again = "from its last checkpoint" if getattr(trial, "checkpoint", None) is not None else "from its start"
        self.console.print(f"trial {self._info(trial).get('number', '?')}: its worker on {node} was lost after "
                           f"{int(r.get('epoch', 0) or 0)} epoch(s); running it again {again} (retry "
                           f"{trial.run_metadata.num_failures} of {trial.max_failures}, --max-retries)",
                           highlight=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trial.last_result or {}, error=True)

    def _finish(self, trial: Any, r: dict, error: bool) -> None:
        self.running.discard(trial.trial_id)
        meta = self._info(trial)
        params, number = int(meta.get("peft_params", 0)), meta.get("number", "?")
        epochs = int(r.get("epoch", 0) or 0)
        self.count.see(trial.trial_id, r)
        reason = str(r.get("fail_reason") or "")
        if reason.startswith(DIVERGED) and not error:  # stopped, as the study records it (PRUNED), not failed
            self.counts["pruned"] += 1
            status = f"[yellow]stopped at epoch {epochs}[/], {escape(reason)}"
        elif error or reason:
            self.counts["failed"] += 1
            status = f"[red]FAIL[/] {escape(reason or 'worker failed')}"  # text, not markup
        elif epochs < self.max_epochs:
            self.counts["pruned"] += 1
            status = f"[yellow]stopped at epoch {epochs}[/] val_acc {r.get('val_acc', float('nan')):.4f}"
        else:
            self.counts["done"] += 1
            acc = float(r["val_acc"])
            status = f"[green]done[/] val_acc {acc:.4f}"
            if params <= self.limit and (self.best is None or (acc, -params) > (self.best[0], -self.best[1])):
                self.best = (acc, params, f"trial {number}")
        finished = sum(self.counts.values()) + self.offset
        best = f"best under budget {self.best[0]:.4f} ({self.best[2]}, {self.best[1]:,} params)" if self.best else ""
        if self.epoch_cap is not None:
            best = f"{self.spent:,}/{self.epoch_cap:,} epochs · {best}"
        self.console.print(
            f"trial {number}: {status} · {params:,} params · "
            f"[dim]{finished}/{self.total} finished · {len(self.running)} running · {self.counts['pruned']} "
            f"stopped early · {self.counts['failed']} failed · {best}[/]",
            highlight=False,
        )


class SupernetProgress(Callback):
    """A Ray Tune callback printing one line per epoch of a one-shot search's supernet."""

    def __init__(self, console: Console | None, epochs: int):
        self.console, self.epochs = console or Console(stderr=True, soft_wrap=True), epochs

    def __getstate__(self) -> dict:  # Ray pickles callbacks with the tuner; a console holds locks
        return {"epochs": self.epochs, "console": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.console = self.console or Console(stderr=True, soft_wrap=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("phase") != "supernet" or "val_acc" not in result:
            return
        then = "; scoring the candidates" if result["epoch"] == self.epochs else ""
        self.console.print(f"supernet epoch {result['epoch']}/{self.epochs}: val_acc {result['val_acc']:.4f} (one "
                           f"fixed sub-plan) · {result['seconds']:.0f} s{then}", highlight=False)

"""Search settings: flags over a study recipe over defaults, validated before anything is created or started."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from autopeft.defaults import DEFAULT_BACKBONE, DEFAULT_SPACES, MAX_FOLDS, STRATEGIES
from autopeft.errors import AutopeftError
from autopeft.objectives import OBJECTIVES
from autopeft.train_config import PRECISIONS
from autopeft.yamlfile import read_yaml

SAMPLERS = ("tpe", "tpe-nogroup", "nsga2", "gp", "random")
DEFAULT_CONCURRENCY = 2  # trials at once where Ray has no GPU and --concurrency is not given


@dataclass
class SearchSettings:
    """One search: what to adapt, under which budget, how many trials at which fidelity, where to keep the study."""

    study: str = "digits"
    dataset: str = "digits"
    budget: str = "2%"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    data_root: str | None = None
    space: str = ""  # "": the strategy's default space (DEFAULT_SPACES)
    trials: int = 20
    epochs: int = 10
    grace_epochs: int = 2
    early_stopping: bool = True  # False: every trial trains all `epochs` (no ASHA)
    reduction_factor: int = 2
    sampler: str = "tpe"
    objectives: tuple[str, ...] = ("acc", "params")
    # None: chosen from the GPUs Ray has (`autopeft.search.cluster.resolve_gpus`): without GPUs none and
    # DEFAULT_CONCURRENCY trials at once; with G GPUs `trials_per_gpu` trials on each of them, or, with
    # `concurrency` c given, each trial 1/ceil(c/G) of a GPU
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1.0
    concurrency: int | None = None
    trials_per_gpu: int = 2
    # DataLoader processes preparing each trial's images; None: one per CPU the trial reserves beyond its own
    # thread (`data_workers`)
    num_workers: int | None = None
    address: str | None = None
    storage: str | None = None
    resume: bool = False
    warm_start: str | None = None
    warm_storage: str | None = None
    seed: int = 0
    baselines: bool = True
    # each baseline is enqueued once per scale of its learning rate (the space's centre times it); early stopping
    # culls the ones that train badly
    baseline_lr_scales: tuple[float, ...] = (1.0,)
    # each baseline fixes only its own method's decisions and the sampler draws the rest of the plan (the budget
    # repair fits the whole): the baselines' methods combined with others, rather than alone
    baseline_mix: bool = False
    # the training epochs the study may spend (stopped and failed trials' too); None: no cap, `trials` ends it
    max_epochs: int | None = None
    # how the study's pick is made: `val` (the best val accuracy) or `cv:K`: the `select_top` best by val are
    # cross-validated over train+val in K folds after the trials, and the best mean fold accuracy is the pick
    select: str = "val"
    select_top: int = 3
    # how often a trial whose worker or node was lost (not one that failed by itself) is re-run before it is FAIL
    max_retries: int = 3
    # seconds the driver waits out an unreachable storage (a database restarting) before it stops for --resume
    storage_patience: float = 600.0
    # a trial silent (no epoch reported) for longer than 5× the longest epoch so far, and at least this many seconds,
    # has its worker restarted as after a lost node (`autopeft.search.stall`); 0: never
    stall_floor: float = 1800.0
    # every k-th epoch a trial saves its state (plan parameters, head, optimiser, RNG) through Ray Tune, so a re-run
    # after a lost worker goes on from there; 0: never. Where: `checkpoint_storage` (Ray's storage_path: a path every
    # node reaches, or an object-store URI); None: a temp dir of the driver, and no checkpoints on a cluster
    checkpoint_every: int = 1
    checkpoint_storage: str | None = None
    # `trials`: every trial trains its plan alone (the sampler proposes, ASHA stops); `oneshot`: a weight-sharing
    # supernet of the space is trained once, `candidates` sub-plans are scored on val with its shared weights, and
    # the best `finalists` train alone as the study's trials (`autopeft.search.oneshot`)
    strategy: str = "trials"
    finalists: int = 5
    candidates: int | None = None  # None: as many as one trial's training compute pays for (oneshot.candidates_for)
    supernet_epochs: int | None = None  # None: `epochs`, one full run's worth
    # what every trial computes at (autopeft.train.resolve_precision: auto is bf16 on a GPU that has it natively,
    # fp16 on one that does not, fp32 on the CPU); exported recipes keep it
    precision: str = "auto"
    # the input size in pixels the backbone runs at in every trial and in exported recipes (None: its pretraining
    # size); the budget's percentage and the study's backbone facts count the model at this size
    img_size: int | None = None
    # the settings the caller gave (flags, a recipe): what `--resume` compares with the study's stored settings and
    # keeps (`study_settings.resumed`); None: every setting counts as given (a SearchSettings built in code)
    given: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.given is not None:
            self.given = tuple(self.given)
        if isinstance(self.baseline_lr_scales, (str, int, float)):
            text = str(self.baseline_lr_scales)
            try:
                self.baseline_lr_scales = tuple(float(x) for x in text.split(",") if x.strip())
            except ValueError:
                raise AutopeftError(f"--baseline-lr-scales '{text}' is not valid; use numbers such as 0.5,1,2"
                                    ) from None
        self.baseline_lr_scales = tuple(float(x) for x in self.baseline_lr_scales)
        if not self.baseline_lr_scales or any(not x > 0 for x in self.baseline_lr_scales):
            raise AutopeftError(f"--baseline-lr-scales must be numbers > 0, got "
                                f"{','.join(f'{x:g}' for x in self.baseline_lr_scales) or 'none'}")
        if isinstance(self.objectives, str):
            self.objectives = tuple(o.strip() for o in self.objectives.split(",") if o.strip())
        self.objectives = tuple(self.objectives)
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or "acc" not in self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise AutopeftError(f"--objectives '{','.join(self.objectives)}' is not valid; use acc,params or "
                                "acc,params,overhead (acc is required, each at most once)")
        if self.strategy not in STRATEGIES:
            raise AutopeftError(f"unknown strategy '{self.strategy}'; choose one of: {', '.join(STRATEGIES)}")
        if not self.space:
            self.space = DEFAULT_SPACES[self.strategy]
        if self.strategy == "oneshot":
            if self.finalists < 1 or (self.candidates is not None and self.candidates < self.finalists):
                raise AutopeftError(f"--finalists must be >= 1 and at most --candidates, got {self.finalists} "
                                    f"finalists of {self.candidates} candidates")
            if self.supernet_epochs is not None and self.supernet_epochs < 1:
                raise AutopeftError(f"--supernet-epochs must be >= 1, got {self.supernet_epochs}")
            if self.warm_start:
                raise AutopeftError("--warm-start belongs to a trial search (--strategy trials); a one-shot search's "
                                    "trials are its supernet's finalists")
            self.trials = self.finalists  # the study's trials are the finalists
        if self.precision not in PRECISIONS:
            raise AutopeftError(f"unknown precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        if self.img_size is not None and (isinstance(self.img_size, bool) or not isinstance(self.img_size, int)
                                          or self.img_size < 1):
            raise AutopeftError(f"--img-size must be a positive integer (pixels), got {self.img_size!r}")
        if self.sampler not in SAMPLERS:
            raise AutopeftError(f"unknown sampler '{self.sampler}'; choose one of: {', '.join(SAMPLERS)}")
        checks = [
            (self.trials >= 1, f"--trials must be >= 1, got {self.trials}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.grace_epochs >= 1, f"--grace-epochs must be >= 1, got {self.grace_epochs}"),
            (self.reduction_factor >= 2, f"reduction_factor must be >= 2, got {self.reduction_factor}"),
            (self.concurrency is None or self.concurrency >= 1, f"--concurrency must be >= 1, got {self.concurrency}"),
            (self.trials_per_gpu >= 1, f"--trials-per-gpu must be >= 1, got {self.trials_per_gpu}"),
            (self.num_workers is None or self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.max_retries >= 0, f"--max-retries must be >= 0, got {self.max_retries}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.storage_patience >= 0, f"--storage-patience must be >= 0 seconds, got {self.storage_patience:g}"),
            (self.stall_floor >= 0, f"--stall-floor must be >= 0 seconds, got {self.stall_floor:g}"),
            (self.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}"),
            (self.gpus_per_trial is None or self.gpus_per_trial >= 0,
             f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}"),
            (self.max_epochs is None or self.max_epochs >= self.epochs,
             f"--max-epochs {self.max_epochs} is less than one trial's {self.epochs} epochs (--epochs): no trial "
             "could finish; give at least that many"),
        ]
        for ok, message in checks:
            if not ok:
                raise AutopeftError(message)
        self.cv_folds  # noqa: B018  (validates `select`)
        if self.select_top < 1:
            raise AutopeftError(f"--select-top must be >= 1, got {self.select_top}")
        # trials run in other working directories (and on other nodes): paths must not be relative
        for name in ("weights", "data_root", "checkpoint_storage"):
            value = getattr(self, name)
            if name == "checkpoint_storage" and value and "://" in value:
                continue  # an object-store URI
            if value:
                setattr(self, name, str(Path(value).expanduser().absolute()))
        if self.address and self.address.startswith("ray://"):
            raise AutopeftError(f"--address {self.address}: Ray Client (ray://) is not supported (Ray Tune pickles the "
                                "search's Optuna searcher, which keeps no storage connection across the client); run "
                                "the search on the cluster's head node with --address auto, or submit it there with "
                                "`ray job submit -- autopeft search ...`")
        if self.space and (self.space.endswith((".yaml", ".yml")) or os.sep in self.space):
            self.space = str(Path(self.space).expanduser().absolute())

    def defaulted(self, name: str) -> bool:
        """Whether setting `name` took its default, neither a flag nor the recipe giving it."""
        return self.given is not None and name not in self.given

    @property
    def cv_folds(self) -> int | None:
        """The folds of `select` (`cv:5` -> 5), None for `val`; AutopeftError for anything else."""
        text = str(self.select).strip()
        if text == "val":
            return None
        match = re.fullmatch(r"cv:(\d+)", text)
        if not match or not 2 <= int(match.group(1)) <= MAX_FOLDS:
            raise AutopeftError(f"--select '{text}' is not valid; use val or cv:K with K folds, 2 to {MAX_FOLDS} "
                                "(e.g. cv:5)")
        return int(match.group(1))

    @property
    def on_cluster(self) -> bool:
        """Whether the search joins a Ray cluster (`--address`, or $RAY_ADDRESS) rather than starting its own."""
        return bool(self.address or os.environ.get("RAY_ADDRESS"))

    @property
    def checkpoints_need_storage(self) -> bool:
        """Checkpoints are asked for on a cluster with no `checkpoint_storage` every node reaches: none are kept."""
        return bool(self.checkpoint_every) and not self.checkpoint_storage and self.on_cluster

    def checkpoints_to(self, workdir: str) -> str | None:
        """Where trial checkpoints go: `checkpoint_storage`, else `workdir` on this machine's own Ray; None when
        they are off (`checkpoint_every` 0, or `checkpoints_need_storage`)."""
        if not self.checkpoint_every or self.checkpoints_need_storage:
            return None
        return self.checkpoint_storage or workdir

    @property
    def data_workers(self) -> int:
        """DataLoader processes per trial: `num_workers`, else the CPUs the trial reserves beyond its training
        thread (--cpus-per-trial 4: three)."""
        return self.num_workers if self.num_workers is not None else max(0, int(self.cpus_per_trial) - 1)

    def local_cpus(self) -> int:
        """CPUs of a local Ray instance: the machine's, but at least what the requested concurrency needs."""
        concurrency = self.concurrency or DEFAULT_CONCURRENCY
        return max(int(os.cpu_count() or 1), int(self.cpus_per_trial * concurrency + 0.999))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A study recipe (YAML mapping of SearchSettings fields), validated key by key."""
    p = Path(path)
    data = read_yaml(p, "study recipe") or {}
    if not isinstance(data, dict):
        raise AutopeftError(f"study recipe '{p}' must be a mapping of settings")
    valid = {f.name for f in fields(SearchSettings)} - {"resume", "storage", "address", "given"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise AutopeftError(f"{p}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    if "budget" in data:
        data["budget"] = str(data["budget"])
    return data


def settings_from(
    recipe: str | Path | None, flags: dict[str, Any], defaults: dict[str, Any] | None = None
) -> SearchSettings:
    """Defaults (`defaults` over the built-in ones), overridden by the recipe, overridden by the flags that were
    given (not None). A recipe's study names its dataset: searching another dataset with it names the study after
    that one (vtab1k/dtd with the natural group's recipe is study vtab1k-dtd)."""
    values: dict[str, Any] = dict(defaults or {})
    from_recipe = load_recipe(recipe) if recipe else {}
    values.update(from_recipe)
    if recipe and "study" not in values:
        values["study"] = Path(recipe).stem
    if recipe and flags.get("dataset") is not None and values.get("dataset", flags["dataset"]) != flags["dataset"]:
        values.pop("study", None)
    given = {k: v for k, v in flags.items() if v is not None}
    values["given"] = tuple(sorted(set(from_recipe) | set(given)))
    values.update(given)
    if values.get("strategy") == "oneshot" and flags.get("trials") is not None:
        raise AutopeftError("--trials counts the trials of a trial search; a one-shot search trains its --finalists "
                            "(default 5) as its trials")
    if "study" not in values and values.get("dataset"):
        # a search of flowers102 is study `flowers102`, of vtab1k/cifar `vtab1k-cifar`, of a folder its name
        dataset = str(values["dataset"]).rstrip("/")
        name = Path(dataset).name if dataset.startswith(("/", ".", "~")) else dataset.replace("/", "-")
        values["study"] = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "study"
    try:
        return SearchSettings(**values)
    except TypeError as exc:
        raise AutopeftError(f"bad search settings: {exc}") from None

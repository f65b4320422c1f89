"""Defaults the command line and the data layer read before anything heavy is imported (no torch, no timm)."""

from __future__ import annotations

import os

from autopeft.errors import AutopeftError

BUNDLED_BACKBONE = "autopeft_tiny_vit"  # the tiny ViT shipped in autopeft/bundled, registered with timm there
DEFAULT_BACKBONE = BUNDLED_BACKBONE  # offline and small: the default of `train`, `search` and the tests
MAX_FOLDS = 20  # cross-validation folds `--select cv:K` accepts


def env_megabytes(name: str, default: float) -> int:
    """Bytes from the environment variable `name`, given in megabytes (`default` when unset)."""
    try:
        return int(float(os.environ.get(name, default)) * 2**20)
    except ValueError:
        raise AutopeftError(f"{name} must be a number of megabytes") from None

# How a search looks at plans (`--strategy`): every trial trains its plan alone, or a one-shot supernet ranks them
# first (autopeft.search.oneshot)
STRATEGIES = ("trials", "oneshot")
# the space each strategy searches unless --space says otherwise: `oneshot` is `unified` without the methods that
# cannot share weights in a supernet
DEFAULT_SPACES = {"trials": "unified", "oneshot": "oneshot"}

"""MATLAB files of the datasets that ship their labels and splits that way (Flowers102, Stanford Dogs and Cars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from autopeft.errors import AutopeftError


def loadmat(path: Path, keys: tuple[str, ...], title: str) -> dict[str, np.ndarray]:
    """The `keys` of a .mat file as at-least-1-D arrays (squeeze_me: a 1-entry list squeezes to a scalar)."""
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True)
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError) as exc:  # NotImplemented: v7.3 files
        raise AutopeftError(f"{path} is not a readable .mat file ({exc}); replace it with the original") from exc
    missing = [k for k in keys if k not in mat]
    if missing:
        raise AutopeftError(f"{path} lacks {', '.join(missing)}; replace it with the original {title} file")
    return {k: np.atleast_1d(np.asarray(mat[k])) for k in keys}

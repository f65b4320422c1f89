"""Reading the project's YAML inputs (plans, recipes, study recipes, search spaces): data only, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autopeft.errors import AutopeftError


def read_yaml(path: str | Path, what: str) -> Any:
    """The content of the YAML file `path`, parsed with `yaml.safe_load` (plain data: no tags that build objects).

    Args:
        path: the file.
        what: what the file is, for messages ("plan file", "recipe file", …).

    Raises:
        AutopeftError: one line naming the file when it is missing or not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise AutopeftError(f"{what} '{path}' does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AutopeftError(f"{what} '{path}' is not valid YAML: {' '.join(str(exc).split())[:200]}") from None

"""Which study recipe `autopeft search` runs: the one given, the one a registered dataset declares, or defaults.

A registered dataset declares its recipe (and whether its images are small) when it registers
(`register_dataset(name, recipe=..., small_images=...)`), so no code here knows a dataset by name. Recipes ship in
`autopeft/studies/` (package data; `studies/` in the repository links to them); a `./studies/<recipe>.yaml` of the
user's own (or of a checkout) is preferred, as for the embedded default study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopeft.data.base import dataset_info
from autopeft.defaults import BUNDLED_BACKBONE
from autopeft.errors import AutopeftError

PACKAGE_STUDIES = Path(__file__).resolve().parent.parent / "studies"
EMBEDDED_RECIPE = "digits"  # `autopeft search` without --recipe or --dataset
# Real images without a recipe of their own get the survey's backbone, never the bundled 32-px one by surprise.
REAL_IMAGE_BACKBONE = "vit_base_patch16_224.augreg_in21k"
REAL_IMAGE_DEFAULTS: dict[str, Any] = {"backbone": REAL_IMAGE_BACKBONE}


@dataclass(frozen=True)
class RecipeChoice:
    """The layers under the command-line flags, and the line that tells the user which were used.

    Attributes:
        path: the recipe file, or None for none.
        defaults: settings under the recipe (and under the flags), replacing the built-in defaults.
        line: one line naming the recipe used (the first line `autopeft search` prints).
    """

    path: str | None
    defaults: dict[str, Any] = field(default_factory=dict)
    line: str = ""


def recipe_file(name: str) -> Path:
    """`./studies/<name>.yaml` where there is one (a checkout, or the user's own copy), else the installed copy.

    Raises:
        AutopeftError: when neither exists (an installation without its package data).
    """
    local = Path("studies") / f"{name}.yaml"
    if local.is_file():
        return local
    shipped = PACKAGE_STUDIES / f"{name}.yaml"
    if not shipped.is_file():
        raise AutopeftError(f"study recipe {shipped} is missing from the installation; reinstall autopeft or pass "
                            "--recipe FILE")
    return shipped


def choose_recipe(recipe: str | None, dataset: str | None) -> RecipeChoice:
    """The recipe for `autopeft search [--recipe R] [--dataset D]`: R when given; else D's declared recipe; else
    the embedded default study when D is absent too; else defaults by D's kind (small images: the built-in ones,
    with the bundled backbone; anything else, a folder included: ViT-B/16 IN-21k)."""
    if recipe is not None:
        return RecipeChoice(recipe, line=f"recipe: {recipe} (given; flags override it)")
    if dataset is None:
        path = recipe_file(EMBEDDED_RECIPE)
        return RecipeChoice(str(path), line=f"recipe: {path} (the embedded default study)")
    info = dataset_info(dataset)
    if info is not None and info.recipe:
        path = recipe_file(info.recipe)
        return RecipeChoice(str(path), line=f"recipe: {path} (shipped for {dataset}; flags override it)")
    if info is not None and info.small_images:
        return RecipeChoice(None, line=f"recipe: none for {dataset}: built-in defaults, backbone {BUNDLED_BACKBONE}")
    return RecipeChoice(
        None,
        dict(REAL_IMAGE_DEFAULTS),
        f"recipe: none for {dataset}: defaults for real images, backbone {REAL_IMAGE_BACKBONE} unless --backbone",
    )

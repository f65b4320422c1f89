"""Budget parsing: one table of valid budgets with their exact counts, one of invalid ones with their messages."""

from __future__ import annotations

import math

import pytest

from autopeft.backbones import backbone_spec
from autopeft.budget import Budget, parse_budget
from autopeft.errors import AutopeftError

VIT_B = 85_798_656  # vit_base_patch16_224 without head


@pytest.fixture(scope="module")
def vit_b():
    spec = backbone_spec("vit_base_patch16_224")
    assert spec.backbone_params == VIT_B
    return spec


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("0.5%", math.floor(0.005 * VIT_B)),
        ("0.05%", math.floor(0.0005 * VIT_B)),
        ("2%", math.floor(0.02 * VIT_B)),
        ("100%", VIT_B),
        (" 1.5 % ", math.floor(0.015 * VIT_B)),
        ("0.2M", 200_000),
        ("0.2m", 200_000),
        ("150k", 150_000),
        ("150K", 150_000),
        ("1.2345k", 1_234),
        ("150000", 150_000),
        ("150_000", 150_000),
        ("1.5e5", 150_000),
        ("1e3k", 1_000_000),
        ("200M", 200_000_000),  # a count may exceed the backbone: it then constrains nothing
        ("1", 1),
    ],
)
def test_valid(vit_b, text: str, limit: int) -> None:
    budget = parse_budget(text, vit_b)
    assert budget.limit == limit
    assert budget.text == text.strip()
    assert budget.backbone_params == VIT_B
    assert budget.percent == pytest.approx(100 * limit / VIT_B)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "greater than zero"),
        ("0%", "greater than zero"),
        ("-1%", "greater than zero"),
        ("-5k", "greater than zero"),
        ("abc", "not valid"),
        ("", "not valid"),
        ("%", "not valid"),
        ("120%", "exceeds 100 %"),
        ("100.01%", "exceeds 100 %"),
        ("0.5%%", "not valid"),
        ("1e999", "finite"),
        ("1e999%", "finite"),
        ("nan", "not valid"),
        ("inf", "not valid"),
        ("0.5", "ambiguous"),
        ("1.5e-1", "ambiguous"),
        ("1e-9%", "rounds to 0"),
        ("0.0001k", "rounds to 0"),
        ("5 M M", "not valid"),
        ("1,000", "not valid"),
        ("0.5 percent", "not valid"),
    ],
)
def test_invalid(vit_b, text: str, message: str) -> None:
    with pytest.raises(AutopeftError) as info:
        parse_budget(text, vit_b)
    text_out = str(info.value)
    assert message in text_out
    assert "\n" not in text_out
    assert f"'{text}'" in text_out


def test_ambiguous_suggests_both_spellings(vit_b) -> None:
    with pytest.raises(AutopeftError, match=r"0\.5% .* 0\.5M"):
        parse_budget("0.5", vit_b)


def test_percent_is_relative_to_the_backbone() -> None:
    small = backbone_spec("test_vit")
    assert parse_budget("100%", small).limit == small.backbone_params
    assert parse_budget("50%", small).limit == small.backbone_params // 2
    assert parse_budget("1M", small).limit == 1_000_000


def test_budget_helpers(vit_b) -> None:
    budget = parse_budget("0.5%", vit_b)
    assert isinstance(budget, Budget)
    assert budget.fits(budget.limit) and not budget.fits(budget.limit + 1)
    assert budget.share(budget.limit) == 1.0 and budget.share(0) == 0.0
    assert "428,993" in budget.describe() and str(budget) == budget.describe()

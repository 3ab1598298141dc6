import pytest

from branchnas.budget import format_count, parse_budget
from branchnas.errors import BudgetError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10M", 10_000_000),
        ("2.5M", 2_500_000),
        ("500k", 500_000),
        ("500K", 500_000),
        ("1.2G", 1_200_000_000),
        ("1500000", 1_500_000),
        (" 3 M ", 3_000_000),
        ("1e6", 1_000_000),
        (".5k", 500),
        (2_000_000, 2_000_000),
    ],
)
def test_parse_budget_accepts_the_documented_forms(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "10MB", "1.2.3M", "-5M", "0", "M", "10 M params", True])
def test_parse_budget_rejects_malformed_input_and_names_the_accepted_forms(text):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "budget" in message
    if text not in ("-5M", "0"):
        assert "10M" in message and "500k" in message


@pytest.mark.parametrize(
    ("value", "text"),
    [(2_516_000, "2.52M"), (999, "999"), (1_000, "1k"), (1_200_000_000, "1.2G"), (45_300, "45.3k")],
)
def test_format_count(value, text):
    assert format_count(value) == text


def test_format_then_parse_round_trips_within_rounding():
    for value in (1234, 56_789, 2_345_678, 9_876_543_210):
        assert abs(parse_budget(format_count(value, digits=6)) - value) <= value * 1e-5


def test_a_percentage_is_a_share_of_the_reference_size():
    assert parse_budget("50%", reference=2_050_000) == 1_025_000
    assert parse_budget(" 12.5 % ", reference=800) == 100
    assert parse_budget("100%", reference=10) == 10
    assert parse_budget("50%") == 1  # validated only; resolved later against the all-separate size


@pytest.mark.parametrize("text", ["0%", "150%", "-5%", "x%", "%"])
def test_a_percentage_outside_0_100_is_rejected(text):
    with pytest.raises(BudgetError, match=r"percentage must lie in \(0, 100\]%"):
        parse_budget(text, reference=100)

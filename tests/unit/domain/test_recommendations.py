"""Recommendations: amounts and unallocated add up exactly, gaps first, no negatives, edge cases."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from overnight.domain.money import split_largest_remainder
from overnight.domain.recommendations import AllocationError, Candidate, Target, recommend, validate_targets


def cand(symbol: str, cls: str, score: str) -> Candidate:
    return Candidate(hash(symbol) % 10_000, symbol, cls, D(score), 1, "dividend_yield")


CANDIDATES = [
    cand("AAA", "Stocks", "20"), cand("AAB", "Stocks", "15"), cand("AAC", "Stocks", "10"), cand("AAD", "Stocks", "5"),
    cand("BBA", "Fixed income", "8"), cand("BBB", "Fixed income", "3"),
    cand("CCA", "ETFs", "1"),
]
TARGETS = [Target("Stocks", D(40), D(60)), Target("Fixed income", D(20), D(40)), Target("ETFs", D(10), D(30))]


@pytest.mark.parametrize(
    ("contribution", "values", "targets", "unallocated"),
    [
        pytest.param(D("1000.00"), {"Stocks": D(500), "Fixed income": D(500)}, TARGETS, D(0), id="one-class-below-min"),
        pytest.param(D("0.01"), {"Stocks": D(100)}, TARGETS, D(0), id="one-cent"),
        pytest.param(D("333.33"), {}, TARGETS, D(0), id="empty-portfolio"),
    ],
)
def test_amounts_are_cents_adding_up_to_contribution(contribution, values, targets, unallocated):
    plan = recommend(contribution, values, targets, CANDIDATES)
    assert plan.recommendations, "some recommendation expected"
    assert sum(r.amount for r in plan.recommendations) == contribution - unallocated
    assert plan.unallocated.amount == unallocated
    assert all(r.amount > 0 and r.amount == r.amount.quantize(D("0.01")) for r in plan.recommendations)


def test_all_classes_over_target_leave_the_contribution_unallocated():
    targets = [Target("Stocks", D(0), D(10)), Target("Fixed income", D(0), D(10)), Target("ETFs", D(0), D(10))]
    plan = recommend(D("1000"), {"Stocks": D(10_000), "Fixed income": D(10_000), "ETFs": D(10_000)}, targets, CANDIDATES)
    assert plan.recommendations == []
    assert (plan.unallocated.amount, plan.unallocated.reason) == (D("1000"), "targets_full")


def test_no_targets_leave_the_contribution_unallocated():
    plan = recommend(D("999.99"), {"Stocks": D(1)}, [], CANDIDATES)
    assert plan.recommendations == []
    assert (plan.unallocated.amount, plan.unallocated.reason) == (D("999.99"), "no_targets")


def test_money_goes_first_to_classes_below_minimum():
    # Stocks at 0% (min 40%), the others within range: a small contribution all goes to Stocks' best assets.
    recs = recommend(D("300.00"), {"Fixed income": D(8_000), "ETFs": D(2_000)}, TARGETS, CANDIDATES).recommendations
    assert {r.candidate.class_name for r in recs} == {"Stocks"}
    assert [r.candidate.symbol for r in recs] == ["AAA", "AAB", "AAC"]  # best three by score
    assert all(r.amount == D("100.00") for r in recs)
    assert recs[0].allocation_gap == D("50.00")  # mid 50% - current 0%


def test_below_minimum_split_in_proportion_to_gap():
    # total after = 1000; Stocks needs 400, Fixed income 200, ETFs 100 to reach min: 700 > 70 contribution
    recs = recommend(D("70.00"), {"Unlisted": D("930")}, TARGETS, CANDIDATES).recommendations
    per_class: dict[str, D] = {}
    for r in recs:
        per_class[r.candidate.class_name] = per_class.get(r.candidate.class_name, D(0)) + r.amount
    assert per_class == {"Stocks": D("40.00"), "Fixed income": D("20.00"), "ETFs": D("10.00")}


@pytest.mark.parametrize(
    ("contribution", "candidates", "reason"),
    [pytest.param(D(0), CANDIDATES, "no_contribution", id="zero-contribution"),
     pytest.param(D(100), [], "no_candidates", id="no-candidates")],
)
def test_nothing_to_recommend(contribution, candidates, reason):
    plan = recommend(contribution, {"Stocks": D(1)}, TARGETS, candidates)
    assert plan.recommendations == []
    assert (plan.unallocated.amount, plan.unallocated.reason) == (contribution, reason)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        pytest.param([Target("A", D(60), D(70)), Target("B", D(50), D(60))], "add up to 110", id="mins-over-100"),
        pytest.param([Target("A", D(50), D(40))], "not within", id="min-above-max"),
        pytest.param([Target("A", D(-1), D(40))], "not within", id="negative"),
    ],
)
def test_unusable_targets_raise(targets, message):
    with pytest.raises(AllocationError, match=message):
        validate_targets(targets)


@pytest.mark.parametrize(
    ("total", "exact", "unit", "expected"),
    [
        pytest.param(D("1.00"), {"a": D(1) / 3, "b": D(1) / 3, "c": D(1) / 3}, D("0.01"),
                     {"a": D("0.34"), "b": D("0.33"), "c": D("0.33")}, id="thirds"),
        pytest.param(D("10"), {"a": D(0), "b": D(10)}, D("0.01"), {"a": D(0), "b": D("10.00")}, id="zero-share"),
        pytest.param(D("10"), {"a": D("3.6"), "b": D("6.4")}, D(1), {"a": D(4), "b": D(6)}, id="yen-largest-remainder"),
        pytest.param(D("9"), {"a": D("3.6"), "b": D("6.4")}, D(1), {"a": D(3), "b": D(6)}, id="total-below-exact"),
    ],
)
def test_split_largest_remainder(total, exact, unit, expected):
    assert split_largest_remainder(total, exact, unit) == expected


def test_recommend_on_the_shortlist_answers_as_on_every_candidate():
    import random

    from overnight.domain.recommendations import shortlist

    rng = random.Random(11)
    classes = ["Stocks", "Fixed income", "ETFs", "Real estate"]
    shortened = 0
    for _ in range(300):
        pool = [cand(f"S{i:03d}", rng.choice(classes), rng.choice(["0", "5", "12.5", "-3", "20", "7"]))
                for i in rng.sample(range(500), rng.randint(1, 40))]
        targets = rng.choice([TARGETS, [], [Target("Real estate", D(0), D(100))]])
        values = {c: D(rng.randint(0, 5000)) for c in rng.sample(classes, rng.randint(0, 4))}
        best_first = sorted(pool, key=lambda c: (-c.score, c.symbol))
        short = shortlist(best_first, lambda c: c.class_name)
        shortened += len(short) < len(pool)
        assert recommend(D("1234.56"), values, targets, short) == recommend(D("1234.56"), values, targets, pool)
    assert shortened > 100


def test_the_policy_doc_names_this_version_and_every_reason_the_code_gives() -> None:
    """docs/allocation.md states the policy first: its version is the code's, and its table of reasons is exactly
    the reasons `recommend` can give (read from the code's source, so a new reason undocumented fails here)."""
    import inspect
    import re
    from pathlib import Path

    from overnight.domain import recommendations

    doc = (Path(__file__).parents[3] / "docs" / "allocation.md").read_text()
    assert f"(now `{recommendations.ALLOCATION_POLICY}`)" in doc
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    given = set(re.findall(r'Unallocated\([^,]+, "([a-z_]+)"', inspect.getsource(recommendations)))
    assert given and documented == given, (documented, given)

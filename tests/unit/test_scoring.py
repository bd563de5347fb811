"""Scoring rules: parsing errors name the rule; scores are exact decimals; missing data unscored."""

from __future__ import annotations

from decimal import Decimal

import pytest

from overnight.scoring import CriteriaError, parse_rules, score_asset

RULES = [
    {"metric": "dividend_yield", "op": ">=", "value": "4", "points": "10"},
    {"metric": "pe_ratio", "op": ">", "value": "30", "points": "-5"},
    {"metric": "roe", "op": "between", "value": ["10", "20"], "points": "2.5"},
]


@pytest.mark.parametrize(
    ("fundamentals", "expected", "count", "top"),
    [
        pytest.param({"dividend_yield": "4", "pe_ratio": "12", "roe": "15"}, Decimal("12.5"), 2, "dividend_yield",
                     id="boundary-ge-and-between"),
        pytest.param({"dividend_yield": "3.99", "pe_ratio": "30.01", "roe": "20"}, Decimal("-2.5"), 2, "pe_ratio",
                     id="negative-points-take-away"),
        pytest.param({"dividend_yield": "0", "pe_ratio": "30", "roe": "9.99"}, Decimal("0"), 0, "",
                     id="nothing-matches"),
        pytest.param({"dividend_yield": "0.1", "pe_ratio": "0.1", "roe": "10"}, Decimal("2.5"), 1, "roe",
                     id="between-inclusive-low"),
    ],
)
def test_score_is_exact_sum_of_matched_points(fundamentals, expected, count, top):
    score = score_asset(parse_rules(RULES), fundamentals, priced=True)
    assert score.score == expected
    assert isinstance(score.score, Decimal)
    assert score.criteria_count == count
    assert score.top_contributor == top


@pytest.mark.parametrize(
    ("fundamentals", "priced", "reason"),
    [
        pytest.param({"dividend_yield": "5", "pe_ratio": "10"}, True, "missing fundamental 'roe'", id="missing"),
        pytest.param({"dividend_yield": "5", "pe_ratio": "x", "roe": "1"}, True, "not a number", id="garbage"),
        pytest.param({"dividend_yield": "NaN", "pe_ratio": "1", "roe": "1"}, True, "not finite", id="nan"),
        pytest.param({"dividend_yield": "5", "pe_ratio": "10", "roe": "1"}, False, "no usable price", id="unpriced"),
    ],
)
def test_missing_data_leaves_asset_unscored_with_reason(fundamentals, priced, reason):
    score = score_asset(parse_rules(RULES), fundamentals, priced=priced)
    assert score.score is None
    assert reason in score.reason


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param([], "non-empty list", id="empty"),
        pytest.param("nope", "non-empty list", id="not-a-list"),
        pytest.param([{"metric": "pe", "op": "~", "value": "1", "points": "1"}], "rule 1: unknown op", id="bad-op"),
        pytest.param([RULES[0], {"metric": "pe", "op": ">", "value": "abc", "points": "1"}], "rule 2 'value'",
                     id="bad-value-names-rule"),
        pytest.param([{"metric": "pe", "op": "between", "value": ["5", "1"], "points": "1"}], "above high",
                     id="between-reversed"),
        pytest.param([{"metric": "", "op": ">", "value": "1", "points": "1"}], "'metric'", id="no-metric"),
        pytest.param([{"metric": "pe", "op": ">", "value": "1", "points": "Infinity"}], "finite", id="inf-points"),
    ],
)
def test_bad_criteria_raise_naming_the_rule(raw, message):
    with pytest.raises(CriteriaError, match=message.replace("(", r"\(")):
        parse_rules(raw)

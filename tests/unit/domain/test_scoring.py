"""Scoring rules: parsing errors name the rule; scores are exact decimals; missing data unscored."""

from __future__ import annotations

from decimal import Decimal

import pytest

from overnight.domain.scoring import CriteriaError, parse_rules, score_asset

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


def _random_case(rng):
    metrics = ["pe_ratio", "roe", "dividend_yield", "payout_ratio"]
    grid = ["0", "1", "1.5", "2.03", "10", "-3.3", "20", "30", "30.01", "4", "12.5"]
    rules = []
    for _ in range(rng.randint(1, 8)):
        op = rng.choice(["<", "<=", ">", ">=", "==", "between"])
        points = rng.choice(["10", "-5", "2.5", "3", "0", "-0.25", "1E+1", "7.0"])
        if op == "between":
            lo, hi = sorted(rng.sample(grid, 2), key=Decimal)
            rules.append({"metric": rng.choice(metrics), "op": op, "value": [lo, hi], "points": points})
        else:
            rules.append({"metric": rng.choice(metrics), "op": op, "value": rng.choice(grid), "points": points})
    assets = {}
    for aid in range(rng.randint(1, 30)):
        fundamentals = {}
        for m in metrics:
            roll = rng.random()
            if roll < 0.05:
                continue  # missing
            fundamentals[m] = (None if roll < 0.07 else "n/a" if roll < 0.09
                               else "1.23456789012345678" if roll < 0.11 else rng.choice(grid))
        assets[aid] = fundamentals
    return rules, assets


def test_score_rows_gives_what_score_asset_gives():
    import random

    from overnight.domain.scoring import FundamentalsTable, compile_rules, score_rows
    from overnight.night.loading import _decimals

    rng = random.Random(7)
    checked = vectorised = 0
    for _ in range(400):
        raw_rules, raw_assets = _random_case(rng)
        rules = parse_rules(raw_rules)
        assets = {aid: _decimals(f) for aid, f in raw_assets.items()}
        table = FundamentalsTable()
        table.add(dict(list(assets.items())[: len(assets) // 2]))  # tables grow chunk by chunk
        table.add(assets)
        order = sorted(assets, key=lambda a: rng.random())
        got = score_rows(compile_rules(rules), table, [table.rows[a] for a in order])
        for j, aid in enumerate(order):
            score = got.score(j) if got.texts[j] is not None else None
            want = score_asset(rules, assets[aid], priced=True)
            if score is None:  # left to score_asset: only when a value is missing or not exact as a float
                assert want.score is None or any(
                    len(str(assets[aid].get(r.metric))) > 15 for r in rules), (raw_rules, raw_assets[aid])
                continue
            vectorised += 1
            assert (str(score.score), got.texts[j], score.criteria_count, score.top_contributor) == (
                str(want.score), str(want.score), want.criteria_count, want.top_contributor), (raw_rules, raw_assets[aid])
            assert score.score == got.values[j]
            checked += 1
    assert vectorised > 2000 and checked == vectorised


def test_rules_with_more_digits_than_floats_hold_are_left_to_score_asset():
    from overnight.domain.scoring import FundamentalsTable, compile_rules, score_rows

    rules = parse_rules([{"metric": "roe", "op": ">", "value": "0.1000000000000000001", "points": "1"}])
    table = FundamentalsTable()
    table.add({1: {"roe": Decimal("0.1")}})
    assert score_rows(compile_rules(rules), table, [0]).texts == [None]


def test_score_many_scores_each_user_by_their_own_rules():
    import random

    from overnight.domain.scoring import FundamentalsTable, compile_rules, score_many
    from overnight.night.loading import _decimals

    rng = random.Random(13)
    checked = reasoned = 0
    for _ in range(60):
        cases = [_random_case(rng) for _ in range(rng.randint(1, 12))]
        table = FundamentalsTable()
        requests, expected = [], []
        for raw_rules, raw_assets in cases:
            offset = len(table.rows) + 1000
            assets = {offset + aid: _decimals(f) for aid, f in raw_assets.items()}
            table.add(assets)
            rules = parse_rules(raw_rules)
            ids = [a for a in assets if rng.random() < 0.8]
            requests.append((compile_rules(rules), [table.rows[a] for a in ids]))
            expected.append([score_asset(rules, assets[a], priced=True) for a in ids])
        for got, want in zip(score_many(requests, table), expected, strict=True):
            assert len(got.texts) == len(want)
            for j, w in enumerate(want):
                if got.texts[j] is None:
                    if j in got.reasons:
                        assert w.score is None and got.reasons[j] == w.reason
                        reasoned += 1
                    continue
                assert (got.texts[j], got.counts[j], got.tops[j]) == (str(w.score), w.criteria_count,
                                                                      w.top_contributor)
                assert got.score(j).score == w.score
                checked += 1
    assert checked > 1000 and reasoned > 50

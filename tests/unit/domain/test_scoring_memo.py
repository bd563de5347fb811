"""Shared criteria scored once per (criteria version, asset) per batch (`score_memoised`): every user's answer is
the one scoring that user alone gives (`score_many` of their request, whose own property test holds it to
`score_asset`), over random worlds: fundamentals with missing, non-numeric and too-long values, criteria versions
with whole and decimal points, several users per version and personal ones, chunk after chunk of one batch."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from overnight.domain.scoring import (
    FundamentalsTable,
    MemoEntry,
    compile_rules,
    parse_rules,
    score_asset,
    score_many,
    score_memoised,
)
from overnight.night.loading import _decimals

METRICS = ["pe_ratio", "roe", "dividend_yield", "payout_ratio"]
GRID = ["0", "1", "1.5", "2.03", "10", "-3.3", "20", "30", "30.01", "4", "12.5"]
POINTS = ["10", "-5", "2.5", "3", "0", "-0.25", "1E+1", "7.0"]
ODD = [None, "n/a", "1.23456789012345678"]  # missing, not a number, more digits than a float compares exactly

rules_st = st.lists(
    st.builds(lambda m, op, v, w, p: {"metric": m, "op": op, "points": p,
                                      "value": sorted([v, w], key=Decimal) if op == "between" else v},
              st.sampled_from(METRICS), st.sampled_from(["<", "<=", ">", ">=", "==", "between"]),
              st.sampled_from(GRID), st.sampled_from(GRID), st.sampled_from(POINTS)),
    min_size=1, max_size=8)
fundamentals_st = st.dictionaries(st.sampled_from(METRICS), st.one_of(st.sampled_from(GRID), st.sampled_from(ODD)))


@st.composite
def worlds(draw):
    """(assets, criteria versions, chunks of users as (version, asset ids))."""
    assets = {1000 + i: f for i, f in enumerate(draw(st.lists(fundamentals_st, min_size=1, max_size=25)))}
    versions = {f"v{i}": r for i, r in enumerate(draw(st.lists(rules_st, min_size=1, max_size=5)))}
    user = st.tuples(st.sampled_from(sorted(versions)), st.lists(st.sampled_from(sorted(assets)), unique=True,
                                                                  max_size=12))
    chunks = draw(st.lists(st.lists(user, max_size=10), min_size=1, max_size=4))
    return assets, versions, chunks


def _answer(got, j):
    """One position of a `RowScores`, as `finish_user` reads it."""
    if got.texts[j] is None:
        return None, got.reasons.get(j)
    score = got.score(j)
    return got.texts[j], str(score.score), score.criteria_count, score.top_contributor, got.values[j] == score.score


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_memoised_scores_equal_scoring_each_user_alone(world):
    raw_assets, raw_versions, chunks = world
    assets = {aid: _decimals(f) for aid, f in raw_assets.items()}
    rules = {k: parse_rules(r) for k, r in raw_versions.items()}
    compiled = {k: compile_rules(r) for k, r in rules.items()}  # one object per version, as the batch keeps them
    table = FundamentalsTable()
    memo: dict[str, dict[int, MemoEntry]] = {}
    for chunk in chunks:
        table.add(assets)
        requests = [(key, compiled[key], [table.rows[a] for a in ids]) for key, ids in chunk]
        before = set(memo)
        shared = {key for key, _ in chunk if sum(k == key for k, _ in chunk) > 1}
        got = score_memoised(requests, table, memo)
        assert set(memo) == before | shared  # a version one user of the chunk has, and no chunk before shared: not
        assert len(got) == len(requests)
        for (key, c, rows), (_, ids), mine in zip(requests, chunk, got, strict=True):
            alone = score_many([(c, rows)], table)[0]
            assert len(mine.texts) == len(rows)
            assert [_answer(mine, j) for j in range(len(rows))] == [_answer(alone, j) for j in range(len(rows))]
            for j, aid in enumerate(ids):  # and what the definition gives, where the vectorised pass answers
                want = score_asset(rules[key], assets[aid], priced=True)
                if mine.texts[j] is not None:
                    assert (mine.texts[j], mine.counts[j], mine.tops[j]) == (str(want.score), want.criteria_count,
                                                                             want.top_contributor)
                elif j in mine.reasons:
                    assert want.score is None and mine.reasons[j] == want.reason


def test_a_shared_version_is_scored_once_per_asset_across_chunks():
    """Two chunks of users sharing one version, and a personal one: the memo holds each (version, asset) once,
    the personal version never, and the second chunk scores nothing already in it."""
    rules = compile_rules(parse_rules([{"metric": "roe", "op": ">=", "value": "10", "points": "2.5"},
                                       {"metric": "pe_ratio", "op": "<", "value": "15", "points": "1"}]))
    personal = compile_rules(parse_rules([{"metric": "roe", "op": "<", "value": "10", "points": "3"}]))
    table = FundamentalsTable()
    table.add({1: {"roe": Decimal("12"), "pe_ratio": Decimal("20")}, 2: {"roe": Decimal("8"), "pe_ratio": Decimal("9")},
               3: {"pe_ratio": Decimal("9")}})
    memo: dict[str, dict[int, MemoEntry]] = {}
    first = score_memoised([("tpl", rules, [0, 1]), ("tpl", rules, [1, 2]), ("me", personal, [0, 1])], table, memo)
    assert memo == {"tpl": {0: ("2.5", Decimal("2.5"), 1, "roe", None), 1: ("1", Decimal("1"), 1, "pe_ratio", None),
                            2: (None, Decimal("1"), 1, "pe_ratio", "missing fundamental 'roe'")}}
    assert [(g.texts, g.counts, g.tops, g.reasons) for g in first] == [
        (["2.5", "1"], [1, 1], ["roe", "pe_ratio"], {}),
        (["1", None], [1, 1], ["pe_ratio", "pe_ratio"], {1: "missing fundamental 'roe'"}),
        (["0", "3"], [0, 1], ["", "roe"], {}),
    ]
    memo["tpl"][0] = ("marker", Decimal(99), 9, "x", None)  # answered from the memo, not scored again
    second = score_memoised([("tpl", rules, [2, 0])], table, memo)
    assert (second[0].texts, second[0].counts, second[0].reasons) == ([None, "marker"], [1, 9],
                                                                      {0: "missing fundamental 'roe'"})

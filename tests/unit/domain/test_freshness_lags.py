"""docs/freshness.md, "unusable": rates counted in ECB publications behind, quotes in sessions of their own market
behind, against cases counted by hand on the real calendars (tests/data/freshness_lags.yaml)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from overnight.domain import freshness

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "data" / "freshness_lags.yaml").read_text())["cases"]
RATES = [c for c in CASES if c["market"] == "ECB"]
QUOTES = [c for c in CASES if c["market"] != "ECB"]


def _at(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text  # the data file writes UTC
    return moment.astimezone(UTC)


def test_the_data_file_covers_the_cases_the_rules_are_about() -> None:
    ids = {c["id"] for c in CASES}
    assert len(ids) == len(CASES) == 24
    assert {"post-easter-tuesday", "ordinary-monday-with-fridays-rates", "october-clock-change", "after-1-may",
            "after-christmas", "after-new-year", "exactly-3-behind-over-easter", "4-behind-over-easter",
            "XSHG-spring-festival-before-its-first-session-after", "XNYS-suspended-6-sessions",
            "unknown-market-not-judged"} <= ids
    # the thresholds themselves: exactly the default (usable) and one more (unusable), on both sides
    assert {(c["behind"], c["usable"]) for c in RATES} >= {(3, True), (4, False)}
    assert {(c["behind"], c["usable"]) for c in QUOTES} >= {(5, True), (6, False)}


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in RATES])
def test_rates_are_unusable_only_more_than_3_publications_behind(case: dict[str, Any]) -> None:
    as_of, moment = _at(case["as_of"]), _at(case["moment"])
    assert freshness.expected_rates_date(moment) == date.fromisoformat(case["expected"])
    assert freshness.publications_behind(as_of, moment) == case["behind"]
    verdict = freshness.judge_rates(as_of, moment)
    assert (verdict.behind, verdict.usable, verdict.stale) == (case["behind"], case["usable"], case["behind"] >= 1)
    assert (verdict.expected - as_of) / timedelta(hours=1) == case["hours"]
    # the count is what the limit is compared with: allowed exactly that many, usable; one fewer, not
    assert freshness.judge_rates(as_of, moment, max_lag_publications=case["behind"]).usable is True
    if case["behind"]:
        assert freshness.judge_rates(as_of, moment, max_lag_publications=case["behind"] - 1).usable is False


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in QUOTES])
def test_quotes_are_unusable_only_more_than_5_sessions_of_their_market_behind(case: dict[str, Any]) -> None:
    as_of, moment, market = _at(case["as_of"]), _at(case["moment"]), case["market"]
    if case["hours"] is not None:
        assert (moment - as_of) / timedelta(hours=1) == case["hours"]
    judged = freshness.judge_quotes({"Q": (as_of, market)}, moment)
    if case["behind"] is None:  # a market exchange-calendars does not know: not judged
        assert judged == (set(), set()) and case["usable"] is True
        with pytest.raises(ValueError, match=f"unknown calendar code '{market}'"):
            freshness.sessions_closed_between(market, as_of, moment)
        return
    behind = case["behind"]
    assert freshness.sessions_closed_between(market, as_of, moment) == behind
    assert judged == ({"Q"} if 1 <= behind <= 5 else set(), set() if case["usable"] else {"Q"})
    assert case["usable"] is (behind <= 5)
    # stale (1 session or more behind) is still "older than the previous close of its market"
    assert (as_of < freshness.previous_close(market, moment)) is (behind >= 1)
    assert freshness.judge_quotes({"Q": (as_of, market)}, moment, max_lag_sessions=behind)[1] == set()
    if behind:
        assert freshness.judge_quotes({"Q": (as_of, market)}, moment, max_lag_sessions=behind - 1)[1] == {"Q"}


def test_quotes_of_several_markets_are_each_judged_on_their_own_calendar() -> None:
    moment = _at("2026-02-24T12:30:00+00:00")  # New York's run for Tuesday 24 February 2026
    quotes = {
        # Shanghai's Friday 13 February close: only Tuesday 24's session closed since (Spring Festival 16-23)
        "SH": (_at("2026-02-13T07:00:00+00:00"), "XSHG"),
        # New York's Friday 13 February close (16:00 EST): Tue 17 .. Mon 23 (Mon 16 is Presidents' Day) = 5
        "NY5": (_at("2026-02-13T21:00:00+00:00"), "XNYS"),
        # New York's Thursday 12 February close: Fri 13 too -> 6
        "NY6": (_at("2026-02-12T21:00:00+00:00"), "XNYS"),
        "??": (_at("2026-01-02T21:00:00+00:00"), "ZZZZ"),
    }
    assert freshness.judge_quotes(quotes, moment) == ({"SH", "NY5"}, {"NY6"})
    assert freshness.judge_quotes(quotes, moment, max_lag_sessions=0) == (set(), {"SH", "NY5", "NY6"})


def test_a_quote_after_the_moment_or_at_it_is_no_session_behind() -> None:
    moment = _at("2026-11-24T12:30:00+00:00")
    assert freshness.sessions_closed_between("XNYS", moment, moment) == 0
    assert freshness.sessions_closed_between("XNYS", moment + timedelta(days=3), moment) == 0
    with pytest.raises(ValueError, match="has no time zone"):
        freshness.sessions_closed_between("XNYS", datetime(2026, 11, 20, 21), moment)


def test_publications_behind_counts_every_publication_day_over_years() -> None:
    # 2026 has 261 weekdays, of which 5 are TARGET closing days (1 Jan Thu, Good Friday 3 Apr, Easter Monday
    # 6 Apr, 1 May Fri, 25 Dec Fri; 26 Dec is a Saturday): 256 publications. From 31 December 2025's rates, the
    # expected publication at 1 January 2027 (a closing day, Friday) 12:00 UTC is 31 December 2026's.
    as_of = _at("2025-12-31T15:00:00+00:00")
    assert freshness.publications_behind(as_of, _at("2027-01-01T12:00:00+00:00")) == 256
    # rates dated later than the expected publication are none behind
    assert freshness.publications_behind(_at("2026-04-07T14:00:00+00:00"), _at("2026-04-07T15:59:00+00:00")) == 0

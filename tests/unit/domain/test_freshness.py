"""docs/freshness.md on the real calendars: the ECB's closing days (written by hand in tests/data), the
markets' real sessions (exchange-calendars), and times worked out by hand from the exchanges' hours."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from overnight.domain import freshness, sessions
from overnight.domain.markets import get_market

DATA = Path(__file__).resolve().parents[2] / "data" / "ecb_target_closing_days_2026_2030.txt"
BERLIN = ZoneInfo("Europe/Berlin")
MARKETS = ("BVMF", "XLON", "XNYS", "XTKS")


def _closing_days() -> set[date]:
    """The ECB's TARGET closing days of 2026-2030 as written by hand in the data file."""
    return {date.fromisoformat(line.split()[0]) for line in DATA.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


CLOSED = _closing_days()


def _published(d: date) -> bool:
    """The oracle: the ECB publishes on weekdays that are not in the hand-written list."""
    return d.weekday() < 5 and d not in CLOSED


def _last_publication_before(d: date) -> date:
    d -= timedelta(days=1)
    while not _published(d):
        d -= timedelta(days=1)
    return d


def _dated(d: date) -> datetime:
    """How the provider dates rates of day `d`: 16:00 Europe/Berlin."""
    return datetime.combine(d, time(16), tzinfo=BERLIN).astimezone(UTC)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize("year", [2026, 2027, 2028, 2029, 2030])
def test_target_closing_days_are_the_ecbs(year: int) -> None:
    days = [date(year, 1, 1) + timedelta(days=i) for i in range(366 if year % 4 == 0 else 365)]
    closed = {d for d in days if d.weekday() < 5 and not freshness.is_ecb_publication_day(d)}
    assert closed == {d for d in CLOSED if d.year == year and d.weekday() < 5}
    assert not any(freshness.is_ecb_publication_day(d) for d in CLOSED if d.year == year)
    assert all(not freshness.is_ecb_publication_day(d) for d in days if d.weekday() >= 5)


def _runs(dates: set[date]) -> list[tuple[str, date, datetime]]:
    """Every run of the four markets for a session on one of `dates` (the real sessions), with its time."""
    out = []
    for code in MARKETS:
        lead = get_market(code).lead
        for s in sessions.sessions_between(code, date(2026, 1, 1), date(2026, 12, 31)):
            if s in dates:
                out.append((code, s, sessions.run_time(code, lead, s)))
    return out


MONDAYS_2026 = {date(2026, 1, 5) + timedelta(weeks=i) for i in range(52)}
# The ECB's weekday closing days of 2026 and the first weekday after each.
HOLIDAYS_2026 = {d for d in CLOSED if d.year == 2026 and d.weekday() < 5}
AFTER_HOLIDAYS_2026 = {min(d + timedelta(days=i) for i in range(1, 6) if (d + timedelta(days=i)).weekday() < 5
                           and d + timedelta(days=i) not in CLOSED) for d in HOLIDAYS_2026}


@pytest.mark.parametrize("days", [pytest.param(MONDAYS_2026, id="every-monday-2026"),
                                  pytest.param(HOLIDAYS_2026 | AFTER_HOLIDAYS_2026, id="ecb-holidays-2026")])
def test_rates_of_the_last_publication_are_fresh_and_the_one_before_is_stale(days: set[date]) -> None:
    # Every market's run comes before 16:00 Berlin on its session's date, so the newest rates it can have
    # are those of the last ECB publication day before that date.
    runs = _runs(days)
    assert {code for code, _, _ in runs} == set(MARKETS) and len(runs) > len(days)
    wrong = []
    for code, session, moment in runs:
        newest = _last_publication_before(session)
        older = _last_publication_before(newest)
        fresh, behind = freshness.judge_rates(_dated(newest), moment), freshness.judge_rates(_dated(older), moment)
        if fresh.stale or not fresh.usable or not behind.stale or not behind.usable:
            wrong.append((code, session, newest, fresh.stale, behind.stale))
    assert wrong == []


@pytest.mark.parametrize(("code", "session", "rates_date"), [
    pytest.param("XNYS", date(2026, 4, 6), date(2026, 4, 2), id="XNYS-easter-monday"),
    pytest.param("XTKS", date(2026, 4, 6), date(2026, 4, 2), id="XTKS-easter-monday"),
    pytest.param("XLON", date(2026, 4, 7), date(2026, 4, 2), id="XLON-tuesday-after-easter"),
    pytest.param("XNYS", date(2026, 4, 7), date(2026, 4, 2), id="XNYS-tuesday-after-easter"),
    pytest.param("BVMF", date(2026, 5, 4), date(2026, 4, 30), id="BVMF-after-labour-day"),
    pytest.param("XNYS", date(2026, 12, 28), date(2026, 12, 24), id="XNYS-after-christmas"),
    pytest.param("XLON", date(2027, 1, 4), date(2026, 12, 31), id="XLON-after-new-year"),
    pytest.param("XNYS", date(2026, 11, 23), date(2026, 11, 20), id="XNYS-monday"),
])
def test_expected_publication_of_a_run(code: str, session: date, rates_date: date) -> None:
    moment = sessions.run_time(code, get_market(code).lead, session)
    assert freshness.expected_rates_date(moment) == rates_date


@pytest.mark.parametrize(("moment", "rates_date"), [
    pytest.param("2026-04-02T15:59", date(2026, 4, 1), id="thursday-17:59-berlin-within-margin"),
    pytest.param("2026-04-02T16:00", date(2026, 4, 2), id="thursday-18:00-berlin-margin-over"),
    pytest.param("2026-04-03T12:00", date(2026, 4, 2), id="good-friday"),
    pytest.param("2026-04-06T23:00", date(2026, 4, 2), id="easter-monday-night"),
    pytest.param("2026-04-07T16:00", date(2026, 4, 7), id="tuesday-after-publication"),
])
def test_margin_after_the_16_00_publication(moment: str, rates_date: date) -> None:
    assert freshness.expected_rates_date(_utc(moment), timedelta(hours=2)) == rates_date


def test_rates_far_behind_the_expected_publication_are_unusable() -> None:
    moment = _utc("2026-04-07T11:30")  # XNYS's run: expected publication 2026-04-02 14:00 UTC
    # 31 March's: 1 and 2 April published since, 2 behind; 30 March's: 3 behind (stale, usable)
    assert (freshness.judge_rates(_dated(date(2026, 3, 31)), moment).behind, freshness.judge_rates(
        _dated(date(2026, 3, 31)), moment).usable) == (2, True)
    assert freshness.judge_rates(_dated(date(2026, 3, 31)), moment).stale is True
    assert freshness.judge_rates(_dated(date(2026, 3, 30)), moment).usable is True
    gone = freshness.judge_rates(_dated(date(2026, 3, 27)), moment)  # 30, 31 March, 1, 2 April: 4 behind, more than 3
    assert (gone.behind, gone.usable) == (4, False)
    assert gone.reason == (
        "rates as of 2026-03-27T15:00:00+00:00 are 4 ECB publications behind the expected publication of "
        "2026-04-02T14:00:00+00:00, more than the allowed lag of 3 (OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS); fix the "
        "rates provider and clear the run")


def test_prices_are_judged_against_the_previous_close_of_their_market() -> None:
    quotes = {
        "NY-MON-CLOSE": (_utc("2026-04-06T20:00"), "XNYS"),  # NYSE closes 16:00 EDT; open on Easter Monday
        "NY-THU-CLOSE": (_utc("2026-04-02T20:00"), "XNYS"),
        "LN-THU-CLOSE": (_utc("2026-04-02T15:30"), "XLON"),  # LSE closes 16:30 BST; Easter Monday closed
        "LN-WED-CLOSE": (_utc("2026-04-01T15:30"), "XLON"),
        "TK-MON-CLOSE": (_utc("2026-04-06T06:30"), "XTKS"),  # TSE closes 15:30 JST, open on Easter Monday
        "TK-FRI-CLOSE": (_utc("2026-04-03T06:30"), "XTKS"),
        # 26, 27, 30, 31 March, 1, 2, 6 April closed since (Good Friday closed): 7 sessions, beyond the 5 default
        "ANCIENT": (_utc("2026-03-25T20:00"), "XNYS"),
    }
    stale, unusable = freshness.judge_quotes(quotes, _utc("2026-04-07T05:00"))  # XLON's run on Tuesday
    assert stale == {"NY-THU-CLOSE", "LN-WED-CLOSE", "TK-FRI-CLOSE"}
    assert unusable == {"ANCIENT"}
    # Monday 11:30 UTC (XNYS's Easter Monday run): Thursday's NYSE close is the previous one (Good Friday
    # closed), Wednesday's is not
    stale, _ = freshness.judge_quotes({"THU": quotes["NY-THU-CLOSE"], "WED": (_utc("2026-04-01T20:00"), "XNYS")},
                                      _utc("2026-04-06T11:30"))
    assert stale == {"WED"}


@pytest.mark.parametrize(("code", "session", "until"), [
    pytest.param("XNYS", date(2026, 4, 2), "2026-04-06T13:30", id="XNYS-over-easter"),  # run 11:30 UTC + 2 h
    pytest.param("XLON", date(2026, 4, 2), "2026-04-07T07:00", id="XLON-over-easter"),  # run 05:00 UTC + 2 h
    pytest.param("XTKS", date(2026, 4, 3), "2026-04-06T00:00", id="XTKS-weekend"),  # run Sun 22:00 UTC + 2 h
    pytest.param("BVMF", date(2026, 11, 19), "2026-11-23T13:00", id="BVMF-holiday-weekend"),  # 20 Nov closed; 10:00 BRT = 13:00 UTC
    pytest.param("XNYS", date(2026, 11, 20), "2026-11-23T14:30", id="XNYS-weekend"),  # EST: run 12:30 UTC
])
def test_a_document_is_fresh_until_its_markets_next_run_plus_grace(code: str, session: date, until: str) -> None:
    assert freshness.document_deadline(code, get_market(code).lead, session) == _utc(until)


def test_cache_ttl_setting() -> None:
    now = _utc("2026-11-20T15:00")
    assert freshness.cache_ttl_seconds(None, None, now) == 24 * 3600
    assert freshness.cache_ttl_seconds("600", None, now) == 600
    assert freshness.cache_ttl_seconds("next-run", _utc("2026-11-23T14:30"), now) == (2 * 24 + 23) * 3600 + 1800
    assert freshness.cache_ttl_seconds("next-run", now + timedelta(minutes=5), now) == 3600  # at least 1 h
    with pytest.raises(freshness.FreshnessConfigError, match="OVERNIGHT_CACHE_TTL='soon': expected a positive"):
        freshness.cache_ttl_seconds("soon", None, now)


LAGS = (("OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS", "ECB publications", 3, freshness.max_rates_lag_publications),
        ("OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "sessions", 5, freshness.max_price_lag_sessions))
RETIRED = (("OVERNIGHT_MAX_RATES_AGE_HOURS", "OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS", "ECB publications", 3),
           ("OVERNIGHT_MAX_PRICE_AGE_HOURS", "OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "sessions of the quote's market", 5))
SETTINGS = ("OVERNIGHT_CACHE_TTL", "OVERNIGHT_RATES_MARGIN_MINUTES", "OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS",
            "OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "OVERNIGHT_FRESHNESS_GRACE_MINUTES", "OVERNIGHT_MAX_RATES_AGE_HOURS",
            "OVERNIGHT_MAX_PRICE_AGE_HOURS")


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_and_their_errors(no_settings: pytest.MonkeyPatch) -> None:
    monkeypatch = no_settings
    assert (freshness.max_rates_lag_publications(), freshness.max_price_lag_sessions()) == (3, 5)  # the defaults
    monkeypatch.setenv("OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "8")
    monkeypatch.setenv("OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS", " 0 ")
    monkeypatch.setenv("OVERNIGHT_RATES_MARGIN_MINUTES", "30")
    assert (freshness.max_price_lag_sessions(), freshness.max_rates_lag_publications(), freshness.rates_margin()) == (
        8, 0, timedelta(minutes=30))
    monkeypatch.setenv("OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "260")  # the most accepted
    monkeypatch.setenv("OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS", "  ")  # blank: the default
    assert (freshness.max_price_lag_sessions(), freshness.max_rates_lag_publications()) == (260, 3)
    monkeypatch.setenv("OVERNIGHT_FRESHNESS_GRACE_MINUTES", "two hours")
    with pytest.raises(freshness.FreshnessConfigError,
                       match=r"OVERNIGHT_FRESHNESS_GRACE_MINUTES='two hours': expected a finite number of minutes "
                             r">= 0 \(the default is OVERNIGHT_FRESHNESS_GRACE_MINUTES=120\)"):
        freshness.grace()
    for endless in ("inf", "nan", "1e300"):  # not a duration (1e300 min overflows timedelta)
        monkeypatch.setenv("OVERNIGHT_RATES_MARGIN_MINUTES", endless)
        with pytest.raises(freshness.FreshnessConfigError, match=f"OVERNIGHT_RATES_MARGIN_MINUTES='{endless}'"):
            freshness.rates_margin()


@pytest.mark.parametrize(("name", "unit", "default", "read"), [pytest.param(*lag, id=lag[0]) for lag in LAGS])
@pytest.mark.parametrize("bad", ["-1", "three", "2.5", "3.0", "261", "99999999999999999999", "1e3", "1_000", "+3",
                                 "3 days", "\u0663"])  # the last: an Arabic-Indic three, a digit to int() but not here
def test_a_bad_lag_setting_names_the_variable_the_value_and_the_default(
        no_settings: pytest.MonkeyPatch, name: str, unit: str, default: int, read: Any, bad: str) -> None:
    no_settings.setenv(name, bad)
    message = (f"{name}={bad!r}: expected a whole number of {unit} from 0 to 260 (the default is {name}={default}); "
               "fix it or unset it for the default")
    with pytest.raises(freshness.FreshnessConfigError) as info:
        read()
    assert str(info.value) == message
    assert freshness.settings_problems() == [message]


@pytest.mark.parametrize(("old", "new", "unit", "default"), [pytest.param(*r, id=r[0]) for r in RETIRED])
def test_the_hour_settings_are_refused_naming_the_one_to_use_instead(
        no_settings: pytest.MonkeyPatch, old: str, new: str, unit: str, default: int) -> None:
    read = dict((n, r) for n, _, _, r in LAGS)[new]
    no_settings.setenv(old, "   ")  # blank is unset, as for every setting
    assert read() == default and freshness.settings_problems() == []
    no_settings.setenv(old, "72")
    no_settings.setenv(new, "4")  # a good new value does not make the old one harmless
    message = (f"{old}='72' is no longer read: lags are counted in {unit}, not hours; unset {old} and set {new} "
               f"instead (a whole number of {unit}, the default is {new}={default}; docs/freshness.md)")
    with pytest.raises(freshness.FreshnessConfigError) as info:
        read()
    assert str(info.value) == message
    assert freshness.settings_problems() == [message]
    with pytest.raises(freshness.FreshnessConfigError) as checked:
        freshness.check_settings()
    assert str(checked.value) == f"1 bad freshness setting(s) (docs/freshness.md): {message}"


def test_settings_problems_name_every_bad_setting_before_a_run(no_settings: pytest.MonkeyPatch) -> None:
    monkeypatch = no_settings
    assert freshness.settings_problems() == []
    freshness.check_settings()  # nothing to say
    monkeypatch.setenv("OVERNIGHT_CACHE_TTL", "next-run")
    monkeypatch.setenv("OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "5")
    assert freshness.settings_problems() == []
    monkeypatch.setenv("OVERNIGHT_CACHE_TTL", "1 day")
    monkeypatch.setenv("OVERNIGHT_RATES_MARGIN_MINUTES", "-5")
    monkeypatch.setenv("OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "ten")
    monkeypatch.setenv("OVERNIGHT_MAX_RATES_AGE_HOURS", "96")
    assert freshness.settings_problems() == [
        "OVERNIGHT_RATES_MARGIN_MINUTES='-5': expected a finite number of minutes >= 0 (the default is "
        "OVERNIGHT_RATES_MARGIN_MINUTES=120); fix it or unset it for the default",
        "OVERNIGHT_MAX_RATES_AGE_HOURS='96' is no longer read: lags are counted in ECB publications, not hours; unset "
        "OVERNIGHT_MAX_RATES_AGE_HOURS and set OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS instead (a whole number of ECB "
        "publications, the default is OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS=3; docs/freshness.md)",
        "OVERNIGHT_MAX_PRICE_LAG_SESSIONS='ten': expected a whole number of sessions from 0 to 260 (the default is "
        "OVERNIGHT_MAX_PRICE_LAG_SESSIONS=5); fix it or unset it for the default",
        "OVERNIGHT_CACHE_TTL='1 day': expected a positive number of seconds or 'next-run' (unset for the default 24 h)",
    ]
    with pytest.raises(freshness.FreshnessConfigError, match=r"^4 bad freshness setting\(s\)") as info:
        freshness.check_settings()
    for name in ("OVERNIGHT_RATES_MARGIN_MINUTES", "OVERNIGHT_MAX_RATES_AGE_HOURS", "OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS",
                 "OVERNIGHT_MAX_PRICE_LAG_SESSIONS", "OVERNIGHT_CACHE_TTL"):
        assert name in str(info.value)

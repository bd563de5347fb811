"""Tests for overnight.domain.sessions: opens in UTC across DST/holidays/late opens, run times, user-to-market rule."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import exchange_calendars
import pytest

from overnight.domain import sessions
from overnight.domain.sessions import (
    calendar_horizon,
    earlier_markets,
    get_calendar,
    horizon_warnings,
    is_session,
    next_run,
    run_time,
    serving_market,
    session_for_run,
    session_open_utc,
    sessions_between,
    validate_session_date,
)

pytestmark = pytest.mark.filterwarnings("ignore:Series.values returning an ndarray")

DEFAULT_CODES = ("BVMF", "XLON", "XNYS", "XTKS")
TWO_HOURS = timedelta(hours=2)
NINETY_MINUTES = timedelta(minutes=90)
YEAR_START, YEAR_END = date(2026, 1, 1), date(2026, 12, 31)


def utc(*args: int) -> datetime:
    """An aware UTC datetime."""
    return datetime(*args, tzinfo=UTC)


def independent_opens(code: str, start: date, end: date) -> dict[date, datetime]:
    """Session opens straight from a fresh exchange_calendars calendar (not via overnight.domain.sessions)."""
    cal = exchange_calendars.get_calendar(code, start=start.isoformat(), end=end.isoformat())
    return {ts.date(): o.to_pydatetime() for ts, o in cal.schedule["open"].items()}


# Expected opens checked by hand against the exchanges' published hours:
# NYSE 09:30 New York (EST=UTC-5, EDT=UTC-4 from 2026-03-08 to 2026-11-01); LSE 08:00 London (BST from
# 2026-03-29 to 2026-10-25); B3 10:00 Sao Paulo (UTC-3, no DST), 13:00 on Ash Wednesday; TSE 09:00 Tokyo (UTC+9).
KNOWN_OPENS = [
    pytest.param("XNYS", date(2026, 3, 6), utc(2026, 3, 6, 14, 30), id="XNYS-before-US-DST"),
    pytest.param("XNYS", date(2026, 3, 9), utc(2026, 3, 9, 13, 30), id="XNYS-first-US-DST-day"),
    pytest.param("XNYS", date(2026, 10, 30), utc(2026, 10, 30, 13, 30), id="XNYS-last-EDT-day"),
    pytest.param("XNYS", date(2026, 11, 2), utc(2026, 11, 2, 14, 30), id="XNYS-first-EST-day"),
    pytest.param("XNYS", date(2026, 11, 27), utc(2026, 11, 27, 14, 30), id="XNYS-day-after-thanksgiving"),
    pytest.param("XLON", date(2026, 3, 27), utc(2026, 3, 27, 8, 0), id="XLON-before-BST"),
    pytest.param("XLON", date(2026, 3, 30), utc(2026, 3, 30, 7, 0), id="XLON-first-BST-day"),
    pytest.param("XLON", date(2026, 10, 23), utc(2026, 10, 23, 7, 0), id="XLON-last-BST-day"),
    pytest.param("XLON", date(2026, 10, 26), utc(2026, 10, 26, 8, 0), id="XLON-first-GMT-day"),
    pytest.param("BVMF", date(2026, 2, 13), utc(2026, 2, 13, 13, 0), id="BVMF-normal"),
    pytest.param("BVMF", date(2026, 2, 18), utc(2026, 2, 18, 16, 0), id="BVMF-ash-wednesday-late-open"),
    pytest.param("BVMF", date(2026, 2, 19), utc(2026, 2, 19, 13, 0), id="BVMF-after-ash-wednesday"),
    pytest.param("XTKS", date(2026, 3, 9), utc(2026, 3, 9, 0, 0), id="XTKS-midnight-utc"),
]


@pytest.mark.parametrize(("code", "day", "expected"), KNOWN_OPENS)
def test_known_opens_and_runs(code: str, day: date, expected: datetime) -> None:
    opens = session_open_utc(code, day)
    assert opens == expected
    assert opens.tzinfo is not None and opens.utcoffset() == timedelta(0)
    assert is_session(code, day)
    assert run_time(code, TWO_HOURS, day) == expected - TWO_HOURS
    assert run_time(code, NINETY_MINUTES, day) == expected - NINETY_MINUTES


def test_tokyo_runs_on_the_previous_utc_day() -> None:
    assert run_time("XTKS", TWO_HOURS, date(2026, 3, 9)) == utc(2026, 3, 8, 22, 0)
    assert next_run("XTKS", TWO_HOURS, utc(2026, 3, 7, 0, 0), inclusive=False) == (
        date(2026, 3, 9),
        utc(2026, 3, 8, 22, 0),
    )


HOLIDAYS = [
    pytest.param("XNYS", date(2026, 7, 3), date(2026, 7, 2), date(2026, 7, 6), id="XNYS-independence-observed"),
    pytest.param("XNYS", date(2026, 11, 26), date(2026, 11, 25), date(2026, 11, 27), id="XNYS-thanksgiving"),
    pytest.param("XLON", date(2026, 8, 31), date(2026, 8, 28), date(2026, 9, 1), id="XLON-summer-bank-holiday"),
    pytest.param("XLON", date(2026, 12, 28), date(2026, 12, 24), date(2026, 12, 29), id="XLON-boxing-day-observed"),
    pytest.param("BVMF", date(2026, 2, 16), date(2026, 2, 13), date(2026, 2, 18), id="BVMF-carnival-monday"),
    pytest.param("BVMF", date(2026, 2, 17), date(2026, 2, 13), date(2026, 2, 18), id="BVMF-carnival-tuesday"),
    pytest.param("XTKS", date(2026, 11, 23), date(2026, 11, 20), date(2026, 11, 24), id="XTKS-labour-thanksgiving"),
    pytest.param("XTKS", date(2026, 1, 2), date(2025, 12, 30), date(2026, 1, 5), id="XTKS-new-year"),
    pytest.param("XNYS", date(2026, 3, 7), date(2026, 3, 6), date(2026, 3, 9), id="XNYS-saturday"),
]


@pytest.mark.parametrize(("code", "day", "before", "after"), HOLIDAYS)
def test_holidays_are_not_sessions(code: str, day: date, before: date, after: date) -> None:
    assert not is_session(code, day)
    with pytest.raises(ValueError) as err:
        session_open_utc(code, day)
    assert f"{day} is not a {code} session" in str(err.value)
    assert f"nearest sessions: {before} before, {after} after" in str(err.value)
    # the next run after the previous session's run is the following session's: the holiday is skipped
    assert next_run(code, TWO_HOURS, run_time(code, TWO_HOURS, before), inclusive=False) == (
        after,
        session_open_utc(code, after) - TWO_HOURS,
    )


def test_sessions_between_is_inclusive_and_skips_holidays() -> None:
    assert sessions_between("XNYS", date(2026, 6, 29), date(2026, 7, 8)) == [
        date(2026, 6, 29),
        date(2026, 6, 30),
        date(2026, 7, 1),
        date(2026, 7, 2),
        date(2026, 7, 6),
        date(2026, 7, 7),
        date(2026, 7, 8),
    ]
    assert sessions_between("XNYS", date(2026, 7, 3), date(2026, 7, 5)) == []
    with pytest.raises(ValueError, match="start 2026-07-08 is after end 2026-07-01"):
        sessions_between("XNYS", date(2026, 7, 8), date(2026, 7, 1))


@pytest.mark.parametrize("code", DEFAULT_CODES)
@pytest.mark.parametrize("lead", [TWO_HOURS, NINETY_MINUTES], ids=["2h", "90m"])
def test_whole_year_matches_exchange_calendars(code: str, lead: timedelta) -> None:
    expected = independent_opens(code, date(2025, 12, 1), date(2027, 1, 31))
    year = [d for d in expected if YEAR_START <= d <= YEAR_END]
    assert sessions_between(code, YEAR_START, YEAR_END) == year
    assert 230 < len(year) < 260
    # walk next_run from just before the year: every session once, at open - lead, nothing else
    got: list[tuple[date, datetime]] = []
    after = run_time(code, lead, max(d for d in expected if d < YEAR_START))
    while True:
        day, at = next_run(code, lead, after, inclusive=False)
        if day > YEAR_END:
            break
        got.append((day, at))
        assert session_for_run(code, lead, at) == day
        after = at
    assert got == [(d, expected[d] - lead) for d in year]


def test_next_run_inclusive_vs_exclusive_at_an_exact_run_time() -> None:
    at = utc(2026, 3, 9, 11, 30)
    assert next_run("XNYS", TWO_HOURS, at, inclusive=True) == (date(2026, 3, 9), at)
    assert next_run("XNYS", TWO_HOURS, at, inclusive=False) == (date(2026, 3, 10), utc(2026, 3, 10, 11, 30))
    # inside the lead window of 2026-03-09 the next run start is the following day's
    assert next_run("XNYS", TWO_HOURS, utc(2026, 3, 9, 12, 0), inclusive=True)[0] == date(2026, 3, 10)


def test_non_utc_aware_input_is_converted_and_naive_rejected() -> None:
    new_york = timezone(timedelta(hours=-4))
    assert next_run("XNYS", TWO_HOURS, datetime(2026, 3, 9, 7, 30, tzinfo=new_york), inclusive=True) == (
        date(2026, 3, 9),
        utc(2026, 3, 9, 11, 30),
    )
    with pytest.raises(ValueError, match="after must be timezone-aware"):
        next_run("XNYS", TWO_HOURS, datetime(2026, 3, 9, 11, 30), inclusive=True)  # noqa: DTZ001


def test_unknown_code() -> None:
    with pytest.raises(ValueError, match="unknown calendar code 'XNYZ'; known codes include XNYS"):
        session_open_utc("XNYZ", date(2026, 3, 9))


@pytest.mark.parametrize(
    ("run_after", "lead", "expected"),
    [
        pytest.param(utc(2026, 3, 9, 11, 30), TWO_HOURS, date(2026, 3, 9), id="exact-run-time"),
        pytest.param(utc(2026, 3, 9, 12, 0), TWO_HOURS, date(2026, 3, 9), id="inside-lead-window"),
        pytest.param(utc(2026, 3, 9, 13, 30), TWO_HOURS, date(2026, 3, 10), id="at-open-is-next-session"),
        pytest.param(utc(2026, 7, 2, 20, 0), TWO_HOURS, date(2026, 7, 6), id="over-holiday-weekend"),
        # interval start of a run made with a 2h lead, read after the lead changed to 90m
        pytest.param(utc(2026, 3, 9, 11, 30), NINETY_MINUTES, date(2026, 3, 9), id="lead-changed"),
    ],
)
def test_session_for_run(run_after: datetime, lead: timedelta, expected: date) -> None:
    assert session_for_run("XNYS", lead, run_after) == expected


def test_session_for_run_prefers_exact_match_when_windows_overlap() -> None:
    # Ash Wednesday opens 16:00 UTC, Thursday 13:00 UTC: with a 22h lead Thursday's run (Wed 15:00)
    # falls before Wednesday's open; the exact run time must still map to Thursday.
    lead = timedelta(hours=22)
    thursday_run = run_time("BVMF", lead, date(2026, 2, 19))
    assert thursday_run == utc(2026, 2, 18, 15, 0)
    assert thursday_run < session_open_utc("BVMF", date(2026, 2, 18))
    assert session_for_run("BVMF", lead, thursday_run) == date(2026, 2, 19)
    assert session_for_run("BVMF", lead, run_time("BVMF", lead, date(2026, 2, 18))) == date(2026, 2, 18)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param("2026-7-3", "malformed; expected YYYY-MM-DD", id="no-padding"),
        pytest.param("03/07/2026", "malformed; expected YYYY-MM-DD", id="slashes"),
        pytest.param("", "malformed", id="empty"),
        pytest.param("2026-02-30", "not a real calendar date", id="impossible-date"),
        pytest.param(
            "2026-07-03",
            "2026-07-03 is not a XNYS session (weekend or exchange holiday); nearest sessions: "
            "2026-07-02 before, 2026-07-06 after",
            id="holiday",
        ),
        pytest.param("2026-03-08", "nearest sessions: 2026-03-06 before, 2026-03-09 after", id="sunday"),
    ],
)
def test_validate_session_date_rejects(value: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        validate_session_date("XNYS", value)
    assert fragment in str(err.value)


def test_validate_session_date_accepts_sessions() -> None:
    assert validate_session_date("XNYS", "2026-07-02") == date(2026, 7, 2)
    assert validate_session_date("BVMF", " 2026-02-18 ") == date(2026, 2, 18)


ASSIGNMENTS = [
    pytest.param({"XLON", "XNYS"}, date(2026, 8, 28), "XLON", id="london-before-new-york"),
    pytest.param({"XLON", "XNYS"}, date(2026, 8, 31), "XNYS", id="uk-bank-holiday-goes-to-new-york"),
    pytest.param({"XLON", "XNYS"}, date(2026, 3, 9), "XLON", id="us-dst-week"),
    pytest.param({"XLON", "XNYS"}, date(2026, 3, 30), "XLON", id="uk-dst-week"),
    pytest.param({"XTKS", "XNYS"}, date(2026, 3, 9), "XTKS", id="tokyo-first"),
    pytest.param({"XTKS", "XNYS"}, date(2026, 11, 23), "XNYS", id="tokyo-holiday"),
    pytest.param({"BVMF", "XNYS"}, date(2026, 2, 19), "BVMF", id="sao-paulo-normal-open"),
    pytest.param({"BVMF", "XNYS"}, date(2026, 2, 18), "XNYS", id="ash-wednesday-late-open"),
    pytest.param({"BVMF", "XNYS"}, date(2026, 2, 17), "XNYS", id="carnival"),
    pytest.param({"XNYS"}, date(2026, 7, 3), None, id="only-market-closed"),
    pytest.param(set(), date(2026, 3, 9), None, id="no-markets"),
    pytest.param({"XNYS", "XTSE"}, date(2026, 3, 9), "XNYS", id="same-open-tie-by-code"),
]


@pytest.mark.parametrize(("user_markets", "day", "expected"), ASSIGNMENTS)
def test_serving_market(user_markets: set[str], day: date, expected: str | None) -> None:
    assert serving_market(user_markets, day) == expected


def test_earlier_markets_examples() -> None:
    assert earlier_markets("XNYS", date(2026, 8, 28), DEFAULT_CODES) == ["XTKS", "XLON", "BVMF"]
    assert earlier_markets("XNYS", date(2026, 8, 31), DEFAULT_CODES) == ["XTKS", "BVMF"]
    assert earlier_markets("XTKS", date(2026, 3, 9), DEFAULT_CODES) == []
    assert earlier_markets("XNYS", date(2026, 2, 18), DEFAULT_CODES) == ["XTKS", "XLON"]
    assert earlier_markets("BVMF", date(2026, 2, 18), DEFAULT_CODES) == ["XTKS", "XLON", "XNYS"]
    assert earlier_markets("XTSE", date(2026, 3, 9), ["XNYS", "XTSE"]) == ["XNYS"]
    assert earlier_markets("XNYS", date(2026, 3, 9), ["XNYS", "XTSE"]) == []
    with pytest.raises(ValueError, match="not a XNYS session"):
        earlier_markets("XNYS", date(2026, 7, 3), DEFAULT_CODES)


def test_dag_rule_and_serving_market_agree_for_every_day_and_market_set() -> None:
    """Each user is scored by exactly the DAG serving_market names, every day of 2026 (or by none)."""
    days = [YEAR_START + timedelta(days=i) for i in range((YEAR_END - YEAR_START).days + 1)]
    open_on = {(c, d): is_session(c, d) for c in DEFAULT_CODES for d in days}
    earlier = {(c, d): set(earlier_markets(c, d, DEFAULT_CODES)) for (c, d), ok in open_on.items() if ok}
    user_sets = [set(s) for n in range(1, 5) for s in itertools.combinations(DEFAULT_CODES, n)]
    served_by_nobody = 0
    for day in days:
        for markets in user_sets:
            serving = [c for c in sorted(markets) if open_on[c, day] and not markets & earlier[c, day]]
            expected = serving_market(markets, day)
            assert serving == ([expected] if expected else [])
            served_by_nobody += expected is None
    assert served_by_nobody > 0  # weekends and holidays exist, so "nobody" must occur


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The state of a process that has computed nothing yet, with an empty session table in `tmp_path`."""
    monkeypatch.setenv("OVERNIGHT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sessions, "_CACHE", {})
    monkeypatch.setattr(sessions, "_TABLE", sessions._SessionTable())
    return tmp_path


def test_calendar_cache_extends_in_a_long_lived_process(new_process: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "_today", lambda: date(2026, 11, 22))
    first = get_calendar("XNYS")
    assert first is get_calendar("XNYS")  # cached
    assert first.first_session.date() <= date(2025, 11, 24)
    assert date(2028, 11, 1) <= first.last_session.date() <= date(2028, 11, 30)
    # months later the same process asks beyond the cached end: the calendar is rebuilt wider
    beyond = first.last_session.date() + timedelta(days=20)
    day, at = next_run("XNYS", TWO_HOURS, datetime.combine(beyond, datetime.min.time(), UTC), inclusive=True)
    assert day >= beyond
    assert at == independent_opens("XNYS", beyond, beyond + timedelta(days=10))[day] - TWO_HOURS
    second = get_calendar("XNYS")
    assert second is not first
    assert second.last_session.date() > beyond
    assert second.first_session.date() == first.first_session.date()  # still covers what it covered


def test_calendar_rebuild_keeps_what_was_covered(new_process: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "_today", lambda: date(2026, 11, 22))
    assert session_open_utc("XNYS", date(2020, 3, 9)) == utc(2020, 3, 9, 13, 30)
    wide = get_calendar("XNYS")
    assert session_open_utc("XNYS", date(2030, 3, 11)) == utc(2030, 3, 11, 13, 30)
    wider = get_calendar("XNYS")
    assert wider is not wide
    # alternating old and new dates must not rebuild the calendar back and forth
    assert session_open_utc("XNYS", date(2020, 3, 9)) == utc(2020, 3, 9, 13, 30)
    assert get_calendar("XNYS") is wider


def test_calendar_before_cached_start_is_rebuilt(new_process: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "_today", lambda: date(2030, 6, 1))
    assert get_calendar("XLON").first_session.date() > date(2026, 1, 1)
    assert session_open_utc("XLON", date(2026, 3, 30)) == utc(2026, 3, 30, 7, 0)


def test_horizon_warning_near_the_end_of_fixed_calendar_data() -> None:
    horizon = calendar_horizon("XSHG")  # Shanghai's holidays are a precomputed list with a last year
    assert is_session("XSHG", horizon)
    assert horizon_warnings(["XSHG", "XNYS"], today=horizon - timedelta(days=30)) == [
        f"XSHG: exchange_calendars data ends with the {horizon} session, 30 days after "
        f"{horizon - timedelta(days=30)}; upgrade the exchange-calendars package before then or the DAG "
        "stops scheduling"
    ]
    assert horizon_warnings(["XSHG"], today=horizon - timedelta(days=60))[0].startswith("XSHG: ")
    assert horizon_warnings(["XSHG"], today=horizon - timedelta(days=61)) == []
    ended = horizon_warnings(["XSHG"], today=horizon + timedelta(days=5))
    assert len(ended) == 1 and "ended" in ended[0] and "5 days before" in ended[0]
    with pytest.raises(ValueError, match="upgrade the exchange-calendars package"):
        next_run("XSHG", TWO_HOURS, datetime.combine(horizon, datetime.max.time(), UTC), inclusive=False)


@pytest.mark.parametrize("code", DEFAULT_CODES)
def test_rule_based_default_markets_never_warn(code: str) -> None:
    assert horizon_warnings([code], today=date(2040, 1, 1)) == []
    assert calendar_horizon(code) > date.today() + timedelta(days=365)


# ------------------------------------------------------------------ the session table on disk


def _table_file(folder: Path) -> Path:
    files = list(folder.glob("sessions-exchange-calendars-*.json"))
    assert len(files) == 1, files
    return files[0]


def test_session_table_serves_a_new_process_without_exchange_calendars(new_process: Path) -> None:
    day = date(2026, 3, 9)  # the first NYSE session after the US DST change
    expected = {code: session_open_utc(code, day) for code in ("XNYS", "XLON", "BVMF", "XTKS")}
    sessions.calendar_names()
    assert _table_file(new_process).stat().st_size > 0
    probe = f"""
import json, sys
from datetime import date
from overnight.domain import markets, sessions
opens = {{c: sessions.session_open_utc(c, date(2026, 3, 9)).isoformat() for c in {sorted(expected)!r}}}
tz = str(sessions.timezone("XTKS"))
markets._check_code("XNYS")
print(json.dumps({{"opens": opens, "tz": tz, "imported": "exchange_calendars" in sys.modules or "pandas" in sys.modules}}))
"""
    env = {**os.environ, "OVERNIGHT_CACHE_DIR": str(new_process), "PYTHONPATH": str(Path(sessions.__file__).parents[2])}
    out = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["imported"] is False, "a process with the session table still imported exchange_calendars"
    assert out["opens"] == {c: v.isoformat() for c, v in expected.items()}
    assert out["tz"] == "Asia/Tokyo"


def test_session_table_answers_match_exchange_calendars(new_process: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session_open_utc("XLON", date(2026, 11, 23))  # builds and saves
    monkeypatch.setattr(sessions, "_CACHE", {})
    monkeypatch.setattr(sessions, "_TABLE", sessions._SessionTable())  # a new process: reads the file
    start, end = date(2026, 1, 1), date(2027, 6, 30)
    got = sessions_between("XLON", start, end)
    assert sessions._CACHE["XLON"]._calendar is None, "the schedule was rebuilt, not read from the table"
    want = independent_opens("XLON", start, end)
    assert got == sorted(want)
    assert {d: session_open_utc("XLON", d) for d in got} == want
    assert get_calendar("XLON").tz.key == "Europe/London"  # the calendar object is still there when asked for


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 99, "codes": {}}', b"[]"])
def test_unreadable_or_foreign_session_table_is_rebuilt(new_process: Path, content: bytes,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    session_open_utc("XNYS", date(2026, 11, 23))
    path = _table_file(new_process)
    path.write_bytes(content)
    sessions._CACHE.clear()
    sessions._TABLE = sessions._SessionTable()
    assert session_open_utc("XNYS", date(2026, 3, 9)) == utc(2026, 3, 9, 13, 30)
    assert sessions._CACHE["XNYS"]._calendar is not None  # rebuilt from exchange_calendars
    assert json.loads(path.read_bytes())["codes"]["XNYS"]["tz"] == "America/New_York"  # and saved again
    if content.startswith(b"{not"):
        assert "unreadable" in caplog.text and str(path) in caplog.text


def test_malformed_session_table_entry_is_rebuilt(new_process: Path, caplog: pytest.LogCaptureFixture) -> None:
    session_open_utc("XNYS", date(2026, 11, 23))
    path = _table_file(new_process)
    data = json.loads(path.read_bytes())
    data["codes"]["XNYS"]["opens"].pop()  # one open fewer than sessions
    path.write_text(json.dumps(data))
    sessions._CACHE.clear()
    sessions._TABLE = sessions._SessionTable()
    assert session_open_utc("XNYS", date(2026, 3, 9)) == utc(2026, 3, 9, 13, 30)
    assert "XNYS's entry is malformed" in caplog.text


def test_unwritable_session_table_costs_speed_not_answers(new_process: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    blocker = new_process / "file"
    blocker.write_text("")
    monkeypatch.setenv("OVERNIGHT_CACHE_DIR", str(blocker / "sub"))  # a folder under a file: cannot exist
    assert session_open_utc("BVMF", date(2026, 11, 23)) == utc(2026, 11, 23, 13, 0)
    assert "not saved" in caplog.text


def test_session_table_closes_match_exchange_calendars_without_a_calendar(new_process: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The closes the batches judge quotes against (`session_closes`, early closes included) come from the session
    table, as exchange_calendars gives them, and no calendar is built to answer them."""
    for code in ("XNYS", "XLON", "BVMF", "XTKS"):
        session_open_utc(code, date(2026, 11, 25))  # builds and saves
    monkeypatch.setattr(sessions, "_CACHE", {})
    monkeypatch.setattr(sessions, "_TABLE", sessions._SessionTable())  # a new process: reads the file
    start, end = date(2026, 1, 1), date(2027, 6, 30)
    for code in ("XNYS", "XLON", "BVMF", "XTKS"):
        got = sessions.session_closes(code, start, end)
        cal = exchange_calendars.get_calendar(code, start=start.isoformat(), end=end.isoformat())
        assert got == [ts.to_pydatetime() for ts in cal.schedule["close"]]
        assert all(c.tzinfo is not None and c.utcoffset() == timedelta(0) for c in got)
        assert sessions._CACHE[code]._calendar is None, f"{code}: a calendar was built for its closes"
    assert utc(2026, 11, 27, 18) in sessions.session_closes("XNYS", date(2026, 11, 27), date(2026, 11, 27))  # 1 pm ET

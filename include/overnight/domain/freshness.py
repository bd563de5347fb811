"""Freshness rules (docs/freshness.md): rates against the ECB's publication calendar, prices and documents
against their market's sessions. Pure functions of dates and moments; the market calendars come from
`overnight.domain.sessions` (exchange-calendars), the ECB's from the TARGET closing days below.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from dateutil.easter import EASTER_WESTERN, easter

# The ECB publishes its euro reference rates at about 16:00 CET/CEST on every TARGET business day.
ECB_PUBLICATION_TIME = time(16, 0)
ECB_TZ = ZoneInfo("Europe/Berlin")
DEFAULT_RATES_MARGIN = timedelta(hours=2)
DEFAULT_MAX_RATES_LAG_PUBLICATIONS = 3  # rates 1-3 ECB publications behind are stale but usable, 4+ unusable
DEFAULT_MAX_PRICE_LAG_SESSIONS = 5  # quotes 1-5 sessions of their market behind are stale but usable, 6+ unusable
MAX_LAG_SETTING = 260  # the largest lag setting accepted: about a year of publications or sessions
RATES_LAG_SETTING = "OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS"
PRICE_LAG_SETTING = "OVERNIGHT_MAX_PRICE_LAG_SESSIONS"
# The hour settings these replace: no longer read, refused when set (docs/freshness.md, "The settings").
RETIRED_SETTINGS = {
    "OVERNIGHT_MAX_RATES_AGE_HOURS": (RATES_LAG_SETTING, DEFAULT_MAX_RATES_LAG_PUBLICATIONS, "ECB publications"),
    "OVERNIGHT_MAX_PRICE_AGE_HOURS": (PRICE_LAG_SETTING, DEFAULT_MAX_PRICE_LAG_SESSIONS, "sessions of the quote's market"),
}
DEFAULT_GRACE = timedelta(hours=2)
LEGACY_DOCUMENT_LIFETIME = timedelta(hours=24)  # documents without market/sessionDate
DEFAULT_CACHE_TTL_S = 24 * 3600
MIN_CACHE_TTL_S = 3600
CACHE_TTL_NEXT_RUN = "next-run"

# Why a document is stale (the dashboard's `staleReason`).
RATES_STALE = "rates_stale"
RUN_FAILED = "run_failed"
RUN_MISSING = "run_missing"
RUN_UNFINISHED = "run_unfinished"
USER_NOT_UPDATED = "user_not_updated"
UNKNOWN_AGE = "unknown_age"
NOT_CALCULATED = "not_calculated"
NEXT_RUN_DUE = "next_run_due"  # a job run whose market's next run + grace has passed
EXPIRED = "expired"  # a document without market/sessionDate, past 24 h
RECALCULATING = "recalculating"  # invalidated after it was generated; its recalculation has not landed yet
INVALIDATED = "invalidated"  # invalidated after it was generated; no recalculation asked, or it ended without it


class FreshnessConfigError(ValueError):
    """A freshness setting (an environment variable) is not usable; the message names it and what to set."""


# --------------------------------------------------------------------------- the ECB's calendar


@functools.cache
def target_closing_days(year: int) -> frozenset[date]:
    """The TARGET2 closing days of `year` that are not weekends' own: New Year, Good Friday, Easter Monday,
    1 May, 25 and 26 December (ECB, unchanged since 2002)."""
    sunday = easter(year, EASTER_WESTERN)
    return frozenset({date(year, 1, 1), sunday - timedelta(days=2), sunday + timedelta(days=1),
                      date(year, 5, 1), date(year, 12, 25), date(year, 12, 26)})


def is_ecb_publication_day(d: date) -> bool:
    """Whether the ECB publishes reference rates on `d` (a TARGET business day: a weekday, not closed)."""
    return d.weekday() < 5 and d not in target_closing_days(d.year)


def publication_moment(d: date) -> datetime:
    """The moment (aware UTC) rates dated `d` are published: 16:00 Europe/Berlin of that day."""
    return datetime.combine(d, ECB_PUBLICATION_TIME, tzinfo=ECB_TZ).astimezone(UTC)


def expected_rates_date(moment: datetime, margin: timedelta = DEFAULT_RATES_MARGIN) -> date:
    """The date of the newest ECB publication that should exist at `moment`, `margin` allowed for lateness."""
    moment = _utc(moment, "moment")
    d = (moment - margin).astimezone(ECB_TZ).date()
    while not (is_ecb_publication_day(d) and publication_moment(d) + margin <= moment):
        d -= timedelta(days=1)
    return d


def publications_behind(as_of: datetime, moment: datetime, margin: timedelta = DEFAULT_RATES_MARGIN) -> int:
    """How many ECB publications rates dated `as_of` are behind at `moment`: the publication days after their
    own day (in Frankfurt) up to and including the expected publication's (`expected_rates_date`)."""
    own = _utc(as_of, "as_of").astimezone(ECB_TZ).date()
    return _publication_days_after(own, expected_rates_date(moment, margin))


def _publication_days_after(start: date, end: date) -> int:
    """The number of ECB publication days d with start < d <= end (0 when end <= start)."""
    days = (end - start).days
    if days <= 0:
        return 0
    weeks, rest = divmod(days, 7)
    weekdays = weeks * 5 + sum(1 for i in range(1, rest + 1) if (start.weekday() + i) % 7 < 5)
    closed = sum(1 for year in range(start.year, end.year + 1) for d in target_closing_days(year)
                 if start < d <= end and d.weekday() < 5)
    return weekdays - closed


def expected_rates_publication(moment: datetime, margin: timedelta = DEFAULT_RATES_MARGIN) -> datetime:
    """The publication moment (aware UTC) of `expected_rates_date(moment, margin)`."""
    return publication_moment(expected_rates_date(moment, margin))


@dataclass(frozen=True)
class RatesVerdict:
    """How rates as of `as_of` look at a moment: stale (older than expected), unusable (more than `max_lag`
    ECB publications behind it)."""

    as_of: datetime
    expected: datetime
    stale: bool
    usable: bool
    behind: int = 0
    max_lag: int = DEFAULT_MAX_RATES_LAG_PUBLICATIONS

    @property
    def reason(self) -> str | None:
        """Why the rates are stale or unusable, in words; None when fresh."""
        if not self.usable:
            return (f"rates as of {self.as_of.isoformat()} are {self.behind} ECB publications behind the expected "
                    f"publication of {self.expected.isoformat()}, more than the allowed lag of {self.max_lag} "
                    f"({RATES_LAG_SETTING}); fix the rates provider and clear the run")
        if self.stale:
            return f"rates as of {self.as_of.isoformat()} are older than the expected publication of {self.expected.isoformat()}"
        return None


def judge_rates(as_of: datetime, moment: datetime, *, margin: timedelta = DEFAULT_RATES_MARGIN,
                max_lag_publications: int = DEFAULT_MAX_RATES_LAG_PUBLICATIONS) -> RatesVerdict:
    """Judges rates dated `as_of` at `moment`: stale when older than the expected publication, unusable when
    more than `max_lag_publications` ECB publications behind it (`publications_behind`)."""
    as_of = _utc(as_of, "as_of")
    expected = expected_rates_publication(moment, margin)
    behind = publications_behind(as_of, moment, margin)
    return RatesVerdict(as_of, expected, as_of < expected, behind <= max_lag_publications, behind,
                        max_lag_publications)


# --------------------------------------------------------------------------- markets: runs, closes, documents


def reference_moment(scheduled_run: datetime, now: datetime) -> datetime:
    """The moment a run is judged at: its scheduled time, or now when it runs earlier than that."""
    return min(_utc(scheduled_run, "scheduled_run"), _utc(now, "now"))


def scheduled_run(code: str, lead: timedelta, session_date: date) -> datetime:
    """The scheduled run time (open - lead, aware UTC) of `code`'s session on `session_date`."""
    from overnight.domain import sessions

    return sessions.run_time(code, lead, session_date)


def previous_close(code: str, moment: datetime) -> datetime:
    """The close (aware UTC) of `code`'s last session that closed at or before `moment` (exchange-calendars)."""
    import pandas as pd

    from overnight.domain import sessions

    moment = _utc(moment, "moment")
    cal = sessions.get_calendar(code, start=moment.date() - timedelta(days=40), end=moment.date() + timedelta(days=5))
    close = cal.previous_close(pd.Timestamp(moment) + pd.Timedelta(minutes=1))  # a close exactly at `moment` counts
    return close.to_pydatetime().astimezone(UTC)


def sessions_closed_between(code: str, as_of: datetime, moment: datetime) -> int:
    """How many sessions of market `code` closed after `as_of` and at or before `moment` (exchange-calendars):
    how many sessions a quote dated `as_of` is behind at `moment`. Raises ValueError for an unknown code or a
    moment outside the installed calendar data."""
    as_of, moment = _utc(as_of, "as_of"), _utc(moment, "moment")
    _check_known(code, moment)
    if as_of >= moment:
        return 0
    closes = _session_closes(code, as_of.date() - timedelta(days=2), moment.date() + timedelta(days=2))
    return bisect.bisect_right(closes, moment) - bisect.bisect_right(closes, as_of)


def _session_closes(code: str, start: date, end: date) -> list[datetime]:
    """The closes (aware UTC, in order) of `code`'s sessions from `start` to `end` that the installed
    exchange-calendars data covers."""
    from overnight.domain import sessions

    return sessions.session_closes(code, start, end)


def _check_known(code: str, moment: datetime) -> None:
    """Raises ValueError when exchange-calendars does not know `code` or has no data for `moment`'s date."""
    from overnight.domain import sessions

    sessions.is_session(code, moment.date())


def _recent_closes(code: str, moment: datetime, at_least: int) -> list[datetime]:
    """The closes of `code`'s sessions at or before `moment`, reaching back far enough to hold more than
    `at_least` of them (or to the start of the installed calendar data)."""
    _check_known(code, moment)
    days = max(40, 2 * at_least)
    while True:
        closes = [c for c in _session_closes(code, moment.date() - timedelta(days=days), moment.date()
                                             + timedelta(days=2)) if c <= moment]
        if len(closes) > at_least or days > 4 * 366 + 2 * at_least:
            return closes
        days *= 2


@functools.lru_cache(maxsize=4096)
def next_run_time(code: str, lead: timedelta, session_date: date) -> datetime:
    """The scheduled time (aware UTC) of `code`'s run for the session after `session_date`."""
    from overnight.domain import sessions

    return sessions.next_run(code, lead, sessions.run_time(code, lead, session_date), inclusive=False)[1]


@functools.lru_cache(maxsize=4096)
def document_deadline(code: str, lead: timedelta, session_date: date, grace: timedelta = DEFAULT_GRACE) -> datetime:
    """Until when a document of `code`'s `session_date` session is fresh: the next session's run + `grace`."""
    return next_run_time(code, lead, session_date) + grace


@functools.lru_cache(maxsize=4096)
def next_session(code: str, lead: timedelta, session_date: date) -> date:
    """The session of `code` after `session_date` (the one whose run must replace its documents)."""
    from overnight.domain import sessions

    return sessions.next_run(code, lead, sessions.run_time(code, lead, session_date), inclusive=False)[0]


def cache_ttl_seconds(setting: str | None, deadline: datetime | None, now: datetime) -> int:
    """The Redis TTL of a document: `setting` seconds (default 24 h), or until `deadline` for "next-run"."""
    value = (setting or "").strip().lower()
    if not value:
        return DEFAULT_CACHE_TTL_S
    if value == CACHE_TTL_NEXT_RUN:
        if deadline is None:
            return DEFAULT_CACHE_TTL_S
        return max(MIN_CACHE_TTL_S, int((deadline - _utc(now, "now")).total_seconds()))
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise FreshnessConfigError(
            f"OVERNIGHT_CACHE_TTL={setting!r}: expected a positive number of seconds or '{CACHE_TTL_NEXT_RUN}' "
            "(unset for the default 24 h)")
    return seconds


# --------------------------------------------------------------------------- settings


def _retired(name: str) -> str | None:
    """The problem with retired hour setting `name` when it is set (not blank), else None."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return None
    new, default, unit = RETIRED_SETTINGS[name]
    return (f"{name}={raw!r} is no longer read: lags are counted in {unit}, not hours; unset {name} and set "
            f"{new} instead (a whole number of {unit}, the default is {new}={default}; docs/freshness.md)")


_WHOLE_NUMBER = re.compile(r"[0-9]+", re.ASCII)


def _lag(name: str, default: int, unit: str, retired: str) -> int:
    if (problem := _retired(retired)) is not None:
        raise FreshnessConfigError(problem)
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if _WHOLE_NUMBER.fullmatch(raw) and int(raw) <= MAX_LAG_SETTING:
        return int(raw)
    raise FreshnessConfigError(f"{name}={raw!r}: expected a whole number of {unit} from 0 to {MAX_LAG_SETTING} "
                               f"(the default is {name}={default}); fix it or unset it for the default")


def _duration(name: str, default: timedelta, unit: str) -> timedelta:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
        if math.isfinite(value) and value >= 0:
            return timedelta(**{unit: value})
    except (ValueError, OverflowError):
        pass
    default_value = default / timedelta(**{unit: 1})
    raise FreshnessConfigError(f"{name}={raw!r}: expected a finite number of {unit} >= 0 (the default is "
                               f"{name}={default_value:g}); fix it or unset it for the default")


def rates_margin() -> timedelta:
    """`OVERNIGHT_RATES_MARGIN_MINUTES` (default 120): how late the ECB's publication may be."""
    return _duration("OVERNIGHT_RATES_MARGIN_MINUTES", DEFAULT_RATES_MARGIN, "minutes")


def max_rates_lag_publications() -> int:
    """`OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS` (default 3): rates more ECB publications behind the expected one
    are unusable. Refuses the retired `OVERNIGHT_MAX_RATES_AGE_HOURS` when it is set."""
    return _lag(RATES_LAG_SETTING, DEFAULT_MAX_RATES_LAG_PUBLICATIONS, "ECB publications",
                "OVERNIGHT_MAX_RATES_AGE_HOURS")


def max_price_lag_sessions() -> int:
    """`OVERNIGHT_MAX_PRICE_LAG_SESSIONS` (default 5): quotes more sessions of their market behind are unusable.
    Refuses the retired `OVERNIGHT_MAX_PRICE_AGE_HOURS` when it is set."""
    return _lag(PRICE_LAG_SETTING, DEFAULT_MAX_PRICE_LAG_SESSIONS, "sessions", "OVERNIGHT_MAX_PRICE_AGE_HOURS")


def grace() -> timedelta:
    """`OVERNIGHT_FRESHNESS_GRACE_MINUTES` (default 120): how long a market's run may take before its
    documents are due."""
    return _duration("OVERNIGHT_FRESHNESS_GRACE_MINUTES", DEFAULT_GRACE, "minutes")


def cache_ttl_setting() -> str | None:
    """`OVERNIGHT_CACHE_TTL`: seconds, or "next-run"; unset for 24 h."""
    return os.environ.get("OVERNIGHT_CACHE_TTL")


def settings_problems() -> list[str]:
    """One line per freshness setting (environment variable) that is not usable, naming it and what to set:
    checked before a run starts (the market DAG's first task, the preflight DAG), not found mid-run."""
    problems: list[str] = []
    for read in (rates_margin, max_rates_lag_publications, max_price_lag_sessions, grace):
        try:
            read()
        except FreshnessConfigError as exc:
            problems.append(str(exc))
    try:
        cache_ttl_seconds(cache_ttl_setting(), None, datetime.now(UTC))
    except FreshnessConfigError as exc:
        problems.append(str(exc))
    return problems


def check_settings() -> None:
    """Raises FreshnessConfigError naming every unusable freshness setting (`settings_problems`)."""
    problems = settings_problems()
    if problems:
        raise FreshnessConfigError(f"{len(problems)} bad freshness setting(s) (docs/freshness.md): "
                                   + "; ".join(problems))


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"freshness: {name} {value.isoformat()} has no time zone; pass an aware datetime (UTC)")
    return value.astimezone(UTC)


def judge_quotes(quotes: dict[str, tuple[datetime, str]], moment: datetime,
                 max_lag_sessions: int = DEFAULT_MAX_PRICE_LAG_SESSIONS) -> tuple[set[str], set[str]]:
    """Judges quotes {symbol: (as_of, market code)} at `moment`: returns (stale, unusable) symbols.

    Stale: older than the previous session's close of its market before `moment` (1 session or more behind);
    unusable: more than `max_lag_sessions` sessions of its market closed after it and at or before `moment`
    (`sessions_closed_between`). A market exchange-calendars does not know is not judged (its quotes count
    as fresh)."""
    moment = _utc(moment, "moment")
    closes: dict[str, list[datetime] | None] = {}
    stale: set[str] = set()
    unusable: set[str] = set()
    for symbol, (as_of, market) in quotes.items():
        as_of = _utc(as_of, f"quote {symbol} as_of")
        if market not in closes:
            try:  # enough of the market's closes to tell more than `max_lag_sessions` behind, once per market
                closes[market] = _recent_closes(market, moment, max_lag_sessions)
            except (ValueError, LookupError) as exc:
                closes[market] = None
                import logging

                logging.getLogger(__name__).warning("prices of market %s not judged: %s", market, exc)
        known = closes[market]
        if known is None:
            continue
        behind = len(known) - bisect.bisect_right(known, as_of)
        if behind > max_lag_sessions:
            unusable.add(symbol)
        elif behind > 0:
            stale.add(symbol)
    return stale, unusable

"""Freshness rules (docs/freshness.md): rates against the ECB's publication calendar, prices and documents
against their market's sessions. Pure functions of dates and moments; the market calendars come from
`overnight.domain.sessions` (exchange-calendars), the ECB's from the TARGET closing days below.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from dateutil.easter import EASTER_WESTERN, easter

# The ECB publishes its euro reference rates at about 16:00 CET/CEST on every TARGET business day.
ECB_PUBLICATION_TIME = time(16, 0)
ECB_TZ = ZoneInfo("Europe/Berlin")
DEFAULT_RATES_MARGIN = timedelta(hours=2)
DEFAULT_MAX_RATES_LAG = timedelta(hours=72)
DEFAULT_MAX_PRICE_AGE = timedelta(hours=240)
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


def expected_rates_publication(moment: datetime, margin: timedelta = DEFAULT_RATES_MARGIN) -> datetime:
    """The publication moment (aware UTC) of `expected_rates_date(moment, margin)`."""
    return publication_moment(expected_rates_date(moment, margin))


@dataclass(frozen=True)
class RatesVerdict:
    """How rates as of `as_of` look at a moment: stale (older than expected), unusable (far older)."""

    as_of: datetime
    expected: datetime
    stale: bool
    usable: bool

    @property
    def reason(self) -> str | None:
        """Why the rates are stale or unusable, in words; None when fresh."""
        if not self.usable:
            return (f"rates as of {self.as_of.isoformat()} are more than the allowed lag behind the expected "
                    f"ECB publication of {self.expected.isoformat()}; fix the rates provider and clear the run")
        if self.stale:
            return f"rates as of {self.as_of.isoformat()} are older than the expected publication of {self.expected.isoformat()}"
        return None


def judge_rates(as_of: datetime, moment: datetime, *, margin: timedelta = DEFAULT_RATES_MARGIN,
                max_lag: timedelta = DEFAULT_MAX_RATES_LAG) -> RatesVerdict:
    """Judges rates dated `as_of` at `moment`: stale when older than the expected publication, unusable when
    older than it by more than `max_lag`."""
    as_of = _utc(as_of, "as_of")
    expected = expected_rates_publication(moment, margin)
    return RatesVerdict(as_of, expected, as_of < expected, as_of >= expected - max_lag)


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


def max_rates_lag() -> timedelta:
    """`OVERNIGHT_MAX_RATES_AGE_HOURS` (default 72): how far behind the expected publication rates stay usable."""
    return _duration("OVERNIGHT_MAX_RATES_AGE_HOURS", DEFAULT_MAX_RATES_LAG, "hours")


def max_price_age() -> timedelta:
    """`OVERNIGHT_MAX_PRICE_AGE_HOURS` (default 240): older quotes are unusable."""
    return _duration("OVERNIGHT_MAX_PRICE_AGE_HOURS", DEFAULT_MAX_PRICE_AGE, "hours")


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
    for read in (rates_margin, max_rates_lag, max_price_age, grace):
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
                 max_age: timedelta = DEFAULT_MAX_PRICE_AGE) -> tuple[set[str], set[str]]:
    """Judges quotes {symbol: (as_of, market code)} at `moment`: returns (stale, unusable) symbols.

    Stale: older than the previous session's close of its market before `moment`; unusable: older than
    `max_age`. A market exchange-calendars does not know is not judged (its quotes count as fresh)."""
    moment = _utc(moment, "moment")
    closes: dict[str, datetime | None] = {}
    stale: set[str] = set()
    unusable: set[str] = set()
    for symbol, (as_of, market) in quotes.items():
        as_of = _utc(as_of, f"quote {symbol} as_of")
        if as_of < moment - max_age:
            unusable.add(symbol)
            continue
        if market not in closes:
            try:
                closes[market] = previous_close(market, moment)
            except (ValueError, LookupError) as exc:
                closes[market] = None
                import logging

                logging.getLogger(__name__).warning("prices of market %s not judged: %s", market, exc)
        close = closes[market]
        if close is not None and as_of < close:
            stale.add(symbol)
    return stale, unusable

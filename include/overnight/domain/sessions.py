"""Exchange session maths from exchange_calendars (no Airflow): opens in UTC, run times, market per user.

Longer than ~400 lines on purpose: the session table (the parse-time cache file of computed sessions) and the
calendar rules it answers for must change together, and each public function is a few lines over them.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from exchange_calendars import ExchangeCalendar


class _LazyCalendars:
    """Imports exchange_calendars (and pandas, ~2 s) on first use, not when a task parses its DAG file."""

    def __getattr__(self, name: str) -> Any:
        import exchange_calendars as module

        return getattr(module, name)


exchange_calendars: Any = _LazyCalendars()
log = logging.getLogger(__name__)

PAST_WINDOW = timedelta(days=366)
FUTURE_WINDOW = timedelta(days=2 * 366)
LOOKUP_WINDOW = timedelta(days=45)
MAX_SEARCH = timedelta(days=3 * 366)
HORIZON_WARNING_DAYS = 60
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
EXAMPLE_CODES = ("XNYS", "XLON", "BVMF", "XTKS")


@dataclass
class _Schedule:
    """The sessions, UTC opens and UTC closes of one calendar for [start, end], as lists; its time zone and data
    bounds.

    `calendar` is the exchange_calendars object for the same range, built on first use when the
    schedule came from the session table on disk (see `_SessionTable`)."""

    code: str
    start: date
    end: date
    sessions: list[date]
    opens: list[datetime]
    tz: str
    bounds: tuple[date | None, date | None]
    closes: list[datetime] = field(default_factory=list)
    positions: dict[date, int] = field(default_factory=dict)
    _calendar: ExchangeCalendar | None = None

    def __post_init__(self) -> None:
        if not self.positions:
            self.positions = {d: i for i, d in enumerate(self.sessions)}

    def covers(self, start: date, end: date) -> bool:
        """Whether this schedule was built for a range containing [start, end]."""
        return self.start <= start and end <= self.end

    @property
    def calendar(self) -> ExchangeCalendar:
        with _LOCK:
            if self._calendar is None:
                self._calendar = _build_calendar(self.code, self.start, self.end)
            return self._calendar

    def to_json(self) -> dict[str, Any]:
        low, high = self.bounds
        return {
            "start": self.start.isoformat(), "end": self.end.isoformat(), "tz": self.tz,
            "low": low.isoformat() if low else None, "high": high.isoformat() if high else None,
            "sessions": [d.isoformat() for d in self.sessions],
            "opens": [int(o.timestamp()) for o in self.opens],
            "closes": [int(c.timestamp()) for c in self.closes],
        }

    @classmethod
    def from_json(cls, code: str, data: dict[str, Any]) -> _Schedule:
        low, high = data["low"], data["high"]
        sessions = [date.fromisoformat(d) for d in data["sessions"]]
        opens = [datetime.fromtimestamp(t, UTC) for t in data["opens"]]
        closes = [datetime.fromtimestamp(t, UTC) for t in data["closes"]]
        if (len(sessions) != len(opens) or len(sessions) != len(closes) or sessions != sorted(sessions)
                or opens != sorted(opens) or closes != sorted(closes)):
            raise ValueError(f"{code}: sessions, opens and closes do not pair up")
        return cls(code=code, start=date.fromisoformat(data["start"]), end=date.fromisoformat(data["end"]),
                   sessions=sessions, opens=opens, closes=closes, tz=str(data["tz"]),
                   bounds=(date.fromisoformat(low) if low else None, date.fromisoformat(high) if high else None))


class _SessionTable:
    """The schedules and calendar names already computed on this machine, in one JSON file per installed
    exchange-calendars version (`$OVERNIGHT_CACHE_DIR`, default `<tmp>/overnight-cache-<uid>`).

    Building the calendars costs the dag-processor about 1.2 s of CPU at every parse of the market DAGs
    (importing pandas and exchange_calendars, then four calendars); reading this file costs a few ms.
    The holidays of a calendar are code of the package, so its version is the whole key. A missing,
    unreadable or foreign file is rebuilt from exchange_calendars; writes are atomic (a temporary file
    renamed over the old one), so concurrent parses never read half a file."""

    FORMAT = 2  # 2: the sessions' closes too (the batches judge quotes against them without building calendars)

    def __init__(self) -> None:
        self._data: dict[str, Any] | None = None

    @staticmethod
    def path() -> Path | None:
        try:
            version = importlib.metadata.version("exchange-calendars")
        except importlib.metadata.PackageNotFoundError:
            return None
        folder = os.environ.get("OVERNIGHT_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), f"overnight-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
        # the format in the name too: a checkout still on an older format shares the folder without rewriting it
        return Path(folder) / f"sessions-exchange-calendars-{version}-format-{_SessionTable.FORMAT}.json"

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            self._data = {"format": self.FORMAT, "names": None, "codes": {}}
            path = self.path()
            try:
                data = json.loads(path.read_bytes()) if path is not None else None
            except FileNotFoundError:
                data = None
            except (OSError, ValueError) as exc:
                log.warning("session table %s unreadable (%s); rebuilding it from exchange_calendars", path, exc)
                data = None
            if isinstance(data, dict) and data.get("format") == self.FORMAT and isinstance(data.get("codes"), dict):
                self._data = data
        return self._data

    def names(self) -> list[str] | None:
        names = self._load().get("names")
        return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None

    def schedule(self, code: str) -> _Schedule | None:
        raw = self._load()["codes"].get(code)
        if raw is None:
            return None
        try:
            return _Schedule.from_json(code, raw)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            log.warning("session table: %s's entry is malformed (%s); rebuilding it", code, exc)
            return None

    def save(self, *, names: list[str] | None = None, schedule: _Schedule | None = None) -> None:
        data = self._load()
        if names is not None:
            data["names"] = names
        if schedule is not None:
            data["codes"][schedule.code] = schedule.to_json()
        path = self.path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp",
                                             delete=False) as tmp:
                json.dump(data, tmp, separators=(",", ":"))
            os.replace(tmp.name, path)
        except OSError as exc:  # a read-only or full disk costs speed, never a parse
            log.warning("session table %s not saved (%s); the calendars will be rebuilt next time", path, exc)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp.name)


_CACHE: dict[str, _Schedule] = {}
_LOCK = threading.RLock()
_TABLE = _SessionTable()


def calendar_names() -> list[str]:
    """The canonical exchange_calendars calendar names (no aliases), from the session table when it has them."""
    with _LOCK:
        names = _TABLE.names()
        if names is None:
            names = list(exchange_calendars.get_calendar_names(include_aliases=False))
            _TABLE.save(names=names)
        return names


def timezone(code: str) -> ZoneInfo:
    """The time zone of `code`'s exchange (e.g. America/New_York for XNYS)."""
    today = _today()
    return ZoneInfo(_schedule(code, today, today).tz)


def _today() -> date:
    """Today's UTC date (a function so tests can fake it)."""
    return datetime.now(UTC).date()


def _as_utc(value: datetime, name: str) -> datetime:
    """Returns `value` as a plain aware UTC datetime; rejects naive datetimes."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a timezone-aware datetime, got {type(value).__name__} {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value.isoformat()}; add tzinfo=datetime.UTC")
    v = value.astimezone(UTC)
    return datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=UTC)


def _check_lead(lead: timedelta) -> timedelta:
    """Returns `lead` if it is a non-negative timedelta."""
    if not isinstance(lead, timedelta) or lead < timedelta(0):
        raise ValueError(f"lead must be a non-negative timedelta, got {lead!r}")
    return lead


def _unknown_code(code: str) -> ValueError:
    """The error for a code exchange_calendars does not know."""
    return ValueError(
        f"unknown calendar code {code!r}; known codes include {', '.join(EXAMPLE_CODES)}, ... "
        "(see exchange_calendars.get_calendar_names())"
    )


def _bounds(code: str) -> tuple[date | None, date | None]:
    """The first and last dates the calendar class can be built for (None where unbounded)."""
    known = _known(code)
    return known.bounds if known is not None else _class_bounds(code)


def _known(code: str) -> _Schedule | None:
    """The schedule of `code` this process holds, else the session table's (then held), else None."""
    cached = _CACHE.get(code)
    if cached is None:
        with _LOCK:
            cached = _CACHE.get(code)
            if cached is None and (stored := _TABLE.schedule(code)) is not None:
                cached = _CACHE[code] = stored
    return cached


@functools.cache
def _class_bounds(code: str) -> tuple[date | None, date | None]:
    """`_bounds` from the calendar class itself (imports exchange_calendars)."""
    try:
        name = exchange_calendars.resolve_alias(code)
    except Exception as exc:  # noqa: BLE001 - InvalidCalendarName is a KeyError subclass
        raise _unknown_code(code) from exc
    dispatcher = exchange_calendars.calendar_utils.global_calendar_dispatcher
    factories = getattr(dispatcher, "_calendar_factories", {})
    cls = factories.get(name)
    if cls is None:
        if not dispatcher.has_calendar(name):
            raise _unknown_code(code)
        return None, None
    low, high = cls.bound_min(), cls.bound_max()
    return (low.date() if low is not None else None, high.date() if high is not None else None)


def _schedule(code: str, start: date, end: date) -> _Schedule:
    """A cached schedule covering [start, end] (clipped to the calendar's data), rebuilt wider when needed."""
    low, high = _bounds(code)
    want_start = max(start, low) if low else start
    want_end = min(end, high) if high else end
    with _LOCK:
        cached = _known(code)
        if cached is not None and cached.covers(want_start, want_end):
            return cached
        today = _today()
        new_start = min(want_start, today - PAST_WINDOW)
        new_end = max(want_end, today + FUTURE_WINDOW)
        if cached is not None:
            new_start, new_end = min(new_start, cached.start), max(new_end, cached.end)
        if low is not None:
            new_start = max(new_start, low)
        if high is not None:
            new_end = min(new_end, high)
        if new_start > new_end:
            new_start = max(new_end - PAST_WINDOW, low) if low else new_end - PAST_WINDOW
        calendar = _build_calendar(code, new_start, new_end)
        table = calendar.schedule
        sessions = [ts.date() for ts in table.index]
        opens = [ts.to_pydatetime().astimezone(UTC).replace(tzinfo=UTC) for ts in table["open"].dt.tz_convert("UTC")]
        closes = [ts.to_pydatetime().astimezone(UTC).replace(tzinfo=UTC) for ts in table["close"].dt.tz_convert("UTC")]
        built = _Schedule(code=code, start=new_start, end=new_end, sessions=sessions, opens=opens, closes=closes,
                          tz=str(calendar.tz), bounds=(low, high), _calendar=calendar)
        _CACHE[code] = built
        _TABLE.save(schedule=built)
        return built


def _build_calendar(code: str, start: date, end: date) -> ExchangeCalendar:
    with warnings.catch_warnings():
        # exchange_calendars 4.13 reads Series.values, which pandas 3.1 flags as deprecated (harmless)
        warnings.filterwarnings("ignore", message="Series.values returning an ndarray")
        return exchange_calendars.get_calendar(code, start=start.isoformat(), end=end.isoformat())


def _outside_data(code: str, d: date) -> ValueError | None:
    """An error if `d` lies outside the dates the installed calendar data can describe, else None."""
    low, high = _bounds(code)
    if (low is not None and d < low) or (high is not None and d > high):
        return ValueError(
            f"{code}: {d.isoformat()} is outside the installed exchange_calendars data "
            f"({low.isoformat() if low else '...'} to {high.isoformat() if high else '...'}); "
            "upgrade the exchange-calendars package for later dates"
        )
    return None


def get_calendar(code: str, *, start: date | None = None, end: date | None = None) -> ExchangeCalendar:
    """The cached exchange_calendars calendar for `code`, covering [start, end] (default: today to +1 year)."""
    today = _today()
    start = start if start is not None else today
    end = end if end is not None else today + timedelta(days=366)
    return _schedule(code, start, end).calendar


def session_closes(code: str, start: date, end: date) -> list[datetime]:
    """The closes (aware UTC, in order) of `code`'s sessions from `start` to `end` that the installed
    exchange-calendars data covers: from the session table, without building a calendar (importing pandas and
    computing holidays cost each score_batch task about 1.1 s, 11.7 % of a 10,779-user batch in py-spy)."""
    sched = _schedule(code, start, end)
    return sched.closes[bisect.bisect_left(sched.sessions, start):bisect.bisect_right(sched.sessions, end)]


def _nearest_sessions(code: str, d: date) -> tuple[date | None, date | None]:
    """The last session before `d` and the first session after `d` (None if not within the search window)."""
    sched = _schedule(code, d - LOOKUP_WINDOW, d + LOOKUP_WINDOW)
    i = bisect.bisect_left(sched.sessions, d)
    j = bisect.bisect_right(sched.sessions, d)
    before = sched.sessions[i - 1] if i > 0 else None
    after = sched.sessions[j] if j < len(sched.sessions) else None
    return before, after


def _not_a_session(code: str, d: date, advice: str = "") -> ValueError:
    """The error for a date that is not a session of `code`, naming the nearest sessions (then `advice`)."""
    before, after = _nearest_sessions(code, d)
    return ValueError(
        f"{d.isoformat()} is not a {code} session (weekend or exchange holiday); nearest sessions: "
        f"{before.isoformat() if before else 'none'} before, {after.isoformat() if after else 'none'} after"
        + (f"; {advice}" if advice else "")
    )


def is_session(code: str, d: date) -> bool:
    """Whether `d` is a trading session of market `code`."""
    if (error := _outside_data(code, d)) is not None:
        raise error
    return d in _schedule(code, d, d).positions


def session_open_utc(code: str, session_date: date) -> datetime:
    """The (aware UTC) opening time of `code`'s session on `session_date`."""
    if (error := _outside_data(code, session_date)) is not None:
        raise error
    sched = _schedule(code, session_date, session_date)
    i = sched.positions.get(session_date)
    if i is None:
        raise _not_a_session(code, session_date)
    return sched.opens[i]


def run_time(code: str, lead: timedelta, session_date: date) -> datetime:
    """When the run for `code`'s session on `session_date` starts: open minus `lead` (aware UTC)."""
    return session_open_utc(code, session_date) - _check_lead(lead)


def sessions_between(code: str, start: date, end: date) -> list[date]:
    """The sessions of `code` from `start` to `end`, both inclusive."""
    if start > end:
        raise ValueError(f"sessions_between({code!r}): start {start} is after end {end}; swap them")
    for d in (start, end):
        if (error := _outside_data(code, d)) is not None:
            raise error
    sched = _schedule(code, start, end)
    return sched.sessions[bisect.bisect_left(sched.sessions, start) : bisect.bisect_right(sched.sessions, end)]


def _first_open_after(code: str, threshold: datetime, inclusive: bool) -> tuple[_Schedule, int]:
    """The schedule and index of the first session opening after `threshold` (at or after if inclusive)."""
    day = threshold.date()
    span = LOOKUP_WINDOW
    while True:
        sched = _schedule(code, day - timedelta(days=2), day + span)
        pick = bisect.bisect_left if inclusive else bisect.bisect_right
        i = pick(sched.opens, threshold)
        if i < len(sched.opens):
            return sched, i
        _, high = _bounds(code)
        if high is not None and sched.end >= high:
            last = sched.sessions[-1].isoformat() if sched.sessions else high.isoformat()
            raise ValueError(
                f"{code}: no session after {threshold:%Y-%m-%d %H:%M} UTC in the installed exchange_calendars "
                f"data (it ends with the {last} session); upgrade the exchange-calendars package"
            )
        if span > MAX_SEARCH:
            raise ValueError(f"{code}: no session within {span.days} days after {threshold:%Y-%m-%d %H:%M} UTC")
        span *= 2


def next_run(code: str, lead: timedelta, after: datetime, *, inclusive: bool) -> tuple[date, datetime]:
    """The first session whose run time (open - lead) is after `after` (or equal if inclusive), and that time."""
    after = _as_utc(after, "after")
    lead = _check_lead(lead)
    sched, i = _first_open_after(code, after + lead, inclusive)
    return sched.sessions[i], sched.opens[i] - lead


def session_for_run(code: str, lead: timedelta, run_after: datetime) -> date:
    """The session whose run time is `run_after` (e.g. a data interval start); else the next one to open."""
    run_after = _as_utc(run_after, "run_after")
    lead = _check_lead(lead)
    target = run_after + lead
    sched = _schedule(code, target.date() - timedelta(days=2), target.date() + timedelta(days=2))
    i = bisect.bisect_left(sched.opens, target)
    if i < len(sched.opens) and sched.opens[i] == target:
        return sched.sessions[i]
    return next_run(code, timedelta(0), run_after, inclusive=False)[0]


def validate_session_date(code: str, value: str) -> date:
    """Parses 'YYYY-MM-DD' and checks it is a session of `code`; raises ValueError saying what to pass."""
    text = value.strip() if isinstance(value, str) else None
    if text is None or not DATE_PATTERN.match(text):
        raise ValueError(f"session date {value!r} is malformed; expected YYYY-MM-DD, e.g. 2026-03-09")
    try:
        d = date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"session date {value!r} is not a real calendar date ({exc}); expected YYYY-MM-DD") from exc
    if not is_session(code, d):
        raise _not_a_session(code, d, "pass one of those")
    return d


def earlier_markets(code: str, session_date: date, all_codes: Iterable[str]) -> list[str]:
    """Markets of `all_codes` with a session on `session_date` opening before `code` (ties: lower code first)."""
    mine = (session_open_utc(code, session_date), code)
    found: list[tuple[datetime, str]] = []
    for other in set(all_codes) - {code}:
        if is_session(other, session_date):
            key = (session_open_utc(other, session_date), other)
            if key < mine:
                found.append(key)
    return [c for _, c in sorted(found)]


def serving_market(user_markets: Iterable[str], session_date: date) -> str | None:
    """The market whose DAG scores this user on `session_date`: earliest open among their open markets."""
    candidates = [(session_open_utc(c, session_date), c) for c in set(user_markets) if is_session(c, session_date)]
    return min(candidates)[1] if candidates else None


def calendar_horizon(code: str) -> date:
    """Last session the installed calendar data covers (rule-based calendars: end of the rolling window)."""
    _, high = _bounds(code)
    today = _today()
    if high is None:
        return _schedule(code, today, today + FUTURE_WINDOW).sessions[-1]
    sched = _schedule(code, min(today, high), high)
    i = bisect.bisect_right(sched.sessions, high)
    return sched.sessions[i - 1]


def horizon_warnings(codes: Iterable[str], today: date, days: int = HORIZON_WARNING_DAYS) -> list[str]:
    """One line per market whose fixed calendar data ends within `days` of `today` (or already ended)."""
    lines: list[str] = []
    for code in sorted(set(codes)):
        _, high = _bounds(code)
        if high is None:
            continue  # holidays come from rules: the calendar extends to any year, nothing to warn about
        horizon = calendar_horizon(code)
        left = (horizon - today).days
        if left < 0:
            lines.append(
                f"{code}: exchange_calendars data ended with the {horizon.isoformat()} session, {-left} days before "
                f"{today.isoformat()}; no runs are scheduled after it; upgrade the exchange-calendars package"
            )
        elif left <= days:
            lines.append(
                f"{code}: exchange_calendars data ends with the {horizon.isoformat()} session, {left} days after "
                f"{today.isoformat()}; upgrade the exchange-calendars package before then or the DAG stops scheduling"
            )
    return lines

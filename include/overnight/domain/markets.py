"""Loads and validates the markets configured in include/markets.yaml (one DAG per market)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from overnight.domain import sessions

DEFAULT_MARKETS_PATH = Path(__file__).resolve().parents[2] / "markets.yaml"  # include/markets.yaml
MARKETS_FILE_ENV = "OVERNIGHT_MARKETS_FILE"  # another file (a ConfigMap mount, say) for every process alike


def markets_path() -> Path:
    """The markets file: `OVERNIGHT_MARKETS_FILE` when set, else include/markets.yaml beside the package."""
    return Path(os.environ[MARKETS_FILE_ENV]) if os.environ.get(MARKETS_FILE_ENV) else DEFAULT_MARKETS_PATH
DEFAULT_LEAD = timedelta(hours=2)
MAX_LEAD = timedelta(hours=24)
DAG_ID_PREFIX = "overnight_scoring_"
ENTRY_KEYS = ("code", "lead", "batch_size", "pool")
TOP_LEVEL_KEYS = ("markets",)
MIC_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{3}$")
LEAD_UNITS_PATTERN = re.compile(r"^(?:(?P<h>\d+)\s*h)?\s*(?:(?P<m>\d+)\s*m)?\s*(?:(?P<s>\d+)\s*s)?$")
LEAD_CLOCK_PATTERN = re.compile(r"^(?P<h>\d{1,2}):(?P<m>[0-5]\d)$")
EXAMPLE_CODES = ("XNYS", "XLON", "BVMF", "XTKS")
POOL_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
YAML_INT_TAG = "tag:yaml.org,2002:int"
YAML_INT_PATTERN = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 ints, so `lead: 2:00` stays the string '2:00' (not 120)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != YAML_INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(YAML_INT_TAG, YAML_INT_PATTERN, list("-+0123456789"))


class MarketConfigError(ValueError):
    """A problem in markets.yaml: says which market (or entry) and field, what is wrong and what to do."""

    def __init__(
        self,
        message: str,
        *,
        market: str | None = None,
        field: str | None = None,
        source: str = "markets.yaml",
        entry: int | None = None,
    ) -> None:
        self.market = market
        self.field = field
        self.message = message
        self.source = source
        self.entry = entry
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.market is not None:
            where.append(f"market '{self.market}'")
        elif self.entry is not None:
            where.append(f"entry #{self.entry}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        location = ", ".join(where)
        return f"{self.source}: {location}: {self.message}" if location else f"{self.source}: {self.message}"


class UnknownMarketError(LookupError):
    """The requested market is not configured (or not valid) in markets.yaml."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown market"


SCORING_POOL = "overnight_scoring"


@dataclass(frozen=True)
class Market:
    """One configured market: its calendar code, how long before the open to run, and tuning knobs."""

    code: str
    lead: timedelta = DEFAULT_LEAD
    batch_size: int | None = None
    pool: str | None = None

    @property
    def scoring_pool(self) -> str:
        """The Airflow pool of this market's scoring tasks: its own, else the shared `overnight_scoring`, which
        bounds the database and provider load of every market's batches together (include/pools.json)."""
        return self.pool or SCORING_POOL

    @property
    def dag_id(self) -> str:
        """The id of this market's DAG."""
        return f"{DAG_ID_PREFIX}{self.code.lower()}"


@dataclass
class MarketsLoad:
    """Result of reading markets.yaml: the valid markets (sorted by code) and one error per bad entry."""

    markets: list[Market] = field(default_factory=list)
    errors: list[MarketConfigError] = field(default_factory=list)

    @property
    def codes(self) -> list[str]:
        """Codes of the valid markets, sorted."""
        return [m.code for m in self.markets]


def format_lead(lead: timedelta) -> str:
    """Formats a lead compactly: '2h', '90m', '5400s' style (whole hours, else minutes, else seconds)."""
    seconds = int(lead.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def parse_lead(value: object) -> timedelta:
    """Parses a lead such as '2h', '90m', '1h30m' or '02:00'; raises ValueError saying what is accepted."""
    if isinstance(value, timedelta):
        lead = value
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        clock = LEAD_CLOCK_PATTERN.match(text)
        units = LEAD_UNITS_PATTERN.match(text)
        if clock:
            lead = timedelta(hours=int(clock["h"]), minutes=int(clock["m"]))
        elif units and any(units.group(g) for g in ("h", "m", "s")):
            lead = timedelta(hours=int(units["h"] or 0), minutes=int(units["m"] or 0), seconds=int(units["s"] or 0))
        else:
            raise ValueError(f"cannot parse lead {value!r}; write a duration like '2h', '90m', '1h30m' or '02:00'")
    else:
        raise ValueError(
            f"lead must be a quoted duration like '2h', '90m', '1h30m' or '02:00', got {value!r} "
            f"({type(value).__name__}); a bare number has no unit"
        )
    if not timedelta(0) < lead < MAX_LEAD:
        raise ValueError(
            f"lead {value!r} is {format_lead(lead) if lead >= timedelta(0) else str(lead)}; "
            "it must be more than 0 and less than 24h (e.g. '2h')"
        )
    return lead


def _calendar_codes() -> list[str]:
    """Canonical exchange_calendars names (no aliases; from the session table, see `sessions`)."""
    return sessions.calendar_names()


def _check_code_syntax(code: object) -> str:
    """The cheap check a task run uses (the dag-processor already checked the code against the calendars)."""
    if not isinstance(code, str) or not MIC_PATTERN.match(code):
        raise ValueError(f"code must be a calendar code string like 'XNYS', got {code!r}")
    return code


def _check_code(code: object) -> str:
    """Returns the code if it is a known exchange_calendars MIC code; raises ValueError with a hint otherwise."""
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"code must be a calendar code string like 'XNYS', got {code!r}")
    known = _calendar_codes()
    if code in known and MIC_PATTERN.match(code):
        return code
    if code.upper() in known and MIC_PATTERN.match(code.upper()):
        raise ValueError(f"calendar codes are upper case; write '{code.upper()}'")
    import exchange_calendars

    try:
        canonical = exchange_calendars.resolve_alias(code)
    except Exception:  # noqa: BLE001 - exchange_calendars raises its own InvalidCalendarName
        canonical = None
    if canonical and canonical != code and MIC_PATTERN.match(canonical):
        raise ValueError(f"'{code}' is an alias; write the calendar code '{canonical}'")
    mics = [k for k in known if MIC_PATTERN.match(k)]
    close = difflib.get_close_matches(code.upper(), mics, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(
        f"unknown calendar code; known codes include {', '.join(EXAMPLE_CODES)}, ... "
        f"(see exchange_calendars.get_calendar_names()){hint}"
    )


def _check_batch_size(value: object) -> int:
    """Returns value if it is an int >= 1; raises ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (e.g. 500), got {value!r}")
    return value


def _check_pool(value: object) -> str:
    """Returns value if it is a usable Airflow pool name; raises ValueError otherwise."""
    if not isinstance(value, str) or not POOL_PATTERN.match(value):
        raise ValueError(f"pool must be an Airflow pool name (letters, digits, '_', '.', '-'), got {value!r}")
    return value


def _parse_entry(raw: Any, index: int, source: str, check_codes: bool = True) -> Market:
    """Builds a Market from one raw entry; raises one MarketConfigError listing every problem found."""
    if not isinstance(raw, dict):
        raise MarketConfigError(
            f"expected a mapping like '- code: XNYS', got {type(raw).__name__} {raw!r}",
            entry=index,
            source=source,
        )
    raw_code = raw.get("code")
    market = raw_code if isinstance(raw_code, str) and raw_code.strip() else None
    problems: list[tuple[str, str]] = []

    unknown = [str(k) for k in raw if k not in ENTRY_KEYS]
    if unknown:
        problems.append(
            (unknown[0], f"unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed: {', '.join(ENTRY_KEYS)}")
        )
    code = None
    if "code" not in raw:
        problems.append(("code", "missing; every entry needs 'code: <calendar code>' like 'code: XNYS'"))
    else:
        try:
            code = _check_code(raw_code) if check_codes else _check_code_syntax(raw_code)
        except ValueError as exc:
            problems.append(("code", str(exc)))
    lead = DEFAULT_LEAD
    if "lead" in raw:
        try:
            lead = parse_lead(raw["lead"])
        except ValueError as exc:
            problems.append(("lead", str(exc)))
    batch_size = None
    if raw.get("batch_size") is not None:
        try:
            batch_size = _check_batch_size(raw["batch_size"])
        except ValueError as exc:
            problems.append(("batch_size", str(exc)))
    pool = None
    if raw.get("pool") is not None:
        try:
            pool = _check_pool(raw["pool"])
        except ValueError as exc:
            problems.append(("pool", str(exc)))

    if problems:
        first_field, first_message = problems[0]
        extra = "".join(f"; also field '{f}': {m}" for f, m in problems[1:])
        raise MarketConfigError(
            f"{first_message}{extra}; this market is skipped until fixed",
            market=market,
            field=first_field,
            entry=index,
            source=source,
        )
    assert code is not None
    return Market(code=code, lead=lead, batch_size=batch_size, pool=pool)


def load_markets(path: Path | None = None, *, check_codes: bool = True) -> MarketsLoad:
    """Reads markets.yaml; bad entries become errors while the valid markets still load."""
    path = Path(path) if path is not None else markets_path()
    source = path.name
    result = MarketsLoad()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        result.errors.append(
            MarketConfigError(
                f"cannot read {path}: {exc.strerror or exc}; create it (see the header of include/markets.yaml)",
                source=source,
            )
        )
        return result
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.YAMLError as exc:
        result.errors.append(MarketConfigError(f"not valid YAML: {exc}; fix the syntax", source=source))
        return result
    if not isinstance(data, dict) or "markets" not in data:
        result.errors.append(
            MarketConfigError(
                f"expected a top-level mapping with a 'markets:' list, got {type(data).__name__}; "
                "write 'markets:' followed by '- code: XNYS' lines",
                field="markets",
                source=source,
            )
        )
        return result
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            result.errors.append(
                MarketConfigError(
                    f"unknown top-level key {key!r}; only 'markets' is allowed (ignored)",
                    field=str(key),
                    source=source,
                )
            )
    entries = data["markets"]
    if not isinstance(entries, list):
        result.errors.append(
            MarketConfigError(
                f"'markets' must be a list of entries like '- code: XNYS', got {type(entries).__name__}",
                field="markets",
                source=source,
            )
        )
        return result

    first_index: dict[str, int] = {}
    for index, raw in enumerate(entries, start=1):
        try:
            market = _parse_entry(raw, index, source, check_codes)
        except MarketConfigError as exc:
            result.errors.append(exc)
            continue
        if market.code in first_index:
            result.errors.append(
                MarketConfigError(
                    f"duplicate code: entry #{index} repeats entry #{first_index[market.code]}; "
                    f"entry #{first_index[market.code]} is used, remove or merge entry #{index}",
                    market=market.code,
                    field="code",
                    entry=index,
                    source=source,
                )
            )
            continue
        first_index[market.code] = index
        result.markets.append(market)
    result.markets.sort(key=lambda m: m.code)
    return result


def get_market(code: str, path: Path | None = None) -> Market:
    """Returns the configured market `code` (case-insensitive); raises a clear error if it is not usable."""
    wanted = code.strip().upper()
    loaded = load_markets(path)
    for market in loaded.markets:
        if market.code == wanted:
            return market
    for error in loaded.errors:
        if error.market == wanted or (error.market is None and error.entry is None and not loaded.markets):
            raise error
    where = path or markets_path()
    configured = ", ".join(loaded.codes) or "none"
    raise UnknownMarketError(
        f"market '{code}' is not configured in {where}; configured markets: {configured}. "
        "Use one of those (e.g. MARKET=XNYS) or add an entry '- code: ...' to that file"
    )

"""The overnight scoring pipeline's steps, free of Airflow: start, rates, plan, score a batch, finalize.

Each step takes connections and small, JSON-able inputs and returns small, JSON-able outputs, so
the DAG only wires them. Bulk data moves between Postgres and Redis, never through XCom.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import math
import operator
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any

import msgspec
import psycopg

from overnight import __version__, freshness, money
from overnight.providers.base import PriceProvider, PriceQuote, ProviderError, RatesProvider, RatesSnapshot
from overnight.providers.db import latest_stored_rates, store_rates
from overnight.recommendations import (
    ALLOCATION_POLICY,
    DEFAULT_SCORE_FLOOR,
    AllocationError,
    Candidate,
    Target,
    recommend,
    shortlist,
    validate_targets,
)
from overnight.scoring import (
    SCORING_VERSION,
    CompiledRules,
    CriteriaError,
    FundamentalsTable,
    RowScores,
    Score,
    compile_rules,
    parse_rules,
    score_asset,
    score_many,
)

log = logging.getLogger(__name__)

JOB_TYPE = "scoring"
RATES_BASE = "USD"
MAX_MAPPED_TASKS = 256
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_RATES_AGE = freshness.DEFAULT_MAX_RATES_LAG  # behind the expected ECB publication, not from now
EVENT_TYPES = ("CALC_STARTED", "INPUTS_CAPTURED", "SCORES_COMPUTED", "CALC_COMPLETED")
MAX_ERROR_DETAILS = 1000
_JSON = msgspec.json.Encoder()
CHUNK_SIZE = 1000  # users loaded, calculated and written together inside a batch (bounds a task's memory)
CENT = Decimal("0.01")
# What a calculation's result depends on besides its inputs: the package and the scoring and allocation rules.
# A replay by another calcVersion says so instead of comparing (docs/audit.md).
CALC_VERSION = f"{__version__}+scoring.{SCORING_VERSION}.allocation.{ALLOCATION_POLICY}"
HISTORY_TABLE = "recommendation_history"


# --------------------------------------------------------------------------- job run


@dataclass(frozen=True)
class JobRun:
    """The job run a DAG run works on: identified by market and session date."""

    id: str
    correlation_id: str
    market: str
    session_date: str
    started_at: str
    resumed: bool = False

    def to_xcom(self) -> dict[str, Any]:
        """Returns the small dict passed between tasks."""
        return dict(self.__dict__)

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> JobRun:
        """Inverse of `to_xcom`."""
        return cls(**data)


def ensure_partitions(conn: psycopg.Connection, today: date) -> None:
    """Creates the audit partitions of this month and the next two (idempotent)."""
    conn.execute("SELECT ensure_event_partitions(%s, 3)", (today.replace(day=1),))


def start_job(
    conn: psycopg.Connection, market: str, session_date: date, dag_run_id: str, *, force: bool = False
) -> JobRun:
    """Upserts the `started` job-run row of (market, session); `force` starts a new calculation."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"overnight:{market}:{session_date}",))
        ensure_partitions(conn, datetime.now(UTC).date())
        row = conn.execute(
            "SELECT id, correlation_id, started_at FROM overnight_job_runs"
            " WHERE market = %s AND session_date = %s AND job_type = %s ORDER BY started_at DESC LIMIT 1",
            (market, session_date, JOB_TYPE),
        ).fetchone()
        if row is not None and not force:
            conn.execute(
                "UPDATE overnight_job_runs SET status = 'started', completed_at = NULL, dag_run_id = %s"
                " WHERE id = %s",
                (dag_run_id, row[0]),
            )
            return JobRun(str(row[0]), str(row[1]), market, session_date.isoformat(), row[2].isoformat(), True)
        job_id, corr, now = uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)
        conn.execute(
            "INSERT INTO overnight_job_runs (id, job_type, status, started_at, correlation_id, market,"
            " session_date, dag_run_id) VALUES (%s, %s, 'started', %s, %s, %s, %s, %s)",
            (job_id, JOB_TYPE, now, corr, market, session_date, dag_run_id),
        )
    log.info("job run %s started", job_id, extra={"correlation_id": str(corr), "market": market})
    return JobRun(str(job_id), str(corr), market, session_date.isoformat(), now.isoformat(), False)


def record_job_error(conn: psycopg.Connection, job: JobRun, stage: str, message: str) -> None:
    """Records a run-level error (a step before the fan-out failed) on the job-run row."""
    conn.execute(
        "UPDATE overnight_job_runs SET error_details = coalesce(error_details, '{}'::jsonb) || %s::jsonb"
        " WHERE id = %s",
        (json.dumps({"run": {"stage": stage, "message": message[:2000]}}), job.id),
    )
    conn.commit()


# --------------------------------------------------------------------------- rates


def needed_currencies(conn: psycopg.Connection) -> list[str]:
    """Returns every currency an asset trades in or a user counts in."""
    rows = conn.execute(
        "SELECT currency FROM assets UNION SELECT base_currency FROM users WHERE active"
    ).fetchall()
    return sorted({money.normalize_quote(Decimal(1), r[0].strip())[1] for r in rows} | {RATES_BASE})


def fetch_rates(
    conn: psycopg.Connection,
    provider: RatesProvider,
    currencies: list[str],
    *,
    max_age: timedelta = DEFAULT_MAX_RATES_AGE,
    now: datetime | None = None,
    margin: timedelta = freshness.DEFAULT_RATES_MARGIN,
) -> RatesSnapshot:
    """Fetches rates once (kept in `exchange_rates`), judged against the ECB's calendar at `now` (the run's
    reference moment; docs/freshness.md). Never raises for rates: stored rates stand in for a failed provider
    (flagged stale) and for currencies it did not deliver; a currency with no usable rate (none at all, or
    more than `max_age` behind the expected publication) is left out and listed in `unavailable`, so only
    the users who need it fail."""
    now = now or datetime.now(UTC)
    try:
        snap = provider.fetch_rates(RATES_BASE, currencies)
        if snap.source != "database":
            store_rates(conn, snap)
            conn.commit()
        fallback = False
    except ProviderError as exc:
        stored = latest_stored_rates(conn, RATES_BASE, currencies)
        reason = f"rates provider failed ({exc}) and no rate is stored"
        if stored is None:
            log.error("rates provider failed and no rates are stored: only %s users can be calculated: %s",
                      RATES_BASE, exc)
            return RatesSnapshot(RATES_BASE, {RATES_BASE: Decimal(1)}, now, "none (provider failed)", True,
                                 {c: reason for c in currencies if c != RATES_BASE})
        log.warning("rates provider failed, using stored rates as of %s: %s", stored.as_of, exc)
        snap = RatesSnapshot(stored.base, stored.rates, stored.as_of, f"{stored.source} (fallback)", True,
                             {c: f"{reason}: {why}" for c, why in stored.unavailable.items()}, stored.dated)
        fallback = True
    got = dict(snap.rates)
    dated = {c: snap.dated.get(c, snap.as_of) for c in got}
    unavailable = dict(snap.unavailable)
    filled = [c for c in currencies if c not in got and c != RATES_BASE]
    if filled and not fallback:  # the provider left some out: stored rates of those may stand in
        stored = latest_stored_rates(conn, RATES_BASE, filled)
        for c in filled:
            if stored is not None and c in stored.rates and c != stored.base:
                got[c] = stored.rates[c]
                dated[c] = stored.dated.get(c, stored.as_of)
                unavailable.pop(c, None)
            else:
                unavailable.setdefault(c, f"{snap.source}: no rate for {c} and none stored")
    rates: dict[str, Decimal] = {}
    stale_in: set[str] = set()
    for c, rate in got.items():
        if c == RATES_BASE:
            rates[c] = rate
            continue
        verdict = freshness.judge_rates(dated[c], now, margin=margin, max_lag=max_age)
        if not verdict.usable:
            unavailable[c] = f"{c}: {verdict.reason}"
            continue
        rates[c] = rate
        if fallback or verdict.stale:  # a stand-in for a failed provider is stale whatever its date
            stale_in.add(c)
    if unavailable:
        log.warning("no usable exchange rate for %s: users who need them fail, the others are calculated",
                    ", ".join(sorted(unavailable)), extra={"unavailable": sorted(unavailable)})
    as_of = min((dated[c] for c in rates if c != RATES_BASE), default=snap.as_of)
    return RatesSnapshot(snap.base, rates, as_of, snap.source, fallback or bool(stale_in), unavailable,
                         stale_in=frozenset(stale_in))


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Audience:
    """Which users a market serves on a session: theirs, none of whose markets open earlier."""

    market: str
    earlier: tuple[str, ...]
    user_ids: tuple[str, ...] | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """Returns the SQL condition on `users u` and its parameters."""
        sql = "u.active AND u.markets @> ARRAY[%(market)s]::text[] AND NOT (u.markets && %(earlier)s::text[])"
        params: dict[str, Any] = {"market": self.market, "earlier": list(self.earlier)}
        if self.user_ids is not None:
            sql += " AND u.id = ANY(%(user_ids)s::uuid[])"
            params["user_ids"] = list(self.user_ids)
        return sql, params

    def to_xcom(self) -> dict[str, Any]:
        """Returns a small JSON-able dict."""
        return {"market": self.market, "earlier": list(self.earlier),
                "user_ids": list(self.user_ids) if self.user_ids is not None else None}

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> Audience:
        """Inverse of `to_xcom`."""
        ids = data.get("user_ids")
        return cls(data["market"], tuple(data["earlier"]), tuple(ids) if ids is not None else None)


def effective_batch_size(total: int, batch_size: int, max_tasks: int = MAX_MAPPED_TASKS) -> int:
    """Returns the batch size, grown so that `total` users never need more than `max_tasks` batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return max(batch_size, math.ceil(total / max_tasks)) if total else batch_size


def plan_batches(conn: psycopg.Connection, audience: Audience, batch_size: int) -> list[dict[str, Any]]:
    """Returns small batch descriptors (id range and position) covering the served users in id order.

    The batches are as few as `batch_size` allows and of equal size (within one user): 11,743 users at
    10,000 per batch are two batches of 5,872 and 5,871, not 10,000 and 1,743, so the run does not wait
    on one large batch after the small one is done.
    """
    where, params = audience.where()
    ids = [r[0] for r in conn.execute(f"SELECT u.id FROM users u WHERE {where} ORDER BY u.id", params)]
    total = len(ids)
    count = math.ceil(total / effective_batch_size(total, batch_size))
    bounds = [total * i // count for i in range(count + 1)] if total else []
    batches = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        batches.append({
            "index": i,
            "first": start + 1,
            "last": end,
            "total": total,
            "lo": str(ids[start]),
            "hi": str(ids[end - 1]),
            "label": f"users {start + 1:,}-{end:,} of {total:,}",
        })
    return batches


# --------------------------------------------------------------------------- score a batch


class UserFailure(Exception):
    """One user cannot be calculated; `stage` says where (load, criteria, targets, prices, ...)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass
class AssetRow:
    """An asset as the batch loaded it."""

    id: int
    symbol: str
    market: str
    class_name: str
    currency: str
    fundamentals: dict[str, Any]


@dataclass
class UserRow:
    """A user and their inputs as the batch loaded them."""

    id: str
    base_currency: str
    default_contribution: Decimal | None
    markets: list[str]
    criteria_key: str
    holdings: list[tuple[int, Any]] = field(default_factory=list)
    watchlist: list[int] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


@dataclass
class UserResult:
    """What one user's calculation produced: four events and two documents."""

    user_id: str
    events: list[tuple[str, datetime, dict[str, Any], list[str] | None]]
    document: dict[str, Any]
    portfolio: dict[str, Any]
    criteria_version: str
    generated_at: datetime
    assets_scored: int
    recommendations: int
    warned: bool = False  # calculated with a warning (a holding could not be valued)
    document_json: str = ""  # the document as stored in Redis and `recommendation_history`; CALC_COMPLETED has its sha256
    latest: bool = True  # the writer set the user's `recommendations` row (no newer session's document is there)

    @functools.cached_property
    def portfolio_json(self) -> str:
        """The portfolio summary as stored in Postgres and Redis (encoded once)."""
        return _encode(self.portfolio)


def _load_chunk(
    conn: psycopg.Connection, job: JobRun, audience: Audience, batch: dict[str, Any], after: str | None, limit: int,
    assets: dict[int, AssetRow] | None = None,
) -> tuple[list[UserRow], dict[int, AssetRow], dict[str, tuple[str, int, Any]], tuple[str | None, int]]:
    """Loads the batch's next `limit` users (ids after `after`) and the inputs of those not completed yet.

    Returns (pending users, assets, criteria, (last id read, users read)). `assets` holds the assets
    earlier chunks loaded (fundamentals parsed once per batch); only the missing ones are read, added to
    it, and it is returned. Completed users are looked up by key for the chunk's ids, never by an
    anti-join against the job's growing `overnight_job_users` (planned on stale statistics, that join
    made each chunk slower than the one before)."""
    where, params = audience.where()
    params.update(lo=after or batch["lo"], hi=batch["hi"], limit=limit)
    lower = "u.id > %(lo)s" if after else "u.id >= %(lo)s"
    rows = conn.execute(
        f"SELECT u.id::text, u.base_currency, u.default_contribution, u.markets, u.criteria_key FROM users u"
        f" WHERE {where} AND {lower} AND u.id <= %(hi)s ORDER BY u.id LIMIT %(limit)s",
        params,
    ).fetchall()
    assets = {} if assets is None else assets
    if not rows:
        return [], assets, {}, (None, 0)
    done = {r[0] for r in conn.execute(
        "SELECT user_id::text FROM overnight_job_users WHERE job_run_id = %s AND user_id = ANY(%s::uuid[])"
        " AND status = 'completed'", (job.id, [r[0] for r in rows])).fetchall()}
    users = {r[0]: UserRow(r[0], r[1].strip(), r[2], list(r[3]), r[4]) for r in rows if r[0] not in done}
    read = (rows[-1][0], len(rows))
    if not users:
        return [], assets, {}, read
    ids = list(users)
    asset_ids: set[int] = set()
    # fetchall() converts the rows in C; iterating the cursor converts them one Python call at a time
    for uid, aid, qty in conn.execute(
        "SELECT user_id::text, asset_id, quantity FROM holdings WHERE user_id = ANY(%s::uuid[])", (ids,)
    ).fetchall():
        users[uid].holdings.append((aid, qty))
        asset_ids.add(aid)
    for uid, aid in conn.execute("SELECT user_id::text, asset_id FROM watchlist WHERE user_id = ANY(%s::uuid[])",
                                 (ids,)).fetchall():
        users[uid].watchlist.append(aid)
        asset_ids.add(aid)
    for uid, name, lo, hi in conn.execute(
        "SELECT t.user_id::text, c.name, t.min_pct, t.max_pct FROM allocation_targets t"
        " JOIN asset_classes c ON c.id = t.class_id WHERE t.user_id = ANY(%s::uuid[])",
        (ids,),
    ).fetchall():
        users[uid].targets.append(Target(name, lo, hi))
    keys = sorted({u.criteria_key for u in users.values()})
    criteria = {
        k: (str(cid), v, rules)
        for k, cid, v, rules in conn.execute(
            "SELECT DISTINCT ON (criteria_key) criteria_key, id, version, rules FROM criteria_sets"
            " WHERE criteria_key = ANY(%s) ORDER BY criteria_key, version DESC",
            (keys,),
        )
    }
    missing = sorted(asset_ids.difference(assets))
    if missing:
        assets.update(job_assets(conn, job, missing))
    return list(users.values()), assets, criteria, read


SNAPSHOT_SELECT = ("SELECT asset_id, symbol, market, class_name, currency, fundamentals FROM overnight_job_assets"
                    " WHERE job_run_id = %s")


def snapshot_asset(row: tuple[Any, ...]) -> AssetRow:
    """An `overnight_job_assets` row (as `SNAPSHOT_SELECT` reads it) as the calculation uses it."""
    return AssetRow(row[0], row[1], row[2], row[3], row[4].strip(), _decimals(row[5] or {}))


def job_assets(conn: psycopg.Connection, job: JobRun, asset_ids: list[int]) -> dict[int, AssetRow]:
    """The job run's snapshot of each asset (symbol, market, class, currency, fundamentals); unknown ids left out.

    The first batch that needs an asset copies it from `assets` into `overnight_job_assets`; every other batch,
    retry and resumed run of the job run reads that copy, so all its users are scored on the same fundamentals
    and a replay needs no live table (docs/audit.md). One statement copies the missing ones, one reads them."""
    conn.commit()  # the copy commits on its own at once: other batches wait on it for a moment, not a chunk
    with conn.transaction():
        conn.execute(
            "INSERT INTO overnight_job_assets (job_run_id, asset_id, symbol, market, class_name, currency, fundamentals)"
            " SELECT %s, a.id, a.symbol, a.market, c.name, a.currency, a.fundamentals FROM assets a"
            " JOIN asset_classes c ON c.id = a.class_id WHERE a.id = ANY(%s)"
            " ORDER BY a.id ON CONFLICT (job_run_id, asset_id) DO NOTHING",
            (job.id, asset_ids),
        )
    # Another batch may have stored some of these first: its copies are the job run's.
    return {r[0]: snapshot_asset(r) for r in conn.execute(SNAPSHOT_SELECT + " AND asset_id = ANY(%s)",
                                                          (job.id, asset_ids)).fetchall()}


def _decimals(fundamentals: dict[str, Any]) -> dict[str, Any]:
    """Parses an asset's fundamentals once per batch (values that are not numbers stay as they are)."""
    out: dict[str, Any] = {}
    for k, v in fundamentals.items():
        try:
            out[k] = Decimal(str(v)) if v is not None else None
        except (InvalidOperation, ValueError):
            out[k] = v
    return out


def _quantity(raw: Any, symbol: str) -> Decimal:
    if type(raw) is Decimal and raw.is_finite() and raw >= 0:  # numeric columns: the usual case
        return raw
    if raw is None:
        raise UserFailure("load", f"holding {symbol}: quantity is missing; fix the holding row")
    q = Decimal(raw)
    if not q.is_finite() or q < 0:
        raise UserFailure("load", f"holding {symbol}: quantity {raw} is not a non-negative number")
    return q


def _convert(amount: Decimal, src: str, dst: str, rates: dict[str, Decimal]) -> Decimal:
    """Converts through the rates' base (rates are `1 base = r currency`)."""
    if src == dst:
        return amount
    for c in (src, dst):
        if c not in rates:
            raise UserFailure("convert", f"no exchange rate for currency {c!r}; known: {', '.join(sorted(rates))}")
    return amount / rates[src] * rates[dst]


def _num(d: Decimal) -> str:
    """A decimal as plain text without trailing zeros (116.78000000 -> 116.78, 1E+2 -> 100)."""
    text = format(d, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _encode(value: Any) -> str:
    """Compact JSON of the documents and events (msgspec: several times faster than json on this path)."""
    return _JSON.encode(value).decode()


def _fmt(d: Decimal, places: Decimal = CENT) -> str:
    return format(d.quantize(places), "f")


@dataclass(frozen=True)
class Contribution:
    """A run's contribution for every user: an amount in a currency, converted to each user's base currency."""

    amount: Decimal
    currency: str

    def to_json(self) -> dict[str, str]:
        """Returns {"amount", "currency"} as the run parameter gives it."""
        return {"amount": money.text(self.amount), "currency": self.currency}


@dataclass
class Batch:
    """What every user of a batch shares: the job, rates, assets, prices, criteria and memos.

    `prices` are the job run's quotes by symbol; `price_text` the same prices as the events show them."""

    job: JobRun
    rates: RatesSnapshot
    assets: dict[int, AssetRow]
    criteria: dict[str, tuple[str, int, Any]]
    prices: dict[str, PriceQuote]
    contribution: Contribution | None = None
    compiled: dict[str, CompiledRules | CriteriaError] = field(default_factory=dict)
    price_text: dict[str, str] = field(default_factory=dict)
    table: FundamentalsTable = field(default_factory=FundamentalsTable)
    score_floor: Decimal = DEFAULT_SCORE_FLOOR
    stale_prices: frozenset[str] = frozenset()  # quotes older than their market's previous close
    unusable_prices: frozenset[str] = frozenset()  # quotes older than the maximum age: their holders fail
    completed_at: dict[str, datetime] | None = None  # a replay's: each user's recorded CALC_COMPLETED time

    def __post_init__(self) -> None:
        self.table.add({aid: a.fundamentals for aid, a in self.assets.items()})
        for symbol, quote in self.prices.items():
            if symbol not in self.price_text:
                self.price_text[symbol] = _num(quote.price)
        self.rates_payload = {k: _num(v) for k, v in sorted(self.rates.rates.items())}
        self.rates_as_of = self.rates.as_of.isoformat()


NO_PRICE = score_asset((), {}, False).reason
_BEST_FIRST = operator.itemgetter(0, 1)


def _asset_class(item: tuple[Any, str, int, AssetRow]) -> str:
    return item[3].class_name


@dataclass(slots=True)
class Prepared:
    """A user between the two halves of their calculation: inputs checked and valued, assets to score."""

    user: UserRow
    stamps: list[datetime]
    criteria_id: str
    version: int
    raw_rules: Any
    compiled: CompiledRules
    values: dict[str, Decimal]
    total: Decimal
    holdings_used: dict[str, str]
    in_scope: list[AssetRow]
    priced_rows: list[int]
    spent_s: float
    unit: Decimal
    unpriced: list[dict[str, str]]
    holding_prices: dict[str, str]
    holdings_as_of: datetime | None
    held_count: int


def _stamp(stamps: list[datetime]) -> datetime:
    """Now, strictly after the user's previous stamp (their events keep their order)."""
    now = datetime.now(UTC)
    if stamps and now <= stamps[-1]:
        now = stamps[-1] + timedelta(microseconds=1)
    stamps.append(now)
    return now


def prepare_user(user: UserRow, batch: Batch) -> Prepared:
    """First half of a user's calculation: criteria, targets, currency, holdings valued; raises UserFailure."""
    t0 = time.perf_counter()
    assets, prices, rates = batch.assets, batch.prices, batch.rates
    stamps: list[datetime] = []
    _stamp(stamps)
    if user.criteria_key not in batch.criteria:
        raise UserFailure("criteria", f"criteria '{user.criteria_key}' has no version; add one")
    criteria_id, version, raw_rules = batch.criteria[user.criteria_key]
    compiled = batch.compiled.get(criteria_id)  # by criteria version: an edit mid-batch is a new entry
    if compiled is None:
        try:
            compiled = compile_rules(parse_rules(raw_rules))
        except CriteriaError as exc:
            compiled = exc
        batch.compiled[criteria_id] = compiled
    if isinstance(compiled, CriteriaError):
        raise UserFailure("criteria", f"criteria '{user.criteria_key}' v{version}: {compiled}")
    try:
        validate_targets(user.targets)
    except AllocationError as exc:
        raise UserFailure("targets", str(exc)) from None
    try:
        unit = money.minor_unit(user.base_currency)
    except money.CurrencyError as exc:
        raise UserFailure("currency", f"base currency: {exc}") from None
    rate_table = rates.rates
    if user.base_currency not in rate_table:
        raise UserFailure("convert", f"base currency {user.base_currency!r} has no exchange rate")

    values: dict[str, Decimal] = {}
    holdings_used: dict[str, str] = {}
    holding_prices: dict[str, str] = {}
    unpriced: list[dict[str, str]] = []
    oldest: datetime | None = None
    total = Decimal(0)
    held = 0
    for aid, raw_qty in sorted(user.holdings):  # by asset id: sums in one order, whatever order the rows came in
        asset = assets.get(aid)
        if asset is None:
            raise UserFailure("load", f"holding of asset id {aid}: no such asset")
        qty = _quantity(raw_qty, asset.symbol)
        symbol = asset.symbol
        holdings_used[symbol] = _num(qty)  # quantity 0 too: the asset is in the user's universe (the replay needs it)
        if not qty:  # a holding of quantity zero is not a holding (docs/allocation.md)
            continue
        held += 1
        quote = prices.get(symbol)
        if quote is None and symbol in batch.unusable_prices:  # docs/freshness.md: too old to value with
            raise UserFailure("prices", f"holding {symbol}: its quote is older than OVERNIGHT_MAX_PRICE_AGE_HOURS; "
                                        "refresh the price (or raise the setting) and clear the batch")
        if quote is None:
            unpriced.append({"symbol": symbol, "quantity": holdings_used[symbol], "reason": NO_PRICE})
            continue
        if quote.currency not in rate_table:
            unpriced.append({"symbol": symbol, "quantity": holdings_used[symbol],
                             "reason": f"no exchange rate for {quote.currency}"})
            continue
        value = _convert(qty * quote.price, quote.currency, user.base_currency, rate_table)
        values[asset.class_name] = values.get(asset.class_name, Decimal(0)) + value
        total += value
        holding_prices[symbol] = batch.price_text[symbol]
        if oldest is None or quote.as_of < oldest:
            oldest = quote.as_of
    unpriced.sort(key=operator.itemgetter("symbol"))
    universe = {aid for aid, _ in user.holdings}
    universe.update(user.watchlist)
    user_markets = user.markets
    in_scope = [a for a in map(assets.get, sorted(universe)) if a is not None and a.market in user_markets]
    rows = batch.table.rows
    priced_rows = [rows[a.id] for a in in_scope if a.symbol in prices]
    return Prepared(user, stamps, criteria_id, version, raw_rules, compiled, values, total, holdings_used, in_scope,
                    priced_rows, time.perf_counter() - t0, unit, unpriced, holding_prices, oldest, held)


def user_contribution(user: UserRow, batch: Batch, unit: Decimal) -> Decimal:
    """The user's contribution in their base currency, rounded down to its minor unit: the run's (converted at
    the job's rates) or the user's default; raises UserFailure when the run's currency has no rate."""
    given = batch.contribution
    if given is None:
        return (user.default_contribution or Decimal(0)).quantize(unit, rounding=ROUND_DOWN)
    if given.currency not in batch.rates.rates:
        raise UserFailure("contribution", f"the run's contribution is in {given.currency}, which has no exchange "
                          "rate; give it in a currency the rates provider publishes")
    converted = _convert(given.amount, given.currency, user.base_currency, batch.rates.rates)
    return converted.quantize(unit, rounding=ROUND_DOWN)


def finish_user(p: Prepared, found: RowScores, batch: Batch, shared_s: float = 0.0) -> UserResult:
    """Second half: the scores `found` for the user's priced assets, recommendations, events, documents.

    `shared_s` is the user's share of the time spent scoring the chunk together. An asset is either in
    `scores` (with its score) or in `unscored` (with the reason), never both."""
    t0 = time.perf_counter()
    user, stamps, compiled, values, total, unit = p.user, p.stamps, p.compiled, p.values, p.total, p.unit
    job, rates, prices, price_text = batch.job, batch.rates, batch.prices, batch.price_text
    base = user.base_currency
    texts, exact_values = found.texts, found.values
    scores: dict[str, str] = {}
    unscored: dict[str, str] = {}
    prices_used = dict(p.holding_prices)
    prices_as_of = p.holdings_as_of
    slow: dict[int, Score] = {}  # positions `score_asset` scored
    buyable: list[tuple[Any, str, int, AssetRow]] = []  # (-score, symbol, position, asset)
    rate_table = rates.rates
    j = -1
    for asset in p.in_scope:
        symbol = asset.symbol
        quote = prices.get(symbol)
        if quote is None:
            unscored[symbol] = NO_PRICE
            continue
        j += 1
        if quote.currency not in rate_table:  # cannot be valued in the base currency: not scored, not bought
            unscored[symbol] = f"no exchange rate for {quote.currency}"
            continue
        prices_used[symbol] = price_text[symbol]
        if prices_as_of is None or quote.as_of < prices_as_of:
            prices_as_of = quote.as_of
        text = texts[j]
        if text is None and (reason := found.reasons.get(j)) is not None:  # a missing fundamental
            unscored[symbol] = reason
            continue
        if text is None:  # a value the vectorised pass cannot compare exactly
            score = slow[j] = score_asset(compiled.rules, asset.fundamentals, True)
            if score.score is None:
                unscored[symbol] = score.reason
                continue
            value: Any = score.score
            text = money.text(value)
        else:
            value = exact_values[j]
        scores[symbol] = text
        buyable.append((-value, symbol, j, asset))
    buyable.sort(key=_BEST_FIRST)
    candidates = []
    for _, symbol, j, asset in shortlist(buyable, _asset_class):
        sc = slow.get(j) or found.score(j)
        assert sc.score is not None  # buyable holds scored assets only
        candidates.append(Candidate(asset.id, symbol, asset.class_name, sc.score, sc.criteria_count,
                                    sc.top_contributor))
    started = stamps[0]
    inputs_at = _stamp(stamps)
    scores_at = _stamp(stamps)
    contribution = user_contribution(user, batch, unit)
    # the user's documents are stale for rates only if a conversion they needed used a stale rate
    converted = {prices[s].currency for s in prices_used} | {base}
    if batch.contribution is not None:
        converted.add(batch.contribution.currency)
    rates_stale = rates.stale and len(converted) > 1 and not rates.stale_in.isdisjoint(converted)
    try:
        plan = recommend(contribution, values, user.targets, candidates, unit=unit, score_floor=batch.score_floor,
                         check_targets=False)
    except AllocationError as exc:
        raise UserFailure("recommend", str(exc)) from None
    recs = plan.recommendations
    completed = _stamp(stamps) if batch.completed_at is None else batch.completed_at[user.id]
    criteria_version = f"{user.criteria_key}@v{p.version}"
    allocations = {  # every held or targeted class, by name
        name: _fmt(values.get(name, Decimal(0)) * 100 / total if total else Decimal(0))
        for name in sorted(values.keys() | {t.class_name for t in user.targets})
    }
    contribution_text = money.text(contribution)
    unallocated = {"amount": money.text(plan.unallocated.amount.quantize(unit)), "reason": plan.unallocated.reason,
                   "message": plan.unallocated.message}
    total_text = money.amount_text(total, base)
    stale_used = sorted(batch.stale_prices.intersection(prices_used))
    document = {
        "userId": user.id,
        "generatedAt": completed.isoformat(),
        "recommendations": [
            {
                "assetId": str(r.candidate.asset_id),
                "symbol": r.candidate.symbol,
                "score": money.text(r.candidate.score),
                "amount": money.text(r.amount),
                "currency": base,
                "allocationGap": _fmt(r.allocation_gap),
                "breakdown": {"criteriaCount": r.candidate.criteria_count,
                              "topContributor": r.candidate.top_contributor},
                "allocationGapAfter": _fmt(r.allocation_gap_after),
            }
            for r in recs
        ],
        "portfolioSummary": {"totalValue": total_text, "baseCurrency": base, "allocations": allocations},
        "dataFreshness": {"pricesAsOf": prices_as_of.isoformat() if prices_as_of else batch.rates_as_of,
                          "ratesAsOf": batch.rates_as_of,
                          "criteriaVersion": criteria_version},
        "totalInvestable": contribution_text,
        "unallocated": unallocated,
        "unpricedHoldings": p.unpriced,
        "ratesStale": rates_stale,
        "stalePrices": stale_used,
        "correlationId": job.correlation_id,
        "market": job.market,
        "sessionDate": job.session_date,
    }
    targets = {t.class_name: t for t in user.targets}
    portfolio = {
        "totalValue": total_text,
        "assetCount": p.held_count,
        "allocations": [
            {"className": name, "currentPercent": percent,
             "targetMin": _fmt(targets[name].min_pct) if name in targets else None,
             "targetMax": _fmt(targets[name].max_pct) if name in targets else None}
            for name, percent in allocations.items()
        ],
    }
    scored_symbols = sorted(scores)
    duration_ms = round((p.spent_s + shared_s + time.perf_counter() - t0) * 1000, 3)
    assets = batch.assets
    inputs = {
        "jobRunId": job.id, "criteriaVersion": criteria_version, "criteria": p.raw_rules, "prices": prices_used,
        "pricesAsOf": prices_as_of.isoformat() if prices_as_of else None, "rates": batch.rates_payload,
        "ratesBase": rates.base, "ratesAsOf": batch.rates_as_of, "ratesStale": rates_stale,
        "holdings": p.holdings_used, "watchlist": sorted(assets[a].symbol for a in user.watchlist if a in assets),
        "targets": [[t.class_name, str(t.min_pct), str(t.max_pct)] for t in user.targets],
        "contribution": contribution_text, "baseCurrency": base, "unpricedHoldings": p.unpriced,
        "allocationPolicy": ALLOCATION_POLICY, "scoreFloor": money.text(batch.score_floor),
        "markets": user.markets, "calcVersion": CALC_VERSION,
    }
    if batch.contribution is not None:
        inputs["contributionGiven"] = batch.contribution.to_json()
    if stale_used:  # quotes judged stale (docs/freshness.md): the judgement is the night's, kept for the replay
        inputs["stalePrices"] = stale_used
    if rates_stale:  # the stale rates this user's conversions used (docs/freshness.md), kept for the replay
        inputs["ratesStaleIn"] = sorted(rates.stale_in.intersection(converted))
    document_json = _encode(document)
    stored = {"sha256": hashlib.sha256(document_json.encode()).hexdigest(), "table": HISTORY_TABLE,
              "jobRunId": job.id, "generatedAt": document["generatedAt"]}
    events = [
        ("CALC_STARTED", started, {"market": job.market, "sessionDate": job.session_date, "jobRunId": job.id,
                                   "criteriaKey": user.criteria_key}, None),
        ("INPUTS_CAPTURED", inputs_at, inputs, None),
        ("SCORES_COMPUTED", scores_at, {"scores": scores, "unscored": unscored}, scored_symbols),
        ("CALC_COMPLETED", completed, {"durationMs": duration_ms, "assetsScored": len(scored_symbols),
                                       "recommendations": len(recs), "totalInvestable": contribution_text,
                                       "unallocated": unallocated["amount"], "document": stored},
         None),
    ]
    return UserResult(user.id, events, document, portfolio, criteria_version, completed, len(scored_symbols),
                      len(recs), bool(p.unpriced), document_json)


_UNEXPECTED = (ArithmeticError, InvalidOperation, ValueError, KeyError, TypeError)


def calculate_chunk(users: list[UserRow], batch: Batch) -> tuple[list[UserResult], list[tuple[str, str, str]]]:
    """Calculates a chunk's users, scoring them together; returns (results, failures as (user, stage, message)).

    One user's failure never stops the others."""
    failures: list[tuple[str, str, str]] = []

    def guarded(user_id: str, step: Callable[..., Any], *args: Any) -> Any:
        try:
            return step(*args)
        except UserFailure as exc:
            failures.append((user_id, exc.stage, str(exc)))
            log.warning("user %s failed at %s: %s", user_id, exc.stage, exc)
        except _UNEXPECTED as exc:
            failures.append((user_id, "calculate", f"{type(exc).__name__}: {exc}"))
            log.exception("user %s failed unexpectedly", user_id)
        return None

    prepared = [p for u in users if (p := guarded(u.id, prepare_user, u, batch)) is not None]
    t = time.perf_counter()
    found = score_many([(p.compiled, p.priced_rows) for p in prepared], batch.table)
    shared_s = (time.perf_counter() - t) / max(1, len(prepared))
    results = [r for p, f in zip(prepared, found, strict=True)
               if (r := guarded(p.user.id, finish_user, p, f, batch, shared_s)) is not None]
    return results, failures


def event_id(correlation_id: str, user_id: str, event_type: str) -> uuid.UUID:
    """Returns the deterministic id of one of a user's four events in a job run."""
    return uuid.uuid5(uuid.UUID(correlation_id), f"{user_id}:{event_type}")


def _event_id_text(namespace: bytes, user_id: str, event_type: str) -> str:
    """`str(event_id(...))` without the UUID objects (the writer's hot path); `namespace` is the
    correlation id's 16 bytes."""
    h = bytearray(hashlib.sha1(namespace + f"{user_id}:{event_type}".encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def _copy_json(text: str) -> str:
    """JSON text for COPY: JSON escapes control characters itself, so only backslashes need doubling."""
    return text.replace("\\", "\\\\") if "\\" in text else text


def _copy_array(items: list[str] | None) -> str:
    """A text[] value for COPY (NULL for None)."""
    if items is None:
        return "\\N"
    if not items:
        return "{}"
    arr = '{"' + '","'.join(items) + '"}'
    if "\\" in arr or arr.count('"') != 2 * len(items) or not arr.isprintable():  # quote, backslash, control
        arr = _copy_value("{" + ",".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items) + "}")
    return arr


def _copy_value(v: Any) -> str:
    if v is None:
        return "\\N"
    return str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# The audit rows go through temporary staging tables (docs/audit.md, migration 0007). Postgres compresses a value
# only in a row over TOAST_TUPLE_THRESHOLD (about 2 kB, fixed at build time), which most events and documents are
# not; a staging row is, by a pad column (compressed to a few bytes with the rest and deleted at commit), and with
# toast_tuple_target = 128 and storage MAIN every value of it is compressed in the row. INSERT ... SELECT moves
# the values into the audit tables as they are, compressed. The staging columns copy the audit columns' storage
# and compression (lz4 where the server has it); the pad is lz4 too when it can be (pglz costs 7 µs a row).
# Created once per connection, emptied at each commit.
_STAGE_PAD_BYTES = 2100  # over TOAST_TUPLE_THRESHOLD (2032 B with 8 kB pages) by itself
_STAGING_TABLES = f"""DO $$
BEGIN
    IF to_regclass('pg_temp._events_in') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TEMP TABLE _events_in (LIKE calculation_events INCLUDING STORAGE INCLUDING COMPRESSION,
        _pad text DEFAULT repeat(' ', {_STAGE_PAD_BYTES})) WITH (toast_tuple_target = 128) ON COMMIT DELETE ROWS;
    CREATE TEMP TABLE _recs_in (LIKE {HISTORY_TABLE} INCLUDING STORAGE INCLUDING COMPRESSION,
        correlation_id uuid, criteria_version text, rates_stale boolean, portfolio text,
        _pad text DEFAULT repeat(' ', {_STAGE_PAD_BYTES})) WITH (toast_tuple_target = 128) ON COMMIT DELETE ROWS;
    ALTER TABLE _events_in ALTER _pad SET STORAGE MAIN;
    ALTER TABLE _recs_in ALTER _pad SET STORAGE MAIN, ALTER portfolio SET STORAGE MAIN;
    BEGIN
        ALTER TABLE _events_in ALTER _pad SET COMPRESSION lz4;
        ALTER TABLE _recs_in ALTER _pad SET COMPRESSION lz4, ALTER portfolio SET COMPRESSION lz4;
    EXCEPTION WHEN feature_not_supported THEN
        NULL;
    END;
END $$"""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector (reference counting still frees nearly everything at once).

    Measured on an 11,743-user batch: with the collector running, a fifth of the batch's CPU went to
    collections that found nothing to free, each scanning the batch's assets, users and results."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_results(
    conn: psycopg.Connection, job: JobRun, results: list[UserResult], failures: list[tuple[str, str, str]]
) -> list[UserResult]:
    """Writes completed users (events, documents) and failures in one transaction; returns new ones."""
    conn.commit()  # ends the chunk's read transaction, so each chunk's writes commit on their own
    with conn.transaction():
        fresh: set[str] = set()
        if results:
            fresh = {
                str(r[0])
                for r in conn.execute(
                    "INSERT INTO overnight_job_users (job_run_id, user_id, status)"
                    " SELECT %s, unnest(%s::uuid[]), 'completed'"
                    " ON CONFLICT (job_run_id, user_id) DO UPDATE SET status = 'completed', stage = NULL,"
                    " error = NULL, updated_at = now() WHERE overnight_job_users.status <> 'completed'"
                    " RETURNING user_id",
                    (job.id, [r.user_id for r in results]),
                )
            }
        if failures:
            conn.execute(
                "INSERT INTO overnight_job_users (job_run_id, user_id, status, stage, error)"
                " SELECT %s, u, 'failed', s, e FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS f(u, s, e)"
                " ON CONFLICT (job_run_id, user_id) DO UPDATE SET status = 'failed', stage = EXCLUDED.stage,"
                " error = EXCLUDED.error, updated_at = now() WHERE overnight_job_users.status <> 'completed'",
                (job.id, [f[0] for f in failures], [f[1] for f in failures], [f[2][:1000] for f in failures]),
            )
        new = [r for r in results if r.user_id in fresh]
        if not new:
            return []
        conn.execute(_STAGING_TABLES)
        with conn.cursor().copy(
            "COPY _events_in (event_id, correlation_id, user_id, event_type, payload, symbols, created_at) FROM STDIN"
        ) as cp:
            lines = []
            ns = uuid.UUID(job.correlation_id).bytes
            corr = job.correlation_id
            for r in new:
                uid = r.user_id
                for etype, at, payload, symbols in r.events:
                    lines.append(f"{_event_id_text(ns, uid, etype)}\t{corr}\t{uid}\t{etype}\t"
                                 f"{_copy_json(_encode(payload))}\t{_copy_array(symbols)}\t{at.isoformat()}")
            cp.write("\n".join(lines) + "\n")
        conn.execute(
            "INSERT INTO calculation_events (event_id, correlation_id, user_id, event_type, payload, symbols,"
            " created_at) SELECT event_id, correlation_id, user_id, event_type, payload, symbols, created_at"
            " FROM _events_in"
        )
        with conn.cursor().copy(
            "COPY _recs_in (user_id, job_run_id, correlation_id, session_date, generated_at, criteria_version,"
            " rates_stale, document, portfolio) FROM STDIN"
        ) as cp:
            cp.write("\n".join("\t".join(_copy_value(v) for v in (
                r.user_id, job.id, job.correlation_id, job.session_date, r.generated_at.isoformat(),
                r.criteria_version, "t" if r.document["ratesStale"] else "f",
                r.document_json, r.portfolio_json))
                for r in new) + "\n")
        # Every document goes to the history as its exact text (CALC_COMPLETED has its sha256); the latest
        # row of a user is replaced only by a document of the same or a newer session (docs/audit.md).
        latest = {str(row[0]) for row in conn.execute(
            "WITH history AS (INSERT INTO recommendation_history (user_id, generated_at, job_run_id, session_date,"
            " document) SELECT user_id, generated_at, job_run_id, session_date, document FROM _recs_in)"
            " INSERT INTO recommendations (user_id, job_run_id, correlation_id, generated_at, criteria_version,"
            " rates_stale, document, portfolio, session_date) SELECT user_id, job_run_id, correlation_id,"
            " generated_at, criteria_version, rates_stale, document::jsonb, portfolio::jsonb, session_date"
            " FROM _recs_in ON CONFLICT (user_id) DO UPDATE SET"
            " job_run_id = EXCLUDED.job_run_id, correlation_id = EXCLUDED.correlation_id,"
            " generated_at = EXCLUDED.generated_at, criteria_version = EXCLUDED.criteria_version,"
            " rates_stale = EXCLUDED.rates_stale, document = EXCLUDED.document, portfolio = EXCLUDED.portfolio,"
            " session_date = EXCLUDED.session_date WHERE recommendations.session_date <= EXCLUDED.session_date"
            " RETURNING user_id"
        )}
        for r in new:
            r.latest = r.user_id in latest
    return new


def job_quotes(
    conn: psycopg.Connection, job: JobRun, provider: PriceProvider, symbols: list[str]
) -> dict[str, PriceQuote]:
    """The job run's quote of each symbol (symbols without a usable price are left out).

    The first batch that needs a symbol fetches it from the provider and stores the quote in
    `overnight_job_prices`; every other batch, retry and resumed run of the job run reads that same
    quote, so all its users are priced alike and the events need not repeat currency and as-of times.
    """
    sql = ("SELECT symbol, price, currency, as_of FROM overnight_job_prices"
           " WHERE job_run_id = %s AND symbol = ANY(%s)")
    out = {s: PriceQuote(s, p, c.strip(), a.astimezone(UTC)) for s, p, c, a in conn.execute(sql, (job.id, symbols))}
    missing = [s for s in symbols if s not in out]
    if not missing:
        return out
    fetched = provider.fetch_prices(missing)
    if fetched:
        source = getattr(provider, "source", None) or type(provider).__name__
        conn.commit()
        with conn.transaction():
            conn.execute(
                "INSERT INTO overnight_job_prices (job_run_id, symbol, price, currency, as_of, source)"
                " SELECT %s, * FROM unnest(%s::text[], %s::numeric[], %s::text[], %s::timestamptz[], %s::text[])"
                " ON CONFLICT (job_run_id, symbol) DO NOTHING",
                (job.id, list(fetched), [q.price for q in fetched.values()], [q.currency for q in fetched.values()],
                 [q.as_of for q in fetched.values()], [source] * len(fetched)),
            )
        # Another batch may have stored some of these first: its quotes are the job run's.
        out.update({s: PriceQuote(s, p, c.strip(), a.astimezone(UTC)) for s, p, c, a in conn.execute(sql, (job.id, list(fetched)))})
    return out


def score_batch(
    conn: psycopg.Connection,
    job: JobRun,
    audience: Audience,
    rates: RatesSnapshot,
    batch: dict[str, Any],
    price_provider: PriceProvider,
    *,
    warm_cache: Callable[[list[tuple[str, str, str]]], int] | None,
    contribution: Contribution | None = None,
    score_floor: Decimal = DEFAULT_SCORE_FLOOR,
    chunk_size: int = CHUNK_SIZE,
    judge_prices: Callable[[dict[str, tuple[datetime, str]]], tuple[set[str], set[str]]] | None = None,
) -> dict[str, Any]:
    """Calculates the batch's pending users; one user's failure never stops the others.

    The batch streams through in chunks of `chunk_size` users (load, calculate, write, warm), so a task's
    memory does not grow with the batch. A systemic failure (database gone) raises and the task is
    retried; users written before are complete (events, row and document committed together) and skipped.
    `judge_prices` ({symbol: (as_of, market)} -> (stale, unusable)) flags stale quotes in the documents and
    drops unusable ones (docs/freshness.md).
    """
    t0, wall0 = time.perf_counter(), time.time()
    timings = {"load": 0.0, "calc": 0.0, "write": 0.0, "cache_warm": 0.0}
    counts = {"users": 0, "completed": 0, "skipped": 0, "failed": 0, "warned": 0, "assets_scored": 0,
              "recommendations_generated": 0}
    quotes: dict[str, PriceQuote | None] = {}  # the job run's quotes, looked up once per batch
    assets: dict[int, AssetRow] = {}  # loaded once per batch, whatever the chunks
    price_text: dict[str, str] = {}
    compiled: dict[str, CompiledRules | CriteriaError] = {}
    table = FundamentalsTable()
    cache_states: set[str] = set()
    cache_error = None
    stale_prices: set[str] = set()
    unusable_prices: set[str] = set()
    after: str | None = None
    while True:
        with _gc_paused():  # a chunk makes ~100k short-lived objects: no collection scans the heap meanwhile
            t = time.perf_counter()
            users, assets, criteria, (last_read, n_read) = _load_chunk(conn, job, audience, batch, after, chunk_size,
                                                                       assets)
            if not n_read:
                break
            if not users:  # every user read was completed before (a retry): on to the next chunk
                after = last_read
                if n_read < chunk_size:
                    break
                continue
            missing = sorted({a.symbol for a in assets.values()}.difference(quotes))
            if missing:
                quotes.update(dict.fromkeys(missing))
                quotes.update(job_quotes(conn, job, price_provider, missing))
                if judge_prices is not None:
                    market_of = {a.symbol: a.market for a in assets.values()}
                    stale, unusable = judge_prices(
                        {s: (q.as_of, market_of[s]) for s in missing if (q := quotes[s]) is not None})
                    stale_prices |= stale
                    unusable_prices |= unusable
                    quotes.update(dict.fromkeys(unusable))  # too old to value anything with: unpriced
            prices = {s: q for s, q in quotes.items() if q is not None}
            timings["load"] += time.perf_counter() - t
            t = time.perf_counter()
            shared = Batch(job, rates, assets, criteria, prices, contribution, compiled, price_text, table,
                           score_floor, frozenset(stale_prices), frozenset(unusable_prices))
            results, failures = calculate_chunk(users, shared)
            timings["calc"] += time.perf_counter() - t
            t = time.perf_counter()
            new = _write_results(conn, job, results, failures)
            timings["write"] += time.perf_counter() - t
            t = time.perf_counter()
            if warm_cache is not None and any(r.latest for r in new):
                try:
                    # only documents that are the users' latest: an older session's re-run leaves newer ones
                    warm_cache([(r.user_id, r.document_json, r.portfolio_json) for r in new if r.latest])
                    cache_states.add("warmed")
                except Exception as exc:  # noqa: BLE001 - the cache is optional: Postgres holds the results
                    cache_states.add("failed")
                    cache_error = f"{type(exc).__name__}: {exc}"
                    log.warning("cache not warmed for %s (chunk after %s): %s", batch.get("label"), after, cache_error)
            timings["cache_warm"] += time.perf_counter() - t
            counts["users"] += len(users)
            counts["completed"] += len(new)
            counts["skipped"] += len(results) - len(new)
            counts["failed"] += len(failures)
            counts["warned"] += sum(r.warned for r in new)
            counts["assets_scored"] += sum(r.assets_scored for r in new)
            counts["recommendations_generated"] += sum(r.recommendations for r in new)
            log.info("%s: %d of %d users done", batch.get("label"), counts["users"],
                     batch.get("last", 0) - batch.get("first", 1) + 1)
            after = last_read
            if n_read < chunk_size:
                break
    cache_status = ("failed" if cache_states == {"failed"} else "partial" if "failed" in cache_states
                    else "warmed" if cache_states else "skipped")
    out = {
        "index": batch["index"],
        "label": batch.get("label"),
        **counts,
        "cache_status": cache_status,
        "cache_error": cache_error,
        "stale_prices": sorted(stale_prices),
        "unusable_prices": sorted(unusable_prices),
        **{f"{k}_ms": round(v * 1000, 1) for k, v in timings.items()},
        "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
        "started_at": wall0,
        "ended_at": time.time(),
    }
    log.info("batch %s: %d users, %d completed, %d failed, %.0f ms", batch.get("label"), counts["users"],
             counts["completed"], counts["failed"], out["duration_ms"], extra={"correlation_id": job.correlation_id})
    return out


# --------------------------------------------------------------------------- finalize


def finalize(
    conn: psycopg.Connection,
    job: JobRun,
    *,
    planned: list[dict[str, Any]] | None,
    results: list[dict[str, Any] | None],
    rates: dict[str, Any] | None,
    fetch_rates_ms: float | None = None,
) -> dict[str, Any]:
    """Writes the job-run row's outcome: completed, partial or failed, with counts and metrics."""
    counts: dict[str, int] = dict(conn.execute(
        "SELECT status, count(*) FROM overnight_job_users WHERE job_run_id = %s GROUP BY status", (job.id,)
    ).fetchall())
    completed, failed_rows = counts.get("completed", 0), counts.get("failed", 0)
    failures = [
        {"userId": str(u), "stage": s, "message": e}
        for u, s, e in conn.execute(
            "SELECT user_id, stage, error FROM overnight_job_users WHERE job_run_id = %s AND status = 'failed'"
            " ORDER BY user_id LIMIT %s",
            (job.id, MAX_ERROR_DETAILS),
        )
    ]
    total = planned[0]["total"] if planned else 0
    done = [r for r in results if r]
    done_idx = {r["index"] for r in done}
    failed_batches = [b["label"] for b in (planned or []) if b["index"] not in done_idx]
    missing = max(0, total - completed - failed_rows)
    row = conn.execute("SELECT error_details FROM overnight_job_runs WHERE id = %s", (job.id,)).fetchone()
    details: dict[str, Any] = dict(row[0] or {}) if row else {}
    details.pop("users", None)
    details.pop("batches", None)
    if failures:
        details["users"] = failures
    if failed_batches:
        details["batches"] = failed_batches
    stale_prices = sorted(set().union(*(r.get("stale_prices", ()) for r in done)))
    unusable_prices = sorted(set().union(*(r.get("unusable_prices", ()) for r in done)))
    rates_missing = dict(sorted(((rates or {}).get("unavailable") or {}).items()))
    details.pop("rates", None)
    details.pop("prices", None)
    if rates_missing:
        details["rates"] = rates_missing
    if unusable_prices:
        details["prices"] = {"unusable": unusable_prices[:MAX_ERROR_DETAILS],
                             "reason": "quotes older than OVERNIGHT_MAX_PRICE_AGE_HOURS; their holders failed"}
    if planned is None or rates is None:
        status = "failed"
        details.setdefault("run", {"stage": "before fan-out", "message": "a step before the fan-out failed"})
    elif total and completed == 0:
        status = "failed"
    elif failed_rows or missing or failed_batches:
        status = "partial"
    else:
        status = "completed"
        details.pop("run", None)
    cache_states = {r["cache_status"] for r in done if r["users"]}
    cache = ("warmed" if cache_states <= {"warmed", "skipped"} and "warmed" in cache_states
             else "not warmed" if cache_states == {"failed"}
             else "partially warmed" if cache_states & {"failed", "partial"} else "nothing to warm")
    starts = [r["started_at"] for r in done]
    ends = [r["ended_at"] for r in done]
    metrics = {
        "fetch_rates_ms": fetch_rates_ms,
        "process_users_ms": round((max(ends) - min(starts)) * 1000, 1) if done else 0,
        "cache_warm_ms": round(sum(r["cache_warm_ms"] for r in done), 1),
        "users_total": total,
        "batches": len(planned or []),
        "batches_failed": len(failed_batches),
        "assets_scored": sum(r["assets_scored"] for r in done),
        "recommendations_generated": sum(r["recommendations_generated"] for r in done),
        "users_with_warnings": sum(r.get("warned", 0) for r in done),
        "users_skipped_already_done": sum(r["skipped"] for r in done),
        "cache_status": cache,
        "cache_errors": sorted({r["cache_error"] for r in done if r.get("cache_error")})[:5],
        "rates_stale": bool(rates and rates.get("stale")),
        "rates_as_of": rates.get("as_of") if rates else None,
        "rates_missing": sorted(rates_missing),
        "stale_prices": len(stale_prices),
        "stale_price_symbols": stale_prices[:20],
        "unusable_prices": len(unusable_prices),
    }
    users_failed = failed_rows + missing
    conn.execute(
        "UPDATE overnight_job_runs SET status = %s, completed_at = clock_timestamp(), users_processed = %s, users_failed = %s,"
        " error_details = %s, metrics = %s WHERE id = %s",
        (status, completed, users_failed, json.dumps(details) if details else None, json.dumps(metrics), job.id),
    )
    conn.commit()
    summary = {"status": status, "users_processed": completed, "users_failed": users_failed, **metrics}
    log.info("job run %s %s: %d processed, %d failed", job.id, status, completed, users_failed,
             extra={"correlation_id": job.correlation_id})
    return summary


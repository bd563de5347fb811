"""Loading a night's inputs: exchange rates, the batches, users in chunks, and the job run's
snapshots of assets and quotes (shared by every batch, retry and replay)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg

from overnight.adapters.providers.base import (
    PriceProvider,
    PriceQuote,
    ProviderError,
    RatesProvider,
    RatesSnapshot,
    normalize_quote,
)
from overnight.adapters.providers.db import latest_stored_rates, store_rates
from overnight.domain import freshness
from overnight.domain.recommendations import (
    Target,
)
from overnight.night.jobrun import RATES_BASE, AssetRow, Audience, JobRun, UserRow

log = logging.getLogger(__name__)


MAX_MAPPED_TASKS = 256


# --------------------------------------------------------------------------- rates


def needed_currencies(conn: psycopg.Connection, also: Iterable[str] = ()) -> list[str]:
    """Returns every currency the run may convert through: those assets trade in, their stored quotes are in, the
    active users count in, and `also` (the run's contribution currency), each as the rates provider knows it."""
    rows = conn.execute(
        "SELECT currency FROM assets UNION SELECT currency FROM (SELECT DISTINCT currency FROM prices) q"
        " UNION SELECT base_currency FROM users WHERE active"
    ).fetchall()
    given = [r[0].strip() for r in rows] + [c.strip() for c in also if c]
    return sorted({normalize_quote(Decimal(1), c)[1] for c in given} | {RATES_BASE})


def fetch_rates(
    conn: psycopg.Connection,
    provider: RatesProvider,
    currencies: list[str],
    *,
    max_lag_publications: int = freshness.DEFAULT_MAX_RATES_LAG_PUBLICATIONS,
    now: datetime | None = None,
    margin: timedelta = freshness.DEFAULT_RATES_MARGIN,
) -> RatesSnapshot:
    """Fetches rates once (kept in `exchange_rates`), judged against the ECB's calendar at `now` (the run's
    reference moment; docs/freshness.md). Never raises for rates: stored rates stand in for a failed provider
    (flagged stale) and for currencies it did not deliver; a currency with no usable rate (none at all, or
    more than `max_lag_publications` ECB publications behind the expected one) is left out and listed in `unavailable`, so only
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
        verdict = freshness.judge_rates(dated[c], now, margin=margin, max_lag_publications=max_lag_publications)
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
                         dated={c: dated[c] for c in rates if c != RATES_BASE}, stale_in=frozenset(stale_in))


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


# A user and their inputs in one row: holdings (by asset id), watchlist (by asset id) and targets (by class name)
# as ordered arrays, each read by the primary key's index, instead of a row per item from three more queries.
# Measured on the XNYS batch of a 20,000-user seed (11,743 users, chunks of 1,000; `_load_chunk` before and after,
# interleaved, 5 rounds): Python CPU 62.7-66.7 -> 46.1-47.1 µs per user (best), wall 98.5-117.8 -> 91.1-105.8 µs,
# Postgres CPU unchanged at 40 µs (the backend's /proc counters).
USERS_SELECT = (
    "SELECT u.id::text, u.base_currency, u.default_contribution, u.markets, u.criteria_key,"
    " h.assets, h.quantities, w.assets, t.names, t.lows, t.highs FROM users u"
    " CROSS JOIN LATERAL (SELECT array_agg(asset_id ORDER BY asset_id) AS assets,"
    " array_agg(quantity ORDER BY asset_id) AS quantities FROM holdings WHERE user_id = u.id) h"
    " CROSS JOIN LATERAL (SELECT array_agg(asset_id ORDER BY asset_id) AS assets FROM watchlist"
    " WHERE user_id = u.id) w"
    " CROSS JOIN LATERAL (SELECT array_agg(c.name ORDER BY c.name) AS names, array_agg(a.min_pct ORDER BY c.name)"
    " AS lows, array_agg(a.max_pct ORDER BY c.name) AS highs FROM allocation_targets a"
    " JOIN asset_classes c ON c.id = a.class_id WHERE a.user_id = u.id) t"
)


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
    # Planned afresh each time (not prepared: the generic plan psycopg's prepared statement gets after five runs
    # scans the three tables whole, 350 ms a chunk against 50), and without JIT (its estimate of the per-user
    # lookups crosses jit_above_cost; compiling cost 10-15 ms a chunk and saved nothing). SET LOCAL: this
    # transaction only (the chunk's reads, until `job_assets` commits). fetchall() converts the rows in C.
    conn.execute("SET LOCAL jit = off")
    rows = conn.execute(USERS_SELECT + f" WHERE {where} AND {lower} AND u.id <= %(hi)s ORDER BY u.id"
                        " LIMIT %(limit)s", params, prepare=False).fetchall()
    assets = {} if assets is None else assets
    if not rows:
        return [], assets, {}, (None, 0)
    done = {r[0] for r in conn.execute(
        "SELECT user_id::text FROM overnight_job_users WHERE job_run_id = %s AND user_id = ANY(%s::uuid[])"
        " AND status = 'completed'", (job.id, [r[0] for r in rows])).fetchall()}
    read = (rows[-1][0], len(rows))
    users: dict[str, UserRow] = {}
    asset_ids: set[int] = set()
    for uid, currency, contribution, markets, key, held, quantities, watched, names, lows, highs in rows:
        if uid in done:
            continue
        users[uid] = UserRow(uid, currency.strip(), contribution, markets, key,
                             list(zip(held, quantities, strict=True)) if held else [], watched or [],
                             list(map(Target, names, lows, highs)) if names else [])
        if held:
            asset_ids.update(held)
        if watched:
            asset_ids.update(watched)
    if not users:
        return [], assets, {}, read
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


def last_known_quotes(conn: psycopg.Connection, job: JobRun, symbols: list[str]) -> dict[str, PriceQuote]:
    """The newest quote earlier job runs (of any market) used for each of `symbols`, from their snapshots
    (`overnight_job_prices`): what a holding without a usable quote tonight is valued at (docs/allocation.md).
    Symbols no job run ever priced are left out."""
    if not symbols:
        return {}
    rows = conn.execute(
        "SELECT DISTINCT ON (symbol) symbol, price, currency, as_of FROM overnight_job_prices"
        " WHERE symbol = ANY(%s) AND job_run_id <> %s ORDER BY symbol, as_of DESC", (symbols, job.id)).fetchall()
    return {s: PriceQuote(s, p, c.strip(), a.astimezone(UTC)) for s, p, c, a in rows}


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

"""The dashboard's data access: recommendations (Redis first, Postgres fallback), job runs, the audit trail.

Async and free of FastAPI so it can be tested on its own: `DashboardStore` owns a lazily created,
bounded pool of `psycopg.AsyncConnection`s (`pgpool`) and a pipelined Redis GET client (`overnight.dashboard.redis_get`)
whose calls are bounded at ~200 ms (~100 ms to connect). Redis is optional: any Redis error or
timeout falls back to the `recommendations` table. A late reply costs only its request; when Redis
refuses, breaks or stays silent for 1 s it is skipped for a few seconds, so an outage costs about a
second of timeouts, not one per request. All SQL is parameterised; nothing a caller passes is ever
formatted into a statement. What a document shows (freshness, the view) is in `docview`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgspec
import psycopg

from overnight.adapters import cache
from overnight.dashboard.docview import (
    DUE,
    OVERDUE,
    DashboardView,
    UnknownUser,
    _iso,
    _lead,
    fresh_until,
    parse_time,
    parse_user_id,
    resolved,
    view_from_document,
)
from overnight.dashboard.pgpool import (
    OPS_POOL_SIZE,
    PG_CONNECT_TIMEOUT_S,
    PG_POOL_SIZE,
    PG_STATEMENT_TIMEOUT_MS,
    AsyncPgPool,
    StoreUnavailable,
)
from overnight.domain import freshness
from overnight.domain.scoring import NO_USABLE_PRICE
from overnight.night import trail
from overnight.night.invalidation import RECALCULATION_WAIT

log = logging.getLogger(__name__)


_decode_json = msgspec.json.Decoder().decode  # as json.loads, ~3x faster
REDIS_TIMEOUT_S = 0.1
REDIS_RETRY_AFTER_S = 5.0
REDIS_SILENT_S = 1.0  # a call times out and Redis has said nothing for this long: it is down, not late
JOB_STATUSES = ("started", "completed", "partial", "failed")
MAX_LIMIT = 500
HISTORY_PER_MARKET = 30
STATUS_TTL_S = 5.0  # how long a process trusts what it read of a market's next run (docs/freshness.md)
STATUS_MAX_ENTRIES = 1024


# --------------------------------------------------------------------------- the store


def _redacted(url: str | None, conn_type: str) -> str:
    """A DSN or URL for a repr: password masked; 'unresolved' before first use."""
    if url is None:
        return "unresolved"
    if not url:
        return "none"
    from overnight.adapters.connections import ConnectionNotConfigured, from_value, redacted

    try:
        return redacted(from_value(f"overnight_{conn_type}", url))
    except (ConnectionNotConfigured, ValueError):
        return "<unparsable, hidden>"


@dataclass
class DashboardStore:
    """The dashboard's reads. Connections are resolved and pools created on first use, not per request."""

    pg_dsn: str | None = field(default=None, repr=False)  # may hold a password: see __repr__
    redis_url: str | None = field(default=None, repr=False)
    redis_timeout_s: float = REDIS_TIMEOUT_S
    pg_pool_size: int = PG_POOL_SIZE
    ops_pool_size: int = OPS_POOL_SIZE
    _pg: AsyncPgPool | None = field(default=None, init=False, repr=False)
    _ops: AsyncPgPool | None = field(default=None, init=False, repr=False)
    _redis: Any = field(default=None, init=False, repr=False)
    _redis_skip_until: float = field(default=0.0, init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)
    # (market, session_date of a document) -> (monotonic time read, what happened to that market's next run)
    _next_runs: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict, init=False, repr=False)

    def __repr__(self) -> str:
        return (f"DashboardStore(pg={_redacted(self.pg_dsn, 'postgres')}, redis={_redacted(self.redis_url, 'redis')}, "
                f"redis_timeout_s={self.redis_timeout_s}, pg_pool_size={self.pg_pool_size}, "
                f"ops_pool_size={self.ops_pool_size})")

    async def _ensure(self) -> None:
        if self._pg is not None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pg is not None:
                return
            if self.pg_dsn is None or self.redis_url is None:
                from overnight.adapters import connections

                # Resolving a connection may ask Airflow's secrets backends or its metadata database (connections
                # added in the UI): keep it off the event loop.
                def resolve(conn_id: str) -> Any:
                    return connections.get_connection(conn_id, server=True)

                if self.pg_dsn is None:
                    pg = await asyncio.to_thread(resolve, connections.POSTGRES_CONN_ID)
                    self.pg_dsn = connections.postgres_dsn(pg)
                if self.redis_url is None:
                    try:
                        rd = await asyncio.to_thread(resolve, connections.REDIS_CONN_ID)
                        self.redis_url = connections.redis_url(rd)
                    except connections.ConnectionNotConfigured as exc:
                        log.warning("dashboard: no Redis (%s); serving from Postgres only", exc)
                        self.redis_url = ""
            if self.redis_url:
                from overnight.dashboard.redis_get import RedisGet

                self._redis = RedisGet(self.redis_url, connect_timeout_s=self.redis_timeout_s)
            self._ops = AsyncPgPool(self.pg_dsn, self.ops_pool_size)
            self._pg = AsyncPgPool(self.pg_dsn, self.pg_pool_size)

    async def _pool(self) -> AsyncPgPool:
        """The investors' pool: dashboards and what their freshness asks."""
        await self._ensure()
        assert self._pg is not None
        return self._pg

    async def _ops_pool(self) -> AsyncPgPool:
        """The operations routes' own small pool (job runs, markets, the page, /audit): a flood of them waits
        or gets 503 there, never takes a connection an investor's dashboard needs."""
        await self._ensure()
        assert self._ops is not None
        return self._ops

    async def aclose(self) -> None:
        """Closes the pools (the app's shutdown)."""
        if self._ops is not None:
            await self._ops.close()
            self._ops = None
        if self._pg is not None:
            await self._pg.close()
            self._pg = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    # ---------------------------------------------------------------- recommendations

    async def cached_raw(self, user_id: str) -> bytes | None:
        """Returns the cached document's bytes, or None on a miss, a Redis error or a timeout."""
        await self._ensure()
        if self._redis is None or time.monotonic() < self._redis_skip_until:
            return None
        try:
            async with asyncio.timeout(self.redis_timeout_s * 2):
                return await self._redis.get(cache.recs_key(user_id))  # type: ignore[no-any-return]
        except TimeoutError:
            if self._redis.silent_for() < REDIS_SILENT_S:
                # Late, not lost: this process or the whole machine stalled (seen: 240 ms on a busy 2-core
                # machine). Postgres answers this call; skipping Redis for 5 s would turn a stall into 5 s
                # of slower answers. The late reply is read and dropped.
                log.warning("dashboard: a Redis reply took over %.0f ms; this request is answered from Postgres",
                            self.redis_timeout_s * 2000)
                return None
            self._redis_failed(TimeoutError(f"no reply, Redis silent for {self._redis.silent_for():.1f} s"))
        except Exception as exc:  # noqa: BLE001 - the cache is optional: any failure means "ask Postgres"
            self._redis_failed(exc)
        return None

    def _redis_failed(self, exc: BaseException) -> None:
        """Redis refused, broke or fell silent: drop the connection and use Postgres alone for a while."""
        self._redis.abort()  # a hung connection is not kept: the next try opens a new one
        self._redis_skip_until = time.monotonic() + REDIS_RETRY_AFTER_S
        log.warning("dashboard: Redis unavailable (%s: %s); using Postgres for %.0f s",
                    type(exc).__name__, exc, REDIS_RETRY_AFTER_S)

    async def _cached(self, user_id: str) -> dict[str, Any] | None:
        """Returns the cached document, or None on a miss, a Redis error, a timeout or an unusable value."""
        raw = await self.cached_raw(user_id)
        if raw is None:
            return None
        try:
            doc = _decode_json(raw)
        except msgspec.DecodeError:
            log.warning("dashboard: cache key %s holds invalid JSON; using Postgres", cache.recs_key(user_id))
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("recommendations"), list) else None

    async def dashboard(self, user_id: str, now: datetime | None = None, *, ask_cache: bool = True) -> DashboardView:
        """Returns a user's recommendations: Redis `recs:{id}` first (unless not `ask_cache`: the caller just
        did), else the `recommendations` row.

        A user known to the users table but not calculated yet gets an empty, stale view; an id that
        neither table knows raises UnknownUser; a malformed id raises InvalidUserId.
        """
        uid = parse_user_id(user_id)
        await self._ensure()
        doc = await self._cached(uid) if ask_cache else None
        if doc is not None:
            return await self._explained(view_from_document(uid, doc, from_cache=True, now=now), doc)
        rows = await (await self._pool()).fetch(
            "SELECT r.document, u.base_currency, u.id IS NOT NULL, i.invalidated_at, i.dag_run_id,"
            " i.invalidated_at > coalesce(r.generated_at, '-infinity') FROM (SELECT %(id)s::uuid AS id) q"
            " LEFT JOIN recommendations r ON r.user_id = q.id LEFT JOIN users u ON u.id = q.id"
            " LEFT JOIN overnight_invalidations i ON i.user_id = q.id",
            {"id": uid},
        )
        document, base_currency, known, invalidated_at, recalculation, superseded = rows[0]
        invalidated = await self._invalidated(invalidated_at, recalculation, now) if superseded else None
        if document is not None:
            view = view_from_document(uid, document, from_cache=False, base_currency=base_currency, now=now)
            if invalidated is not None:  # invalidated since it was generated (docs/design.md): not current advice
                return dataclasses.replace(view, stale=True, stale_reason=invalidated, next_run_due=False)
            return await self._explained(view, document)
        if not known:
            raise UnknownUser(f"user {uid} is not in the users table and has no recommendations")
        return DashboardView(uid, [], None, base_currency.strip() if base_currency else None, None,
                             from_cache=False, stale=True,
                             stale_reason=freshness.RECALCULATING if invalidated == freshness.RECALCULATING
                             else freshness.NOT_CALCULATED)

    async def _invalidated(self, invalidated_at: datetime, dag_run_id: str | None, now: datetime | None) -> str:
        """`recalculating` while the recalculation asked with the invalidation (its DAG run) has not ended, and for at
        most the market DAG's run timeout; else `invalidated`."""
        if dag_run_id is None or (now or datetime.now(UTC)) - invalidated_at > RECALCULATION_WAIT:
            return freshness.INVALIDATED
        rows = await (await self._pool()).fetch(
            "SELECT completed_at IS NOT NULL FROM overnight_job_runs WHERE job_type = 'recalculation'"
            " AND dag_run_id = %(run)s ORDER BY started_at DESC LIMIT 1", {"run": dag_run_id})
        return freshness.INVALIDATED if rows and rows[0][0] else freshness.RECALCULATING

    async def _explained(self, view: DashboardView, doc: dict[str, Any]) -> DashboardView:
        """The view with its market's next run looked up when it matters: why an overdue document was not
        replaced, or whether the due next run already failed (docs/freshness.md)."""
        if not view.next_run_due and view.stale_reason != OVERDUE:
            return view
        market, session = doc["market"], doc["sessionDate"]
        next_run = self.known_next_run(market, session) or await self.overdue_reason(market, session)
        reason = resolved(DUE if view.next_run_due else OVERDUE, next_run)
        return dataclasses.replace(view, stale=reason is not None, stale_reason=reason, next_run_due=False)

    def known_next_run(self, market: str, session_date: str) -> str | None:
        """What `overdue_reason` said of this (market, session)'s next run within the last STATUS_TTL_S, else None
        (then ask `overdue_reason`). Lets the fast path answer a document whose next run is due without a query."""
        entry = self._next_runs.get((market, session_date))
        if entry is None or time.monotonic() - entry[0] > STATUS_TTL_S:
            return None
        return entry[1]

    async def overdue_reason(self, market: str, session_date: str) -> str:
        """What happened to the run of `market`'s session after `session_date` (the one that must replace its
        documents): failed, missing, not finished, or finished (`user_not_updated`: a document still of
        `session_date` was not replaced by it). Kept STATUS_TTL_S for `known_next_run`."""
        lead = _lead(market) or timedelta(0)
        nxt = freshness.next_session(market, lead, date.fromisoformat(session_date))
        rows = await (await self._pool()).fetch(
            "SELECT status FROM overnight_job_runs WHERE market = %(m)s AND session_date = %(d)s"
            " AND job_type = 'scoring' ORDER BY started_at DESC LIMIT 1", {"m": market, "d": nxt})
        status = rows[0][0] if rows else None
        reason = (freshness.RUN_MISSING if status is None
                  else freshness.RUN_FAILED if status == "failed"
                  else freshness.RUN_UNFINISHED if status == "started"
                  else freshness.USER_NOT_UPDATED)
        if len(self._next_runs) >= STATUS_MAX_ENTRIES:
            self._next_runs.clear()
        self._next_runs[(market, session_date)] = (time.monotonic(), reason)
        return reason

    # ---------------------------------------------------------------- invalidation

    async def invalidate(self, user_id: str, by: str | None, *, recalculate: bool,
                         trigger: Callable[[str, str, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Drops a user's cached keys, records the invalidation and, with `recalculate`, triggers their serving
        market's DAG through `trigger` (`overnight.night.invalidation`), off the event loop. Raises InvalidUserId,
        invalidation.UnknownUser / NoServingMarket / LookupError, PermissionError, StoreUnavailable."""
        from overnight.night import invalidation

        uid = parse_user_id(user_id)
        await self._ensure()
        dsn, url = self.pg_dsn, self.redis_url
        assert dsn is not None

        def run() -> dict[str, Any]:
            client = cache.connect(url) if url else None
            try:
                with psycopg.connect(dsn, connect_timeout=PG_CONNECT_TIMEOUT_S,
                                     application_name="overnight-invalidation") as conn:
                    done = invalidation.invalidate_user(conn, client, uid, by)
                    if recalculate and trigger is None:
                        raise LookupError("no way to trigger a recalculation was given")
                    done["recalculation"] = (invalidation.request_recalculation(conn, uid, trigger).to_json()
                                             if recalculate and trigger is not None else None)
                    return done
            finally:
                if client is not None:
                    client.close()

        try:
            return await asyncio.to_thread(contextvars.copy_context().run, run)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"Postgres (overnight_postgres) is unavailable: {exc}".strip()) from exc

    async def invalidate_all(self) -> dict[str, Any]:
        """Drops every user's cached keys (SCAN + UNLINK, off the event loop); raises StoreUnavailable without Redis."""
        from overnight.night import invalidation

        await self._ensure()
        if not self.redis_url:
            raise StoreUnavailable("no Redis connection (overnight_redis) is configured: there is no cache to clear")
        url = self.redis_url

        def run() -> dict[str, Any]:
            client = cache.connect(url)
            try:
                return invalidation.invalidate_all(client)
            finally:
                client.close()

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:  # redis.RedisError: the cache cannot be reached
            raise StoreUnavailable(f"Redis (overnight_redis) is unavailable: {type(exc).__name__}: {exc}") from exc

    # ---------------------------------------------------------------- job runs

    async def job_runs(
        self, *, market: str | None = None, status: str | None = None, limit: int = 50,
        now: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Returns the newest `overnight_job_runs` rows (optionally of one market / status), newest first."""
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(JOB_STATUSES)}")
        limit = max(1, min(int(limit), MAX_LIMIT))
        where: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        if market is not None:
            where.append("market = %(market)s")
            params["market"] = market
        if status is not None:
            where.append("status = %(status)s")
            params["status"] = status
        sql = (_JOB_RUN_SELECT + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY started_at DESC LIMIT %(limit)s")
        rows = await (await self._ops_pool()).fetch(sql, params)
        return [_job_run(r, now) for r in rows]

    async def market_history(self, per_market: int = HISTORY_PER_MARKET,
                             now: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
        """Returns each market's last `per_market` job runs, oldest first (the page's table and chart)."""
        rows = await (await self._ops_pool()).fetch(
            "SELECT * FROM (" + _JOB_RUN_SELECT.replace(
                "FROM overnight_job_runs",
                ", row_number() OVER (PARTITION BY market ORDER BY started_at DESC) AS rn FROM overnight_job_runs"
                " WHERE job_type = 'scoring'")  # the markets' nights, not recalculations nor cache warming
            + ") t WHERE rn <= %(n)s ORDER BY market, started_at",
            {"n": max(1, min(per_market, MAX_LIMIT))},
        )
        out: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            run = _job_run(r[:-1], now)
            out.setdefault(run["market"], []).append(run)
        return out

    # ---------------------------------------------------------------- audit

    async def replay(self, correlation_id: str, user_id: str, *,
                     done: Callable[[], None] | None = None) -> dict[str, Any]:
        """Replays a user's calculation (`overnight.night.replay`) on a read-only connection of its own, off the event
        loop; returns the result's JSON. Raises replay.UnknownCalculation, replay.IncompleteCalculation,
        StoreUnavailable.

        `done` is called exactly once, on the event loop, when nothing this call started still runs: when the
        thread ends, not when the caller stops waiting. A cancelled request does not stop a thread (nor its
        query, up to the statement timeout), so a concurrency slot released at cancellation would let more
        replays run than it allows (the /audit cap)."""
        loop = asyncio.get_running_loop()
        handed_over = False
        try:
            uid = parse_user_id(user_id)
            await self._ensure()
            dsn = self.pg_dsn
            assert dsn is not None

            def run() -> dict[str, Any]:
                from overnight.night import replay

                try:
                    with psycopg.connect(dsn, connect_timeout=PG_CONNECT_TIMEOUT_S,
                                         application_name="overnight-replay",
                                         options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}") as conn:
                        conn.read_only = True
                        return replay.replay_user(conn, correlation_id, uid).to_json()
                finally:
                    if done is not None:
                        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the slot
                            loop.call_soon_threadsafe(done)

            # shielded: a cancelled caller must not cancel a thread still queued (its `done` would never come)
            thread = loop.run_in_executor(None, contextvars.copy_context().run, run)
            handed_over = True
            thread.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even with no waiter
            try:
                return await asyncio.shield(thread)
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"Postgres (overnight_postgres) is unavailable: {exc}".strip()) from exc
        finally:
            if not handed_over and done is not None:
                done()

    async def calculation(self, correlation_id: str, user_id: str) -> dict[str, Any] | None:
        """A user's events in the job run of `correlation_id`, oldest first (index: correlation id, user); None when
        there are none."""
        uid = parse_user_id(user_id)
        rows = await (await self._ops_pool()).fetch(CALCULATION_SQL, {"corr": correlation_id, "users": [uid]})
        if not rows:
            return None
        r = rows[0]
        return {
            "userId": uid, "correlationId": correlation_id,
            "jobRun": None if r[4] is None else {"id": str(r[4]), "market": r[5], "sessionDate": _iso(r[6]),
                                                 "status": r[7]},
            "events": [{"eventId": str(e[0]), "eventType": e[1], "createdAt": e[2].isoformat(), "payload": e[3]}
                       for e in rows],
        }

    async def asset_events(
        self, symbol: str, *, limit: int = 50, before: datetime | None = None, before_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
        """Returns the SCORES_COMPUTED event of every calculation whose universe held `symbol` (scored or not), newest
        first, with its outcome, and the next page's cursor.

        Keyset pagination on (created_at, event_id): pass the returned `before` (and `beforeId`) back.
        """
        limit = max(1, min(int(limit), MAX_LIMIT))
        sql, params = asset_events_query(symbol, limit + 1, before, before_id)
        rows = await (await self._ops_pool()).fetch(sql, params)
        more = len(rows) > limit
        rows = rows[:limit]
        events = [
            {
                "eventId": str(r[0]), "eventType": r[1], "userId": str(r[2]), "correlationId": str(r[3]),
                "createdAt": r[4].isoformat(), "symbol": symbol, "score": r[5], **_outcome(r[5], r[10]),
                "jobRun": None if r[6] is None else {
                    "id": str(r[6]), "market": r[7], "sessionDate": _iso(r[8]), "status": r[9]},
            }
            for r in rows
        ]
        cursor = {"before": events[-1]["createdAt"], "beforeId": events[-1]["eventId"]} if more and events else None
        return events, cursor


CALCULATION_SQL = (
    "SELECT e.event_id, e.event_type, e.created_at, e.payload, j.id, j.market, j.session_date, j.status FROM ("
    + trail.events_sql(True) + ") e (user_id, event_id, event_type, payload, created_at)"
    " LEFT JOIN overnight_job_runs j ON j.correlation_id = %(corr)s ORDER BY e.created_at, e.event_id")


def _outcome(score: str | None, unscored: str | None) -> dict[str, str | None]:
    """A calculation's outcome for the asset: `scored`, `unpriced` (no usable price) or `unscored` (no exchange rate,
    a missing fundamental: `reason` says)."""
    if score is not None:
        return {"outcome": "scored", "reason": None}
    return {"outcome": "unpriced" if unscored == NO_USABLE_PRICE else "unscored", "reason": unscored}


def asset_events_query(symbol: str, limit: int, before: datetime | None = None, before_id: str | None = None
                       ) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters of one `/audit/assets/{symbol}` page, in its three shapes: the first page, a page
    before a time, a page after an event (its id and time, the previous page's cursor).

    Newest first by chunk: the chunks whose users' universes held the symbol (GIN index on `symbols`), newest
    first (index on created_at), each chunk's users last written first; then the rows from before migration 0011
    (`calculation_events_rows`, its partial GIN index), newest first. Every chunk the GIN index finds has at least
    one such user, so `limit` chunks always fill a page: no page reads more. An event id names its chunk and its
    user's position (`overnight_event_id`), so a cursor continues inside a chunk; `before` alone keeps the chunks
    written before that time. tests/integration/dashboard/test_audit_plans.py checks the plans."""
    params: dict[str, Any] = {"symbol": symbol, "limit": limit, "before": None, "before_id": None, "cid": None,
                              "pos": None}
    chunk_cond = row_cond = pos_cond = ""
    if before is not None:
        params["before"] = parse_time(before)
        if before_id is not None:
            event = uuid.UUID(before_id)
            params["before_id"] = str(event)
            params["cid"] = str(event)[:31] + "00000"
            params["pos"] = int(str(event)[31:], 16) >> 3
            # after an event of a chunk: the rest of that chunk and the older chunks, then every older row; after an
            # older row: no chunk, and the rows before it
            chunk_cond = (" AND EXISTS (SELECT 1 FROM cur) AND (c.created_at, c.chunk_id) <="
                          " (SELECT created_at, chunk_id FROM cur)")
            pos_cond = " AND (c.chunk_id <> %(cid)s::uuid OR u.n < %(pos)s)"
            row_cond = (" AND (EXISTS (SELECT 1 FROM cur) OR (e.created_at, e.event_id) <"
                        " (%(before)s, %(before_id)s::uuid))")
        else:
            chunk_cond = " AND c.created_at < %(before)s"
            row_cond = " AND e.created_at < %(before)s"
    sc = "(u.evs -> 2 -> 2)"  # the user's SCORES_COMPUTED payload (json): scores inline, or the job run's table
    outcome = (f"CASE WHEN {sc} -> 'scores' IS NOT NULL THEN {sc} -> 'scores' ->> %(symbol)s"
               f" WHEN {sc} -> 'unscored' -> %(symbol)s IS NOT NULL THEN NULL ELSE s.score END,"
               " j.id, j.market, j.session_date, j.status,"
               f" coalesce({sc} -> 'unscored' ->> %(symbol)s, CASE WHEN {sc} -> 'scores' IS NOT NULL THEN NULL"
               " ELSE s.reason END)")
    chunks = (
        "SELECT overnight_event_id(c.chunk_id, u.n, 3), 'SCORES_COMPUTED', c.user_ids[u.n], c.correlation_id,"
        " c.created_at + (u.evs -> 2 ->> 1)::bigint * interval '1 microsecond', " + outcome + ","
        " 0 AS part, c.created_at AS k1, c.chunk_id AS k2, u.n AS k3"
        " FROM (SELECT c.chunk_id, c.created_at, c.job_run_id, c.correlation_id, c.user_ids, c.events"
        " FROM calculation_chunks c WHERE c.symbols @> ARRAY[%(symbol)s]::text[]" + chunk_cond +
        " ORDER BY c.created_at DESC, c.chunk_id DESC LIMIT %(limit)s + 1) c"
        " CROSS JOIN LATERAL json_array_elements(c.events) WITH ORDINALITY AS u(evs, n)"
        " LEFT JOIN overnight_job_scores s ON s.job_run_id = c.job_run_id"
        f" AND s.criteria_version = {sc} ->> 'criteriaVersion' AND s.symbol = %(symbol)s"
        " LEFT JOIN overnight_job_runs j ON j.id = c.job_run_id"
        # the universe's JSON text holds the symbol as a JSON string: found without parsing the payload
        f" WHERE u.evs -> 2 ->> 0 = 'SCORES_COMPUTED' AND strpos(({sc} -> 'universe')::text,"
        " to_json(%(symbol)s::text)::text) > 0" + pos_cond)
    # the rows from before migration 0011: SCORES_COMPUTED's scored and unscored symbols (migration 0010's index)
    rows = (
        "SELECT e.event_id, e.event_type, e.user_id, e.correlation_id, e.created_at,"
        " e.payload -> 'scores' ->> %(symbol)s, j.id, j.market, j.session_date, j.status,"
        " e.payload -> 'unscored' ->> %(symbol)s, 1, e.created_at, e.event_id, 0"
        " FROM calculation_events_rows e LEFT JOIN overnight_job_runs j ON j.correlation_id = e.correlation_id"
        " WHERE e.event_type = 'SCORES_COMPUTED' AND overnight_universe(e.symbols, e.payload) @> ARRAY[%(symbol)s]"
        "::text[]" + row_cond + " ORDER BY e.created_at DESC, e.event_id DESC LIMIT %(limit)s")
    cur = "WITH cur AS (SELECT chunk_id, created_at FROM calculation_chunks WHERE chunk_id = %(cid)s::uuid) "
    sql = (cur + "SELECT * FROM ((" + chunks + " ORDER BY k1 DESC, k2 DESC, k3 DESC LIMIT %(limit)s) UNION ALL ("
           + rows + ")) page ORDER BY part, k1 DESC, k2 DESC, k3 DESC LIMIT %(limit)s")
    return sql, params


_JOB_RUN_SELECT = (
    "SELECT id, job_type, market, session_date, status, started_at, completed_at, users_processed,"
    " users_failed, correlation_id, dag_run_id, metrics ->> 'rates_stale', metrics ->> 'rates_as_of',"
    " metrics ->> 'cache_status', metrics ->> 'users_total', metrics -> 'rates_missing',"
    " metrics ->> 'stale_prices' FROM overnight_job_runs"
)


def _job_run(r: tuple[Any, ...], now: datetime | None) -> dict[str, Any]:
    """Shapes one `_JOB_RUN_SELECT` row: counts, duration and freshness: stale (with `staleReason`) when built
    on stale rates, failed, unfinished, or its market's next run + grace has passed (docs/freshness.md)."""
    now = now or datetime.now(UTC)
    started, completed = r[5], r[6]
    rates_stale = (r[11] or "").lower() == "true"
    age = (now - completed).total_seconds() if completed else None
    until = fresh_until(r[2], _iso(r[3]), completed)
    reason = (freshness.RATES_STALE if rates_stale
              else freshness.RUN_FAILED if r[4] == "failed"
              else freshness.RUN_UNFINISHED if completed is None
              else freshness.NEXT_RUN_DUE if until is not None and now > until else None)
    return {
        "id": str(r[0]),
        "jobType": r[1],
        "market": r[2],
        "sessionDate": _iso(r[3]),
        "status": r[4],
        "startedAt": _iso(started),
        "completedAt": _iso(completed),
        "durationSeconds": round((completed - started).total_seconds(), 3) if completed else None,
        "usersProcessed": r[7],
        "usersFailed": r[8],
        "usersTotal": int(r[14]) if r[14] is not None else None,
        "correlationId": str(r[9]),
        "dagRunId": r[10],
        "ratesStale": rates_stale,
        "ratesAsOf": r[12],
        "cacheStatus": r[13],
        "ageSeconds": round(age, 1) if age is not None else None,
        "stale": reason is not None,
        "staleReason": reason,
        "ratesMissing": list(r[15] or []),
        "stalePrices": int(r[16]) if r[16] is not None else 0,
    }

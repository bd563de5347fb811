"""Re-warms the Redis cache from Postgres: `recs:{id}` and `portfolio:{id}` from the `recommendations` table.

For everyone, or for the given users. Rows stream through a server-side cursor in chunks and go to
Redis in pipelined writes (`overnight.adapters.cache.warm`) with the TTL `OVERNIGHT_CACHE_TTL` gives each document (24 h by
default, or until its market's next run: docs/freshness.md), so memory stays flat
whatever the number of users. Used by the `overnight_cache_warmer` DAG (after a Redis flush or loss).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import redis

from overnight.adapters import cache, db
from overnight.adapters.pseudonyms import user_ref
from overnight.domain import freshness
from overnight.domain.markets import UnknownMarketError, get_market
from overnight.night.jobrun import CACHE_WARM, start_execution

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2000
MAX_MISSING_REPORTED = 100


def validate_user_ids(user_ids: Sequence[Any] | None) -> list[str] | None:
    """Returns the canonical UUIDs (deduplicated, in order) or None for everyone; raises ValueError naming bad ids."""
    if user_ids is None:
        return None
    if isinstance(user_ids, str) or not isinstance(user_ids, Sequence):
        raise ValueError(f"user_ids must be a list of UUID strings or null, got {type(user_ids).__name__}")
    good: list[str] = []
    bad: list[str] = []
    for raw in user_ids:
        try:
            canonical = str(uuid.UUID(str(raw)))
        except ValueError:
            bad.append(repr(raw)[:60])
            continue
        if canonical not in good:
            good.append(canonical)
    if bad:
        raise ValueError(f"user_ids: {len(bad)} not a UUID: {', '.join(bad[:10])}; pass UUID strings, or null for everyone")
    return good


def iter_documents(
    conn: psycopg.Connection, user_ids: list[str] | None = None, chunk: int = DEFAULT_CHUNK
) -> Iterator[tuple[str, str, str, str | None, str | None]]:
    """Yields (user_id, recs JSON, portfolio JSON, market, session date) from `recommendations` via a
    server-side cursor, in id order."""
    # a document invalidated since it was generated (overnight_invalidations) is not put back (docs/design.md)
    sql = ("SELECT r.user_id::text, r.document::text, r.portfolio::text, r.document ->> 'market',"
           " r.document ->> 'sessionDate' FROM recommendations r LEFT JOIN overnight_invalidations i"
           " ON i.user_id = r.user_id WHERE (i.invalidated_at IS NULL OR r.generated_at >= i.invalidated_at)")
    params: tuple[Any, ...] = ()
    if user_ids is not None:
        sql += " AND r.user_id = ANY(%s::uuid[])"
        params = (user_ids,)
    with conn.transaction(), conn.cursor(name="overnight_cache_warmer") as cur:
        cur.itersize = chunk
        cur.execute(sql + " ORDER BY r.user_id", params)
        yield from cur


def document_ttl(setting: str | None, now: datetime) -> Callable[[str | None, str | None], int]:
    """The Redis TTL of a document by its market and session: `OVERNIGHT_CACHE_TTL` (docs/freshness.md), the
    default 24 h, or for "next-run" until its market's next session's run + grace, from the calendar."""

    @functools.cache
    def ttl(market: str | None, session: str | None) -> int:
        deadline = None
        if setting and market and session:
            try:
                deadline = freshness.document_deadline(market, get_market(market).lead,
                                                       date.fromisoformat(session), freshness.grace())
            except (UnknownMarketError, ValueError) as exc:  # a market no longer listed: the default TTL
                log.warning("document of %s %s: no calendar deadline (%s); default TTL", market, session, exc)
        return freshness.cache_ttl_seconds(setting, deadline, now)

    return ttl


def warm_from_postgres(
    conn: psycopg.Connection, client: redis.Redis, user_ids: Sequence[Any] | None = None,
    *, chunk: int = DEFAULT_CHUNK, now: datetime | None = None,
) -> dict[str, Any]:
    """Writes the cached documents of everyone (or `user_ids`) from Postgres to Redis, each with the TTL the
    settings give it (`document_ttl`); returns the counts."""
    wanted = validate_user_ids(user_ids)
    t0 = time.perf_counter()
    seen: list[str] = []
    setting = freshness.cache_ttl_setting()
    ttl = document_ttl(setting, now or datetime.now(UTC))

    def docs() -> Iterator[tuple[str, str, str, int]]:
        for user_id, recs_json, portfolio_json, market, session in iter_documents(conn, wanted, chunk):
            if wanted is not None:
                seen.append(user_id)
            yield user_id, recs_json, portfolio_json, ttl(market, session)

    warmed = cache.warm(client, docs(), chunk=chunk) if wanted != [] else 0
    missing = sorted(set(wanted) - set(seen)) if wanted is not None else []
    result = {
        "scope": "all" if wanted is None else "users",
        "requested": None if wanted is None else len(wanted),
        "users_warmed": warmed,
        "keys_written": warmed * 2,
        "missing": len(missing),
        # pseudonyms, not ids: Airflow shows the return value to every viewer (XCom); a holder of personal data
        # maps them back through /audit (docs/access.md)
        "missing_user_refs": [user_ref(u) for u in missing[:MAX_MISSING_REPORTED]],
        "ttl": setting or str(cache.TTL_SECONDS),
        "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
    }
    log.info("cache warmed: %d users (%d keys), %d requested users without recommendations, %.0f ms",
             warmed, warmed * 2, len(missing), result["duration_ms"])
    return result


def run(user_ids: Sequence[Any] | None = None, *, chunk: int = DEFAULT_CHUNK, dag_run_id: str | None = None
        ) -> dict[str, Any]:
    """Warms the cache through the `overnight_postgres` and `overnight_redis` connections, recorded as a `cache-warm`
    job run (one per DAG run; each try of its task an execution of it); returns the counts and the job run's id."""
    client = cache.connect()
    try:
        with db.connect() as conn:
            job_id, attempt = start_job_run(conn, dag_run_id)
            try:
                result = warm_from_postgres(conn, client, user_ids, chunk=chunk)
            except Exception as exc:
                conn.rollback()
                end_job_run(conn, job_id, attempt, None, f"{type(exc).__name__}: {exc}")
                raise
            end_job_run(conn, job_id, attempt, result)
            return {**result, "job_run_id": job_id}
    finally:
        client.close()


def start_job_run(conn: psycopg.Connection, dag_run_id: str | None) -> tuple[str, int]:
    """The `cache-warm` job run of `dag_run_id` (started, or continued by a retry) and this execution's attempt."""
    with conn.transaction():
        row = None if dag_run_id is None else conn.execute(
            "SELECT id FROM overnight_job_runs WHERE job_type = %s AND dag_run_id = %s", (CACHE_WARM, dag_run_id)
        ).fetchone()
        if row is None:
            job_id = str(uuid.uuid4())
            conn.execute("INSERT INTO overnight_job_runs (id, job_type, status, started_at, correlation_id, market,"
                         " session_date, dag_run_id) VALUES (%s, %s, 'started', clock_timestamp(), %s, NULL,"
                         " (now() AT TIME ZONE 'UTC')::date, %s)", (job_id, CACHE_WARM, uuid.uuid4(), dag_run_id))
        else:
            job_id = str(row[0])
            conn.execute("UPDATE overnight_job_runs SET status = 'started', completed_at = NULL WHERE id = %s",
                         (job_id,))
        return job_id, start_execution(conn, job_id, dag_run_id)


def end_job_run(conn: psycopg.Connection, job_id: str, attempt: int, result: dict[str, Any] | None,
                error: str | None = None) -> None:
    """Writes the outcome of a `cache-warm` job run and of its execution: completed with the counts, or failed."""
    status = "failed" if result is None else "completed"
    metrics = None if result is None else json.dumps({k: v for k, v in result.items() if k != "missing_user_refs"})
    warmed = 0 if result is None else result["users_warmed"]
    missing = 0 if result is None else result["missing"]
    details = None if error is None else json.dumps({"run": {"stage": "warm_cache", "message": error[:2000]}})
    with conn.transaction():
        conn.execute("UPDATE overnight_job_runs SET status = %s, completed_at = clock_timestamp(), users_processed = %s,"
                     " users_failed = %s, metrics = %s, error_details = %s WHERE id = %s",
                     (status, warmed, missing, metrics, details, job_id))
        conn.execute("UPDATE overnight_job_run_executions SET status = %s, completed_at = clock_timestamp(),"
                     " users_processed = %s, users_failed = %s, metrics = %s WHERE job_run_id = %s AND attempt = %s",
                     (status, warmed, missing, metrics, job_id, attempt))

"""Re-warms the Redis cache from Postgres: `recs:{id}` and `portfolio:{id}` from the `recommendations` table.

For everyone, or for the given users. Rows stream through a server-side cursor in chunks and go to
Redis in pipelined writes (`overnight.cache.warm`) with the contract TTL of 24 h, so memory stays flat
whatever the number of users. Used by the `overnight_cache_warmer` DAG (after a Redis flush or loss).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import redis

from overnight import cache, db

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
) -> Iterator[tuple[str, str, str]]:
    """Yields (user_id, recs JSON, portfolio JSON) from `recommendations` via a server-side cursor, in id order."""
    sql = "SELECT user_id::text, document::text, portfolio::text FROM recommendations"
    params: tuple[Any, ...] = ()
    if user_ids is not None:
        sql += " WHERE user_id = ANY(%s::uuid[])"
        params = (user_ids,)
    with conn.transaction(), conn.cursor(name="overnight_cache_warmer") as cur:
        cur.itersize = chunk
        cur.execute(sql + " ORDER BY user_id", params)
        yield from cur


def warm_from_postgres(
    conn: psycopg.Connection, client: redis.Redis, user_ids: Sequence[Any] | None = None,
    *, chunk: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """Writes the cached documents of everyone (or `user_ids`) from Postgres to Redis; returns the counts."""
    wanted = validate_user_ids(user_ids)
    t0 = time.perf_counter()
    seen: list[str] = []

    def docs() -> Iterator[tuple[str, str, str]]:
        for user_id, recs_json, portfolio_json in iter_documents(conn, wanted, chunk):
            if wanted is not None:
                seen.append(user_id)
            yield user_id, recs_json, portfolio_json

    warmed = cache.warm(client, docs(), chunk=chunk) if wanted != [] else 0
    missing = sorted(set(wanted) - set(seen)) if wanted is not None else []
    result = {
        "scope": "all" if wanted is None else "users",
        "requested": None if wanted is None else len(wanted),
        "users_warmed": warmed,
        "keys_written": warmed * 2,
        "missing": len(missing),
        "missing_user_ids": missing[:MAX_MISSING_REPORTED],
        "ttl_seconds": cache.TTL_SECONDS,
        "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
    }
    log.info("cache warmed: %d users (%d keys), %d requested users without recommendations, %.0f ms",
             warmed, warmed * 2, len(missing), result["duration_ms"])
    return result


def run(user_ids: Sequence[Any] | None = None, *, chunk: int = DEFAULT_CHUNK) -> dict[str, Any]:
    """Warms the cache through the `overnight_postgres` and `overnight_redis` connections."""
    client = cache.connect()
    try:
        with db.connect() as conn:
            return warm_from_postgres(conn, client, user_ids, chunk=chunk)
    finally:
        client.close()

"""Redis adapter: the recommendations cache (`recs:{userId}`, `portfolio:{userId}`, TTL 24 h)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis

from overnight.adapters.connections import redis_client

log = logging.getLogger(__name__)

TTL_SECONDS = 24 * 3600
RECS_PREFIX = "recs:"
PORTFOLIO_PREFIX = "portfolio:"
INVALIDATE_BATCH = 1000  # keys a SCAN step asks for, and an UNLINK drops, in `invalidate_all`


def connect(url: str | None = None, *, timeout_s: float = 2.0) -> redis.Redis:
    """Returns a client for the `overnight_redis` Airflow connection, or for `url` where a tool names one
    (short timeouts: the cache is optional)."""
    if url:
        return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                    health_check_interval=30)
    client: redis.Redis = redis_client(timeout_s=timeout_s)
    return client


def recs_key(user_id: str) -> str:
    """Returns the cache key of a user's recommendations."""
    return f"{RECS_PREFIX}{user_id}"


def portfolio_key(user_id: str) -> str:
    """Returns the cache key of a user's portfolio summary."""
    return f"{PORTFOLIO_PREFIX}{user_id}"


def warm(client: redis.Redis, docs: Iterable[tuple[Any, ...]], chunk: int = 2000, ttl_s: int = TTL_SECONDS) -> int:
    """Writes (user_id, recs JSON, portfolio JSON[, TTL]) with the item's TTL or `ttl_s` (default 24 h;
    `OVERNIGHT_CACHE_TTL`, see docs/freshness.md) in pipelined chunks; returns users."""
    n = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    for item in docs:
        user_id, recs_json, portfolio_json = item[0], item[1], item[2]
        ttl = item[3] if len(item) > 3 else ttl_s
        pipe.set(recs_key(user_id), recs_json, ex=ttl)
        pipe.set(portfolio_key(user_id), portfolio_json, ex=ttl)
        n += 1
        pending += 1
        if pending >= chunk:
            pipe.execute()
            pending = 0
    if pending:
        pipe.execute()
    return n


def invalidate(client: redis.Redis, user_id: str) -> int:
    """Drops a user's `recs:` and `portfolio:` keys (UNLINK: freed in the background); returns the keys dropped."""
    return int(client.unlink(recs_key(user_id), portfolio_key(user_id)))


def invalidate_all(client: redis.Redis, *, batch: int = INVALIDATE_BATCH) -> int:
    """Drops every `recs:` and `portfolio:` key; returns how many. SCAN walks the keyspace `batch` keys a step and each
    step's keys go in one UNLINK, so Redis never blocks on it (no KEYS, no FLUSHDB: other keys, such as the price
    provider's rate limit, stay). A key written meanwhile may survive: SCAN guarantees only the keys there throughout."""
    dropped = 0
    for prefix in (RECS_PREFIX, PORTFOLIO_PREFIX):
        for_unlink: list[Any] = []
        for key in client.scan_iter(match=f"{prefix}*", count=batch):
            for_unlink.append(key)
            if len(for_unlink) >= batch:
                dropped += int(client.unlink(*for_unlink))
                for_unlink.clear()
        if for_unlink:
            dropped += int(client.unlink(*for_unlink))
    return dropped

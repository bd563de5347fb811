"""Redis adapter: the recommendations cache (`recs:{userId}`, `portfolio:{userId}`, TTL 24 h)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from overnight.connections import redis_url

log = logging.getLogger(__name__)

TTL_SECONDS = 24 * 3600
RECS_PREFIX = "recs:"
PORTFOLIO_PREFIX = "portfolio:"


def connect(url: str | None = None, *, timeout_s: float = 2.0) -> redis.Redis:
    """Returns a client for the `overnight_redis` connection (short timeouts: the cache is optional)."""
    return redis.Redis.from_url(
        url or redis_url(), socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=30
    )


def recs_key(user_id: str) -> str:
    """Returns the cache key of a user's recommendations."""
    return f"{RECS_PREFIX}{user_id}"


def portfolio_key(user_id: str) -> str:
    """Returns the cache key of a user's portfolio summary."""
    return f"{PORTFOLIO_PREFIX}{user_id}"


def warm(client: redis.Redis, docs: Iterable[tuple[str, bytes | str, bytes | str]], chunk: int = 2000,
         ttl_s: int = TTL_SECONDS) -> int:
    """Writes (user_id, recs JSON, portfolio JSON) with the TTL (default 24 h; `OVERNIGHT_CACHE_TTL`, see
    docs/freshness.md) in pipelined chunks; returns users."""
    n = 0
    pipe = client.pipeline(transaction=False)
    pending = 0
    for user_id, recs_json, portfolio_json in docs:
        pipe.set(recs_key(user_id), recs_json, ex=ttl_s)
        pipe.set(portfolio_key(user_id), portfolio_json, ex=ttl_s)
        n += 1
        pending += 1
        if pending >= chunk:
            pipe.execute()
            pending = 0
    if pending:
        pipe.execute()
    return n

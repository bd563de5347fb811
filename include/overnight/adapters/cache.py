"""Redis adapter: the recommendations cache (`recs:{userId}`, `portfolio:{userId}`, TTL 24 h)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
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
    `OVERNIGHT_CACHE_TTL`, see docs/freshness.md) in pipelined chunks of `chunk` users; returns users.

    The SET commands are put in Redis's wire format here (`packed_set`) and sent on one of the client's pooled
    connections, each chunk at once (`send_packed`): redis-py's pipeline spent 31-41 µs of CPU a user building and
    tracking its two commands, this 8-10 (1,000 users of 1.2 kB and 0.3 kB documents, the machine's Redis); a batch
    of 10,000 users saves about 0.25 s."""
    n = 0

    def commands() -> Iterator[bytes]:
        nonlocal n
        for item in docs:
            ttl = item[3] if len(item) > 3 else ttl_s
            yield packed_set(recs_key(item[0]), item[1], ttl)
            yield packed_set(portfolio_key(item[0]), item[2], ttl)
            n += 1

    send_chunked(client, commands(), 2 * chunk)
    return n


def send_chunked(client: redis.Redis, commands: Iterable[bytes], per_send: int) -> None:
    """Sends packed commands (`packed_set`) `per_send` at a time (`send_packed`), streaming."""
    parts: list[bytes] = []
    for command in commands:
        parts.append(command)
        if len(parts) >= per_send:
            send_packed(client, parts)
            parts = []
    if parts:
        send_packed(client, parts)


def packed_set(key: str | bytes, value: str | bytes, ttl_s: int) -> bytes:
    """`SET key value EX ttl_s` in Redis's wire format (RESP), for `send_packed`."""
    k = key if isinstance(key, bytes) else key.encode()
    v = value if isinstance(value, bytes) else value.encode()
    ttl = b"%d" % ttl_s
    return b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$2\r\nEX\r\n$%d\r\n%b\r\n" % (
        len(k), k, len(v), v, len(ttl), ttl)


def send_packed(client: redis.Redis, commands: list[bytes]) -> None:
    """Sends `packed_set` commands at once on one of the client's pooled connections and reads a reply for each;
    raises on the first error (a refused command, a lost connection), and then drops the connection rather than
    return it to the pool with replies unread."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(commands)])
        for _ in commands:
            reply = conn.read_response()
            if reply not in (b"OK", "OK"):
                raise redis.ResponseError(f"SET answered {reply!r}")
    except BaseException:
        conn.disconnect()  # replies may be left unread: the connection is not reused as it is
        raise
    finally:
        pool.release(conn)


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

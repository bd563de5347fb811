"""The cache adapter's invalidation on real Redis (issue 27): one user's two keys, or every `recs:`/`portfolio:` key in
SCAN batches with UNLINK, other keys untouched."""

from __future__ import annotations

import uuid

import redis

from overnight.adapters import cache


def _users(n: int) -> list[str]:
    return [str(uuid.UUID(int=i + 1)) for i in range(n)]


def test_invalidate_drops_exactly_the_users_two_keys(redis_client: redis.Redis) -> None:
    a, b = _users(2)
    assert cache.warm(redis_client, [(a, "{}", "{}"), (b, "{}", "{}")]) == 2
    assert cache.invalidate(redis_client, a) == 2
    assert redis_client.exists(cache.recs_key(a), cache.portfolio_key(a)) == 0
    assert redis_client.exists(cache.recs_key(b), cache.portfolio_key(b)) == 2
    assert cache.invalidate(redis_client, a) == 0  # nothing left to drop
    cache.invalidate(redis_client, b)


def test_invalidate_all_walks_the_keyspace_in_batches_and_leaves_other_keys(redis_client: redis.Redis) -> None:
    users = _users(1234)
    assert cache.warm(redis_client, [(u, "{}", "{}") for u in users], chunk=500) == 1234
    redis_client.set("ratelimit:prices", "10")
    redis_client.set("recsX:not-a-user-key", "1")  # a prefix must match with its colon
    present = sum(1 for p in ("recs:*", "portfolio:*") for _ in redis_client.scan_iter(match=p))
    assert present >= 2 * 1234  # this process's other tests may have left theirs: they go too
    assert cache.invalidate_all(redis_client, batch=100) == present
    assert not any(redis_client.scan_iter(match="recs:*")) and not any(redis_client.scan_iter(match="portfolio:*"))
    assert redis_client.get("ratelimit:prices") == b"10" and redis_client.get("recsX:not-a-user-key") == b"1"
    assert cache.invalidate_all(redis_client, batch=100) == 0
    redis_client.delete("ratelimit:prices", "recsX:not-a-user-key")

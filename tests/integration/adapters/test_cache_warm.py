"""The cache adapter's warm on real Redis: every user's two keys with their documents byte for byte and their TTL,
in chunks; a command Redis refuses raises, and the client's next command gets its own reply, not one left unread."""

from __future__ import annotations

import secrets
import uuid

import pytest
import redis

from overnight.adapters import cache

HOSTILE = ['{"a": "quote \\" back \\\\ slash"}', '{"b": "ünï €\\u2028"}', "\r\n$3\r\nSET\r\n", "", "*5\r\n"]


def test_warm_writes_each_users_two_documents_exactly_with_their_ttl(redis_client: redis.Redis) -> None:
    users = [str(uuid.uuid4()) for _ in range(25)]
    docs = [(u, HOSTILE[i % len(HOSTILE)] + u, "{}" + HOSTILE[-1 - i % len(HOSTILE)], 600 + i) for i, u in
            enumerate(users)]
    assert cache.warm(redis_client, docs[:20], chunk=3) == 20  # 7 chunks, the last one short
    assert cache.warm(redis_client, [d[:3] for d in docs[20:]], ttl_s=900) == 5  # the default TTL
    for i, (u, recs, portfolio, ttl) in enumerate(docs):
        assert redis_client.get(cache.recs_key(u)) == recs.encode()
        assert redis_client.get(cache.portfolio_key(u)) == portfolio.encode()
        expected = ttl if i < 20 else 900
        assert expected - 5 < redis_client.ttl(cache.recs_key(u)) <= expected
        assert expected - 5 < redis_client.ttl(cache.portfolio_key(u)) <= expected
    assert redis_client.delete(*map(cache.recs_key, users), *map(cache.portfolio_key, users)) == 50


@pytest.fixture
def no_portfolios(redis_client: redis.Redis):
    """A client logged in as a Redis user who may use `recs:` keys but no `portfolio:` key (Redis 6.2's ACL, as the
    embedded server's)."""
    name, password = f"warmtest-{secrets.token_hex(4)}", secrets.token_hex(16)
    redis_client.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~recs:*", "+@all")
    server = redis_client.connection_pool.connection_kwargs  # this test's Redis server and database
    client = redis.Redis(host=server["host"], port=server["port"], db=server["db"], username=name, password=password)
    yield client
    client.close()
    redis_client.execute_command("ACL", "DELUSER", name)


def test_a_refused_set_raises_and_leaves_no_reply_behind(redis_client: redis.Redis, no_portfolios) -> None:
    users = [str(uuid.uuid4()) for _ in range(3)]
    with pytest.raises(redis.exceptions.NoPermissionError):
        cache.warm(no_portfolios, [(u, f'"{u}"', "{}") for u in users])
    # the first SET went through, the second was refused; the replies of the four after it were never read
    assert redis_client.get(cache.recs_key(users[0])) == f'"{users[0]}"'.encode()
    assert redis_client.exists(cache.portfolio_key(users[0])) == 0
    # on the same client, the next command gets its own reply (an unread "OK" would answer it otherwise)
    assert no_portfolios.get(cache.recs_key(users[2])) == f'"{users[2]}"'.encode()
    assert no_portfolios.get(cache.recs_key(users[1])) == f'"{users[1]}"'.encode()
    redis_client.delete(*map(cache.recs_key, users))

"""Tests for overnight.dashboard.redis_get against this run's real Redis: values, pipelining order, callers that give
up, dropped connections, SELECT/AUTH, and servers that are down or answer garbage."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from overnight.dashboard.redis_get import RedisGet, RedisGetError
from tests.conftest import TEST_ENV
from tests.support.ports import free_port

URL = TEST_ENV["AIRFLOW_CONN_OVERNIGHT_REDIS"]
PREFIX = "test:redis_get:"


@pytest.fixture
def keys(redis_client: redis.Redis) -> Iterator[dict[str, bytes]]:
    values = {f"{PREFIX}{i}": f"value {i} é".encode() * (1 + i % 50) for i in range(300)}
    redis_client.mset(values)
    yield values
    redis_client.delete(*values)


def test_get_returns_each_callers_own_value_with_many_in_flight(keys: dict[str, bytes]) -> None:
    async def main() -> list[bytes | None]:
        client = RedisGet(URL)
        try:
            names = [*keys, f"{PREFIX}missing"]
            return await asyncio.gather(*(client.get(k) for k in names * 3))
        finally:
            await client.aclose()

    got = asyncio.run(main())
    assert got == ([*keys.values(), None]) * 3


def test_the_commands_of_one_turn_of_the_event_loop_go_out_in_one_write(keys: dict[str, bytes]) -> None:
    async def main() -> tuple[list[bytes | None], list[bytes]]:
        client = RedisGet(URL)
        try:
            await client.get(f"{PREFIX}0")  # connected
            assert client._conn is not None and client._conn.transport is not None
            transport = client._conn.transport
            writes: list[bytes] = []
            real_write = transport.write

            def counting_write(data: bytes) -> None:
                writes.append(bytes(data))
                real_write(data)

            transport.write = counting_write  # type: ignore[method-assign]
            got = await asyncio.gather(*(client.get(f"{PREFIX}{i}") for i in range(20)))
            got.append(await client.get(f"{PREFIX}20"))  # a later turn: a write of its own
            return got, writes
        finally:
            await client.aclose()

    got, writes = asyncio.run(main())
    assert got == [keys[f"{PREFIX}{i}"] for i in range(21)]
    assert [w.count(b"GET") for w in writes] == [20, 1]


def test_a_caller_that_gives_up_never_gets_or_shifts_a_reply(keys: dict[str, bytes]) -> None:
    pauser = redis.Redis.from_url(URL)

    async def main() -> tuple[bool, list[bytes | None]]:
        client = RedisGet(URL)
        try:
            await client.get(f"{PREFIX}0")  # connected
            pauser.execute_command("CLIENT", "PAUSE", "300", "ALL")
            gave_up = False
            try:
                async with asyncio.timeout(0.05):
                    await client.get(f"{PREFIX}1")
            except TimeoutError:
                gave_up = True
            # the late reply to key 1 arrives first on this connection: it must be dropped, not handed on
            return gave_up, [await client.get(f"{PREFIX}{i}") for i in (2, 3)]
        finally:
            await client.aclose()

    try:
        gave_up, got = asyncio.run(main())
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
    assert gave_up
    assert got == [keys[f"{PREFIX}2"], keys[f"{PREFIX}3"]]


def test_a_killed_connection_is_opened_again_by_the_next_call(
        keys: dict[str, bytes], redis_client: redis.Redis) -> None:
    async def main() -> bytes | None:
        client = RedisGet(URL)
        try:
            await client.get(f"{PREFIX}0")
            assert client._conn is not None and client._conn.transport is not None
            host, port = client._conn.transport.get_extra_info("sockname")[:2]
            assert redis_client.execute_command("CLIENT", "KILL", "ADDR", f"{host}:{port}")
            await asyncio.sleep(0.1)  # the close reaches the protocol
            return await client.get(f"{PREFIX}4")
        finally:
            await client.aclose()

    assert asyncio.run(main()) == keys[f"{PREFIX}4"]


def test_the_database_number_of_the_url_is_selected(redis_client: redis.Redis) -> None:
    base, _, _ = URL.rpartition("/")
    other = 1 if int(URL.rpartition("/")[2] or 0) != 1 else 2
    other_client = redis.Redis.from_url(f"{base}/{other}")
    other_client.set(f"{PREFIX}db", b"in the other db", ex=60)
    try:
        async def main() -> tuple[bytes | None, bytes | None]:
            a, b = RedisGet(URL), RedisGet(f"{base}/{other}")
            try:
                return await a.get(f"{PREFIX}db"), await b.get(f"{PREFIX}db")
            finally:
                await a.aclose()
                await b.aclose()

        assert asyncio.run(main()) == (None, b"in the other db")
    finally:
        other_client.delete(f"{PREFIX}db")
        other_client.close()


def test_a_refused_auth_is_an_error_that_says_what_redis_answered() -> None:
    """A wrong password: Redis's own refusal, whether it has a password (the embedded one: WRONGPASS) or none
    (the machine's: AUTH called without any password configured)."""
    has_password = bool(redis.Redis.from_url(URL).config_get("requirepass").get("requirepass"))
    host_part = URL.split("://", 1)[1].split("@")[-1]
    with pytest.raises(RedisGetError, match="Redis answered: .*(WRONGPASS|AUTH)") as refused:
        asyncio.run(RedisGet(f"redis://:wrong@{host_part}").get("k"))
    assert ("WRONGPASS" in str(refused.value)) is has_password, str(refused.value)


def test_nothing_listening_is_an_error_that_names_the_address() -> None:
    port = free_port()
    with pytest.raises(RedisGetError, match=f"cannot connect to Redis at 127.0.0.1:{port}"):
        asyncio.run(RedisGet(f"redis://127.0.0.1:{port}/0").get("k"))


@pytest.fixture(params=[b"HTTP/1.1 200 OK\r\n\r\nhello", b""], ids=["not-resp", "closes"])
def bad_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, bytes]]:
    """A TCP server that reads a command, then answers bytes that are not RESP, or closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(5)

    def serve() -> None:
        conn: Any = None
        try:
            conn, _ = srv.accept()
            conn.recv(1024)
            conn.sendall(request.param)
        except OSError:
            pass
        finally:
            if conn is not None:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0", request.param
    thread.join(5)
    srv.close()


def test_a_waiting_call_fails_when_the_server_answers_garbage_or_closes(bad_server: tuple[str, bytes]) -> None:
    url, answer = bad_server
    with pytest.raises(RedisGetError, match="not a reply" if answer else "connection was closed"):
        asyncio.run(RedisGet(url).get("k"))

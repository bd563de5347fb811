"""A pipelined, read-only Redis client for the dashboard's one hot command: `GET key`.

redis-py's asyncio client spends ~90 us of CPU per command (connection pool lock, retry wrapper,
command packing, reply parsing through several layers), as much as the rest of a dashboard answer.
`RedisGet` keeps one connection per process and pipelines: the commands of one turn of the event loop
go out in one write at its end (under load several requests reach the same turn: one send instead of
several, and Redis reads and answers them in one go; +12 % dashboard hits per second on the
benchmark's 2 cores), and each caller waits for its reply, which Redis sends in order, parsed by
hiredis (~15 us). A reply nobody waits for any more (the caller's timeout) is read and dropped, so
replies never go to the wrong caller.

- URLs as redis-py reads them (`redis.connection.parse_url`): `redis://[[user]:password@]host[:port][/db]`,
  `rediss://` (TLS; `?ssl_cert_reqs=none` skips verification) and `unix:///path?db=N`.
- A broken connection fails every waiting call with `RedisGetError` and is opened again by the next call.
- The caller bounds each call (`asyncio.timeout`); `abort()` drops the connection after a timeout, so a
  hung server does not pile up requests on a connection that will never answer.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url


class RedisGetError(ConnectionError):
    """The connection broke, could not be made, or Redis answered with an error."""


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Pipelined(asyncio.Protocol):
    """One connection: commands written as they come, replies handed out in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []
        self.heard_at = time.monotonic()  # the last reply, or the start of the current wait for one
        self.dropped = False  # by `RedisGet.abort`, not by the server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if not self.waiting:
            self.heard_at = time.monotonic()
        self.waiting.append(waiter)
        if not self.outgoing:  # the first command of this turn of the event loop: written at its end
            loop.call_soon(self._flush)
        self.outgoing.append(command)
        return waiter

    def _flush(self) -> None:
        """Writes the commands of one turn of the event loop in one go: one send, and Redis reads them,
        and answers them, in one go too."""
        commands, self.outgoing = self.outgoing, []
        if self.transport is not None:
            self.transport.write(b"".join(commands))

    def data_received(self, data: bytes) -> None:
        self.heard_at = time.monotonic()
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiting.popleft()
                if waiter.done():  # its caller gave up: the reply is dropped
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(RedisGetError(f"Redis answered: {reply}"))
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # not RESP, or a reply nobody asked for
            self._fail(RedisGetError(f"Redis sent an answer that is not a reply to our commands: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        how = "dropped by this client" if self.dropped else exc or "by the server"
        self._fail(RedisGetError(f"the Redis connection was closed ({how})"))

    def _fail(self, error: Exception) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)


class RedisGet:
    """`await RedisGet(url).get(key)` -> bytes or None, over one pipelined connection opened on first use."""

    def __init__(self, url: str, connect_timeout_s: float = 1.0) -> None:
        try:
            options = parse_url(url)
        except ValueError:  # its message may quote part of the URL: the password with an unencoded / ? #
            raise ValueError("the overnight_redis connection's URL is not a Redis URL (value hidden): give "
                             "redis://[:password@]host:port/db, the password percent-encoded") from None
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._path: str | None = options.get("path")
        self._host: str = options.get("host") or "localhost"
        self._port: int = int(options.get("port") or 6379)
        self._ssl: ssl.SSLContext | None = None
        if options.get("connection_class") is SSLConnection:
            self._ssl = ssl.create_default_context()
            if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "optional"):
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        elif options.get("connection_class") not in (None, UnixDomainSocketConnection):
            raise ValueError("the overnight_redis connection's URL has an unsupported scheme (value hidden): "
                             "give redis://, rediss:// or unix://")
        self._setup: list[bytes] = []
        if options.get("password") is not None:
            user = options.get("username")
            auth = (b"AUTH",) + ((user.encode(),) if user else ()) + (options["password"].encode(),)
            self._setup.append(_command(*auth))
        if int(options.get("db") or 0):
            self._setup.append(_command(b"SELECT", str(int(options["db"])).encode()))
        self._conn: _Pipelined | None = None
        self._connecting: asyncio.Future[_Pipelined] | None = None

    async def get(self, key: str) -> bytes | None:
        """The value of `key` (None when it does not exist); raises RedisGetError."""
        conn = self._conn
        if conn is None or conn.transport is None:
            conn = await self._connection()
        return await conn.send(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k := key.encode()), k))  # type: ignore[no-any-return]

    async def _connection(self) -> _Pipelined:
        if self._connecting is None:  # one attempt, shared by every call that arrives meanwhile
            self._connecting = connecting = asyncio.ensure_future(self._connect())
            connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[_Pipelined]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here too, for an attempt whose callers all gave up

    async def _connect(self) -> _Pipelined:
        loop = asyncio.get_running_loop()
        conn: _Pipelined | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(_Pipelined, self._path)
                else:
                    _, conn = await loop.create_connection(_Pipelined, self._host, self._port, ssl=self._ssl)
                for command in self._setup:  # AUTH, SELECT: an error answer raises
                    await conn.send(command)
        except BaseException as exc:
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            if isinstance(exc, TimeoutError):
                raise RedisGetError(f"no Redis connection within {self.connect_timeout_s} s ({self._where()})"
                                    ) from None
            if isinstance(exc, OSError) and not isinstance(exc, RedisGetError):
                raise RedisGetError(f"cannot connect to Redis at {self._where()}: {exc}") from None
            raise
        self._conn = conn
        return conn

    def _where(self) -> str:
        return self._path or f"{self._host}:{self._port}"

    def silent_for(self) -> float:
        """Seconds since the connection last heard from Redis while calls wait for replies (0 when none wait).

        A reply that is merely late (this process or machine stalled) comes soon; a hung server stays silent."""
        conn = self._conn
        if conn is None or conn.transport is None or not conn.waiting:
            return 0.0
        return time.monotonic() - conn.heard_at

    def abort(self) -> None:
        """Drops the connection (every waiting call fails); the next call opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.dropped = True
            conn.transport.abort()

    async def aclose(self) -> None:
        """Closes the connection."""
        self.abort()

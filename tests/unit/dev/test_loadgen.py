"""Tests for overnight.dev.loadgen against a small local HTTP server: framing, keep-alive, errors, latencies, bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from overnight.dev import loadgen

# A body that looks like a response head: a client that does not consume bodies exactly misreads the next answer.
TRICKY = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"


class Server:
    """An HTTP/1.1 server on 127.0.0.1 in its own thread, answering by path; counts connections and requests.

    /ok?ms=N         200, Content-Length, after N ms
    /chunked         200, chunked in odd pieces, a chunk extension and a trailer
    /status/N        status N with a JSON body
    /close           200 without a length, then closes the connection (body to EOF)
    /continue        100 Continue, then 200
    /garbage         a line that is not HTTP, then closes
    /auth            200 only with `Authorization: Bearer t`, else 401
    """

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                    return
                self.requests += 1
                lines = head.decode().split("\r\n")
                target = urlsplit(lines[0].split(" ")[1])
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                if not await self._answer(target.path, parse_qs(target.query), headers, writer):
                    return
                await writer.drain()
        finally:
            writer.close()

    async def _answer(self, path: str, query: dict[str, list[str]], headers: dict[str, str],
                      writer: asyncio.StreamWriter) -> bool:
        """Writes one answer; returns False when the connection is to be closed."""
        if path == "/ok":
            await asyncio.sleep(int(query.get("ms", ["0"])[0]) / 1000)
            body = TRICKY + b"x" * 100
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5;ext=1\r\nHTTP/\r\n" + b"%x\r\n%s\r\n" % (len(TRICKY) - 5, TRICKY[5:])
                         + b"0\r\nX-Trailer: yes\r\n\r\n")
        elif path.startswith("/status/"):
            writer.write(b"HTTP/1.1 %s Nope\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                         % path.rsplit("/", 1)[1].encode())
        elif path == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
            return False
        elif path == "/continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/garbage":
            writer.write(b"SPDY nonsense\r\n\r\n")
            return False
        elif path == "/auth":
            ok = headers.get("authorization") == "Bearer t"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if ok else
                         b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True

    async def _shutdown(self) -> None:
        self.server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def _parse(raw: bytes) -> list[tuple[int, bytes, bool]]:
    """Parses every response in `raw` with loadgen.read_response."""

    async def go() -> list[tuple[int, bytes, bool]]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        out = []
        while not reader.at_eof():
            out.append(await loadgen.read_response(reader))
        return out

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", [(200, b"hello", True)], id="length"),
        pytest.param(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n2\r\nde\r\n0\r\n"
                     b"T: 1\r\n\r\nHTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n",
                     [(200, b"abcde", True), (404, b"", True)], id="chunked-trailer-then-next"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx",
                     [(201, b"x", True)], id="interim"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end", [(200, b"to the end", False)],
                     id="until-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", [(200, b"x", False)], id="http10"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                     [(204, b"", True), (200, b"", True)], id="no-content"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(TRICKY), TRICKY),
                     [(200, TRICKY, True)], id="body-looks-like-a-head"),
    ],
)
def test_read_response_framing(raw: bytes, expected: list[tuple[int, bytes, bool]]) -> None:
    assert _parse(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"SPDY nonsense\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 OK 200\r\n\r\n", id="status-not-a-number"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", id="truncated-body"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="bad-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n", id="bad-chunk"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="truncated-head"),
    ],
)
def test_read_response_refuses_malformed_answers(raw: bytes) -> None:
    with pytest.raises(loadgen.ResponseError):
        _parse(raw)


def test_keep_alive_clients_read_every_framing_without_errors(server: Server) -> None:
    urls = [f"{server.url}/ok", f"{server.url}/chunked", f"{server.url}/continue"]
    result = loadgen.run(urls, {}, clients=4, seconds=0.5)
    assert result["errors"] == 0 and result["n"] > 50
    assert result["n"] == server.requests
    assert server.connections == 4  # one kept-alive connection per client
    assert set(result) == {"p50_ms", "p99_ms", "rps", "errors", "n", "elapsed_s"}


def test_non_200_and_broken_answers_count_as_errors(server: Server) -> None:
    urls = [f"{server.url}/ok", f"{server.url}/status/500", f"{server.url}/garbage", f"{server.url}/status/404",
            f"{server.url}/nowhere"]
    result = loadgen.run(urls, {}, clients=1, seconds=5, max_requests=50)
    assert result["n"] == 50 and result["errors"] == 40
    assert server.connections == 1 + 10  # a fresh connection after each garbage answer


def test_connection_close_reopens_and_is_not_an_error(server: Server) -> None:
    result = loadgen.run([f"{server.url}/close"], {}, clients=2, seconds=5, max_requests=20)
    assert result == {**result, "n": 20, "errors": 0}
    assert server.connections == 20


def test_refused_connection_is_an_error_not_a_crash() -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: refused
        result = loadgen.run([f"http://127.0.0.1:{port}/"], {}, clients=2, seconds=0.3)
    assert result["n"] > 0 and result["errors"] == result["n"]


def test_latencies_are_per_request_and_in_milliseconds(server: Server) -> None:
    # One client alternating a fast and a 60 ms route: half the samples are ~0 ms, half >= 60 ms.
    result = loadgen.run([f"{server.url}/ok", f"{server.url}/ok?ms=60"], {}, clients=1, seconds=10, max_requests=20)
    assert result["n"] == 20 and result["errors"] == 0
    assert result["p50_ms"] < 30
    assert 60 <= result["p99_ms"] < 500
    assert "latencies_ms" not in result
    kept = loadgen.run_in_subprocess([f"{server.url}/ok", f"{server.url}/ok?ms=60"], {}, clients=1, seconds=10,
                                     max_requests=10, latencies=True)
    slow = sorted(kept["latencies_ms"])[5:]
    assert len(kept["latencies_ms"]) == kept["n"] == 10 and all(60 <= t < 500 for t in slow)
    assert 0.3 <= kept["elapsed_s"] < 5


def test_closed_loop_is_bounded_in_time(server: Server) -> None:
    # 2 clients on a 50 ms route for 0.5 s: about 2 * 10 requests, about 40 per second.
    t0 = time.perf_counter()
    result = loadgen.run([f"{server.url}/ok?ms=50"], {}, clients=2, seconds=0.5)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.5
    assert 12 <= result["n"] <= 22 and result["errors"] == 0
    assert 50 <= result["p50_ms"] < 200
    assert 24 <= result["rps"] <= 44


def test_headers_are_sent_and_run_in_subprocess(server: Server) -> None:
    assert loadgen.run([f"{server.url}/auth"], {}, clients=1, seconds=5, max_requests=3)["errors"] == 3
    result: dict[str, Any] = loadgen.run_in_subprocess(
        [f"{server.url}/auth"], {"Authorization": "Bearer t"}, clients=2, seconds=0.3)
    assert result["errors"] == 0 and result["n"] > 10 and result["n"] == server.requests - 3


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (loadgen.percentile(values, 50), loadgen.percentile(values, 99), loadgen.percentile([], 50)) == (50, 99, 0)


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="http://"):
        loadgen.run(["https://127.0.0.1/"], {}, clients=1, seconds=1)

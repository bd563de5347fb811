"""A cheap closed-loop HTTP/1.1 load generator, so a benchmark measures the server and not its client.

`run(urls, headers, clients=8, seconds=20)` opens one keep-alive connection per client (asyncio
streams, uvloop when installed) and has each client send GET requests back to back, cycling through
`urls` from its own offset, until `seconds` have passed or `max_requests` were sent. Responses are
parsed properly (status line, `Content-Length`, `Transfer-Encoding: chunked` with trailers, bodies
up to `Connection: close`, 1xx interim answers); a non-200 answer, a malformed answer, a reset or a
timeout counts as an error (the connection is then reopened). Returns p50/p99 in ms, requests per
second, errors and the number of requests.

`run_in_subprocess(...)` runs the same in a fresh Python process (headers passed on stdin, never on
the command line), so the generator's CPU is not in the caller's GIL. No Airflow import here.
`python -m overnight.dev.loadgen` reads `{"urls", "headers", "clients", "seconds", ...}` as JSON on stdin
and prints the result as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MAX_REQUESTS = 1_000_000
TIMEOUT_S = 10.0
_MAX_HEAD = 64 * 1024


class ResponseError(Exception):
    """The server's answer could not be parsed, or the connection broke mid-answer."""


def percentile(values: Sequence[float], pct: float) -> float:
    """Returns the nearest-rank percentile of `values` (pct in 0-100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _target(url: str, headers: dict[str, str]) -> tuple[tuple[str, int], bytes]:
    """Returns the (host, port) of an http:// URL and its pre-encoded GET request."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"loadgen: {url!r} is not an http:// URL (https is not supported)")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
    return (parts.hostname, port), ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Reads one response to a GET; returns (status, body, keep_alive). Raises ResponseError when malformed."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ResponseError("connection closed before a complete response head") from exc
        except asyncio.LimitOverrunError as exc:
            raise ResponseError("response head too long") from exc
        lines = head[:-4].decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1.") or not status_line[1].isdigit():
            raise ResponseError(f"bad status line {lines[0][:80]!r}")
        status = int(status_line[1])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ResponseError(f"bad header line {line[:80]!r}")
            fields[name.strip().lower()] = value.strip()
        if 100 <= status < 200:  # interim answer (100 Continue, 103 Early Hints): the real one follows
            continue
        break
    keep_alive = "close" not in fields.get("connection", "").lower() and status_line[0] != "HTTP/1.0"
    try:
        if status in (204, 304):
            body = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in fields:
            length = fields["content-length"]
            if not length.isdigit():
                raise ResponseError(f"bad Content-Length {length!r}")
            body = await reader.readexactly(int(length))
        else:  # no framing: the body runs to the end of the connection
            body = await reader.read()
            keep_alive = False
    except asyncio.IncompleteReadError as exc:
        raise ResponseError("connection closed in the middle of a body") from exc
    return status, body, keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ResponseError(f"bad chunk size {size_line[:40]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the empty line
                pass
            return b"".join(parts)
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise ResponseError("chunk not followed by CRLF")
        parts.append(chunk[:-2])


async def _client(offset: int, targets: list[tuple[tuple[str, int], bytes]], deadline: float,
                  budget: list[int], timeout_s: float, times: list[float], errors: list[int]) -> None:
    """One closed-loop client: a request, its whole response, the next request."""
    conns: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    i = offset
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            addr, request = targets[i % len(targets)]
            i += 1
            t0 = time.perf_counter()
            ok = False
            try:
                async with asyncio.timeout(timeout_s):
                    if addr not in conns:
                        conns[addr] = await asyncio.open_connection(*addr, limit=_MAX_HEAD)
                    reader, writer = conns[addr]
                    writer.write(request)
                    status, _, keep_alive = await read_response(reader)
                ok = status == 200
            except (OSError, ResponseError, TimeoutError):
                keep_alive = False
            times.append((time.perf_counter() - t0) * 1000)
            if not ok:
                errors[0] += 1
            if not keep_alive:
                if addr in conns:
                    conns.pop(addr)[1].close()
                else:  # could not even connect: do not spin on a refused port
                    await asyncio.sleep(0.01)
    finally:
        for _, writer in conns.values():
            writer.close()


async def _run(targets: list[tuple[tuple[str, int], bytes]], clients: int, seconds: float, max_requests: int,
               timeout_s: float, latencies: bool = False) -> dict[str, Any]:
    times: list[float] = []
    errors = [0]
    t0 = time.perf_counter()
    deadline = t0 + seconds
    budget = [max_requests]
    await asyncio.gather(*(_client(k, targets, deadline, budget, timeout_s, times, errors) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {"p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
              "rps": round(len(times) / elapsed, 1) if elapsed > 0 else 0.0, "errors": errors[0], "n": len(times),
              "elapsed_s": round(elapsed, 3)}
    if latencies:
        result["latencies_ms"] = [round(t, 3) for t in times]
    return result


def run(urls: Sequence[str], headers: dict[str, str] | None = None, clients: int = 8, seconds: float = 20.0,
        *, max_requests: int = MAX_REQUESTS, timeout_s: float = TIMEOUT_S, latencies: bool = False) -> dict[str, Any]:
    """Returns {p50_ms, p99_ms, rps, errors, n, elapsed_s} of `clients` keep-alive clients GETting `urls` for
    `seconds`; with `latencies`, every request's latency too (`latencies_ms`, to merge runs)."""
    if not urls or clients < 1 or seconds <= 0:
        raise ValueError("loadgen: need at least one URL, one client and a positive duration")
    targets = [_target(u, headers or {}) for u in urls]
    coro = _run(targets, clients, seconds, max_requests, timeout_s, latencies)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_in_subprocess(urls: Sequence[str], headers: dict[str, str] | None = None, clients: int = 8,
                      seconds: float = 20.0, *, max_requests: int = MAX_REQUESTS,
                      timeout_s: float = TIMEOUT_S, latencies: bool = False) -> dict[str, Any]:
    """`run` in a fresh Python process (its CPU outside the caller's GIL); the headers go over stdin."""
    job = {"urls": list(urls), "headers": headers or {}, "clients": clients, "seconds": seconds,
           "max_requests": max_requests, "timeout_s": timeout_s, "latencies": latencies}
    include = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (include, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "overnight.dev.loadgen"], input=json.dumps(job), env=env,
                          capture_output=True, text=True, timeout=seconds + timeout_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen process failed (exit {proc.returncode}): {proc.stderr[-1000:]}")
    return dict(json.loads(proc.stdout.strip().rsplit("\n", 1)[-1]))


def main() -> int:
    """Command line: a JSON job on stdin, the result as one JSON line on stdout."""
    job = json.load(sys.stdin)
    result = run(job["urls"], job.get("headers"), int(job.get("clients", 8)), float(job.get("seconds", 20)),
                 max_requests=int(job.get("max_requests", MAX_REQUESTS)),
                 timeout_s=float(job.get("timeout_s", TIMEOUT_S)), latencies=bool(job.get("latencies", False)))
    os.set_blocking(sys.stdout.fileno(), True)  # a pipe left non-blocking would cut a long line short
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

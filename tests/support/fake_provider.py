"""A real local HTTP server speaking the Frankfurter and Yahoo v7 quote formats, scriptable per test."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

RATES_PATH = "/latest"
QUOTE_PATH = "/v7/finance/quote"
DEFAULT_RATES_DATE = "2026-11-20"
DEFAULT_MARKET_TIME = 1763740800  # 2025-11-21T16:00:00Z

# base -> quote currency -> rate (1 base = rate quote).
DEFAULT_RATES: dict[str, dict[str, str]] = {
    "USD": {
        "BRL": "5.1234",
        "GBP": "0.7890",
        "JPY": "154.32",
        "EUR": "0.9456",
        "CHF": "0.8812",
    },
    "EUR": {
        "USD": "1.0575",
        "BRL": "5.4182",
        "GBP": "0.8344",
        "JPY": "163.20",
        "CHF": "0.9319",
    },
}

ECB_USD = "1.08"  # EUR -> USD in the tables `ecb_table` makes


def ecb_table(usd_rates: dict[str, Any], eur_usd: str = ECB_USD) -> dict[str, dict[str, str]]:
    """The ECB's table (base EUR) of rates given per USD: EUR -> c = (USD -> c) x (EUR -> USD), exactly (a product
    of short decimals), so the provider's cross rate (EUR -> c) / (EUR -> USD) gives each given rate back exactly.
    EUR itself is the table's base: 1 USD = 1 / eur_usd EUR, whatever `usd_rates` said of it."""
    k = Decimal(eur_usd)
    table = {c: str(Decimal(str(v)) * k) for c, v in usd_rates.items() if c not in ("EUR", "USD")}
    return {"EUR": {"USD": eur_usd, **table}}


# symbol -> (price, currency).
DEFAULT_PRICES: dict[str, tuple[str, str]] = {
    "AAPL": ("189.5", "USD"),
    "MSFT": ("415.25", "USD"),
    "NVDA": ("142.10", "USD"),
    "SAP.DE": ("230.15", "EUR"),
    "VOD.L": ("72.5", "GBp"),
    "PETR4.SA": ("37.42", "BRL"),
    "7203.T": ("2650", "JPY"),
    "NESN.SW": ("88.12", "CHF"),
}


@dataclass
class ScriptedResponse:
    """One canned response; `body` may be bytes, str or a JSON-able object (Decimals allowed, NaN written as NaN)."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop_connection: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    """A request the server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw_path: str
    at: float = 0.0  # time.monotonic() when it arrived

    def param(self, name: str) -> str | None:
        """Returns the first value of a query parameter, or None."""
        values = self.query.get(name)
        return values[0] if values else None


def _to_jsonable(value: Any) -> Any:
    """Converts Decimals (recursively) to floats so json.dumps writes them as plain numbers."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    return value


def encode_body(body: Any) -> bytes:
    """Returns the wire bytes of a scripted body."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(_to_jsonable(body), allow_nan=True).encode("utf-8")


class _QuietServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that does not print tracebacks for clients that hung up."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignores connection errors caused by clients giving up; prints anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class FakeProviderServer:
    """ThreadingHTTPServer on 127.0.0.1:<ephemeral>; per-path FIFO of scripted responses, then table defaults."""

    def __init__(
        self,
        rates: dict[str, dict[str, str]] | None = None,
        prices: dict[str, tuple[str, str]] | None = None,
        rates_date: str = DEFAULT_RATES_DATE,
        market_time: int = DEFAULT_MARKET_TIME,
    ) -> None:
        self.rates = {b: dict(r) for b, r in (rates or DEFAULT_RATES).items()}
        self.prices = dict(prices or DEFAULT_PRICES)
        self.rates_date = rates_date
        self.market_time = market_time
        self.requests: list[RecordedRequest] = []
        self._queues: dict[str, deque[ScriptedResponse]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-provider",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<port> (no trailing slash)."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> Self:
        """Starts serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving, interrupting delayed responses."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        """Starts the server."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stops the server."""
        self.stop()

    def enqueue(self, path: str, *responses: ScriptedResponse) -> None:
        """Queues responses for `path` (served in order, before falling back to the defaults)."""
        with self._lock:
            self._queues.setdefault(path, deque()).extend(responses)

    def respond(
        self,
        path: str,
        status: int = 200,
        body: Any = b"",
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
        times: int = 1,
        drop_connection: bool = False,
    ) -> None:
        """Queues the same response `times` times for `path`."""
        self.enqueue(
            path,
            *(
                ScriptedResponse(
                    status, body, dict(headers or {}), delay_s, drop_connection
                )
                for _ in range(times)
            ),
        )

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """Returns the recorded requests for `path`, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def pending(self, path: str) -> int:
        """Returns how many scripted responses for `path` have not been served yet."""
        with self._lock:
            return len(self._queues.get(path, ()))

    def rates_body(self, base: str, symbols: list[str] | None) -> tuple[int, Any]:
        """Returns the default Frankfurter response (unknown quote currencies are left out)."""
        table = self.rates.get(base)
        if table is None:
            return 404, {"message": "not found"}
        wanted = symbols if symbols is not None else sorted(table)
        rates = {s: Decimal(table[s]) for s in wanted if s in table}
        return 200, {
            "amount": Decimal("1.0"),
            "base": base,
            "date": self.rates_date,
            "rates": rates,
        }

    def quote_body(self, symbols: list[str]) -> tuple[int, Any]:
        """Returns the default Yahoo v7 response (unknown symbols are left out)."""
        result = []
        for symbol in symbols:
            if symbol in self.prices:
                price, currency = self.prices[symbol]
                result.append(
                    {
                        "symbol": symbol,
                        "regularMarketPrice": Decimal(price),
                        "currency": currency,
                        "regularMarketTime": self.market_time,
                        "marketState": "CLOSED",
                    }
                )
        return 200, {"quoteResponse": {"result": result, "error": None}}

    def _default(self, path: str, query: dict[str, list[str]]) -> ScriptedResponse:
        """Builds the table-driven response for a request with no scripted response left."""
        if path == RATES_PATH:
            base = (query.get("base") or ["EUR"])[0]
            symbols = query.get("symbols")
            status, body = self.rates_body(
                base, symbols[0].split(",") if symbols else None
            )
        elif path == QUOTE_PATH:
            symbols = query.get("symbols")
            status, body = self.quote_body(symbols[0].split(",") if symbols else [])
        else:
            status, body = 404, {"message": f"no route for {path}"}
        return ScriptedResponse(status, body, {"Content-Type": "application/json"})

    def _next_response(self, request: RecordedRequest) -> ScriptedResponse:
        """Records the request and returns the scripted or default response for it."""
        with self._lock:
            self.requests.append(request)
            queue = self._queues.get(request.path)
            scripted = queue.popleft() if queue else None
        return (
            scripted
            if scripted is not None
            else self._default(request.path, request.query)
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        """Returns a request handler class bound to this server's state."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def do_GET(self) -> None:
                """Serves one GET from the script or the tables."""
                parts = urlsplit(self.path)
                request = RecordedRequest(
                    method="GET",
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    raw_path=self.path,
                    at=time.monotonic(),
                )
                response = fake._next_response(request)
                if response.delay_s and fake._stopping.wait(response.delay_s):
                    return
                if response.drop_connection:
                    self.close_connection = True
                    return
                payload = encode_body(response.body)
                try:
                    self.send_response(response.status)
                    headers = {"Content-Type": "application/json", **response.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = (
                        True  # the client gave up (timeout); nothing to do
                    )

            def log_message(self, format: str, *args: Any) -> None:
                """Keeps test output quiet."""

        return Handler

"""HTTP providers against a real local HTTP server, and the rate limiters against a real Redis."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from overnight.adapters.providers.base import ProviderError
from overnight.adapters.providers.http import parse_retry_after, redact
from overnight.adapters.providers.http_prices import HttpPriceProvider
from overnight.adapters.providers.http_rates import HttpRatesProvider
from overnight.adapters.providers.ratelimit import LocalRateLimiter, RateLimitTimeout, RedisRateLimiter
from tests.support.fake_provider import DEFAULT_RATES, QUOTE_PATH, RATES_PATH, FakeProviderServer

REDIS_URL = os.environ.get("OVERNIGHT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SECRET = "s3cr3t-KEY-123"


class Recorder:
    """An injectable sleep that records the delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class CountingLimiter:
    """A RateLimiter that only counts acquisitions."""

    def __init__(self) -> None:
        self.calls = 0

    def acquire(self, cost: int = 1) -> None:
        self.calls += cost


_OPEN: list[HttpRatesProvider | HttpPriceProvider] = []


P = TypeVar("P", HttpRatesProvider, HttpPriceProvider)


def track(provider: P) -> P:
    """Closes the provider's HTTP client after the test."""
    _OPEN.append(provider)
    return provider


@pytest.fixture(autouse=True)
def _close_providers() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture
def sleeps() -> Recorder:
    return Recorder()


def rates(
    fake: FakeProviderServer, sleeps: Recorder, **kwargs: object
) -> HttpRatesProvider:
    opts: dict[str, object] = {"sleep": sleeps, "jitter": lambda: 1.0, "timeout_s": 2.0}
    opts.update(kwargs)
    return track(HttpRatesProvider(fake.base_url, **opts))  # type: ignore[arg-type]


def prices(
    fake: FakeProviderServer, sleeps: Recorder, **kwargs: object
) -> HttpPriceProvider:
    opts: dict[str, object] = {"sleep": sleeps, "jitter": lambda: 1.0, "timeout_s": 2.0}
    opts.update(kwargs)
    return track(HttpPriceProvider(fake.base_url, **opts))  # type: ignore[arg-type]


def usd(code: str) -> Decimal:
    """1 USD in `code` from the ECB's table (base EUR, the fake's DEFAULT_RATES["EUR"]): EUR->code / EUR->USD."""
    return Decimal(DEFAULT_RATES["EUR"][code]) / Decimal(DEFAULT_RATES["EUR"]["USD"])


# --- happy paths ---------------------------------------------------------------------------------


def test_rates_happy_path(fake_provider: FakeProviderServer, sleeps: Recorder) -> None:
    with rates(fake_provider, sleeps) as provider:
        snap = provider.fetch_rates("usd", ["BRL", "GBP", "JPY", "BRL"])
    assert snap.base == "USD"
    assert snap.rates == {"BRL": usd("BRL"), "GBP": usd("GBP"), "JPY": usd("JPY")}
    assert str(snap.rates["JPY"]) == "154.3262411347517730496453901"  # 163.20 / 1.0575: not the API's 154.32
    assert all(isinstance(v, Decimal) for v in snap.rates.values())
    assert snap.source == "frankfurter"
    assert not snap.stale
    # 2026-11-20 16:00 Europe/Berlin (CET, UTC+1) = 15:00 UTC
    assert snap.as_of == datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
    [req] = fake_provider.requests_for(RATES_PATH)
    assert req.param("base") == "EUR"  # the ECB's own table: the API rounds the rates it derives
    assert req.param("symbols") == "BRL,GBP,JPY,USD"
    assert sleeps.delays == []


def test_rates_base_in_symbols_is_one_and_not_requested(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    provider = rates(fake_provider, sleeps)
    snap = provider.fetch_rates("USD", ["USD", "EUR"])
    assert snap.rates == {"USD": Decimal(1), "EUR": Decimal(1) / Decimal("1.0575")}
    assert fake_provider.requests_for(RATES_PATH)[0].param("symbols") == "USD"
    only_base = provider.fetch_rates("USD", ["USD"])
    assert only_base.rates == {"USD": Decimal(1)}
    assert len(fake_provider.requests_for(RATES_PATH)) == 1


def test_prices_happy_path(fake_provider: FakeProviderServer, sleeps: Recorder) -> None:
    provider = prices(fake_provider, sleeps)
    quotes = provider.fetch_prices(["AAPL", "SAP.DE", "VOD.L", "NOPE"])
    assert set(quotes) == {"AAPL", "SAP.DE", "VOD.L"}  # NOPE is simply absent
    aapl = quotes["AAPL"]
    assert (aapl.symbol, aapl.price, aapl.currency) == ("AAPL", Decimal("189.5"), "USD")
    assert aapl.as_of == datetime.fromtimestamp(1763740800, UTC)
    assert quotes["SAP.DE"].currency == "EUR"
    # pence are converted to pounds, the quoted unit is kept in extra
    vod = quotes["VOD.L"]
    assert (vod.price, vod.currency) == (Decimal("0.725"), "GBP")
    assert vod.extra["quoted_currency"] == "GBp"
    assert provider.last_stats.requested == 4
    assert provider.last_stats.priced == 3
    assert provider.last_stats.missing == 1
    assert provider.last_stats.skipped_invalid == 0
    [req] = fake_provider.requests_for(QUOTE_PATH)
    assert req.param("symbols") == "AAPL,SAP.DE,VOD.L,NOPE"


def test_price_requests_are_chunked(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    symbols = ["AAPL", "MSFT", "NVDA", "SAP.DE", "VOD.L", "PETR4.SA", "7203.T"]
    limiter = CountingLimiter()
    provider = prices(fake_provider, sleeps, chunk_size=3, rate_limiter=limiter)
    quotes = provider.fetch_prices(symbols)
    assert set(quotes) == set(symbols)
    sent = [r.param("symbols") for r in fake_provider.requests_for(QUOTE_PATH)]
    assert sent == ["AAPL,MSFT,NVDA", "SAP.DE,VOD.L,PETR4.SA", "7203.T"]
    assert provider.last_stats.requests == 3
    assert limiter.calls == 3  # one token per HTTP request


def test_empty_symbol_list_makes_no_request(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    assert prices(fake_provider, sleeps).fetch_prices([]) == {}
    assert fake_provider.requests == []


# --- retries -------------------------------------------------------------------------------------


def test_429_honours_retry_after_seconds(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(
        RATES_PATH, 429, {"message": "slow down"}, headers={"Retry-After": "2"}
    )
    snap = rates(fake_provider, sleeps).fetch_rates("USD", ["BRL"])
    assert snap.rates == {"BRL": usd("BRL")}
    assert sleeps.delays == [2.0]
    assert len(fake_provider.requests_for(RATES_PATH)) == 2


def test_429_honours_retry_after_http_date(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    fake_provider.respond(QUOTE_PATH, 429, "", headers={"Retry-After": when})
    quotes = prices(fake_provider, sleeps).fetch_prices(["AAPL"])
    assert "AAPL" in quotes
    [delay] = sleeps.delays
    assert 2.0 <= delay <= 4.0


def test_429_retry_after_too_long_gives_up_at_once(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(RATES_PATH, 429, "", headers={"Retry-After": "120"})
    with pytest.raises(ProviderError, match=r"retry after 120s.*retry_after_max_s=30s"):
        rates(fake_provider, sleeps).fetch_rates("USD", ["BRL"])
    assert sleeps.delays == []
    assert len(fake_provider.requests_for(RATES_PATH)) == 1


def test_429_without_retry_after_backs_off(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(RATES_PATH, 429, "", times=4)
    with pytest.raises(
        ProviderError, match=r"after 4 attempts; last cause: HTTP 429.*rate limiting"
    ):
        rates(fake_provider, sleeps).fetch_rates("USD", ["BRL"])
    assert sleeps.delays == [0.5, 1.0, 2.0]


def test_5xx_twice_then_ok(fake_provider: FakeProviderServer, sleeps: Recorder) -> None:
    fake_provider.respond(RATES_PATH, 503, "maintenance")
    fake_provider.respond(RATES_PATH, 502, "bad gateway")
    snap = rates(fake_provider, sleeps).fetch_rates("USD", ["JPY"])
    assert snap.rates == {"JPY": usd("JPY")}
    assert sleeps.delays == [0.5, 1.0]  # exponential, jitter pinned to its maximum
    assert len(fake_provider.requests_for(RATES_PATH)) == 3


def test_backoff_has_full_jitter_and_is_capped(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(QUOTE_PATH, 500, "", times=6)
    provider = prices(
        fake_provider,
        sleeps,
        max_attempts=6,
        backoff_base_s=1.0,
        backoff_max_s=4.0,
        jitter=lambda: 0.5,
    )
    with pytest.raises(ProviderError, match="after 6 attempts; last cause: HTTP 500"):
        provider.fetch_prices(["AAPL"])
    assert sleeps.delays == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_5xx_exhausts_attempts(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(RATES_PATH, 503, "<h1>down</h1>", times=3)
    with pytest.raises(ProviderError) as err:
        rates(fake_provider, sleeps, max_attempts=3).fetch_rates("USD", ["BRL"])
    msg = str(err.value)
    assert "failed after 3 attempts" in msg
    assert "HTTP 503 Service Unavailable" in msg
    assert "<h1>down</h1>" in msg
    assert len(sleeps.delays) == 2
    assert fake_provider.pending(RATES_PATH) == 0


def test_timeouts_are_retried_then_fail(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(RATES_PATH, 200, {"late": True}, delay_s=1.0, times=3)
    provider = rates(fake_provider, sleeps, timeout_s=0.2, max_attempts=3)
    started = time.monotonic()
    with pytest.raises(
        ProviderError, match=r"after 3 attempts; last cause: timed out after 0.2s"
    ):
        provider.fetch_rates("USD", ["BRL"])
    assert time.monotonic() - started < 2.5
    assert len(fake_provider.requests_for(RATES_PATH)) == 3
    assert len(sleeps.delays) == 2


def test_timeout_then_success(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(QUOTE_PATH, 200, {"late": True}, delay_s=1.0)
    quotes = prices(fake_provider, sleeps, timeout_s=0.2).fetch_prices(["MSFT"])
    assert quotes["MSFT"].price == Decimal("415.25")
    assert sleeps.delays == [0.5]


def test_dropped_connection_is_retried(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(QUOTE_PATH, drop_connection=True)
    quotes = prices(fake_provider, sleeps).fetch_prices(["NVDA"])
    assert "NVDA" in quotes
    assert len(fake_provider.requests_for(QUOTE_PATH)) == 2


def test_connection_refused_is_retried_then_fails(sleeps: Recorder) -> None:
    provider = track(
        HttpRatesProvider(
            "http://127.0.0.1:1", sleep=sleeps, jitter=lambda: 1.0, max_attempts=2
        )
    )
    with pytest.raises(
        ProviderError,
        match=r"after 2 attempts; last cause: connection error \(ConnectError",
    ):
        provider.fetch_rates("USD", ["BRL"])
    assert sleeps.delays == [0.5]


def test_404_fails_at_once(fake_provider: FakeProviderServer, sleeps: Recorder) -> None:
    fake_provider.respond(RATES_PATH, 404, {"message": "not found"})
    with pytest.raises(
        ProviderError, match=r"HTTP 404 Not Found.*not retried.*check base_url"
    ):
        rates(fake_provider, sleeps).fetch_rates("USD", ["BRL"])
    assert sleeps.delays == []
    assert len(fake_provider.requests_for(RATES_PATH)) == 1


def test_unknown_path_is_404(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    provider = track(HttpRatesProvider(fake_provider.base_url + "/v9", sleep=sleeps))
    with pytest.raises(ProviderError, match="HTTP 404"):
        provider.fetch_rates("USD", ["BRL"])
    assert sleeps.delays == []


# --- malformed bodies ----------------------------------------------------------------------------


def test_non_json_body_fails_without_retry(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(
        RATES_PATH,
        200,
        "<html><body>Gateway login</body></html>",
        headers={"Content-Type": "text/html"},
    )
    with pytest.raises(ProviderError) as err:
        rates(fake_provider, sleeps).fetch_rates("USD", ["BRL"])
    msg = str(err.value)
    assert "not valid JSON" in msg
    assert "<html><body>Gateway login" in msg
    assert f"{fake_provider.base_url}/latest?base=EUR" in msg
    assert sleeps.delays == []
    assert len(fake_provider.requests_for(RATES_PATH)) == 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([1, 2, 3], "expected a JSON object, got list"),
        (
            {"amount": 1, "base": "USD", "date": "2026-11-20", "rates": {"BRL": 5}},
            "base is 'USD', expected 'EUR'",
        ),
        (
            {"amount": 1, "base": "EUR", "date": "20/11/2026", "rates": {"BRL": 5}},
            "is not an ISO date",
        ),
        ({"amount": 1, "base": "EUR", "date": "2026-11-20"}, "'rates' is missing"),
        (
            {"amount": 1, "base": "EUR", "date": "2026-11-20", "rates": {"BRL": -5.1, "USD": 1.0575}},
            r"invalid rate for BRL: Decimal\('-5.1'\)",
        ),
        (
            {
                "amount": 1,
                "base": "EUR",
                "date": "2026-11-20",
                "rates": {"BRL": float("nan"), "USD": 1.0575},
            },
            "invalid rate for BRL: ",
        ),
        (
            {"amount": 1, "base": "EUR", "date": "2026-11-20", "rates": {"BRL": "5.1", "USD": 1.0575}},
            "invalid rate for BRL: '5.1'",
        ),
        (
            {"amount": 1, "base": "EUR", "date": "2026-11-20", "rates": {"BRL": True, "USD": 1.0575}},
            "invalid rate for BRL: True",
        ),
    ],
)
def test_malformed_rates_fail_without_retry(
    fake_provider: FakeProviderServer, sleeps: Recorder, body: object, match: str
) -> None:
    fake_provider.respond(RATES_PATH, 200, body)
    with pytest.raises(ProviderError, match=match):
        rates(fake_provider, sleeps).fetch_rates("USD", ["BRL"])
    assert sleeps.delays == []
    assert len(fake_provider.requests_for(RATES_PATH)) == 1


def test_partial_rates_deliver_the_others_and_name_the_missing_currencies(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    # the fake leaves out currencies it does not know, like the real API: one unpublished currency never
    # blocks the others (docs/freshness.md)
    snap = rates(fake_provider, sleeps).fetch_rates("USD", ["BRL", "XAU", "GBP", "ZAR"])
    assert snap.rates == {"BRL": usd("BRL"), "GBP": usd("GBP")}
    assert sorted(snap.unavailable) == ["XAU", "ZAR"]
    assert "returned no rate for XAU (base EUR, date 2026-11-20)" in snap.unavailable["XAU"]
    assert sleeps.delays == []


def test_only_unpublished_currencies_is_an_error(fake_provider: FakeProviderServer, sleeps: Recorder) -> None:
    with pytest.raises(ProviderError, match=r"no usable rate for any of XAU, ZAR.*returned no rate for XAU"):
        rates(fake_provider, sleeps).fetch_rates("USD", ["XAU", "ZAR"])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"result": []}, "'quoteResponse' object"),
        ({"quoteResponse": {"result": None, "error": None}}, "result must be a list"),
        (
            {"quoteResponse": {"result": [1, 2], "error": None}},
            "result must be a list of objects",
        ),
        (
            {
                "quoteResponse": {
                    "result": [],
                    "error": {"code": "Bad", "description": "no"},
                }
            },
            "reported an error",
        ),
        ("[]", "'quoteResponse' object"),
    ],
)
def test_malformed_price_bodies_fail_without_retry(
    fake_provider: FakeProviderServer, sleeps: Recorder, body: object, match: str
) -> None:
    fake_provider.respond(QUOTE_PATH, 200, body)
    with pytest.raises(ProviderError, match=match):
        prices(fake_provider, sleeps).fetch_prices(["AAPL"])
    assert sleeps.delays == []
    assert len(fake_provider.requests_for(QUOTE_PATH)) == 1


def test_invalid_price_entries_are_skipped_and_counted(
    fake_provider: FakeProviderServer,
    sleeps: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = 1763740800
    fake_provider.respond(
        QUOTE_PATH,
        200,
        {
            "quoteResponse": {
                "error": None,
                "result": [
                    {
                        "symbol": "AAPL",
                        "regularMarketPrice": Decimal("189.5"),
                        "currency": "USD",
                        "regularMarketTime": t,
                    },
                    {
                        "symbol": "MSFT",
                        "regularMarketPrice": Decimal(-1),
                        "currency": "USD",
                        "regularMarketTime": t,
                    },
                    {
                        "symbol": "NVDA",
                        "regularMarketPrice": float("nan"),
                        "currency": "USD",
                        "regularMarketTime": t,
                    },
                    {"symbol": "SAP.DE", "currency": "EUR", "regularMarketTime": t},
                    {
                        "symbol": "VOD.L",
                        "regularMarketPrice": 0,
                        "currency": "GBp",
                        "regularMarketTime": t,
                    },
                    {"symbol": "PETR4.SA", "regularMarketPrice": 37, "currency": "BRL"},
                    {
                        "symbol": "7203.T",
                        "regularMarketPrice": 2650,
                        "currency": "JPY",
                        "regularMarketTime": t,
                    },
                ],
            }
        },
    )
    provider = prices(fake_provider, sleeps)
    with caplog.at_level(logging.WARNING, logger="overnight.adapters.providers.http"):
        quotes = provider.fetch_prices(
            ["AAPL", "MSFT", "NVDA", "SAP.DE", "VOD.L", "PETR4.SA", "7203.T"]
        )
    assert set(quotes) == {"AAPL", "7203.T"}
    assert quotes["7203.T"].price == Decimal(2650)
    assert provider.last_stats.skipped_invalid == 5
    assert provider.last_stats.missing == 5
    skipped = [
        r for r in caplog.records if r.getMessage().startswith("price quote skipped")
    ]
    skipped_symbols = {r.__dict__["symbol"] for r in skipped}  # structured field
    assert skipped_symbols == {"MSFT", "NVDA", "SAP.DE", "VOD.L", "PETR4.SA"}
    assert sleeps.delays == []


# --- secrets -------------------------------------------------------------------------------------


def test_api_key_is_sent_but_redacted_in_errors_and_logs(
    fake_provider: FakeProviderServer,
    sleeps: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_provider.respond(RATES_PATH, 500, f"oops for apikey={SECRET}")
    fake_provider.respond(RATES_PATH, 404, f"unknown key {SECRET}")
    provider = rates(fake_provider, sleeps, api_key=SECRET)
    with caplog.at_level(logging.DEBUG), pytest.raises(ProviderError) as err:
        provider.fetch_rates("USD", ["BRL"])
    sent = fake_provider.requests_for(RATES_PATH)
    assert [r.param("apikey") for r in sent] == [SECRET, SECRET]
    msg = str(err.value)
    assert "HTTP 404" in msg
    assert "apikey=***" in msg
    assert SECRET not in msg
    assert SECRET not in caplog.text
    assert "apikey=***" in caplog.text
    assert SECRET not in repr(provider)


def test_api_key_redacted_in_malformed_and_exhausted_errors(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    fake_provider.respond(QUOTE_PATH, 200, f"not json {SECRET}")
    provider = prices(fake_provider, sleeps, api_key=SECRET, max_attempts=2)
    with pytest.raises(ProviderError) as err:
        provider.fetch_prices(["AAPL"])
    assert SECRET not in str(err.value)
    fake_provider.respond(QUOTE_PATH, 503, "", times=2)
    with pytest.raises(ProviderError, match="after 2 attempts") as err:
        provider.fetch_prices(["AAPL"])
    assert SECRET not in str(err.value)
    assert "apikey=***" in str(err.value)


def test_redact_helpers() -> None:
    assert (
        redact("https://u:p@x.io/q?a=1&token=abc&key=k#f")
        == "https://***@x.io/q?a=1&token=***&key=***#f"
    )
    assert redact("body has sp ace", ["sp ace"]) == "body has ***"
    assert redact("q?k=a%2Fb", ["a/b"]) == "q?k=***"
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


# --- rate limiters -------------------------------------------------------------------------------


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(
        REDIS_URL,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"no Redis answers at {REDIS_URL} ({exc}): `make test` starts one (or point "
            "AIRFLOW_CONN_OVERNIGHT_REDIS / OVERNIGHT_TEST_REDIS_URL at yours); these tests need a real Redis"
        )
    yield client
    client.close()


@pytest.fixture
def limiter_key(redis_client: redis.Redis) -> Iterator[str]:
    key = f"test-{uuid.uuid4().hex}"
    yield key
    redis_client.delete(f"ratelimit:{key}")


def test_redis_limiter_budget_is_shared(
    redis_client: redis.Redis, limiter_key: str
) -> None:
    second_client = redis.Redis.from_url(REDIS_URL)
    a = RedisRateLimiter(redis_client, limiter_key, rate_per_s=10, burst=5)
    b = RedisRateLimiter(second_client, limiter_key, rate_per_s=10, burst=5)
    assert a.key == b.key == f"ratelimit:{limiter_key}"
    errors: list[BaseException] = []

    def worker(limiter: RedisRateLimiter, n: int) -> None:
        try:
            for _ in range(n):
                limiter.acquire()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    started = time.monotonic()
    threads = [
        threading.Thread(target=worker, args=(a, 8)),
        threading.Thread(target=worker, args=(b, 7)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.monotonic() - started
    second_client.close()
    assert not errors
    # 15 tokens with a burst of 5 at 10/s: the 10 extra tokens need 1 s, whoever asks for them
    assert 0.9 <= elapsed < 4.0
    assert 0 < redis_client.pttl(a.key) <= 1500
    assert not a.degraded and not b.degraded


def test_redis_limiter_burst_is_immediate(
    redis_client: redis.Redis, limiter_key: str
) -> None:
    limiter = RedisRateLimiter(redis_client, limiter_key, rate_per_s=1, burst=5)
    started = time.monotonic()
    for _ in range(5):
        limiter.acquire()
    assert time.monotonic() - started < 0.5


def test_redis_limiter_gives_up_after_max_wait(
    redis_client: redis.Redis, limiter_key: str
) -> None:
    sleeps = Recorder()
    limiter = RedisRateLimiter(
        redis_client, limiter_key, rate_per_s=0.1, burst=2, sleep=sleeps, max_wait_s=1
    )
    limiter.acquire(2)
    with pytest.raises(
        RateLimitTimeout, match=r"max_wait_s=1s.*lower task parallelism"
    ):
        limiter.acquire()
    assert sleeps.delays == []
    with pytest.raises(ValueError, match="cost must be between 1 and burst=2"):
        limiter.acquire(3)


def test_unreachable_redis_degrades_to_local(caplog: pytest.LogCaptureFixture) -> None:
    dead = redis.Redis(
        host="127.0.0.1",
        port=1,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    now = [0.0]
    sleeps = Recorder()

    def sleep(seconds: float) -> None:
        sleeps(seconds)
        now[0] += seconds

    limiter = RedisRateLimiter(
        dead, "unreachable", rate_per_s=2, burst=2, sleep=sleep, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="overnight.adapters.providers.ratelimit"):
        for _ in range(4):
            limiter.acquire()
    assert limiter.degraded
    warnings = [
        r
        for r in caplog.records
        if "degrading to a per-process limiter" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    # the local bucket still limits: 2 free, then 0.5 s per token at 2/s
    assert sleeps.delays == [0.5, 0.5]


def test_from_url_fails_fast_and_degrades(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisRateLimiter.from_url(
        "redis://127.0.0.1:1/0", "x", rate_per_s=100, burst=10
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        limiter.acquire()
    assert time.monotonic() - started < 1.0
    assert limiter.degraded
    assert "Redis unavailable" in caplog.text


def test_local_limiter_with_fake_clock() -> None:
    now = [100.0]
    sleeps = Recorder()

    def sleep(seconds: float) -> None:
        sleeps(seconds)
        now[0] += seconds

    limiter = LocalRateLimiter(4, 2, sleep=sleep, clock=lambda: now[0], max_wait_s=1)
    for _ in range(4):
        limiter.acquire()
    assert sleeps.delays == [0.25, 0.25]
    limiter.acquire(2)
    assert sleeps.delays[-1] == 0.5
    slow = LocalRateLimiter(0.5, 1, sleep=sleep, clock=lambda: now[0], max_wait_s=1)
    slow.acquire()
    with pytest.raises(RateLimitTimeout, match=r"next token in 2\.00s"):
        slow.acquire()


def test_http_provider_uses_shared_redis_limiter(
    fake_provider: FakeProviderServer,
    sleeps: Recorder,
    redis_client: redis.Redis,
    limiter_key: str,
) -> None:
    limiter = RedisRateLimiter(redis_client, limiter_key, rate_per_s=50, burst=3)
    fake_provider.respond(QUOTE_PATH, 503, "")
    provider = prices(fake_provider, sleeps, rate_limiter=limiter, chunk_size=2)
    quotes = provider.fetch_prices(["AAPL", "MSFT", "NVDA"])
    assert set(quotes) == {"AAPL", "MSFT", "NVDA"}
    assert (
        len(fake_provider.requests_for(QUOTE_PATH)) == 3
    )  # 1 retry + 2 chunks, each took a token
    tokens = float(redis_client.hget(limiter.key, "tokens") or 0)
    assert tokens < 3


@pytest.mark.parametrize("status", [404, 422])
def test_an_api_refusing_an_unknown_symbol_is_asked_one_by_one(
    fake_provider: FakeProviderServer, sleeps: Recorder, status: int
) -> None:
    # Some Frankfurter versions refuse the whole request when one symbol is unknown (404 "not found" or 422):
    # the others are then asked one at a time, and only the unknown one is left out (docs/freshness.md).
    def ok(code: str, rate: str) -> dict[str, object]:
        return {"amount": 1, "base": "EUR", "date": "2026-11-20", "rates": {code: Decimal(rate), "USD": Decimal("1.0575")}}

    fake_provider.respond(RATES_PATH, status, {"message": "not found"})
    fake_provider.respond(RATES_PATH, 200, ok("BRL", "5.4182"))
    fake_provider.respond(RATES_PATH, status, {"message": "not found"})
    fake_provider.respond(RATES_PATH, 200, ok("GBP", "0.8344"))
    snap = rates(fake_provider, sleeps).fetch_rates("USD", ["BRL", "ARS", "GBP"])
    assert snap.rates == {"BRL": usd("BRL"), "GBP": usd("GBP")}
    assert list(snap.unavailable) == ["ARS"] and f"HTTP {status}" in snap.unavailable["ARS"]
    assert [r.param("symbols") for r in fake_provider.requests_for(RATES_PATH)] == [
        "ARS,BRL,GBP,USD", "BRL,USD", "ARS,USD", "GBP,USD"]
    assert snap.as_of == datetime(2026, 11, 20, 15, tzinfo=UTC)  # 16:00 CET
    assert sleeps.delays == []


def test_a_refused_request_for_one_symbol_is_an_error(fake_provider: FakeProviderServer, sleeps: Recorder) -> None:
    fake_provider.respond(RATES_PATH, 404, {"message": "not found"})
    with pytest.raises(ProviderError, match=r"HTTP 404"):
        rates(fake_provider, sleeps).fetch_rates("USD", ["ARS"])


def test_a_table_without_the_dollar_derives_nothing_and_says_why(
    fake_provider: FakeProviderServer, sleeps: Recorder
) -> None:
    """Every USD rate is derived from the ECB's EUR -> USD: without it, no rate is usable, and the error names
    it (the night then falls back to stored rates, flagged stale: docs/freshness.md)."""
    fake_provider.respond(RATES_PATH, 200, {"amount": 1, "base": "EUR", "date": "2026-11-20",
                                            "rates": {"BRL": 5.4182, "GBP": 0.8344}})
    with pytest.raises(ProviderError, match=r"no usable rate for USD, the base every rate is derived from") as err:
        rates(fake_provider, sleeps).fetch_rates("USD", ["BRL", "GBP"])
    assert "returned no rate for USD (base EUR, date 2026-11-20)" in str(err.value)
    assert fake_provider.requests_for(RATES_PATH)[0].param("symbols") == "BRL,GBP,USD"

"""HTTP adapters: exchange rates from a Frankfurter (ECB) API, prices from a Yahoo Finance v7 quote API."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Self
from zoneinfo import ZoneInfo

import httpx

from overnight.money import QUOTED_IN_MINOR_UNITS, normalize_quote
from overnight.providers.base import PriceQuote, ProviderClientError, ProviderError, RatesSnapshot
from overnight.providers.ratelimit import RateLimiter
from overnight.redaction import redact

logger = logging.getLogger(__name__)

USER_AGENT = "overnight-providers/1.0"
SNIPPET_CHARS = 200

# The ECB publishes its reference rates for a day at about 16:00 CET/CEST.
ECB_PUBLICATION_TIME = dtime(16, 0)
ECB_TZ = ZoneInfo("Europe/Berlin")


_CURRENCY = re.compile(r"^[A-Z]{3}$")


class _RedactingFilter(logging.Filter):
    """Redacts API keys from records of the `httpx` logger, which logs every request URL at INFO."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add_secret(self, secret: str) -> None:
        """Registers a secret to redact (longest first, so a key containing another is fully hidden)."""
        with self._lock:
            if secret not in self._secrets:
                self._secrets = tuple(
                    sorted({*self._secrets, secret}, key=len, reverse=True)
                )

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrites the record's message with secrets and credential-like query values redacted."""
        message = record.getMessage()
        cleaned = redact(message, self._secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_HTTPX_LOG_FILTER = _RedactingFilter()
logging.getLogger("httpx").addFilter(_HTTPX_LOG_FILTER)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Returns the delay in seconds of a Retry-After header (delta-seconds or HTTP date), None if absent or invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _number(value: object) -> Decimal | None:
    """Returns a JSON number (already parsed as Decimal/int) as Decimal, None for anything else (bools included)."""
    # Yahoo's formatted variant: {"raw": 1.5, "fmt": "1.50"}.
    if isinstance(value, dict) and "raw" in value:
        value = value["raw"]
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    return None


def _positive_finite(value: object) -> Decimal | None:
    """Returns the value as a positive finite Decimal, else None."""
    number = _number(value)
    if number is None or not number.is_finite() or number <= 0:
        return None
    return number


def _snippet(text: str, secrets: Sequence[str | None]) -> str:
    """Returns the start of a body on one line, redacted, for error messages."""
    flat = " ".join(text.split())
    if len(flat) > SNIPPET_CHARS:
        flat = flat[:SNIPPET_CHARS] + "..."
    return redact(flat, secrets)


def _dedupe(items: Iterable[str]) -> list[str]:
    """Returns the items without duplicates, first occurrence order kept."""
    return list(dict.fromkeys(items))


def _currency_code(value: str, what: str) -> str:
    """Returns an upper-cased ISO 4217 code or raises ValueError naming the bad input."""
    code = str(value).strip().upper()
    if not _CURRENCY.match(code):
        raise ValueError(
            f"{what} must be a 3-letter ISO 4217 currency code, got {value!r}"
        )
    return code


class _HttpJsonSource:
    """GETs JSON from one HTTP API with bounded retries, backoff with full jitter, Retry-After and rate limiting."""

    source = "http"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_param: str = "apikey",
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        retry_after_max_s: float = 30.0,
        rate_limiter: RateLimiter | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {redact(base_url, [api_key])!r}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if backoff_base_s < 0 or backoff_max_s < 0 or retry_after_max_s < 0:
            raise ValueError(
                "backoff_base_s, backoff_max_s and retry_after_max_s must be >= 0"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_attempts = int(max_attempts)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.retry_after_max_s = float(retry_after_max_s)
        self.rate_limiter = rate_limiter
        self._api_key = api_key
        self._api_key_param = api_key_param
        self._secrets: list[str | None] = [api_key]
        if api_key:
            _HTTPX_LOG_FILTER.add_secret(api_key)
        self._sleep = sleep
        self._jitter = jitter
        self._owns_client = client is None
        self._client = (
            client
            if client is not None
            else httpx.Client(
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"}
            )
        )

    def __repr__(self) -> str:
        """Shows the endpoint without the API key."""
        return (
            f"{type(self).__name__}(base_url={redact(self.base_url, self._secrets)!r})"
        )

    def close(self) -> None:
        """Closes the HTTP client if this provider created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        """Returns self; the client is closed on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Closes the HTTP client if this provider created it."""
        self.close()

    def _redact(self, text: str) -> str:
        """Redacts this provider's API key and any credential-looking query values."""
        return redact(text, self._secrets)

    def _backoff(self, attempt: int) -> float:
        """Returns the full-jitter exponential delay after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (attempt - 1))
        return self._jitter() * ceiling

    def _get_json(self, path: str, params: dict[str, str]) -> tuple[Any, str]:
        """Returns (decoded JSON body with Decimal numbers, redacted URL) or raises ProviderError."""
        url = self.base_url + path
        query = dict(params)
        if self._api_key:
            query[self._api_key_param] = self._api_key
        shown = self._redact(str(httpx.URL(url, params=query)))
        cause = "no attempt made"
        hint = ""
        for attempt in range(1, self.max_attempts + 1):
            if self.rate_limiter is not None:
                self.rate_limiter.acquire()
            started = time.monotonic()
            try:
                response = self._client.get(
                    url, params=query, timeout=self.timeout_s, follow_redirects=True
                )
            except httpx.TimeoutException as exc:
                cause = f"timed out after {self.timeout_s:g}s ({type(exc).__name__})"
                hint = "the provider is slow or unreachable: retry the run later or raise timeout_s"
                delay = self._backoff(attempt)
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                cause = (
                    f"connection error ({type(exc).__name__}: {self._redact(str(exc))})"
                )
                hint = "the provider is unreachable: check base_url and the network, or retry the run later"
                delay = self._backoff(attempt)
            except httpx.HTTPError as exc:
                raise ProviderError(
                    f"{self.source}: GET {shown} could not be sent ({type(exc).__name__}: "
                    f"{self._redact(str(exc))}); check base_url and the proxy settings"
                ) from None
            else:
                elapsed_ms = round((time.monotonic() - started) * 1000)
                status = response.status_code
                if 200 <= status < 300:
                    logger.debug(
                        "provider response provider=%s url=%s status=%d elapsed_ms=%d attempt=%d",
                        self.source,
                        shown,
                        status,
                        elapsed_ms,
                        attempt,
                        extra={
                            "provider": self.source,
                            "url": shown,
                            "status_code": status,
                            "elapsed_ms": elapsed_ms,
                            "attempt": attempt,
                        },
                    )
                    return self._decode(response, shown), shown
                body = _snippet(response.text, self._secrets)
                cause = f"HTTP {status} {response.reason_phrase}".rstrip() + (
                    f" (body: {body!r})" if body else ""
                )
                if status != 429 and status < 500:
                    raise ProviderClientError(
                        f"{self.source}: GET {shown} failed with {cause}; not retried: "
                        f"{self._client_error_hint(status)}",
                        status,
                    )
                if status == 429:
                    hint = (
                        "the provider is rate limiting us: lower the shared rate limiter's rate_per_s "
                        "or the task parallelism"
                    )
                else:
                    hint = "the provider is failing: retry the run later or raise max_attempts"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is None:
                    delay = self._backoff(attempt)
                elif retry_after > self.retry_after_max_s:
                    raise ProviderError(
                        f"{self.source}: GET {shown} failed with {cause} and asked to retry after "
                        f"{retry_after:.0f}s, more than retry_after_max_s={self.retry_after_max_s:g}s; "
                        f"gave up after {attempt} attempt(s): {hint}, or retry the run later"
                    )
                else:
                    delay = retry_after
            if attempt == self.max_attempts:
                break
            logger.warning(
                "provider request failed, retrying provider=%s url=%s attempt=%d/%d cause=%s delay_s=%.2f",
                self.source,
                shown,
                attempt,
                self.max_attempts,
                cause,
                delay,
                extra={
                    "provider": self.source,
                    "url": shown,
                    "attempt": attempt,
                    "max_attempts": self.max_attempts,
                    "cause": cause,
                    "delay_s": delay,
                },
            )
            self._sleep(delay)
        raise ProviderError(
            f"{self.source}: GET {shown} failed after {self.max_attempts} attempts; last cause: {cause}; {hint}"
        )

    @staticmethod
    def _client_error_hint(status: int) -> str:
        """Says what to do about a non-retryable 4xx/3xx status."""
        if status in (401, 403):
            return "check the API key and that it is allowed to use this endpoint"
        if status == 404:
            return "check base_url and that the requested currencies/symbols exist at this provider"
        if status in (400, 422):
            return "the provider rejected the request parameters; check the requested currencies/symbols"
        return "check base_url and the provider's documentation"

    def _decode(self, response: httpx.Response, shown: str) -> Any:
        """Parses a JSON body with exact decimals; malformed JSON is a ProviderError (never retried)."""
        try:
            return json.loads(
                response.content, parse_float=Decimal, parse_constant=Decimal
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProviderError(
                f"{self.source}: GET {shown} returned HTTP {response.status_code} with a body that is not "
                f"valid JSON ({type(exc).__name__}: {exc}); body starts with "
                f"{_snippet(response.text, self._secrets)!r}. Check that base_url points at the right API "
                "(an HTML page usually means a proxy or an error page)"
            ) from None

    def _shape_error(self, shown: str, problem: str, body: object) -> ProviderError:
        """Builds the ProviderError for a JSON body that does not have the expected shape."""
        text = json.dumps(body, default=str)
        return ProviderError(
            f"{self.source}: GET {shown} returned an unexpected body: {problem}; body starts with "
            f"{_snippet(text, self._secrets)!r}. Check that base_url points at a {self.source}-compatible API"
        )


class HttpRatesProvider(_HttpJsonSource):
    """RatesProvider for the Frankfurter (ECB reference rates) JSON API: GET {base_url}/latest?base=..&symbols=.."""

    source = "frankfurter"

    def fetch_rates(self, base: str, symbols: list[str]) -> RatesSnapshot:
        """Returns 1 `base` in each requested currency the provider publishes; missing or invalid ones are left
        out and listed in `unavailable` (a ProviderError only when none is usable)."""
        base_code = _currency_code(base, "base")
        wanted = _dedupe(_currency_code(s, "symbol") for s in symbols)
        remote = [s for s in wanted if s != base_code]
        rates: dict[str, Decimal] = (
            {base_code: Decimal(1)} if base_code in wanted else {}
        )
        if not remote:
            return RatesSnapshot(
                base=base_code, rates=rates, as_of=datetime.now(UTC), source=self.source
            )
        try:
            body, shown = self._get_json(
                "/latest", {"base": base_code, "symbols": ",".join(remote)}
            )
        except ProviderClientError as exc:
            if exc.status not in (404, 422) or len(remote) < 2:
                raise
            # The API refuses the whole request for one symbol it does not know: ask one by one, so one
            # unpublished currency never blocks the others.
            return self._one_by_one(base_code, remote, rates, exc)
        if not isinstance(body, dict):
            raise self._shape_error(
                shown, f"expected a JSON object, got {type(body).__name__}", body
            )
        got_base = body.get("base")
        if not isinstance(got_base, str) or got_base.upper() != base_code:
            raise self._shape_error(
                shown, f"base is {got_base!r}, expected {base_code!r}", body
            )
        amount = body.get("amount", 1)
        if _number(amount) != 1:
            raise self._shape_error(shown, f"amount is {amount!r}, expected 1", body)
        raw_date = body.get("date")
        try:
            day = (
                date.fromisoformat(str(raw_date)) if isinstance(raw_date, str) else None
            )
        except ValueError:
            day = None
        if day is None:
            raise self._shape_error(
                shown, f"date {raw_date!r} is not an ISO date (YYYY-MM-DD)", body
            )
        raw_rates = body.get("rates")
        if not isinstance(raw_rates, dict):
            raise self._shape_error(shown, "'rates' is missing or not an object", body)
        # One currency the provider does not publish (or sends broken) never blocks the others: it is
        # left out and reported, so only the users who need it are affected (docs/freshness.md).
        unavailable: dict[str, str] = {}
        for s in remote:
            if s not in raw_rates:
                unavailable[s] = (f"{self.source}: GET {shown} returned no rate for {s} (base {base_code}, date "
                                  f"{day.isoformat()}); the provider does not publish it: use a provider that covers it")
                continue
            rate = _positive_finite(raw_rates[s])
            if rate is None:
                unavailable[s] = (f"{self.source}: GET {shown} returned an invalid rate for {s}: {raw_rates[s]!r} "
                                  "(must be a positive finite number); the provider's data is broken")
                continue
            rates[s] = rate
        if unavailable:
            logger.warning("rates not delivered provider=%s currencies=%s", self.source, ",".join(unavailable),
                           extra={"provider": self.source, "unavailable": sorted(unavailable)})
        if not any(s in rates for s in remote):
            raise ProviderError(
                f"{self.source}: GET {shown} delivered no usable rate for any of {', '.join(remote)} (base "
                f"{base_code}): {'; '.join(unavailable.values())}"
            )
        as_of = datetime.combine(day, ECB_PUBLICATION_TIME, tzinfo=ECB_TZ).astimezone(
            UTC
        )
        logger.info(
            "rates fetched provider=%s base=%s currencies=%d date=%s",
            self.source,
            base_code,
            len(rates),
            day.isoformat(),
            extra={
                "provider": self.source,
                "base": base_code,
                "currencies": len(rates),
                "rates_date": day.isoformat(),
            },
        )
        return RatesSnapshot(
            base=base_code, rates=rates, as_of=as_of, source=self.source, unavailable=unavailable
        )


    def _one_by_one(self, base: str, remote: list[str], rates: dict[str, Decimal],
                    refused: ProviderClientError) -> RatesSnapshot:
        """The rates of `remote` asked one currency at a time; refused ones are listed in `unavailable`."""
        unavailable: dict[str, str] = {}
        dated: dict[str, datetime] = {}
        for s in remote:
            try:
                one = self.fetch_rates(base, [s])
            except ProviderError as exc:
                unavailable[s] = str(exc)
                continue
            rates.update(one.rates)
            dated.update(dict.fromkeys(one.rates, one.as_of))
            unavailable.update(one.unavailable)
        if not dated:
            raise ProviderError(f"{refused}; asked one by one, no currency was delivered either")
        logger.warning("rates asked one by one after %s provider=%s unavailable=%s", refused.status, self.source,
                       ",".join(unavailable))
        return RatesSnapshot(base=base, rates=rates, as_of=min(dated.values()), source=self.source,
                             unavailable=unavailable, dated=dated)


@dataclass(frozen=True)
class PriceFetchStats:
    """Counts of one fetch_prices call."""

    requested: int = 0
    priced: int = 0
    missing: int = 0
    skipped_invalid: int = 0
    requests: int = 0


class HttpPriceProvider(_HttpJsonSource):
    """PriceProvider for Yahoo Finance's v7 quote JSON API: GET {base_url}/v7/finance/quote?symbols=..."""

    source = "yahoo"

    def __init__(self, base_url: str, *, chunk_size: int = 50, **source: Any) -> None:
        """`chunk_size` symbols per request; `source` are `_HttpJsonSource`'s settings (api_key, timeout_s, ...)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        super().__init__(base_url, **source)
        self.chunk_size = int(chunk_size)
        self.last_stats = PriceFetchStats()

    def fetch_prices(self, symbols: list[str]) -> dict[str, PriceQuote]:
        """Returns a quote per priced symbol (keyed as requested); unknown or invalid symbols are absent."""
        wanted = _dedupe(s.strip() for s in symbols)
        bad = [s for s in wanted if not s or "," in s]
        if bad:
            raise ValueError(
                f"symbols must be non-empty and contain no comma, got {bad!r}"
            )
        result: dict[str, PriceQuote] = {}
        skipped = 0
        requests = 0
        for start in range(0, len(wanted), self.chunk_size):
            chunk = wanted[start : start + self.chunk_size]
            body, shown = self._get_json(
                "/v7/finance/quote", {"symbols": ",".join(chunk)}
            )
            requests += 1
            by_key = {s.upper(): s for s in chunk}
            for entry in self._entries(body, shown):
                outcome = self._quote(entry, by_key, result)
                if outcome is not None:
                    skipped += 1
                    logger.warning(
                        "price quote skipped provider=%s symbol=%s reason=%s",
                        self.source,
                        entry.get("symbol"),
                        outcome,
                        extra={
                            "provider": self.source,
                            "symbol": str(entry.get("symbol")),
                            "reason": outcome,
                        },
                    )
        missing = len(wanted) - len(result)
        self.last_stats = PriceFetchStats(
            requested=len(wanted),
            priced=len(result),
            missing=missing,
            skipped_invalid=skipped,
            requests=requests,
        )
        logger.info(
            "prices fetched provider=%s requested=%d priced=%d unpriced=%d skipped_invalid=%d requests=%d",
            self.source,
            len(wanted),
            len(result),
            missing,
            skipped,
            requests,
            extra={
                "provider": self.source,
                "requested": len(wanted),
                "priced": len(result),
                "unpriced": missing,
                "skipped_invalid": skipped,
                "requests": requests,
            },
        )
        return result

    def _entries(self, body: Any, shown: str) -> list[dict[str, Any]]:
        """Returns quoteResponse.result, or raises ProviderError if the body does not have that shape."""
        response = body.get("quoteResponse") if isinstance(body, dict) else None
        if not isinstance(response, dict):
            raise self._shape_error(
                shown, "expected an object with a 'quoteResponse' object", body
            )
        error = response.get("error")
        if error is not None:
            raise ProviderError(
                f"{self.source}: GET {shown} reported an error: "
                f"{_snippet(json.dumps(error, default=str), self._secrets)!r}; check the symbols and the API key"
            )
        entries = response.get("result")
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) for e in entries
        ):
            raise self._shape_error(
                shown, "quoteResponse.result must be a list of objects", body
            )
        return entries

    def _quote(
        self,
        entry: dict[str, Any],
        by_key: dict[str, str],
        result: dict[str, PriceQuote],
    ) -> str | None:
        """Adds the entry's quote to `result`; returns why it was skipped as invalid, or None."""
        raw_symbol = entry.get("symbol")
        if not isinstance(raw_symbol, str):
            return "missing symbol"
        symbol = by_key.get(raw_symbol.upper())
        if symbol is None:
            logger.debug(
                "unrequested symbol ignored provider=%s symbol=%s",
                self.source,
                raw_symbol,
            )
            return None
        if symbol in result:
            logger.debug(
                "duplicate quote ignored provider=%s symbol=%s", self.source, symbol
            )
            return None
        raw_price = entry.get("regularMarketPrice")
        price = _positive_finite(raw_price)
        if price is None:
            return f"regularMarketPrice {raw_price!r} is missing or not a positive finite number"
        currency = entry.get("currency")
        if not isinstance(currency, str):
            return f"currency {currency!r} is missing"
        extra = {"source": self.source}
        if currency in QUOTED_IN_MINOR_UNITS:  # Yahoo quotes some exchanges in pence, cents, agorot
            extra.update(quoted_currency=currency, quoted_price=str(price))
            price, currency = normalize_quote(price, currency)
        currency = currency.upper()
        if not _CURRENCY.match(currency):
            return f"currency {entry.get('currency')!r} is not a 3-letter code"
        epoch = _number(entry.get("regularMarketTime"))
        if epoch is None or not epoch.is_finite() or epoch <= 0:
            return f"regularMarketTime {entry.get('regularMarketTime')!r} is missing or invalid"
        try:
            as_of = datetime.fromtimestamp(int(epoch), UTC)
        except (OverflowError, OSError, ValueError):
            return (
                f"regularMarketTime {entry.get('regularMarketTime')!r} is out of range"
            )
        for field_name, key in (
            ("exchange", "exchange"),
            ("marketState", "market_state"),
        ):
            value = entry.get(field_name)
            if isinstance(value, str):
                extra[key] = value
        result[symbol] = PriceQuote(
            symbol=symbol, price=price, currency=currency, as_of=as_of, extra=extra
        )
        return None

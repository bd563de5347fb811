"""Prices over HTTP from a Yahoo Finance v7 quote API: batched, rate-limited, minor units normalised."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from overnight.adapters.providers.base import (
    QUOTED_IN_MINOR_UNITS,
    PriceQuote,
    ProviderError,
    normalize_quote,
)
from overnight.adapters.providers.http import (
    _CURRENCY,
    _dedupe,
    _HttpJsonSource,
    _number,
    _positive_finite,
    _snippet,
    logger,
)


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

"""Types shared by every provider: what a provider returns and how it fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol


class ProviderError(RuntimeError):
    """A provider could not deliver usable data (after its retries); the message says why."""


class ProviderClientError(ProviderError):
    """The provider refused the request itself (an HTTP 4xx other than 429): not retried; `status` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RatesSnapshot:
    """Exchange rates: 1 unit of `base` = rates[quote] units of quote, as of `as_of` (aware UTC).

    `unavailable`: currencies asked for but not delivered, with the reason (a currency the provider does
    not publish, or whose rate is too old to use); `dated`: each rate's own as-of where they differ;
    `stale_in`: the currencies whose rate is stale (a user's document is stale only if it used one)."""

    base: str
    rates: dict[str, Decimal]
    as_of: datetime
    source: str = "unknown"
    stale: bool = False
    unavailable: dict[str, str] = field(default_factory=dict)
    dated: dict[str, datetime] = field(default_factory=dict)
    stale_in: frozenset[str] = frozenset()

    def to_xcom(self) -> dict[str, object]:
        """Returns a small JSON-able dict (decimals as strings)."""
        return {
            "base": self.base,
            "rates": {k: str(v) for k, v in sorted(self.rates.items())},
            "as_of": self.as_of.isoformat(),
            "source": self.source,
            "stale": self.stale,
            "unavailable": dict(sorted(self.unavailable.items())),
            "stale_in": sorted(self.stale_in),
            "dated": {k: v.isoformat() for k, v in sorted(self.dated.items())},
        }

    @classmethod
    def from_xcom(cls, data: dict[str, object]) -> RatesSnapshot:
        """Inverse of `to_xcom`."""
        rates = data["rates"]
        assert isinstance(rates, dict)
        return cls(
            base=str(data["base"]),
            rates={str(k): Decimal(str(v)) for k, v in rates.items()},
            as_of=datetime.fromisoformat(str(data["as_of"])),
            source=str(data.get("source", "unknown")),
            stale=bool(data.get("stale", False)),
            unavailable={str(k): str(v) for k, v in dict(data.get("unavailable") or {}).items()},  # type: ignore[call-overload]
            stale_in=frozenset(str(c) for c in data.get("stale_in") or ()),  # type: ignore[attr-defined]
            dated={str(k): datetime.fromisoformat(str(v)) for k, v in dict(data.get("dated") or {}).items()},  # type: ignore[call-overload]
        )

    def as_of_for(self, currencies: set[str]) -> datetime:
        """The date of the oldest rate among `currencies` (a document's conversions); with none to convert, the
        date of the newest rate the run has (docs/freshness.md)."""
        dates = [self.dated.get(c, self.as_of) for c in currencies if c != self.base and c in self.rates]
        if dates:
            return min(dates)
        return max(self.dated.values(), default=self.as_of)


# How quotes arrive (the providers' side, not the domain's money): exchanges that quote in a currency's minor unit (pence, cents, agorot): quoted code -> (ISO code, divisor).
QUOTED_IN_MINOR_UNITS: dict[str, tuple[str, int]] = {
    "GBp": ("GBP", 100),
    "GBX": ("GBP", 100),
    "ZAc": ("ZAR", 100),
    "ZAC": ("ZAR", 100),
    "ILA": ("ILS", 100),
}


def normalize_quote(price: Decimal, currency: str) -> tuple[Decimal, str]:
    """A price quoted in a minor unit (GBp, ZAc, ILA) as (price, ISO code) in the major unit."""
    minor = QUOTED_IN_MINOR_UNITS.get(currency)
    if minor is None:
        return price, currency
    code, divisor = minor
    return price / divisor, code



@dataclass(frozen=True)
class PriceQuote:
    """The last price of one asset in its trading currency."""

    symbol: str
    price: Decimal
    currency: str
    as_of: datetime
    extra: dict[str, str] = field(default_factory=dict)


class RatesProvider(Protocol):
    """Fetches exchange rates for the given currencies against a base currency."""

    def fetch_rates(self, base: str, symbols: list[str]) -> RatesSnapshot: ...


class PriceProvider(Protocol):
    """Fetches the latest quote of each symbol; symbols it cannot price are absent from the result."""

    def fetch_prices(self, symbols: list[str]) -> dict[str, PriceQuote]: ...

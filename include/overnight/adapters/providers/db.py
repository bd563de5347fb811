"""Database providers: rates and prices from the application's own tables (the offline default)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

import psycopg

from overnight.adapters.providers.base import PriceQuote, ProviderError, RatesSnapshot, normalize_quote


class DbRatesProvider:
    """Reads the latest stored rate of each currency against the base."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def fetch_rates(self, base: str, symbols: list[str]) -> RatesSnapshot:
        """Returns the newest stored rates; the snapshot's as-of is the oldest of them."""
        rows = self._conn.execute(
            "SELECT DISTINCT ON (quote) quote, rate, as_of FROM exchange_rates"
            " WHERE base = %s AND quote = ANY(%s) ORDER BY quote, as_of DESC",
            (base, symbols),
        ).fetchall()
        found = {q.strip(): (Decimal(r), a) for q, r, a in rows}
        if not found and [s for s in symbols if s != base]:
            raise ProviderError(
                f"exchange_rates: no stored {base} rates at all for {', '.join(symbols)}; "
                "load them or configure the HTTP rates provider"
            )
        # A currency with no stored rate is left out: the users and assets that need it fail or stay
        # unscored with that reason, instead of one bad row stopping everyone's run.
        rates = {q: r for q, (r, _) in found.items()}
        rates[base] = Decimal(1)
        as_of = min((a for _, a in found.values()), default=datetime.now(UTC))
        unavailable = {s: f"exchange_rates: no stored {base} rate for {s}" for s in symbols
                       if s not in rates}
        return RatesSnapshot(base=base, rates=rates, as_of=as_of, source="database", unavailable=unavailable,
                             dated={q: a.astimezone(UTC) for q, (_, a) in found.items()})


class DbPriceProvider:
    """Reads the latest stored price of each asset (by symbol)."""

    source = "database"

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def fetch_prices(self, symbols: list[str]) -> dict[str, PriceQuote]:
        """Returns a quote per symbol that has a finite, positive stored price."""
        rows = self._conn.execute(
            "SELECT a.symbol, p.price, p.currency, p.as_of FROM prices p JOIN assets a ON a.id = p.asset_id"
            " WHERE a.symbol = ANY(%s)",
            (symbols,),
        ).fetchall()
        out = {}
        for symbol, price, currency, as_of in rows:
            if price is None or not math.isfinite(price) or price <= 0:
                continue
            value, code = normalize_quote(Decimal(price), currency.strip())  # GBp (pence) -> GBP
            out[symbol] = PriceQuote(symbol, value, code, as_of)
        return out


def store_rates(conn: psycopg.Connection, snapshot: RatesSnapshot) -> None:
    """Keeps a fetched snapshot (its as-of time and source) for audit and stale fallback."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO exchange_rates (base, quote, rate, as_of, source) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (base, quote, as_of) DO UPDATE SET rate = EXCLUDED.rate, source = EXCLUDED.source",
            [(snapshot.base, q, r, snapshot.as_of, snapshot.source) for q, r in snapshot.rates.items()],
        )


def latest_stored_rates(conn: psycopg.Connection, base: str, symbols: list[str]) -> RatesSnapshot | None:
    """Returns the newest stored rates for the currencies, or None when none are stored."""
    try:
        return DbRatesProvider(conn).fetch_rates(base, symbols)
    except ProviderError:
        return None

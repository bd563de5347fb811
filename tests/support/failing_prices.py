"""A price provider that is down for some symbols: the database's quotes, but a ConnectionError whenever asked for one
of them, so the batch task that needs one dies there (the users of its earlier chunks stay completed)."""

from __future__ import annotations

import psycopg

from overnight.adapters.providers.base import PriceQuote
from overnight.adapters.providers.db import DbPriceProvider


class ProviderDownFor(DbPriceProvider):
    """The database's quotes, but down (a ConnectionError) whenever asked for one of `down`."""

    def __init__(self, conn: psycopg.Connection, down: set[str]) -> None:
        super().__init__(conn)
        self.down = down

    def fetch_prices(self, symbols: list[str]) -> dict[str, PriceQuote]:
        if self.down.intersection(symbols):
            raise ConnectionError(f"quote provider down for {sorted(self.down.intersection(symbols))}")
        return super().fetch_prices(symbols)

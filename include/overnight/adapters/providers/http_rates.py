"""Exchange rates over HTTP from a Frankfurter (ECB) API, dated by the ECB's publication (16:00 Berlin)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from datetime import time as dtime
from decimal import Decimal
from zoneinfo import ZoneInfo

from overnight.adapters.providers.base import (
    ProviderClientError,
    ProviderError,
    RatesSnapshot,
)
from overnight.adapters.providers.http import (
    _currency_code,
    _dedupe,
    _HttpJsonSource,
    _number,
    _positive_finite,
    logger,
)

# The ECB publishes its reference rates for a day at about 16:00 CET/CEST, in euros.
ECB_PUBLICATION_TIME = dtime(16, 0)
ECB_BASE = "EUR"
ECB_TZ = ZoneInfo("Europe/Berlin")


class HttpRatesProvider(_HttpJsonSource):
    """RatesProvider for the Frankfurter (ECB reference rates) JSON API: GET {base_url}/latest?base=EUR&symbols=.."""

    source = "frankfurter"

    def fetch_rates(self, base: str, symbols: list[str]) -> RatesSnapshot:
        """Returns 1 `base` in each requested currency the provider publishes; missing or invalid ones are left
        out and listed in `unavailable` (a ProviderError only when none is usable).

        Asks the ECB's own table, base EUR, and derives each rate as EUR->currency / EUR->base in Decimal. Asked
        on another base, the Frankfurter API derives and rounds the rates itself (2 decimals above 80, whole
        numbers above 5,000: JPY 154.32, KRW 1456), and the night would round them again."""
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
        ask = sorted({*remote, base_code} - {ECB_BASE})
        try:
            body, shown = self._get_json("/latest", {"base": ECB_BASE, "symbols": ",".join(ask)})
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
        if not isinstance(got_base, str) or got_base.upper() != ECB_BASE:
            raise self._shape_error(
                shown, f"base is {got_base!r}, expected {ECB_BASE!r}", body
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
        euro: dict[str, Decimal] = {ECB_BASE: Decimal(1)}
        for s in ask:
            if s not in raw_rates:
                unavailable[s] = (f"{self.source}: GET {shown} returned no rate for {s} (base {ECB_BASE}, date "
                                  f"{day.isoformat()}); the provider does not publish it: use a provider that covers it")
                continue
            rate = _positive_finite(raw_rates[s])
            if rate is None:
                unavailable[s] = (f"{self.source}: GET {shown} returned an invalid rate for {s}: {raw_rates[s]!r} "
                                  "(must be a positive finite number); the provider's data is broken")
                continue
            euro[s] = rate
        if base_code not in euro:
            raise ProviderError(
                f"{self.source}: GET {shown} delivered no usable rate for {base_code}, the base every rate is "
                f"derived from (EUR->currency / EUR->{base_code}): {'; '.join(unavailable.values())}")
        for s in remote:
            if s in euro:
                rates[s] = euro[s] / euro[base_code]  # 1 base = (EUR -> s) / (EUR -> base) of s
        if unavailable:
            logger.warning("rates not delivered provider=%s currencies=%s", self.source, ",".join(unavailable),
                           extra={"provider": self.source, "unavailable": sorted(unavailable)})
        if not any(s in rates for s in remote):
            raise ProviderError(
                f"{self.source}: GET {shown} delivered no usable rate for any of {', '.join(remote)} (base "
                f"{ECB_BASE}): {'; '.join(unavailable.values())}"
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

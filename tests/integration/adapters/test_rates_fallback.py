"""Rates: fetched once over HTTP and kept; when the provider fails, stored rates stand in (stale); rates too old
to use are left out (their users fail), never the run."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from overnight.adapters.providers.http_rates import HttpRatesProvider
from overnight.domain import freshness
from overnight.night import loading

CURRENCIES = ["BRL", "GBP", "JPY", "USD"]


def _provider(fake_provider) -> HttpRatesProvider:
    return HttpRatesProvider(fake_provider.base_url, max_attempts=2, timeout_s=0.5, sleep=lambda s: None)


def test_http_rates_are_stored_with_their_as_of(conn, seeded, fake_provider):
    snap = loading.fetch_rates(conn, _provider(fake_provider), CURRENCIES, now=datetime(2026, 11, 21, tzinfo=UTC))
    assert snap.source == "frankfurter" and not snap.stale
    stored = conn.execute("SELECT count(*) FROM exchange_rates WHERE source = 'frankfurter' AND as_of = %s",
                          (snap.as_of,)).fetchone()[0]
    assert stored == len(snap.rates) >= 3


def test_provider_down_uses_recent_stored_rates_marked_stale(conn, seeded, fake_provider):
    fake_provider.respond("/latest", status=500, times=10)
    latest = conn.execute("SELECT max(as_of) FROM exchange_rates WHERE base = 'USD'").fetchone()[0]
    snap = loading.fetch_rates(conn, _provider(fake_provider), CURRENCIES, now=latest + timedelta(hours=30))
    assert snap.stale and "fallback" in snap.source
    assert len(fake_provider.requests_for("/latest")) == 2  # bounded retries, then the fallback


def test_provider_down_and_stored_rates_too_old_leaves_the_currencies_out_not_the_run(conn, seeded, fake_provider):
    # docs/freshness.md: the run never fails because of rates; a currency without a usable rate fails only
    # the users who need it. Two weeks on, the stored rates are at least 6 ECB publications behind the expected
    # one (10 weekdays, at most 3 of them TARGET closing days, the day's own publication perhaps not out yet),
    # more than the 3 allowed.
    fake_provider.respond("/latest", body=b"<html>not json</html>", times=10)
    latest = conn.execute("SELECT max(as_of) FROM exchange_rates WHERE base = 'USD'").fetchone()[0]
    snap = loading.fetch_rates(conn, _provider(fake_provider), CURRENCIES, now=latest + timedelta(days=14))
    assert snap.rates == {"USD": 1} and snap.stale is True
    assert sorted(snap.unavailable) == ["BRL", "GBP", "JPY"]
    expected = freshness.expected_rates_publication(latest + timedelta(days=14)).isoformat()
    newest = dict(conn.execute("SELECT quote, max(as_of) FROM exchange_rates WHERE base = 'USD' GROUP BY quote"))
    assert {c: re.sub(r"are \d+ ECB", "are N ECB", why) for c, why in snap.unavailable.items()} == {
        c: f"{c}: rates as of {newest[c].astimezone(UTC).isoformat()}"
           f" are N ECB publications behind the expected publication of {expected}, more than the allowed lag of 3"
           " (OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS); fix the rates provider and clear the run" for c in ("BRL", "GBP", "JPY")}
    assert all(int(re.search(r"are (\d+) ECB", why)[1]) >= 6 for why in snap.unavailable.values())

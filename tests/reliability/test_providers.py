"""HTTP rate and price providers misbehaving, through `loading.fetch_rates` and `pipeline.score_batch`.

A real local HTTP server (tests/support/fake_provider.py) answers with 429 + Retry-After, 500s,
timeouts, malformed and partial bodies. Expected: bounded retries, then either stored rates flagged
stale; rates nobody can use fail only the users who need them, never the run; a partial price body fails exactly the users whose
holdings lack a price (stage 'prices'), everyone else completes. Never silent use of wrong data.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from overnight.adapters.providers.base import ProviderError
from overnight.adapters.providers.db import DbPriceProvider, DbRatesProvider
from overnight.adapters.providers.http_prices import HttpPriceProvider
from overnight.adapters.providers.http_rates import ECB_PUBLICATION_TIME, ECB_TZ, HttpRatesProvider
from overnight.domain.markets import get_market
from overnight.night import jobrun, loading, pipeline, runtime
from tests.support import reliability as R
from tests.support.fake_provider import QUOTE_PATH, RATES_PATH, FakeProviderServer, ecb_table
from tests.support.pipeline_run import run_pipeline, start

MARKET = "XNYS"
SESSION = R.S_PROVIDERS


class Sleeps(list):
    """An injected sleep that records delays instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def tables(conn: psycopg.Connection, seeded) -> dict[str, Any]:
    """The seeded data set's prices and rates, as the fake provider will serve them."""
    symbols = [r[0] for r in conn.execute("SELECT symbol FROM assets ORDER BY symbol")]
    quotes = DbPriceProvider(conn).fetch_prices(symbols)
    currencies = loading.needed_currencies(conn)
    stored = DbRatesProvider(conn).fetch_rates("USD", currencies)
    conn.commit()
    return {"prices": {s: (str(q.price), q.currency) for s, q in quotes.items()},
            "rates": ecb_table(stored.rates),  # as the ECB publishes them: base EUR
            "currencies": currencies, "stored": stored}


@pytest.fixture
def server(tables: dict[str, Any]) -> Iterator[FakeProviderServer]:
    # the newest ECB publication at this moment (~16:00 CET daily): fresh (under 24 h) at any time of day;
    # "yesterday" was 24 h 55 min old at 15:55 UTC, and the pipeline rightly flagged it stale
    now = datetime.now(ECB_TZ)
    published = now.date() if now.time() >= ECB_PUBLICATION_TIME else now.date() - timedelta(days=1)
    srv = FakeProviderServer(rates=tables["rates"], prices=tables["prices"], rates_date=published.isoformat(),
                             market_time=int(datetime.now(UTC).timestamp()) - 3600).start()
    try:
        yield srv
    finally:
        srv.stop()


def _rates_provider(server: FakeProviderServer, sleeps: Sleeps, **kw: Any) -> HttpRatesProvider:
    return HttpRatesProvider(server.base_url, sleep=sleeps, jitter=lambda: 0.5, timeout_s=kw.pop("timeout_s", 1.0),
                             max_attempts=kw.pop("max_attempts", 3), **kw)


def test_429_with_retry_after_is_honoured_then_fresh_rates(conn, server, tables) -> None:
    sleeps = Sleeps()
    server.respond(RATES_PATH, 429, {"message": "slow down"}, {"Retry-After": "2"}, times=2)
    with _rates_provider(server, sleeps) as provider:
        snap = loading.fetch_rates(conn, provider, tables["currencies"])
    assert sleeps == [2.0, 2.0] and len(server.requests_for(RATES_PATH)) == 3
    assert snap.source == "frankfurter" and not snap.stale
    served = tables["rates"]["EUR"]  # the cross rates of the table served: EUR -> c / EUR -> USD
    assert {c: v for c, v in snap.rates.items() if c != "USD"} == {
        **{c: Decimal(v) / Decimal(served["USD"]) for c, v in served.items() if c != "USD"},
        **({"EUR": 1 / Decimal(served["USD"])} if "EUR" in tables["currencies"] else {})}
    assert {c: snap.rates[c] for c in served if c != "USD"} == {
        c: r for c, r in tables["stored"].rates.items() if c in served and c != "USD"}  # each given back exactly


def test_fresh_http_rates_score_usd_users(conn, server, tables) -> None:
    with _rates_provider(server, Sleeps()) as provider:
        snap = loading.fetch_rates(conn, provider, tables["currencies"])
    conn.commit()
    run = start(conn, MARKET, SESSION, "reliability-http-rates", force=True, rates=snap, batch_size=50)
    job = run.job
    out = pipeline.score_batch(conn, job, run.audience, snap, run.batches[0], DbPriceProvider(conn), warm_cache=None)
    failed = conn.execute("SELECT stage, error FROM overnight_job_users WHERE job_run_id = %s AND status = 'failed'"
                          " LIMIT 3", (job.id,)).fetchall()
    assert out["failed"] == 0 and out["completed"] == out["users"] > 0, failed
    assert snap.rates.get("USD") == Decimal(1)


def _script(server: FakeProviderServer, kind: str, tables: dict[str, Any]) -> int:
    """Scripts a failure of the rates endpoint; returns how many requests the provider makes (its 3 attempts, or 1
    when the answer is not worth retrying)."""
    if kind == "500s":
        server.respond(RATES_PATH, 500, {"error": "boom"}, times=5)
        return 3
    if kind == "timeouts":
        server.respond(RATES_PATH, 200, {"rates": {}}, delay_s=1.5, times=5)
        return 3
    if kind == "malformed":
        server.respond(RATES_PATH, 200, b"<html>502 Bad Gateway</html>")
        return 1
    if kind == "invalid":  # rates sent as JSON strings, not numbers: none is usable, the provider refuses them all
        some = dict(list(tables["rates"]["EUR"].items())[:2])
        assert all(isinstance(v, str) for v in some.values())
        server.respond(RATES_PATH, 200, {"amount": 1, "base": "EUR", "date": "2026-11-20", "rates": some})
        return 1
    if kind == "nan":
        rates = ",".join(f'"{c}": NaN' for c in tables["rates"]["EUR"])
        server.respond(RATES_PATH, 200, f'{{"amount": 1, "base": "EUR", "date": "2026-11-20", "rates": {{{rates}}}}}')
        return 1
    if kind == "retry-after-too-long":
        server.respond(RATES_PATH, 429, {}, {"Retry-After": "3600"})
        return 1
    raise AssertionError(kind)


FAILURES = ["500s", "timeouts", "malformed", "invalid", "nan", "retry-after-too-long"]


@pytest.mark.parametrize("kind", FAILURES)
def test_rates_failure_falls_back_to_stored_rates_flagged_stale(conn, server, tables, kind) -> None:
    requests = _script(server, kind, tables)
    # the newest stored rates, put in here: a minute old, each currency a rate of its own
    as_of = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    others = [c for c in tables["currencies"] if c != "USD"]
    mine = {c: Decimal(f"{i}.{i:04d}") for i, c in enumerate(others, start=2)}
    conn.cursor().executemany("INSERT INTO exchange_rates (base, quote, rate, as_of, source)"
                              " VALUES ('USD', %s, %s, %s, 'test')", [(c, r, as_of) for c, r in mine.items()])
    conn.commit()
    sleeps = Sleeps()
    try:
        with _rates_provider(server, sleeps) as provider:
            snap = loading.fetch_rates(conn, provider, tables["currencies"])
    finally:
        conn.rollback()
        conn.execute("DELETE FROM exchange_rates WHERE source = 'test' AND as_of = %s", (as_of,))
        conn.commit()
    assert len(server.requests_for(RATES_PATH)) == requests
    assert snap.stale is True and snap.source == "database (fallback)"
    assert (snap.rates, snap.as_of) == ({**mine, "USD": Decimal(1)}, as_of)  # the stored ones, whole, not a mix


# A partial answer, judged on Wednesday 2027-01-13 13:00 UTC. By hand from the TARGET calendar: Wednesday's
# publication (16:00 CET = 15:00 UTC) is not out yet, so the expected one is Tuesday 2027-01-12 15:00 UTC.
PARTIAL_MOMENT = datetime(2027, 1, 13, 13, 0, tzinfo=UTC)
TUESDAY = datetime(2027, 1, 12, 15, 0, tzinfo=UTC)  # the expected publication
MONDAY = datetime(2027, 1, 11, 15, 0, tzinfo=UTC)  # one publication behind: stale, still usable
# Wednesday 6 January's: Thu 7, Fri 8, Mon 11 and Tue 12 published since, 4 publications behind (more than 3):
# unusable. (Friday 8 January's would be 2 behind, 96 h: usable now, refused by the old 72 h rule.)
WEDNESDAY = datetime(2027, 1, 6, 15, 0, tzinfo=UTC)
STORED = {"GBP": ("0.801", TUESDAY), "JPY": ("152.5", MONDAY), "CHF": ("0.931", WEDNESDAY)}


def test_partial_answer_others_come_from_stored_rates_each_judged_by_its_own_date(
        conn, server, tables, request: pytest.FixtureRequest) -> None:
    # docs/freshness.md: "when it delivers some currencies but not others, stored rates of the others stand
    # in, each judged by its own date". The provider sends the ECB's USD and BRL (real JSON numbers: 1 USD =
    # 5.6805 / 1.05 = 5.41 BRL) and nothing for CHF, GBP and JPY; the stored rates of those are the newest ones in
    # exchange_rates (the seed's are from today).
    server.respond(RATES_PATH, 200,
                   b'{"amount": 1, "base": "EUR", "date": "2027-01-12", "rates": {"USD": 1.05, "BRL": 5.6805}}')

    def forget() -> None:
        conn.rollback()
        conn.execute("DELETE FROM exchange_rates WHERE as_of = ANY(%s)", ([TUESDAY, MONDAY, WEDNESDAY],))
        conn.commit()

    request.addfinalizer(forget)
    conn.cursor().executemany(
        "INSERT INTO exchange_rates (base, quote, rate, as_of, source) VALUES ('USD', %s, %s, %s, 'stored-test')",
        [(q, Decimal(r), at) for q, (r, at) in STORED.items()])
    conn.commit()
    with _rates_provider(server, Sleeps()) as provider:
        snap = loading.fetch_rates(conn, provider, ["BRL", "CHF", "GBP", "JPY", "USD"], now=PARTIAL_MOMENT)
    assert len(server.requests_for(RATES_PATH)) == 1
    assert snap.source == "frankfurter"  # not a fallback: the provider answered
    assert snap.rates == {"USD": Decimal(1), "BRL": Decimal("5.41"), "GBP": Decimal("0.801"),
                          "JPY": Decimal("152.5")}
    assert snap.stale_in == {"JPY"} and snap.stale is True  # GBP (Tuesday's) is fresh, BRL came fresh
    assert set(snap.unavailable) == {"CHF"}
    assert snap.unavailable["CHF"] == (
        "CHF: rates as of 2027-01-06T15:00:00+00:00 are 4 ECB publications behind the expected publication of "
        "2027-01-12T15:00:00+00:00, more than the allowed lag of 3 (OVERNIGHT_MAX_RATES_LAG_PUBLICATIONS); fix the "
        "rates provider and clear the run")
    assert snap.as_of == MONDAY  # the oldest rate used
    # The delivered rate was kept with its publication date.
    assert conn.execute("SELECT rate FROM exchange_rates WHERE quote = 'BRL' AND source = 'frankfurter'"
                        " AND as_of = %s", (TUESDAY,)).fetchone() == (Decimal("5.41"),)


def _needing(conn, users: set[str], currencies: set[str]) -> set[str]:
    """The oracle: users who count in one of `currencies` (a holding in one is listed unpriced instead)."""
    return {str(r[0]) for r in conn.execute(
        "SELECT u.id FROM users u WHERE u.id = ANY(%(u)s::uuid[]) AND u.base_currency = ANY(%(c)s)",
        {"u": sorted(users), "c": sorted(currencies)})}


def _run_with_rates(conn, rates_x: dict[str, Any], job_x: dict[str, Any]) -> R.Outcome:
    job = jobrun.JobRun.from_xcom(job_x)
    market = job.market
    run_pipeline(conn, market, SESSION, job=job, rates=loading.RatesSnapshot.from_xcom(rates_x))
    n = conn.execute("SELECT count(*) FROM overnight_job_runs WHERE market = %s AND session_date = %s",
                     (market, SESSION)).fetchone()[0]
    return R.check_invariants(conn, market, SESSION, rows=n)


@pytest.mark.parametrize("kind", ["500s", "malformed", "invalid"])
def test_rates_failure_without_usable_stored_rates_fails_only_the_users_who_need_them(
        conn, server, tables, kind, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    # docs/freshness.md: the run never fails because of rates; only users needing a currency without a usable
    # rate fail (stage convert, naming the currency), the others are calculated.
    _script(server, kind, tables)
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", server.base_url)
    foreign = set(tables["currencies"]) - {"USD"}
    code = MARKET  # its users count in USD and hold USD assets; one of them is made to count in GBP
    victim = sorted(R.served(conn, code, SESSION))[0]
    base = conn.execute("SELECT base_currency FROM users WHERE id = %s", (victim,)).fetchone()[0]
    conn.execute("UPDATE users SET base_currency = 'GBP' WHERE id = %s", (victim,))
    conn.commit()
    request.addfinalizer(lambda: (conn.rollback(), conn.execute(
        "UPDATE users SET base_currency = %s WHERE id = %s", (base, victim)), conn.commit()))
    market = get_market(code)
    run = runtime.validate_params(market, {}, {"session_date": SESSION.isoformat(), "force": True},
                                  interval_end=None, run_after=None)
    job_x = runtime.start(market, run, f"reliability-rates-{kind}")
    # judged two weeks on: the stored rates (an hour old) are at least 6 ECB publications behind (10 weekdays,
    # at most 3 of them closing days, the day's own publication perhaps not out yet), more than 3
    with monkeypatch.context() as m:
        m.setattr(runtime, "reference_moment", lambda job, now=None: datetime.now(UTC) + timedelta(days=14))
        rates_x = runtime.fetch_rates(job_x)
    assert rates_x["rates"] == {"USD": "1"} and set(rates_x["unavailable"]) == foreign and rates_x["stale"]
    out = _run_with_rates(conn, rates_x, job_x)
    served = R.served(conn, code, SESSION)
    needing = _needing(conn, served, foreign)
    assert victim in needing
    assert set(out.failed) == needing and out.completed == served - needing and out.completed
    assert out.status == "partial"
    assert all(stage == "convert" and any(c in msg for c in foreign) for stage, msg in out.failed.values())
    assert set(out.error_details["rates"]) == foreign and out.metrics["rates_missing"] == sorted(foreign)


def test_a_currency_the_ecb_does_not_publish_affects_only_its_users(conn, server, tables) -> None:
    # ARS is in the assets table; the Frankfurter (ECB) API does not publish it and none is stored.
    served = sorted(R.served(conn, MARKET, SESSION))
    holders = served[:3]
    class_id = conn.execute("SELECT class_id FROM assets WHERE market = %s LIMIT 1", (MARKET,)).fetchone()[0]
    conn.execute("INSERT INTO assets (id, symbol, name, market, class_id, currency) VALUES (999001, 'GGAL.BA',"
                 " 'Grupo Galicia', %s, %s, 'ARS')", (MARKET, class_id))
    conn.execute("INSERT INTO prices (asset_id, price, currency, as_of) VALUES (999001, 5000, 'ARS', now())")
    conn.cursor().executemany("INSERT INTO holdings (user_id, asset_id, quantity) VALUES (%s, 999001, 10)",
                     [(u,) for u in holders])
    conn.commit()
    try:
        with _rates_provider(server, Sleeps()) as provider:
            snap = loading.fetch_rates(conn, provider, loading.needed_currencies(conn))
        assert "ARS" in loading.needed_currencies(conn)
        assert set(snap.unavailable) == {"ARS"} and "does not publish" in snap.unavailable["ARS"]
        assert set(snap.rates) == set(tables["currencies"]) and snap.source == "frankfurter" and not snap.stale
        job = jobrun.start_job(conn, MARKET, SESSION, "reliability-ars", force=True)
        out = _run_with_rates(conn, snap.to_xcom(), job.to_xcom())
    finally:
        conn.rollback()
        conn.execute("DELETE FROM holdings WHERE asset_id = 999001")
        conn.execute("DELETE FROM prices WHERE asset_id = 999001")
        conn.execute("DELETE FROM assets WHERE id = 999001")
        conn.commit()
    # Everyone is calculated; only the ARS holders' documents show the holding unpriced, for want of a rate
    # (docs/allocation.md: degrade, don't drop).
    assert out.failed == {} and out.completed == set(served) and out.status == "completed"
    unpriced = dict(conn.execute("SELECT user_id::text, document::jsonb->'unpricedHoldings' FROM recommendation_history"
                                 " WHERE job_run_id = %s", (out.job_id,)).fetchall())
    assert {u for u, h in unpriced.items() if h} == set(holders)
    assert all(unpriced[u] == [{"symbol": "GGAL.BA", "quantity": "10", "reason": "no exchange rate for ARS"}]
               for u in holders)
    assert out.metrics["rates_missing"] == ["ARS"] and not out.metrics["rates_stale"]
    assert "does not publish" in out.error_details["rates"]["ARS"]


def test_database_provider_without_a_stored_ars_rate_affects_only_ars_users(
        conn, tables, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    # No overnight_rates_http: the run reads rates from exchange_rates (the database provider). ARS is in the
    # assets table but no ARS rate is stored: ARS is reported unavailable, the run completes; holders of the
    # ARS asset get it listed in unpricedHoldings, a user counting in ARS fails at stage convert.
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", raising=False)
    served = sorted(R.served(conn, MARKET, SESSION))
    holders, ars_user = served[:3], served[3]
    base = conn.execute("SELECT base_currency FROM users WHERE id = %s", (ars_user,)).fetchone()[0]

    def put_back() -> None:
        conn.rollback()
        conn.execute("DELETE FROM holdings WHERE asset_id = 999002")
        conn.execute("DELETE FROM prices WHERE asset_id = 999002")
        conn.execute("DELETE FROM assets WHERE id = 999002")
        conn.execute("UPDATE users SET base_currency = %s WHERE id = %s", (base, ars_user))
        conn.commit()

    request.addfinalizer(put_back)
    class_id = conn.execute("SELECT class_id FROM assets WHERE market = %s LIMIT 1", (MARKET,)).fetchone()[0]
    conn.execute("INSERT INTO assets (id, symbol, name, market, class_id, currency) VALUES (999002, 'BMA.BA',"
                 " 'Banco Macro', %s, %s, 'ARS')", (MARKET, class_id))
    conn.execute("INSERT INTO prices (asset_id, price, currency, as_of) VALUES (999002, 7000, 'ARS', now())")
    conn.cursor().executemany("INSERT INTO holdings (user_id, asset_id, quantity) VALUES (%s, 999002, 4)",
                              [(u,) for u in holders])
    conn.execute("UPDATE users SET base_currency = 'ARS' WHERE id = %s", (ars_user,))
    conn.commit()
    assert conn.execute("SELECT count(*) FROM exchange_rates WHERE quote = 'ARS'").fetchone()[0] == 0
    market = get_market(MARKET)
    run = runtime.validate_params(market, {}, {"session_date": SESSION.isoformat(), "force": True},
                                  interval_end=None, run_after=None)
    assert isinstance(runtime.rates_provider(conn), DbRatesProvider)
    job_x = runtime.start(market, run, "reliability-db-ars")
    rates_x = runtime.fetch_rates(job_x)
    assert rates_x["source"] == "database"
    assert rates_x["unavailable"] == {"ARS": "exchange_rates: no stored USD rate for ARS"}
    assert sorted(rates_x["rates"]) == ["BRL", "GBP", "JPY", "USD"]  # the seeded data set's others, as stored
    out = _run_with_rates(conn, rates_x, job_x)
    # The run completes (partial: one user failed); everyone but the ARS user is calculated.
    assert out.status == "partial"
    assert out.completed == set(served) - {ars_user}
    assert set(out.failed) == {ars_user}
    stage, message = out.failed[ars_user]
    assert stage == "convert" and "'ARS'" in message
    assert out.error_details["users"] == [{"userId": ars_user, "stage": "convert", "message": message}]
    assert out.error_details["rates"] == {"ARS": "exchange_rates: no stored USD rate for ARS"}
    assert out.metrics["rates_missing"] == ["ARS"]
    unpriced = dict(conn.execute("SELECT user_id::text, document::jsonb->'unpricedHoldings' FROM recommendation_history"
                                 " WHERE job_run_id = %s", (out.job_id,)).fetchall())
    assert {u for u, h in unpriced.items() if h} == set(holders)
    assert all(unpriced[u] == [{"symbol": "BMA.BA", "quantity": "4", "reason": "no exchange rate for ARS"}]
               for u in holders)


def _score(conn, price_provider, *, force: bool = True) -> tuple[jobrun.JobRun, list, list, dict]:
    run = run_pipeline(conn, MARKET, SESSION, "reliability-prices", force=force, prices=price_provider,
                       tolerate=(ProviderError,))
    return run.job, run.batches, run.results, run.summary


def _holders(conn, symbols: set[str], users: set[str]) -> set[str]:
    return {str(r[0]) for r in conn.execute(
        "SELECT DISTINCT h.user_id FROM holdings h JOIN assets a ON a.id = h.asset_id WHERE a.symbol = ANY(%s)",
        (sorted(symbols),)) if str(r[0]) in users}


def test_partial_and_nan_price_bodies_leave_only_those_holdings_unvalued(conn, server, tables) -> None:
    served = R.served(conn, MARKET, SESSION)
    counts = conn.execute(
        "SELECT a.symbol, count(DISTINCT h.user_id) FROM holdings h JOIN assets a ON a.id = h.asset_id"
        " WHERE h.user_id = ANY(%s::uuid[]) AND h.quantity > 0 GROUP BY a.symbol ORDER BY 2, 1",
        (sorted(served),)).fetchall()
    gone, nan = counts[0][0], counts[1][0]  # the two least-held symbols among served users
    server.prices.pop(gone)
    server.prices[nan] = ("NaN", server.prices[nan][1])
    with HttpPriceProvider(server.base_url, sleep=Sleeps(), chunk_size=40) as prices:
        job, _, results, summary = _score(conn, prices)
    held: dict[str, set[str]] = {}
    for u, symbol in conn.execute("SELECT h.user_id::text, a.symbol FROM holdings h JOIN assets a ON a.id = h.asset_id"
                                  " WHERE h.quantity > 0 AND h.user_id = ANY(%s::uuid[])", (sorted(served),)):
        held.setdefault(u, set()).add(symbol)
    no_price = {s for symbols in held.values() for s in symbols if s not in server.prices} | {nan}
    assert {gone, nan} <= no_price
    affected = {u for u, symbols in held.items() if symbols & no_price}
    assert affected and affected != served
    out = R.check_invariants(conn, MARKET, SESSION, rows=conn.execute(
        "SELECT count(*) FROM overnight_job_runs WHERE market = %s AND session_date = %s",
        (MARKET, SESSION)).fetchone()[0])
    # docs/allocation.md: a holding without a usable quote is valued at the newest price an earlier job run used
    # for it, and named; one never priced is named too, and its holder gets no advice. Either way the holder is
    # calculated (with a warning).
    ever = {r[0] for r in conn.execute("SELECT DISTINCT symbol FROM overnight_job_prices WHERE symbol = ANY(%s)"
                                       " AND job_run_id <> %s", (sorted(no_price), job.id))}
    assert out.correlation_id == job.correlation_id and out.status == "completed"
    assert not out.failed and out.completed == served
    assert summary["users_with_warnings"] == len(affected)
    docs = {str(u): d for u, d in conn.execute(
        "SELECT user_id, document::jsonb FROM recommendation_history WHERE job_run_id = %s", (job.id,))}
    unpriced = {u: {i["symbol"]: i["reason"] for i in d["unpricedHoldings"]} for u, d in docs.items()}
    valued_old = {u: {k["symbol"] for k in d.get("lastKnownPrices", [])} for u, d in docs.items()}
    assert {u for u, items in unpriced.items() if items} == {u for u in affected if held[u] & (no_price - ever)}
    assert {u for u, items in valued_old.items() if items} == {u for u in affected if held[u] & no_price & ever}
    for u in affected:
        assert set(unpriced[u]) == held[u] & (no_price - ever)
        assert set(unpriced[u].values()) <= {"no price known"}
        assert valued_old[u] == held[u] & no_price & ever
        assert (docs[u]["unallocated"]["reason"] == "portfolio_unpriced") is bool(unpriced[u])
    # The documents used only real prices: no NaN anywhere.
    assert conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s"
                        " AND payload::text ILIKE '%%nan%%'", (job.correlation_id,)).fetchone()[0] == 0


def test_price_provider_down_fails_the_batches_cleanly(conn, server, tables) -> None:
    server.respond(QUOTE_PATH, 503, {"error": "down"}, times=10_000)
    sleeps = Sleeps()
    with HttpPriceProvider(server.base_url, sleep=sleeps, max_attempts=2, chunk_size=40) as prices:
        job, batches, results, summary = _score(conn, prices)
    assert results == [None] * len(batches)
    assert summary["status"] == "failed" and summary["users_processed"] == 0
    assert len(sleeps) == len(batches)  # one backoff per batch: bounded (2 attempts each)
    n = conn.execute("SELECT count(*) FROM overnight_job_runs WHERE market = %s AND session_date = %s",
                     (MARKET, SESSION)).fetchone()[0]
    out = R.check_invariants(conn, MARKET, SESSION, rows=n)
    # nobody completed; every served user is failed at stage `batch`, with its trail (docs/audit.md)
    assert not out.completed and set(out.failed) == R.served(conn, MARKET, SESSION)
    assert {stage for stage, _ in out.failed.values()} == {"batch"}
    assert sorted(out.error_details["batches"]) == sorted(b["label"] for b in batches)


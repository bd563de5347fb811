"""Secrets stay secret, hostile values stay harmless.

A run (`python -m overnight.dev.cli run`, dag.test in a subprocess) with a known password on the Postgres
connection (a real role with that password on the test server) and a known API key on both HTTP provider
connections, whose provider answers 401 / 500 echoing the key back: neither secret appears in XCom
(Airflow's `xcom` table), task logs (AIRFLOW_HOME/logs and the run's output), `error_details`, `metrics`,
events, documents, or the dashboard data layer's answers. Hostile symbols (quotes, SQL, unicode, very
long) flow through scoring intact; hostile parameters get clear errors and write nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from overnight.adapters.connections import postgres_dsn
from overnight.adapters.providers.db import DbPriceProvider, DbRatesProvider
from overnight.dashboard.store import DashboardStore
from overnight.domain.markets import get_market
from overnight.night import runtime, trail
from tests.support import reliability as R
from tests.support.fake_provider import QUOTE_PATH, RATES_PATH, FakeProviderServer
from tests.support.ports import free_port

MARKET = "XNYS"
SESSION = R.S_SECURITY
PG_SECRET = f"Pg-S3cret-{uuid.uuid4().hex[:12]}"
API_KEY = f"ApiK3y-{uuid.uuid4().hex[:12]}"
HOSTILE_SYMBOLS = ["'; DROP TABLE users;--", 'Q"U\\OTE\'S', "ÄÖÜ-€-日本", "L" + "o" * 300 + "NG", "<script>x</script>"]


def _secrets() -> list[str]:
    return [PG_SECRET, API_KEY, quote(PG_SECRET, safe=""), quote(API_KEY, safe="")]


def _leaks(text: str) -> list[str]:
    return [s for s in _secrets() if s in text]


@pytest.fixture
def secret_role():
    info = R.base_info()
    admin = postgres_dsn(info, dbname="postgres")
    role = f"ovt_sec_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PG_SECRET}'")
    try:
        yield role
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
            c.execute(f"DROP ROLE IF EXISTS {role}")


def _hostile_assets(conn: psycopg.Connection) -> str:
    """Adds assets with hostile symbols, held and watched by one served user; returns that user."""
    user = sorted(R.served(conn, MARKET, SESSION))[0]
    for i, symbol in enumerate(HOSTILE_SYMBOLS, start=1):
        aid = conn.execute(
            "INSERT INTO assets (id, symbol, name, market, class_id, currency, fundamentals)"
            " SELECT (SELECT max(id) FROM assets) + 1, %s, %s, market, class_id, currency, fundamentals"
            " FROM assets WHERE market = %s AND currency = 'USD' ORDER BY id LIMIT 1 RETURNING id",
            (symbol, symbol * 2, MARKET)).fetchone()[0]
        conn.execute("INSERT INTO prices (asset_id, price, currency, as_of) VALUES (%s, %s, 'USD', now())",
                      (aid, 10 + i))
        conn.execute("INSERT INTO holdings (user_id, asset_id, quantity) VALUES (%s, %s, 1)", (user, aid))
        conn.execute("INSERT INTO watchlist (user_id, asset_id) VALUES (%s, %s)", (user, aid))
    conn.commit()
    return user


def _dashboard(dsn: str, user: str) -> tuple[dict, list]:
    async def go() -> tuple[dict, list]:
        store = DashboardStore(pg_dsn=dsn, redis_url=os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"])
        try:
            view = (await store.dashboard(user)).to_json()
            runs = await store.job_runs(market=MARKET, limit=50)
            return view, runs
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_no_secret_leaks_and_hostile_symbols_are_harmless(airflow_db, secret_role, tmp_path: Path) -> None:
    with R.scratch_database("sec", users=600) as admin_dsn:
        secret_dsn = admin_dsn.replace("postgresql://postgres@", f"postgresql://{secret_role}:{PG_SECRET}@", 1)
        with psycopg.connect(secret_dsn) as conn:  # the role and its password work
            hostile_user = _hostile_assets(conn)
            symbols = [r[0] for r in conn.execute("SELECT symbol FROM assets")]
            quotes = DbPriceProvider(conn).fetch_prices(symbols)
            stored = DbRatesProvider(conn).fetch_rates("USD", ["BRL", "GBP", "JPY", "USD"])
            counts_before = conn.execute("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM assets)"
                                         ).fetchone()
        # quotes of an hour ago: the default (2025) is more than OVERNIGHT_MAX_PRICE_LAG_SESSIONS behind and unusable
        server = FakeProviderServer(rates={"USD": {c: str(v) for c, v in stored.rates.items() if c != "USD"}},
                                    prices={s: (str(q.price), q.currency) for s, q in quotes.items()},
                                    market_time=int(time.time()) - 3600).start()
        try:
            echo = {"error": f"bad request ?apikey={API_KEY} key {API_KEY}"}
            server.respond(RATES_PATH, 401, echo)  # not retried: stored rates stand in, flagged stale
            server.respond(QUOTE_PATH, 500, echo)  # retried
            provider_url = f"http://:{API_KEY}@127.0.0.1:{server.base_url.rsplit(':', 1)[1]}"
            env = R.subprocess_env(AIRFLOW_CONN_OVERNIGHT_POSTGRES=secret_dsn,
                                   AIRFLOW_CONN_OVERNIGHT_RATES_HTTP=provider_url,
                                   AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP=provider_url)
            log = tmp_path / "run.log"
            proc = R.cli_run(MARKET, SESSION, env, batch_size=100, log=log)
            rc = proc.wait(600)
        finally:
            server.stop()
        output = log.read_text(errors="replace")
        assert server.requests_for(RATES_PATH) and server.requests_for(QUOTE_PATH)
        assert all(r.param("apikey") == API_KEY for r in server.requests)  # the key was really used
        assert "rates provider failed" in output and "401" in output  # the failure was logged ...
        assert not _leaks(output), "secret in the run's output"  # ... redacted

        with psycopg.connect(admin_dsn) as conn:
            out = R.check_invariants(conn, MARKET, SESSION)
            # every served user, the hostile one too: the stored rates stand in, the stored quotes are fresh
            assert (out.status, out.completed, out.failed) == ("completed", R.served(conn, MARKET, SESSION), {})
            assert hostile_user in out.completed
            assert out.metrics["rates_stale"] is True
            scored = next(p for u, _, t, p, _ in trail.read_calculated(conn, out.correlation_id, [hostile_user])
                          if t == "SCORES_COMPUTED")
            listed = set(scored["scores"]) | set(scored["unscored"])
            assert set(HOSTILE_SYMBOLS) <= listed and not set(scored["scores"]) & set(scored["unscored"])
            assert conn.execute("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM assets)"
                                ).fetchone() == counts_before
            stored_text = "\n".join(str(r) for r in conn.execute(
                "SELECT error_details::text, metrics::text, dag_run_id FROM overnight_job_runs"))
            stored_text += "\n".join(r[0] for r in conn.execute(
                "SELECT payload::text FROM calculation_events WHERE correlation_id = %s", (out.correlation_id,)))
            stored_text += "\n".join(str(r) for r in conn.execute(  # what the events point at
                "SELECT s.symbol, s.score, s.reason FROM overnight_job_scores s JOIN overnight_job_runs j"
                " ON j.id = s.job_run_id WHERE j.correlation_id = %s", (out.correlation_id,)))
            stored_text += "\n".join(r[0] for r in conn.execute("SELECT document::text FROM recommendations"))
            stored_text += "\n".join(str(r) for r in conn.execute(
                "SELECT stage, error FROM overnight_job_users"))
            user_ids = [str(r[0]) for r in conn.execute("SELECT id FROM users")]
            dag_run_id = conn.execute("SELECT dag_run_id FROM overnight_job_runs WHERE correlation_id = %s",
                                      (out.correlation_id,)).fetchone()[0]
        assert not _leaks(stored_text), "secret in the application tables"

        with psycopg.connect(R.airflow_meta_dsn()) as af:
            xcoms = af.execute("SELECT dag_id, task_id, value::text FROM xcom").fetchall()
            runs = af.execute("SELECT conf::text FROM dag_run").fetchall()
            this_run = [r[0] for r in af.execute("SELECT value::text FROM xcom WHERE run_id = %s", (dag_run_id,))]
        assert xcoms and not _leaks(json.dumps(xcoms) + json.dumps(runs)), "secret in XCom"
        # No user id in what a viewer reads of the run: its XComs (plan_batches: batch numbers and positions,
        # the ranges stay in overnight_job_batches) and its task logs (pseudonyms) (docs/access.md)
        assert {"start", "fetch_rates", "plan_batches", "score_batch", "finalize"} <= {
            r[1] for r in xcoms if r[0] == get_market(MARKET).dag_id}
        assert len(this_run) >= 5 and "plan_id" in "".join(this_run)
        named = [u for u in user_ids if any(u in v for v in this_run)]
        assert not named, f"user ids in the run's XComs: {named[:3]}"

        logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
        files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
        leaking = [str(p) for p in files if _leaks(p.read_text(errors="replace"))]
        assert not leaking, f"secret in task logs: {leaking[:5]}"
        # dag.test() writes the task logs to the run's output (and any task log files under AIRFLOW_HOME/logs)
        task_logs = [output] + [p.read_text(errors="replace") for p in files if "dag_id=" in str(p)]
        assert "users done" in output and "Done. Returned value was" in output  # the tasks' own lines are there
        named = [u for u in user_ids if any(u in t for t in task_logs)]
        assert not named, f"user ids in task logs or the run's output: {named[:3]}"

        view, job_runs = _dashboard(secret_dsn, hostile_user)
        assert view["recommendations"] is not None and job_runs
        assert not _leaks(json.dumps(view, default=str) + json.dumps(job_runs, default=str))
        assert rc == 0, output[-3000:]  # last: the scans above hold even when the run's exit code is wrong


def test_wrong_port_with_a_secret_password_fails_without_showing_it() -> None:
    from overnight.adapters import db
    from overnight.adapters.connections import from_value
    from overnight.dashboard.pgpool import StoreUnavailable
    from overnight.dev import devenv

    port = free_port()  # nothing listens there
    dsn = f"postgresql://someone:{PG_SECRET}@127.0.0.1:{port}/overnight"
    refused = f'connection to server at "127.0.0.1", port {port} failed: Connection refused'
    with pytest.raises(devenv.SetupError) as setup:
        devenv.check_postgres(from_value("overnight_postgres", dsn))
    assert str(setup.value) == (  # Airflow names the type `postgres`
        f"connection 'overnight_postgres' (postgres://someone:***@127.0.0.1:{port}/overnight): cannot connect: "
        f"OperationalError: connection failed: {refused}. Fix AIRFLOW_CONN_OVERNIGHT_POSTGRES (host, port, user, "
        "password, database) or unset it to use the embedded Postgres.")
    hint = "\n\tIs the server running on that host and accepting TCP/IP connections?"  # libpq's own words
    with pytest.raises(psycopg.OperationalError) as direct:
        db.connect(dsn).close()
    assert str(direct.value) == f"connection failed: {refused}{hint}"

    async def go() -> None:
        store = DashboardStore(pg_dsn=dsn, redis_url="")
        try:
            await store.dashboard(str(uuid.uuid4()))
        finally:
            await store.aclose()

    with pytest.raises(StoreUnavailable) as dashboard:
        asyncio.run(go())
    assert str(dashboard.value) == f"Postgres (overnight_postgres) is unavailable: connection failed: {refused}{hint}"
    assert not _leaks(str(setup.value) + str(direct.value) + str(dashboard.value))


SQL = "'; DROP TABLE users;--"
KNOWN = "known: ['session_date', 'user_ids', 'batch_size', 'contribution', 'force', 'recalculate']"


@pytest.mark.parametrize(
    ("conf", "problem"),
    [
        ({"session_date": SQL}, f'session_date: session date "{SQL}" is malformed; expected YYYY-MM-DD, e.g. 2026-03-09'),
        ({"session_date": "2027-01-05", "contribution": SQL},
         'contribution: expected an amount with its currency such as {"amount": "1500", "currency": "USD"}, got'
         f' "{SQL}"; a bare number is ambiguous (1500 yen is not 1500 dollars)'),
        ({"session_date": "2027-01-05", "user_ids": ["' OR 1=1 --", "日本" * 50]},
         # each bad id cut to 40 characters
         "user_ids: not UUIDs: [\"' OR 1=1 --\", '" + "日本" * 20 + "']"),
        ({"session_date": "2027-01-05", SQL: 1}, f'unknown --conf keys ["{SQL}"]; {KNOWN}'),
        ({"session_date": "2027-01-05", "x" * 100_000: 1}, f"unknown --conf keys ['{'x' * 100_000}']; {KNOWN}"),
        ({"session_date": "2027-01-05\u0000"},
         "session_date: session date '2027-01-05\\x00' is malformed; expected YYYY-MM-DD, e.g. 2026-03-09"),
        ({"session_date": "２０２７-０１-０５"},
         "session_date: session date '２０２７-０１-０５' is not a real calendar date (Invalid isoformat string:"
         " '２０２７-０１-０５'); expected YYYY-MM-DD"),
    ],
    ids=["sql-date", "sql-contribution", "sql-user-ids", "sql-key", "long-key", "nul", "fullwidth-digits"],
)
def test_hostile_params_get_clear_errors(conf, problem) -> None:
    """Each hostile parameter is refused with the one message naming it (validation reads and writes nothing)."""
    with pytest.raises(runtime.ParamError) as info:
        runtime.validate_params(get_market(MARKET), {}, conf, interval_end=None, run_after=None)
    assert str(info.value) == f"overnight_scoring_xnys: bad parameters: {problem}"

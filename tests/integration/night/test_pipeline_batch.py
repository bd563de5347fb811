"""One market's batches against real Postgres and Redis: events, documents, TTLs, idempotency, isolation."""

from __future__ import annotations

import uuid
from datetime import UTC, date
from decimal import Decimal

import psycopg
import pytest

from overnight.adapters import cache
from overnight.adapters.providers.db import DbPriceProvider
from overnight.night import calculate, jobrun, loading, pipeline, trail
from tests.support import reliability as R
from tests.support.pipeline_run import make_latest, run_pipeline, start

SESSION = date(2026, 12, 1)


@pytest.fixture
def batch_run(conn, seeded, redis_client):
    make_latest(conn, SESSION)
    run = run_pipeline(conn, "XNYS", SESSION, redis_client=redis_client)
    return run.job, run.batches, run.results, run.summary


def test_batches_cover_exactly_the_served_users(conn, batch_run):
    job, batches, results, summary = batch_run
    expected = R.served(conn, "XNYS", SESSION)
    assert batches and batches[0]["total"] == len(expected)
    sizes = [b["last"] - b["first"] + 1 for b in batches]
    assert len(batches) == -(-len(expected) // 100) and max(sizes) <= 100 and max(sizes) - min(sizes) <= 1
    assert [b["first"] for b in batches] == [1] + [b["last"] + 1 for b in batches[:-1]]
    assert batches[-1]["last"] == len(expected) == sum(sizes)
    assert batches[-1]["label"].endswith(f"of {len(expected):,}")
    done = {str(r[0]) for r in conn.execute(
        "SELECT user_id FROM overnight_job_users WHERE job_run_id = %s AND status = 'completed'", (job.id,))}
    assert done == expected
    assert summary["status"] == "completed" and summary["users_processed"] == len(expected)


def test_four_events_per_user_in_order_with_unlinkable_ids(conn, batch_run):
    job, *_ = batch_run
    rows = conn.execute(
        "SELECT user_id, array_agg(event_type ORDER BY created_at), array_agg(event_id ORDER BY created_at)"
        " FROM calculation_events WHERE correlation_id = %s GROUP BY user_id", (job.correlation_id,)).fetchall()
    assert rows
    every_id: set[uuid.UUID] = set()
    for user_id, types, ids in rows:
        assert types == list(jobrun.EVENT_TYPES)
        # random: not the uuid5 of (correlation id, user id, type) that let a user id be linked (docs/access.md)
        assert all(i.version == 4 for i in ids)
        assert not set(ids) & {uuid.uuid5(uuid.UUID(job.correlation_id), f"{user_id}:{t}") for t in types}
        every_id.update(ids)
    assert len(every_id) == 4 * len(rows)
    # SCORES_COMPUTED as stored names the criteria version and the universe; as calculated (the snapshots' scores
    # put back, `trail.expand`) it holds every asset of that universe once, scored or not
    stored = {u: p for u, _, t, p, _ in trail.read_events(conn, job.correlation_id, None) if t == "SCORES_COMPUTED"}
    calculated = {u: p for u, _, t, p, _ in trail.read_calculated(conn, job.correlation_id) if t == "SCORES_COMPUTED"}
    chunk_symbols = set().union(*(set(r[0]) for r in conn.execute(
        "SELECT symbols FROM calculation_chunks WHERE correlation_id = %s", (job.correlation_id,))))
    assert stored.keys() == calculated.keys() == {str(u) for u, *_ in rows}
    for uid, payload in calculated.items():
        assert sorted(payload["scores"].keys() | payload["unscored"].keys()) == stored[uid]["universe"]
        assert None not in payload["scores"].values() and not set(payload["scores"]) & set(payload["unscored"])
        assert set(stored[uid]["universe"]) <= chunk_symbols
    assert any("scores" not in p for p in stored.values())  # shared criteria versions: scores stored once


def test_documents_shapes_and_ttl(conn, batch_run, redis_client):
    job, *_ = batch_run
    user_id, doc, portfolio = conn.execute(
        "SELECT user_id, document, portfolio FROM recommendations WHERE correlation_id = %s"
        " AND jsonb_array_length(document->'recommendations') > 0 LIMIT 1", (job.correlation_id,)).fetchone()
    assert set(doc) >= {"userId", "generatedAt", "recommendations", "portfolioSummary", "dataFreshness"}
    rec = doc["recommendations"][0]
    assert set(rec) == {"assetId", "symbol", "score", "amount", "currency", "allocationGap", "breakdown",
                        "allocationGapAfter"}
    assert set(rec["breakdown"]) == {"criteriaCount", "topContributor"}
    assert all(isinstance(rec[k], str) for k in ("score", "amount", "allocationGap", "allocationGapAfter"))
    assert (sum(Decimal(r["amount"]) for r in doc["recommendations"]) + Decimal(doc["unallocated"]["amount"])
            == Decimal(doc["totalInvestable"]))
    assert set(doc["dataFreshness"]) == {"pricesAsOf", "ratesAsOf", "criteriaVersion"}
    assert set(portfolio) == {"totalValue", "assetCount", "allocations"}
    import json

    assert json.loads(redis_client.get(cache.recs_key(str(user_id)))) == doc
    assert json.loads(redis_client.get(cache.portfolio_key(str(user_id)))) == portfolio
    for key in (cache.recs_key(str(user_id)), cache.portfolio_key(str(user_id))):
        assert 86_000 < redis_client.ttl(key) <= 86_400


def test_rerun_continues_the_same_job_and_adds_nothing(conn, batch_run, redis_client):
    job, _, _, summary = batch_run
    count = conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s",
                         (job.correlation_id,)).fetchone()[0]
    again = run_pipeline(conn, "XNYS", SESSION, redis_client=redis_client)
    assert (again.job.id, again.job.correlation_id, again.job.resumed) == (job.id, job.correlation_id, True)
    assert sum(r["completed"] for r in again.results) == 0
    assert conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s",
                        (job.correlation_id,)).fetchone()[0] == count
    assert again.summary["users_processed"] == summary["users_processed"]
    assert conn.execute("SELECT count(*) FROM overnight_job_runs WHERE market = 'XNYS' AND session_date = %s",
                        (SESSION,)).fetchone()[0] == 1


def test_force_starts_a_new_calculation(conn, batch_run, redis_client):
    job, *_ = batch_run
    forced = run_pipeline(conn, "XNYS", SESSION, redis_client=redis_client, force=True)
    assert forced.job.correlation_id != job.correlation_id and not forced.job.resumed
    assert conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s",
                        (forced.job.correlation_id,)).fetchone()[0] == 4 * forced.summary["users_processed"]


# the users a corruption breaks: the victim, or for its criteria every user of the victim's criteria key
BROKEN = {"criteria": "SELECT id::text FROM users WHERE criteria_key = (SELECT criteria_key FROM users WHERE id = %(u)s)"}


@pytest.mark.parametrize(
    ("corrupt_sql", "stage", "message"),
    [
        pytest.param("UPDATE holdings SET quantity = -5 WHERE user_id = %(u)s", "load", "not a non-negative",
                     id="negative-quantity"),
        pytest.param("UPDATE holdings SET quantity = NULL WHERE user_id = %(u)s", "load", "quantity is missing",
                     id="null-quantity"),
        pytest.param("UPDATE users SET base_currency = 'XXX' WHERE id = %(u)s", "currency", "XXX has no minor unit",
                     id="unknown-currency"),
        pytest.param("UPDATE allocation_targets SET min_pct = 30, max_pct = 90 WHERE user_id = %(u)s", "targets", "more than 100",
                     id="targets-over-100"),
        pytest.param("INSERT INTO criteria_sets (id, criteria_key, version, name, rules) SELECT gen_random_uuid(),"
                     " criteria_key, 99, 'broken', '[{\"metric\": \"pe_ratio\", \"op\": \"~~\"}]' FROM users"
                     " WHERE id = %(u)s", "criteria", "unknown op", id="criteria-do-not-parse"),
    ],
)

def test_a_bad_user_fails_with_a_reason_and_the_others_complete(pg_dsn, seeded, redis_client, corrupt_sql, stage,
                                                                 message):
    from overnight.dev import seed

    session = date(2026, 12, 2)
    with psycopg.connect(pg_dsn) as conn:
        served = sorted(R.served(conn, "XNYS", session))
        victim = served[len(served) // 2]
        broken = ({r[0] for r in conn.execute(BROKEN[stage], {"u": victim})} & set(served)) if stage in BROKEN \
            else {victim}
        conn.execute(corrupt_sql, {"u": victim})
        conn.commit()
        try:
            run = run_pipeline(conn, "XNYS", session, redis_client=redis_client, force=True)
            job, summary = run.job, run.summary
            details = conn.execute("SELECT status, error_details FROM overnight_job_runs WHERE id = %s",
                                   (job.id,)).fetchone()
            failed_rows = {r[0] for r in conn.execute("SELECT user_id::text FROM overnight_job_users"
                                                      " WHERE job_run_id = %s AND status = 'failed'", (job.id,))}
        finally:
            conn.rollback()
            seed.seed(conn, 600, 7, dsn=pg_dsn)  # restore the session's data set for the other tests
    status, errors = details
    assert status == "partial"
    assert (failed_rows, summary["users_failed"]) == (broken, len(broken))
    failed = {e["userId"]: e for e in errors["users"]}
    assert failed[victim]["stage"] == stage and message in failed[victim]["message"]
    assert summary["users_processed"] == len(served) - len(broken)


def test_a_holding_without_a_price_is_named_and_its_holder_still_calculated(pg_dsn, seeded, redis_client):
    from overnight.dev import seed

    session = date(2026, 12, 2)
    with psycopg.connect(pg_dsn) as conn:
        served = sorted(R.served(conn, "XNYS", session))
        victim = served[len(served) // 2]
        asset, symbol = conn.execute(
            "SELECT a.id, a.symbol FROM holdings h JOIN assets a ON a.id = h.asset_id WHERE h.user_id = %s"
            " AND h.quantity > 0 ORDER BY a.id LIMIT 1", (victim,)).fetchone()
        conn.execute("UPDATE prices SET price = 'NaN' WHERE asset_id = %s", (asset,))
        # the newest price an earlier job run of this database used for it, if one did (docs/allocation.md)
        known = conn.execute("SELECT price, currency, as_of FROM overnight_job_prices WHERE symbol = %s"
                             " ORDER BY as_of DESC LIMIT 1", (symbol,)).fetchone()
        holders = {r[0] for r in conn.execute("SELECT user_id::text FROM holdings WHERE asset_id = %s AND quantity > 0",
                                              (asset,))} & set(served)
        conn.commit()
        try:
            run = run_pipeline(conn, "XNYS", session, redis_client=redis_client, force=True)
            job, summary = run.job, run.summary
            doc = conn.execute("SELECT document::jsonb FROM recommendation_history WHERE user_id = %s AND job_run_id = %s",
                               (victim, job.id)).fetchone()
        finally:
            conn.rollback()
            seed.seed(conn, 600, 7, dsn=pg_dsn)
    assert summary["status"] == "completed" and summary["users_failed"] == 0
    assert summary["users_with_warnings"] == len(holders)  # every served holder of the asset, and no one else
    assert doc is not None, "the holder of the unpriced asset has a document"
    doc = doc[0]
    if known is None:  # never priced: named, and no advice at all (not advice as if it were worth zero)
        assert {"symbol": symbol, "reason": "no price known"}.items() <= next(
            u for u in doc["unpricedHoldings"] if u["symbol"] == symbol).items()
        assert doc["recommendations"] == [] and doc["unallocated"]["reason"] == "portfolio_unpriced"
        assert symbol in doc["unallocated"]["message"] and doc["unallocated"]["amount"] == doc["totalInvestable"]
    else:  # valued at the newest price an earlier job run used, and said so
        price, currency, as_of = known
        assert {"symbol": symbol, "price": jobrun._num(price), "currency": currency.strip(),
                "asOf": as_of.astimezone(UTC).isoformat()} in doc["lastKnownPrices"]
        assert symbol not in {u["symbol"] for u in doc["unpricedHoldings"]}


def test_redis_down_still_completes_in_postgres(conn, seeded, redis_client):
    def broken(docs):
        raise ConnectionError("Redis is down")

    session = date(2026, 12, 3)
    run = run_pipeline(conn, "XLON", session, "t", force=True, batch_size=500, warm_cache=broken)
    job, summary = run.job, run.summary
    assert summary["status"] == "completed"
    assert summary["cache_status"] == "not warmed"
    assert "Redis is down" in summary["cache_errors"][0]
    assert conn.execute("SELECT count(*) FROM recommendation_history WHERE job_run_id = %s",
                        (job.id,)).fetchone()[0] == summary["users_processed"] > 0


def test_a_batch_streams_in_chunks_with_the_same_results(conn, seeded, redis_client):
    session = date(2026, 12, 4)
    run = start(conn, "XLON", session, "chunks", force=True, batch_size=10_000)
    job, [batch] = run.job, run.batches
    out = pipeline.score_batch(conn, job, run.audience, run.rates, batch, DbPriceProvider(conn), warm_cache=None,
                               chunk_size=7)
    expected = R.served(conn, "XLON", session)
    assert out["users"] == out["completed"] == len(expected) > 7 * 3
    rows = conn.execute("SELECT user_id, count(*) FROM calculation_events WHERE correlation_id = %s GROUP BY 1",
                        (job.correlation_id,)).fetchall()
    assert {str(u) for u, _ in rows} == expected and {n for _, n in rows} == {4}


def test_each_chunk_commits_so_a_crash_keeps_the_users_written_before(pg_dsn, seeded, redis_client, monkeypatch):
    session = date(2026, 12, 3)
    with psycopg.connect(pg_dsn) as conn:
        run = start(conn, "XNYS", session, "test-crash", batch_size=10_000)
        job, rates, aud, batch = run.job, run.rates, run.audience, run.batches[0]
        assert batch["total"] > 25
        symbols = [r[0] for r in conn.execute("SELECT symbol FROM assets")]
        loading.job_quotes(conn, job, DbPriceProvider(conn), symbols)  # no price fetch (and commit) mid-batch
        calculated = []
        real = calculate.finish_user

        def crash_in_third_chunk(prepared, *args):
            calculated.append(prepared.user.id)
            if len(calculated) > 20:
                raise RuntimeError("the task process died")
            return real(prepared, *args)

        monkeypatch.setattr(calculate, "finish_user", crash_in_third_chunk)
        with pytest.raises(RuntimeError):
            pipeline.score_batch(conn, job, aud, rates, batch, DbPriceProvider(conn), warm_cache=None, chunk_size=10)
        with psycopg.connect(pg_dsn) as other:  # what a retry sees while the dead task's connection is still open
            done = {str(r[0]) for r in other.execute(
                "SELECT user_id FROM overnight_job_users WHERE job_run_id = %s AND status = 'completed'", (job.id,))}
            events = other.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s",
                                   (job.correlation_id,)).fetchone()[0]
        conn.rollback()
    assert done == set(calculated[:20]) and events == 4 * 20


def test_a_job_run_prices_every_user_with_the_same_stored_quote(pg_dsn, seeded, redis_client):
    import dataclasses

    class MovedMarket:
        """The database's prices, doubled: what a provider answers later in the night."""

        source = "moved"

        def __init__(self, conn):
            self.inner = DbPriceProvider(conn)

        def fetch_prices(self, symbols):
            return {s: dataclasses.replace(q, price=q.price * 2) for s, q in self.inner.fetch_prices(symbols).items()}

    session = date(2026, 12, 4)
    with psycopg.connect(pg_dsn) as conn:
        run = start(conn, "XNYS", session, "test-prices", batch_size=40)
        job, rates, aud, (first, second, *_) = run.job, run.rates, run.audience, run.batches
        pipeline.score_batch(conn, job, aud, rates, first, DbPriceProvider(conn), warm_cache=None)
        stored = dict(conn.execute("SELECT symbol, price FROM overnight_job_prices WHERE job_run_id = %s", (job.id,)))
        assert stored
        pipeline.score_batch(conn, job, aud, rates, second, MovedMarket(conn), warm_cache=None)
        conn.commit()
        after = {s: (p, src) for s, p, src in conn.execute(
            "SELECT symbol, price, source FROM overnight_job_prices WHERE job_run_id = %s", (job.id,))}
        db_price = dict(conn.execute("SELECT a.symbol, p.price FROM prices p JOIN assets a ON a.id = p.asset_id"))
        captured = [r[0] for r in conn.execute(
            "SELECT payload FROM calculation_events WHERE correlation_id = %s AND event_type = 'INPUTS_CAPTURED'",
            (job.correlation_id,))]
    # quotes the first batch stored stay the job run's; symbols first needed later are stored as fetched then
    assert {s: after[s] for s in stored} == {s: (p, "database") for s, p in stored.items()}
    later = set(after) - set(stored)
    assert later and all(after[s] == (db_price[s] * 2, "moved") for s in later)
    assert len(captured) == sum(b["last"] - b["first"] + 1 for b in (first, second)) > 40
    for payload in captured:  # each event names the quotes it used; their prices are the job run's rows, stored once
        assert payload["jobRunId"] == job.id and payload["pricedSymbols"] and "prices" not in payload
        assert set(payload["pricedSymbols"]) <= set(after)


def _per_item(conn, ids: list[str]) -> dict[str, tuple]:
    """Each user's holdings, watchlist and targets read a row per item, sorted as the calculation uses them."""
    out: dict[str, tuple] = {u: ([], [], []) for u in ids}
    for uid, aid, qty in conn.execute("SELECT user_id::text, asset_id, quantity FROM holdings"
                                      " WHERE user_id = ANY(%s::uuid[]) ORDER BY asset_id", (ids,)):
        out[uid][0].append((aid, qty))
    for uid, aid in conn.execute("SELECT user_id::text, asset_id FROM watchlist WHERE user_id = ANY(%s::uuid[])"
                                 " ORDER BY asset_id", (ids,)):
        out[uid][1].append(aid)
    for uid, name, lo, hi in conn.execute(
            "SELECT t.user_id::text, c.name, t.min_pct, t.max_pct FROM allocation_targets t JOIN asset_classes c"
            " ON c.id = t.class_id WHERE t.user_id = ANY(%s::uuid[]) ORDER BY c.name", (ids,)):
        out[uid][2].append((name, lo, hi))
    return out


def test_a_chunk_loads_each_user_in_one_row_as_the_items_say(conn, seeded):
    """`_load_chunk` reads a user's holdings, watchlist and targets as ordered arrays in the user's row: the same
    items, by asset id and by class name, as reading a row per item; a user with none of them has empty lists."""
    job = jobrun.JobRun(str(uuid.uuid4()), str(uuid.uuid4()), "XNYS", SESSION.isoformat(), "2026-12-02T03:00:00+00:00")
    every_asset = {r[0]: None for r in conn.execute("SELECT id FROM assets")}  # no snapshot copy: nothing missing
    aud = jobrun.Audience("XNYS", ())
    plan = loading.plan_batches(conn, aud, 10_000)
    users, *_, (last, n) = loading._load_chunk(conn, job, aud, plan[0], None, 150, every_asset)
    assert n == len(users) == 150 and last == users[-1].id
    want = _per_item(conn, [u.id for u in users])
    got = {u.id: (u.holdings, u.watchlist, [(t.class_name, t.min_pct, t.max_pct) for t in u.targets]) for u in users}
    assert got == want
    assert sum(len(h) for h, _, _ in got.values()) > 1000 and all(type(q) is Decimal for h, _, _ in got.values()
                                                                   for _, q in h)
    empty = str(uuid.uuid4())
    conn.execute("INSERT INTO users (id, email, base_currency, default_contribution, markets, criteria_key)"
                 " VALUES (%s, %s, 'USD', 100, ARRAY['XNYS'], 'tpl-01')", (empty, f"{empty}@example.test"))
    alone = jobrun.Audience("XNYS", (), (empty,))
    users, *_ = loading._load_chunk(conn, job, alone, {"lo": empty, "hi": empty}, None, 10, every_asset)
    assert [(u.id, u.base_currency, u.default_contribution, u.markets, u.holdings, u.watchlist, u.targets)
            for u in users] == [(empty, "USD", Decimal("100.00"), ["XNYS"], [], [], [])]
    conn.rollback()

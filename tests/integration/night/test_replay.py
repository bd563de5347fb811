"""Replay and history on a 1,000-user night (its own database, real Postgres and Redis): every calculation replays
identical from the trail alone, whatever changes after; a changed rule shows as a named field; an older session's
re-run never replaces a newer document (Postgres and Redis); the audit query by asset still works."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from overnight.adapters import cache, migrate
from overnight.adapters.connections import POSTGRES_CONN_ID, from_value, postgres_dsn
from overnight.adapters.providers.db import DbPriceProvider, DbRatesProvider
from overnight.dashboard import store as dashboard
from overnight.dev import bench, devenv, seed
from overnight.domain import sessions
from overnight.domain.markets import load_markets
from overnight.night import calculate, jobrun, loading, pipeline, replay, trail, writing
from tests.support import reliability as R

ROOT = Path(__file__).resolve().parents[3]
RUN_ID = os.environ["OVERNIGHT_TEST_RUN_ID"]
SESSION = date(2026, 12, 1)  # every market trades
OLDER, NEWER = date(2026, 11, 30), date(2026, 12, 2)
CODES = load_markets().codes
LIVE_TABLES = ("assets", "prices", "criteria_sets", "allocation_targets", "holdings", "users", "asset_classes",
               "watchlist", "exchange_rates")


def _run(dsn: str, market: str, session: date, redis_client: Any, judge_prices: Any = None,
         stale_rates: frozenset[str] | None = None) -> tuple[jobrun.JobRun, list[dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        job = jobrun.start_job(conn, market, session, "test-replay")
        rates = loading.fetch_rates(conn, DbRatesProvider(conn), loading.needed_currencies(conn))
        if stale_rates:  # as the ECB calendar would judge rates that missed their publication (docs/freshness.md)
            rates = dataclasses.replace(rates, stale=True, stale_in=stale_rates)
        aud = jobrun.Audience(market, tuple(sessions.earlier_markets(market, session, CODES)))
        batches = loading.plan_batches(conn, aud, 150)
        results = [pipeline.score_batch(conn, job, aud, rates, b, DbPriceProvider(conn), judge_prices=judge_prices,
                                        warm_cache=lambda docs: cache.warm(redis_client, docs)) for b in batches]
        writing.finalize(conn, job, planned=batches, results=results, rates=rates.to_xcom())
    return job, results


@pytest.fixture(scope="module")
def night() -> Iterator[dict[str, Any]]:
    """A database of its own with 1,000 seeded users (seed 42), every market run once for SESSION (the test run's
    Redis database: the seed's user ids are not those of the other tests' seed)."""
    redis_client = redis.Redis.from_url(os.environ["OVERNIGHT_TEST_REDIS_URL"])
    base = from_value(POSTGRES_CONN_ID, os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"])
    name = f"ovt_{RUN_ID}_replay"
    devenv.create_database(base, name)
    dsn = postgres_dsn(base, dbname=name)
    try:
        migrate.migrate(dsn)
        with psycopg.connect(dsn) as conn:
            seed.seed(conn, 1000, 42, dsn=dsn)
            # the seed holds nothing in quantity 0: one BVMF user's first holding becomes one (kept in the inputs)
            conn.execute("UPDATE holdings SET quantity = 0 WHERE (user_id, asset_id) = (SELECT user_id, asset_id"
                         " FROM holdings WHERE user_id = %s ORDER BY asset_id LIMIT 1)",
                         (min(R.served(conn, "BVMF", SESSION)),))
            conn.commit()
        jobs = {m: _run(dsn, m, SESSION, redis_client)[0] for m in CODES}
        yield {"dsn": dsn, "jobs": jobs, "redis": redis_client}
    finally:
        redis_client.close()
        with psycopg.connect(postgres_dsn(base, dbname="postgres"), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _edit(conn: psycopg.Connection, job: jobrun.JobRun, uid: str, change: str, path: list[Any],
          value: str | None = None) -> int:
    """Changes a user's stored event in their chunk row: `change` is `set` (path to `value`, JSON) or `delete`;
    `path` is below the user's events array ([event index, 2, key...]). Returns the rows changed."""
    pos = "array_position(user_ids, %(u)s::uuid) - 1"
    target = "ARRAY[(" + pos + ")::text] || %(path)s::text[]"
    expr = (f"jsonb_set(events::jsonb, {target}, %(value)s::jsonb)" if change == "set"
            else f"events::jsonb #- ({target})")
    return conn.execute(f"UPDATE calculation_chunks SET events = ({expr})::json WHERE correlation_id = %(c)s"
                        " AND user_ids @> ARRAY[%(u)s::uuid]",
                        {"u": uid, "c": job.correlation_id, "path": [str(p) for p in path], "value": value}).rowcount


def _a_user(conn: psycopg.Connection, job: jobrun.JobRun) -> tuple[str, dict[str, Any]]:
    """A user of the job run with at least two recommendations and a held asset, and their stored document."""
    uid, text = conn.execute(
        "SELECT h.user_id::text, h.document FROM recommendation_history h WHERE h.job_run_id = %s"
        " AND jsonb_array_length(h.document::jsonb -> 'recommendations') > 1"
        " AND h.document::jsonb -> 'portfolioSummary' -> 'allocations' <> '{}'::jsonb"
        " ORDER BY h.user_id LIMIT 1", (job.id,)).fetchone()
    return uid, json.loads(text)


def test_every_user_of_a_1000_user_night_replays_identical(night: dict[str, Any]) -> None:
    """(How long the replay of a night takes is `make bench`'s business: a 60 s limit here failed on a loaded
    machine.)"""
    with psycopg.connect(night["dsn"]) as conn:
        results = [r for job in night["jobs"].values() for r in replay.replay(conn, job.correlation_id)]
        calculated = conn.execute("SELECT count(*) FROM overnight_job_users WHERE status = 'completed'").fetchone()[0]
        # served: an active user one of whose markets trades on SESSION (the contract's rule, computed here)
        served = {str(u) for u, markets in conn.execute("SELECT id, markets FROM users WHERE active")
                  if sessions.serving_market(markets, SESSION) is not None}
    assert calculated == len(results) == len(served)
    assert {r.user_id for r in results} == served
    different = [r.text() for r in results if r.status != replay.IDENTICAL]
    assert different == [], "\n".join(different[:5])
    assert all(r.stored_sha256 == r.replayed_sha256 and r.stored_sha256 for r in results)


def test_inputs_changed_after_the_night_still_replay_identical_and_no_live_table_is_read(night: dict[str, Any]) -> None:
    job = night["jobs"]["XNYS"]
    with psycopg.connect(night["dsn"]) as conn:
        uid, doc = _a_user(conn, job)
        inputs = conn.execute("SELECT payload FROM calculation_events WHERE correlation_id = %s AND user_id = %s"
                              " AND event_type = 'INPUTS_CAPTURED'", (job.correlation_id, uid)).fetchone()[0]
        shared = "criteria" not in inputs  # a template's: its rules are the job run's snapshot
        bought = doc["recommendations"][0]["symbol"]
        held = next(iter(inputs["holdings"]))
        key = conn.execute("SELECT criteria_key FROM users WHERE id = %s", (uid,)).fetchone()[0]
        changed = [
            conn.execute("UPDATE assets SET fundamentals = fundamentals || '{\"pe_ratio\": 999, \"roe\": -99}'"
                         " WHERE symbol = %s", (bought,)).rowcount,
            conn.execute("UPDATE prices SET price = price * 3 WHERE asset_id = (SELECT id FROM assets WHERE symbol = %s)",
                         (held,)).rowcount,
            conn.execute("UPDATE criteria_sets SET rules = jsonb_set(rules, '{0,points}', '50')"
                         " WHERE criteria_key = %s", (key,)).rowcount,
            conn.execute("UPDATE allocation_targets SET min_pct = 0, max_pct = 100 WHERE user_id = %s", (uid,)).rowcount,
        ]
        assert all(n >= 1 for n in changed), changed
        # A role that may read the trail and the snapshots, and nothing else: a live read would raise.
        probe = f"ovt_{RUN_ID}_probe"
        conn.execute(f'CREATE ROLE "{probe}"')
        conn.execute(f'GRANT SELECT ON calculation_chunks, calculation_events_rows, recommendation_history_rows,'
                     f' overnight_job_runs, overnight_job_users, overnight_job_prices, overnight_job_assets,'
                     f' overnight_job_criteria, overnight_job_rates, overnight_job_scores TO "{probe}"')
        conn.execute(f'SET LOCAL ROLE "{probe}"')
        for table in LIVE_TABLES:
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1")
        result = replay.replay_user(conn, job.correlation_id, uid)
        conn.rollback()  # the changes and the role go
    assert result.status == replay.IDENTICAL, result.text()
    assert result.differences == [] and result.stored_sha256 == result.replayed_sha256
    assert shared or "criteria" in inputs


def _plus_one_point(real: Any) -> Any:
    def parse(raw: Any) -> Any:
        return tuple(dataclasses.replace(r, points=r.points + 1) for r in real(raw))
    return parse


def test_a_changed_scoring_rule_gives_a_diff_naming_the_field(night: dict[str, Any], monkeypatch) -> None:
    job = night["jobs"]["XNYS"]
    with psycopg.connect(night["dsn"]) as conn:
        uid, doc = _a_user(conn, job)
        monkeypatch.setattr(calculate, "parse_rules", _plus_one_point(calculate.parse_rules))
        result = replay.replay_user(conn, job.correlation_id, uid)
    rec = next(r for r in doc["recommendations"] if r["breakdown"]["criteriaCount"] > 0)
    stored, count = Decimal(rec["score"]), rec["breakdown"]["criteriaCount"]
    assert result.status == replay.DIFFERENT
    assert (f'SCORES_COMPUTED.scores.{rec["symbol"]}: stored "{rec["score"]}", replayed "{stored + count}"'
            in result.differences), result.text()
    assert any(d.startswith("recommendations[") and ".score: stored" in d for d in result.differences), result.text()
    assert result.stored_sha256 != result.replayed_sha256


def test_a_calculation_of_another_calc_version_says_so(night: dict[str, Any]) -> None:
    job = night["jobs"]["XLON"]
    with psycopg.connect(night["dsn"]) as conn:
        uid, _ = _a_user(conn, job)
        assert _edit(conn, job, uid, "set", [1, 2, "calcVersion"], '"0.0.9+scoring.0.allocation.1"') == 1
        result = replay.replay_user(conn, job.correlation_id, uid)
        assert _edit(conn, job, uid, "delete", [1, 2, "calcVersion"]) == 1
        before = replay.replay_user(conn, job.correlation_id, uid)
        conn.rollback()
    assert result.status == replay.OTHER_VERSION
    assert result.stored_calc_version == "0.0.9+scoring.0.allocation.1"
    assert result.replay_calc_version == jobrun.CALC_VERSION
    assert result.differences == ["INPUTS_CAPTURED.calcVersion: stored \"0.0.9+scoring.0.allocation.1\", replayed "
                                  f"\"{jobrun.CALC_VERSION}\""]
    assert "other_version" in result.text() and jobrun.CALC_VERSION in result.text()
    assert before.status == replay.OTHER_VERSION and before.stored_calc_version is None
    assert "cannot be replayed" in (before.note or "")


def test_the_trail_points_at_the_exact_stored_document(night: dict[str, Any]) -> None:
    redis_client = night["redis"]
    job = night["jobs"]["BVMF"]
    with psycopg.connect(night["dsn"]) as conn:
        rows = conn.execute(
            "SELECT e.payload -> 'document', h.document, encode(sha256(convert_to(h.document, 'UTF8')), 'hex')"
            " FROM calculation_events e JOIN recommendation_history h ON h.user_id = e.user_id"
            " AND h.job_run_id = (e.payload -> 'document' ->> 'jobRunId')::uuid"
            " AND h.generated_at = (e.payload -> 'document' ->> 'generatedAt')::timestamptz"
            " WHERE e.correlation_id = %s AND e.event_type = 'CALC_COMPLETED'", (job.correlation_id,)).fetchall()
        served = conn.execute("SELECT count(*) FROM overnight_job_users WHERE job_run_id = %s AND status = 'completed'",
                              (job.id,)).fetchone()[0]
        assert served == len(R.served(conn, "BVMF", SESSION))  # every user BVMF serves, calculated
        uid, _ = _a_user(conn, job)
        zero = conn.execute(
            "SELECT h.user_id::text, a.symbol FROM holdings h JOIN assets a ON a.id = h.asset_id"
            " WHERE h.quantity = 0 AND h.user_id IN (SELECT user_id FROM overnight_job_users WHERE job_run_id = %s)"
            " LIMIT 1", (job.id,)).fetchone()
        zero_inputs = None if zero is None else conn.execute(
            "SELECT payload -> 'holdings' FROM calculation_events WHERE correlation_id = %s AND user_id = %s"
            " AND event_type = 'INPUTS_CAPTURED'", (job.correlation_id, zero[0])).fetchone()[0]
    assert len(rows) == served > 0
    for pointer, text, sha in rows:
        assert pointer["table"] == "recommendation_history" and pointer["jobRunId"] == job.id
        assert pointer["sha256"] == sha == hashlib.sha256(text.encode()).hexdigest()
    assert redis_client.get(cache.recs_key(uid)).decode() == next(
        t for p, t, _ in rows if json.loads(t)["userId"] == uid)  # the bytes Redis serves are the stored copy
    assert zero is not None  # the fixture gave one of BVMF's users a holding of quantity 0 ...
    assert zero_inputs[zero[1]] == "0"  # ... kept in the inputs


def test_an_older_sessions_rerun_never_replaces_the_newer_document(night: dict[str, Any]) -> None:
    redis_client = night["redis"]
    dsn, current = night["dsn"], night["jobs"]["XNYS"]
    old_job, old_results = _run(dsn, "XNYS", OLDER, redis_client)
    with psycopg.connect(dsn) as conn:
        old_users = [str(r[0]) for r in conn.execute(
            "SELECT user_id FROM overnight_job_users WHERE job_run_id = %s AND status = 'completed' ORDER BY user_id",
            (old_job.id,))]
        latest = dict(conn.execute("SELECT user_id::text, session_date FROM recommendations WHERE user_id = ANY(%s::uuid[])",
                                   (old_users,)).fetchall())
        kept = conn.execute("SELECT count(*) FROM recommendation_history WHERE job_run_id = %s", (old_job.id,)).fetchone()[0]
        replayed = replay.replay(conn, old_job.correlation_id)
    assert sum(r["completed"] for r in old_results) == len(old_users) > 100
    assert {r["cache_status"] for r in old_results} == {"skipped"}  # nothing warmed: no document was the latest
    assert set(latest.values()) == {SESSION}  # every one still has the 2026-12-01 document
    assert kept == len(old_users)  # ... and the older one is in the history
    assert {r.status for r in replayed} == {replay.IDENTICAL}
    for uid in old_users[:50]:
        assert json.loads(redis_client.get(cache.recs_key(uid)))["sessionDate"] == SESSION.isoformat()
    with psycopg.connect(dsn) as conn:
        assert replay.find_calculation(conn, old_users[0]) == current.correlation_id  # the newest session's, not the last run
        assert replay.find_calculation(conn, old_users[0], session=OLDER, market="xnys") == old_job.correlation_id
    new_job, new_results = _run(dsn, "XNYS", NEWER, redis_client)
    with psycopg.connect(dsn) as conn:
        newest = dict(conn.execute("SELECT user_id::text, correlation_id::text FROM recommendations"
                                   " WHERE user_id = ANY(%s::uuid[])", (old_users,)).fetchall())
    served_new = sum(r["completed"] for r in new_results)
    assert list(newest.values()).count(new_job.correlation_id) == served_new > 100
    warmed = [u for u, c in newest.items() if c == new_job.correlation_id]
    assert all(json.loads(redis_client.get(cache.recs_key(u)))["sessionDate"] == NEWER.isoformat() for u in warmed[:50])


def test_stale_and_unusable_quotes_and_stale_rates_replay_as_the_night_judged_them(night: dict[str, Any]) -> None:
    """docs/freshness.md: a stale quote is listed in the document; an unusable one is never scored or bought, and its
    holders are valued at the newest price known for it (docs/allocation.md: `lastKnownPrices`); the replay reads
    the night's judgement and those prices from the trail, not from the clock or the snapshots of other nights."""
    def judge(quotes: dict[str, Any]) -> tuple[set[str], set[str]]:
        symbols = sorted(quotes)
        return set(symbols[::3]), set(symbols[1::40])

    job, results = _run(night["dsn"], "BVMF", date(2026, 11, 27), night["redis"], judge_prices=judge,
                        stale_rates=frozenset({"BRL"}))
    with psycopg.connect(night["dsn"]) as conn:
        flagged = conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s"
                               " AND event_type = 'INPUTS_CAPTURED' AND payload ? 'stalePrices'",
                               (job.correlation_id,)).fetchone()[0]
        valued_old = conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s"
                                  " AND event_type = 'INPUTS_CAPTURED' AND payload ? 'lastKnownPrices'",
                                  (job.correlation_id,)).fetchone()[0]
        stale_rates = dict(conn.execute(
            "SELECT payload ->> 'ratesStale', count(*) FROM calculation_events WHERE correlation_id = %s"
            " AND event_type = 'INPUTS_CAPTURED' GROUP BY 1", (job.correlation_id,)).fetchall())
        replayed = replay.replay(conn, job.correlation_id)
    assert sum(r["completed"] for r in results) == len(replayed) > 50
    assert sum(r["failed"] for r in results) == 0  # holders of unusable quotes are calculated ...
    assert valued_old > 50  # ... valued at the newest price known, and replayed identically below
    assert flagged > 0
    assert stale_rates.get("true", 0) > 0 and stale_rates.get("false", 0) > 0  # only users who converted BRL
    assert {r.status for r in replayed} == {replay.IDENTICAL}, next(r.text() for r in replayed if r.status != "identical")


def test_the_audit_query_for_an_asset_still_finds_every_calculation(night: dict[str, Any]) -> None:
    job = night["jobs"]["XNYS"]
    with psycopg.connect(night["dsn"]) as conn:
        # the oracle: every SCORES_COMPUTED of the night whose universe names the symbol, counted from the view
        symbol, count = conn.execute(
            "SELECT s, count(*) FROM calculation_events, jsonb_array_elements_text(payload -> 'universe') s"
            " WHERE correlation_id = %s AND event_type = 'SCORES_COMPUTED'"
            " GROUP BY s ORDER BY count(*) DESC, s LIMIT 1", (job.correlation_id,)).fetchone()
        total = conn.execute("SELECT count(*) FROM calculation_events WHERE event_type = 'SCORES_COMPUTED'"
                             " AND payload -> 'universe' ? %s", (symbol,)).fetchone()[0]
        calculated = {(u, corr): p["scores"].get(symbol) for (corr,) in conn.execute(
            "SELECT correlation_id::text FROM overnight_job_runs").fetchall()
            for u, _, t, p, _ in trail.read_calculated(conn, corr) if t == "SCORES_COMPUTED"
            if symbol in p["scores"] or symbol in p["unscored"]}

    async def all_events() -> list[dict[str, Any]]:
        store = dashboard.DashboardStore(pg_dsn=night["dsn"], redis_url="")
        try:
            events, cursor = await store.asset_events(symbol, limit=500)  # (its speed: `make bench`'s business)
            while cursor:
                more, cursor = await store.asset_events(symbol, limit=500, before=cursor["before"],
                                                        before_id=cursor["beforeId"])
                events += more
            return events
        finally:
            await store.aclose()

    events = asyncio.run(all_events())
    assert len(events) == total == len(calculated) >= count > 1
    assert {e["eventType"] for e in events} == {"SCORES_COMPUTED"}
    assert {(e["userId"], e["correlationId"]): e["score"] for e in events} == calculated  # the scores as calculated
    assert len({e["eventId"] for e in events}) == len(events)  # pages neither repeat nor skip
    assert sum(e["correlationId"] == job.correlation_id for e in events) == count


def test_replay_errors_say_what_and_where(night: dict[str, Any]) -> None:
    job = night["jobs"]["XTKS"]
    with psycopg.connect(night["dsn"]) as conn:
        uid, _ = _a_user(conn, job)
        other = conn.execute("SELECT id::text FROM users WHERE id NOT IN (SELECT user_id FROM overnight_job_users"
                             " WHERE job_run_id = %s) LIMIT 1", (job.id,)).fetchone()[0]
        with pytest.raises(replay.UnknownCalculation, match="no job run has correlation id 00000000-"):
            replay.replay_user(conn, "00000000-0000-0000-0000-000000000000", uid)
        with pytest.raises(replay.UnknownCalculation, match="is not a UUID"):
            replay.replay_user(conn, "nope", uid)
        with pytest.raises(replay.UnknownCalculation, match=f"user {other} has no calculation events in job run {job.id}"):
            replay.replay_user(conn, job.correlation_id, other)
        with pytest.raises(replay.UnknownCalculation, match="has no calculation in recommendation_history"):
            replay.find_calculation(conn, "00000000-0000-0000-0000-000000000001")
        with pytest.raises(replay.UnknownCalculation, match="give both a session date and a market"):
            replay.find_calculation(conn, uid, session=SESSION)
        assert _edit(conn, job, uid, "delete", [3]) == 1  # CALC_COMPLETED, the fourth event
        with pytest.raises(replay.IncompleteCalculation, match="events missing from calculation_events: CALC_COMPLETED"):
            replay.replay_user(conn, job.correlation_id, uid)
        conn.rollback()


def test_the_command_line_prints_identical(night: dict[str, Any]) -> None:
    job = night["jobs"]["XLON"]
    with psycopg.connect(night["dsn"]) as conn:
        uid, _ = _a_user(conn, job)
    env = {**os.environ, "AIRFLOW_CONN_OVERNIGHT_POSTGRES": night["dsn"],
           "PYTHONPATH": str(ROOT / "include")}
    out = subprocess.run([sys.executable, "-m", "overnight.night.replay", "--user", uid, "--job", job.id],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"identical: user {uid}, job run {job.id} (XLON {SESSION.isoformat()}")
    bad = subprocess.run([sys.executable, "-m", "overnight.night.replay", "--user", uid, "--session", "2026-12-01"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give both a session date and a market" in bad.stderr


# Issue 25: at most 1.5 kB of row data per user per night for the trail and the history together (docs/audit.md).
ROW_BYTES_PER_USER_BOUND = 1_500


def _compressed(conn: psycopg.Connection, corrs: list[str]) -> dict[str, tuple[int, int]]:
    """(chunks, chunks whose value is stored compressed) of the events, the documents and `symbols`."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE pg_column_compression(events) IS NOT NULL),"
        " count(*) FILTER (WHERE pg_column_compression(documents) IS NOT NULL),"
        " count(*) FILTER (WHERE pg_column_compression(symbols) IS NOT NULL)"
        " FROM calculation_chunks WHERE correlation_id = ANY(%s::uuid[]) AND cardinality(user_ids) >= 50",
        (corrs,)).fetchone()
    return {"events": (row[0], row[1]), "documents": (row[0], row[2]), "symbols": (row[0], row[3])}


def _assert_compressed(found: dict[str, tuple[int, int]]) -> None:
    """A chunk of 50 users or more is a value of tens of kB, which Postgres compresses by itself (docs/audit.md)."""
    for kind, (n, compressed) in found.items():
        assert n > 0 and compressed == n, f"{kind}: {compressed} of {n} values stored compressed"


def test_storage_per_user_per_night(night: dict[str, Any]) -> None:
    """The trail and the history of a night, as stored (pg_column_size: after compression): each chunk's row and
    the snapshot rows the events point at instead of repeating them, within issue 25's bound, and compressed. The
    figure is `make bench`'s `audit_bytes_per_user` (one measure: `bench.audit_size`). At this size (1,000 users)
    the scores of the 30 shared criteria versions weigh more per user than they do at 100,000: they grow with
    versions x assets, not with users, which is what is checked of them here."""
    with psycopg.connect(night["dsn"]) as conn:
        ids = [j.id for j in night["jobs"].values()]
        corrs = [j.correlation_id for j in night["jobs"].values()]
        size = bench.audit_size(conn, ids)
        users = conn.execute("SELECT count(*) FROM overnight_job_users WHERE job_run_id = ANY(%s::uuid[])"
                             " AND status = 'completed'", (ids,)).fetchone()[0]
        chunks, documents = conn.execute(
            "SELECT sum(pg_column_size(c.*)), sum(pg_column_size(c.documents) + pg_column_size(c.generated_at))"
            " FROM calculation_chunks c WHERE correlation_id = ANY(%s::uuid[])", (corrs,)).fetchone()
        snapshots = {t: conn.execute(f"SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0) FROM {t} t"
                                     " WHERE job_run_id = ANY(%s::uuid[])", (ids,)).fetchone()
                     for t in ("overnight_job_criteria", "overnight_job_rates", "overnight_job_scores")}
        versions, assets = conn.execute(
            "SELECT (SELECT count(DISTINCT criteria_version) FROM overnight_job_scores WHERE job_run_id = ANY(%(j)s)),"
            " (SELECT count(*) FROM overnight_job_assets WHERE job_run_id = ANY(%(j)s))", {"j": ids}).fetchone()
        found = _compressed(conn, corrs)
    snapshot_bytes = sum(b for _, b in snapshots.values())
    assert size["audit_users"] == users > 0
    assert size["audit_bytes_per_user"] == round((chunks + snapshot_bytes) / users, 1)  # the bench's figure is this
    assert size["audit_events_bytes_per_user"] == round((chunks - documents) / users, 1)
    assert size["audit_history_bytes_per_user"] == round(documents / users, 1)
    assert size["audit_snapshot_bytes_per_user"] == round(snapshot_bytes / users, 1)
    assert size["audit_index_bytes_per_user"] > 0
    assert json.loads(json.dumps(size)) == size  # the bench prints it in its JSON line
    print(f"\nbytes per user per night ({users} users, {len(ids)} job runs): events {(chunks - documents) / users:.0f},"
          f" history {documents / users:.0f}, together {chunks / users:.0f} (bound {ROW_BYTES_PER_USER_BOUND:,});"
          f" snapshot rows {snapshots} ({snapshot_bytes / users:.0f} per user at this size); indexes of the"
          f" database's whole trail {size['audit_index_bytes_per_user']:.0f} per user; compressed: {found}")
    _assert_compressed(found)
    assert chunks / users <= ROW_BYTES_PER_USER_BOUND, f"{chunks / users:.0f} B of rows per user per night"
    assert snapshots["overnight_job_scores"][0] <= versions * assets  # once per version and asset, at most
    assert snapshots["overnight_job_criteria"][0] <= 4 * 30  # the 30 shared templates, once per job run


def test_a_partition_made_after_the_migrations_stores_compressed_rows(night: dict[str, Any], monkeypatch) -> None:
    """A month no migration made: the partition maintenance of a job run's start makes it, with no setting of its
    own (none is needed: docs/audit.md), and a night written into it is stored compressed alike."""
    now = datetime.now(UTC)
    month = (now.replace(day=1) + timedelta(days=5 * 31)).replace(day=1)  # the migrations made 1 back to 2 on
    later = datetime(month.year, month.month, 10, tzinfo=UTC)
    parts = [f"calculation_chunks_{month:%Y_%m}"]

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + (later - now)

    with psycopg.connect(night["dsn"]) as conn:
        assert conn.execute("SELECT to_regclass(%s)", parts).fetchone() == (None,)
        rates = loading.fetch_rates(conn, DbRatesProvider(conn), loading.needed_currencies(conn))  # judged now
        monkeypatch.setattr(jobrun, "datetime", Later)  # the job run's start (and its partitions)
        monkeypatch.setattr(calculate, "datetime", Later)  # its events' times
        job = jobrun.start_job(conn, "XTKS", date(2026, 12, 4), "test-replay")
        aud = jobrun.Audience("XTKS", ())
        batches = loading.plan_batches(conn, aud, 150)
        results = [pipeline.score_batch(conn, job, aud, rates, b, DbPriceProvider(conn),
                                        warm_cache=lambda docs: cache.warm(night["redis"], docs)) for b in batches]
        writing.finalize(conn, job, planned=batches, results=results, rates=rates.to_xcom())
        monkeypatch.undo()
        options = dict(conn.execute("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s)", (parts,)))
        where = {r[0] for r in conn.execute(
            "SELECT tableoid::regclass::text FROM calculation_chunks WHERE correlation_id = %s", (job.correlation_id,))}
        found = _compressed(conn, [job.correlation_id])
    assert where == set(parts)
    assert options == {parts[0]: None}, options  # no storage setting of its own
    _assert_compressed(found)

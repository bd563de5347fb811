"""The cache warmer (overnight.ops.cache_warmer) against real Postgres and Redis: flush, warm, keys back with TTL."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from overnight.adapters import cache
from overnight.adapters.pseudonyms import user_ref
from overnight.ops import cache_warmer
from tests.support.pipeline_run import run_pipeline

SESSION = date(2026, 11, 24)


@pytest.fixture(scope="module")
def documents(pg_dsn: str, seeded: dict[str, int]) -> dict[str, tuple[Any, Any]]:
    """Scores XLON for SESSION (no cache warming); returns every recommendations row by user id."""
    with psycopg.connect(pg_dsn) as conn:
        run_pipeline(conn, "XLON", SESSION, "test-cache-warmer", batch_size=250)
        rows = conn.execute("SELECT user_id::text, document, portfolio FROM recommendations").fetchall()
    assert rows
    return {u: (d, p) for u, d, p in rows}


@pytest.fixture
def flushed() -> Iterator[redis.Redis]:
    """This run's Redis database without any cache keys (the run's lock key stays: no FLUSHDB)."""
    client = redis.Redis.from_url(os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"])
    for prefix in (cache.RECS_PREFIX, cache.PORTFOLIO_PREFIX):
        keys = list(client.scan_iter(f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
    yield client
    client.close()


def _keys(client: redis.Redis, prefix: str) -> set[str]:
    return {k.decode()[len(prefix):] for k in client.scan_iter(f"{prefix}*", count=1000)}


def test_warms_everyone_with_ttl(pg_dsn: str, documents: dict[str, tuple[Any, Any]], flushed: redis.Redis) -> None:
    assert not _keys(flushed, cache.RECS_PREFIX)
    with psycopg.connect(pg_dsn) as conn:
        result = cache_warmer.warm_from_postgres(conn, flushed, chunk=97)  # several cursor fetches and pipelines
    assert result["scope"] == "all" and result["users_warmed"] == len(documents)
    assert result["keys_written"] == 2 * len(documents) and result["missing"] == 0
    assert _keys(flushed, cache.RECS_PREFIX) == set(documents) == _keys(flushed, cache.PORTFOLIO_PREFIX)
    for uid in list(documents)[:25]:
        doc, portfolio = documents[uid]
        assert json.loads(flushed.get(cache.recs_key(uid))) == doc
        assert json.loads(flushed.get(cache.portfolio_key(uid))) == portfolio
        for key in (cache.recs_key(uid), cache.portfolio_key(uid)):
            assert cache.TTL_SECONDS - 120 < flushed.ttl(key) <= cache.TTL_SECONDS


def test_warms_only_the_given_users_and_reports_missing(
    pg_dsn: str, documents: dict[str, tuple[Any, Any]], flushed: redis.Redis
) -> None:
    chosen = sorted(documents)[:3]
    ghost = str(uuid.uuid4())
    with psycopg.connect(pg_dsn) as conn:
        result = cache_warmer.warm_from_postgres(conn, flushed, [chosen[0].upper(), *chosen, ghost])
    assert result["scope"] == "users" and result["requested"] == 4  # the upper-case duplicate counts once
    assert result["users_warmed"] == 3 and result["missing"] == 1 and result["missing_user_refs"] == [user_ref(ghost)]
    assert ghost not in json.dumps(result)  # the task's XCom names nobody
    assert _keys(flushed, cache.RECS_PREFIX) == set(chosen) == _keys(flushed, cache.PORTFOLIO_PREFIX)


def test_run_uses_the_connections_and_an_empty_list_warms_nothing(
    documents: dict[str, tuple[Any, Any]], flushed: redis.Redis
) -> None:
    assert cache_warmer.run([])["users_warmed"] == 0
    assert not _keys(flushed, cache.RECS_PREFIX)
    assert cache_warmer.run(None)["users_warmed"] == len(documents)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(["not-a-uuid"], id="not-uuid"),
        pytest.param("0b7c6d4e-1f2a-4b3c-8d9e-0a1b2c3d4e5f", id="a-string-not-a-list"),
        pytest.param(["'; DROP TABLE users;--"], id="sql"),
    ],
)
def test_bad_user_ids_are_refused_with_a_reason(bad: Any) -> None:
    with pytest.raises(ValueError, match="user_ids"):
        cache_warmer.validate_user_ids(bad)


def test_dag_is_well_formed() -> None:
    from airflow.dag_processing.dagbag import DagBag

    path = Path(__file__).resolve().parents[3] / "dags" / "cache_warmer.py"
    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors
    dag = bag.dags["overnight_cache_warmer"]
    assert dag.doc_md and dag.schedule is None and not dag.catchup
    assert set(dag.tags) <= {"overnight", "cache"} and dag.default_args["retries"] >= 2
    param = dag.params.get_param("user_ids")
    assert param.value is None and param.description and param.schema["type"] == ["null", "array"]


@pytest.mark.parametrize(
    ("market", "session", "now", "ttl_s"),
    [  # hand-worked from the exchanges' calendars (docs/freshness.md: next session's run + 2 h grace)
        # XNYS: Thursday 26 Nov 2026 is Thanksgiving; the next session is Friday 27 Nov, open 09:30 EST = 14:30
        # UTC, run 12:30 UTC, fresh until 14:30 UTC: from Wednesday 20:00 UTC that is 42 h 30 min.
        pytest.param("XNYS", "2026-11-25", "2026-11-25T20:00:00+00:00", 42 * 3600 + 1800, id="XNYS-thanksgiving"),
        # XLON: Wednesday 25 Nov opens 08:00 GMT, run 06:00, fresh until 08:00 UTC: 12 h after Tuesday 20:00.
        pytest.param("XLON", "2026-11-24", "2026-11-24T20:00:00+00:00", 12 * 3600, id="XLON-next-morning"),
        # XLON on a Friday: Monday 30 Nov 08:00 UTC is 60 h after Friday 20:00 (a weekend is not stale).
        pytest.param("XLON", "2026-11-27", "2026-11-27T20:00:00+00:00", 60 * 3600, id="XLON-over-the-weekend"),
    ],
)
def test_next_run_ttl_follows_the_markets_calendar(pg_dsn: str, documents: dict[str, tuple[Any, Any]],
                                                   flushed: redis.Redis, monkeypatch: pytest.MonkeyPatch,
                                                   market: str, session: str, now: str, ttl_s: int) -> None:
    from datetime import datetime

    uid = sorted(documents)[0]
    monkeypatch.setenv("OVERNIGHT_CACHE_TTL", "next-run")
    with psycopg.connect(pg_dsn) as conn:
        original = conn.execute("SELECT document FROM recommendations WHERE user_id = %s", (uid,)).fetchone()[0]
        conn.execute("UPDATE recommendations SET document = document || %s::jsonb WHERE user_id = %s",
                     (json.dumps({"market": market, "sessionDate": session}), uid))
        conn.commit()
        try:
            result = cache_warmer.warm_from_postgres(conn, flushed, [uid], now=datetime.fromisoformat(now))
        finally:
            conn.execute("UPDATE recommendations SET document = %s WHERE user_id = %s", (json.dumps(original), uid))
            conn.commit()
    assert result["users_warmed"] == 1 and result["ttl"] == "next-run"
    for key in (cache.recs_key(uid), cache.portfolio_key(uid)):
        assert ttl_s - 5 <= flushed.ttl(key) <= ttl_s

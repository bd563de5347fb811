"""Invalidation through the live api-server, recalculated by the live scheduler (issue 27, docs/access.md).

An investor sells everything during the day: the app's backend invalidates their advice through the API with
`recalculate=true`; the dashboard says `recalculating` (the older document, stale) until the run of their serving
market's DAG, triggered by the plugin, lands; then it serves the fresh document, built on the holdings as they are
now (none: a portfolio worth 0.00) in a job run of its own, the night's job run untouched. The routes change state,
so they take a bearer token of a holder of personal data only: the UI's cookie, a viewer and anonymous callers are
refused and nothing changes. `invalidate-all` drops every cached key and no other."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import redis

from overnight.domain import sessions
from overnight.domain.markets import get_market
from tests.support import reliability as R
from tests.support.live_airflow import live_airflow
from tests.support.pipeline_run import run_market

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
API = "/overnight/api/v1"
MARKET = get_market("XNYS")
FOUR = ["CALC_STARTED", "INPUTS_CAPTURED", "SCORES_COMPUTED", "CALC_COMPLETED"]


def _call(af: Any, method: str, path: str, token: str | None = None, cookie: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    cookies = {"_token": cookie} if cookie else None
    return httpx.request(method, af.env["AIRFLOW__API__BASE_URL"] + API + path, headers=headers, cookies=cookies,
                         timeout=60, trust_env=False)


def test_edit_invalidate_and_read_the_recalculated_document(airflow_db: None, tmp_path: Any) -> None:
    session = sessions.next_run(MARKET.code, timedelta(0), datetime.now(UTC), inclusive=False)[0]
    cache = redis.Redis.from_url(os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"])
    with R.scratch_database("invalidate", users=200) as dsn, live_airflow(tmp_path, dsn, tag="invalidate") as af:
        night = run_market(dsn, MARKET.code, session, "the-night", redis_url=os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"],
                           latest=True, batch_size=500).job
        with psycopg.connect(dsn) as conn:
            served = R.served(conn, MARKET.code, session)
            user, base = conn.execute(
                "SELECT u.id::text, u.base_currency FROM users u WHERE u.id = ANY(%s::uuid[])"
                " AND u.base_currency IN ('USD', 'EUR', 'GBP', 'BRL')"
                " AND EXISTS (SELECT 1 FROM holdings h WHERE h.user_id = u.id AND h.quantity > 0) ORDER BY u.id LIMIT 1",
                (sorted(served),)).fetchone()
            night_processed = conn.execute("SELECT users_processed FROM overnight_job_runs WHERE id = %s",
                                           (night.id,)).fetchone()[0]
        R.wait_until(lambda: af.dag_parsed(MARKET.dag_id), 180, 1, "the dag-processor to parse the market DAG")
        unpause = af.airflow("dags", "unpause", MARKET.dag_id)
        assert unpause.returncode == 0, unpause.stdout + unpause.stderr
        app = R.wait_until(lambda: _token_or_none(af, "overnight_app"), 120, 1, "the api-server")
        viewer, admin = af.token("viewer"), af.token("admin")

        before = _call(af, "GET", f"/dashboard/{user}", app).json()["data"]
        assert (before["fromCache"], before["stale"], before["correlationId"]) == (True, False, night.correlation_id)
        assert before["portfolioSummary"]["totalValue"] != "0.00"
        keys = [f"recs:{user}", f"portfolio:{user}"]
        assert cache.exists(*keys) == 2

        # refused, and nothing changes: the UI's cookie alone, a viewer, nobody
        path = f"/cache/invalidate/{user}?recalculate=true"
        by_cookie = _call(af, "POST", path, cookie=app)
        assert by_cookie.status_code == 403 and "bearer token only" in by_cookie.json()["detail"]
        assert _call(af, "POST", path, viewer).status_code == 403
        assert _call(af, "POST", path).status_code == 401
        assert _call(af, "POST", "/cache/invalidate-all", cookie=admin).status_code == 403
        assert cache.exists(*keys) == 2
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM overnight_invalidations").fetchone()[0] == 0

        # the investor sells everything; their backend invalidates them, asking for the recalculation
        with psycopg.connect(dsn) as conn:
            conn.execute("DELETE FROM holdings WHERE user_id = %s", (user,))
            conn.commit()
        answer = _call(af, "POST", path, app)
        assert answer.status_code == 200, answer.text
        done = answer.json()["data"]
        recalc = done["recalculation"]
        assert (done["userId"], done["keysDeleted"], done["cacheError"]) == (user, 2, None)
        assert (recalc["dagId"], recalc["market"], recalc["sessionDate"], recalc["dagPaused"]) == (
            MARKET.dag_id, MARKET.code, session.isoformat(), False)
        assert cache.exists(*keys) == 0
        meanwhile = _call(af, "GET", f"/dashboard/{user}", app).json()["data"]
        assert (meanwhile["fromCache"], meanwhile["stale"], meanwhile["staleReason"]) == (False, True, "recalculating")
        assert meanwhile["correlationId"] == night.correlation_id  # the older document, said to be recalculating

        def landed() -> dict[str, Any] | None:
            data = _call(af, "GET", f"/dashboard/{user}", app).json()["data"]
            return None if data["staleReason"] == "recalculating" else data

        try:
            fresh = R.wait_until(landed, 360, 2, "the recalculated document")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{af.log_tail('scheduler')}") from None
        assert af.wait_finished(MARKET.dag_id, recalc["dagRunId"]) == "success"
        with psycopg.connect(dsn) as conn:
            job = conn.execute(
                "SELECT id::text, correlation_id::text, job_type, status, users_processed, market, session_date"
                " FROM overnight_job_runs WHERE dag_run_id = %s", (recalc["dagRunId"],)).fetchone()
            nights = conn.execute("SELECT count(*), sum(users_processed) FROM overnight_job_runs WHERE market = %s"
                                  " AND session_date = %s AND job_type = 'scoring'", (MARKET.code, session)).fetchone()
        assert job[2:] == ("recalculation", "completed", 1, MARKET.code, session)
        # docs/access.md's words: one run, named by a random id, for that one user, triggered as the caller; recorded
        assert re.fullmatch(r"recalculation__[0-9a-f-]{36}", recalc["dagRunId"])
        with psycopg.connect(af.af_dsn) as meta:
            triggered = meta.execute("SELECT triggering_user_name, conf FROM dag_run WHERE dag_id = %s AND run_id = %s",
                                     (MARKET.dag_id, recalc["dagRunId"])).fetchone()
            runs = meta.execute("SELECT count(*) FROM dag_run WHERE dag_id = %s", (MARKET.dag_id,)).fetchone()[0]
        assert triggered == ("overnight_app", {"session_date": session.isoformat(), "user_ids": [user],
                                               "recalculate": True}) and runs == 1
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT invalidated_by, dag_run_id FROM overnight_invalidations WHERE user_id = %s",
                                (user,)).fetchone() == ("overnight_app", recalc["dagRunId"])
        assert nights == (1, night_processed)  # the night's job run is as it was
        assert (fresh["fromCache"], fresh["stale"], fresh["staleReason"], fresh["correlationId"]) == (
            True, False, None, job[1])
        assert fresh["portfolioSummary"]["totalValue"] == "0.00" and fresh["baseCurrency"] == base.strip()
        assert datetime.fromisoformat(fresh["dataFreshness"]["generatedAt"]) > datetime.fromisoformat(
            done["invalidatedAt"])

        # the calculation's four events: the holdings as they are now
        calc = _call(af, "GET", f"/audit/calculations/{job[1]}/{user}", app)
        assert calc.status_code == 200, calc.text
        events = calc.json()["data"]["events"]
        assert [e["eventType"] for e in events] == FOUR
        assert events[1]["payload"]["holdings"] == {}
        assert _call(af, "GET", f"/audit/calculations/{job[1]}/{user}", viewer).status_code == 403

        # invalidate-all: every recs:/portfolio: key, and no other
        cache.set("ratelimit:prices", "kept")
        cached = sum(1 for _ in cache.scan_iter(match="recs:*")) + sum(1 for _ in cache.scan_iter(match="portfolio:*"))
        assert cached >= 2 * len(served) - 2
        cleared = _call(af, "POST", "/cache/invalidate-all", admin)
        assert cleared.status_code == 200 and cleared.json()["data"] == {"keysDeleted": cached}
        assert not any(cache.scan_iter(match="recs:*")) and not any(cache.scan_iter(match="portfolio:*"))
        assert cache.get("ratelimit:prices") == b"kept"
        after_all = _call(af, "GET", f"/dashboard/{user}", app).json()["data"]
        assert (after_all["fromCache"], after_all["stale"], after_all["correlationId"]) == (False, False, job[1])
    cache.delete("ratelimit:prices")
    cache.close()


def _token_or_none(af: Any, login: str) -> str | None:
    try:
        return str(af.token(login))
    except (AssertionError, httpx.HTTPError, KeyError, OSError):
        return None

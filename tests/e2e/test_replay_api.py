"""`GET /overnight/api/v1/audit/calculations/{correlation_id}/{user_id}/replay` through a real `airflow api-server`:
personal data (a user's amounts), so 200 for admin and the service login, 403 for viewer, 401 anonymous; clear 404s."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from overnight.night import jobrun
from tests.support.api_server import SERVICE, ApiServer, auth_env, token
from tests.support.pipeline_run import run_market

pytestmark = pytest.mark.e2e

SESSION = date(2026, 11, 25)  # the session the other api-server tests score (continued, not duplicated)
API = "/overnight/api/v1"


@pytest.fixture(scope="module")
def server(airflow_db: None, pg_dsn: str, seeded: dict[str, int]) -> Iterator[dict[str, Any]]:
    job = run_market(pg_dsn, "XNYS", SESSION, "test-e2e-api", redis_url=os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"],
                     batch_size=300, latest=True).job
    with psycopg.connect(pg_dsn) as conn:
        user = conn.execute("SELECT user_id::text FROM calculation_events WHERE correlation_id = %s"
                            " AND event_type = 'CALC_COMPLETED' ORDER BY user_id LIMIT 1",
                            (job.correlation_id,)).fetchone()[0]
    tmp = Path(tempfile.mkdtemp(prefix="overnight-replay-"))
    env, passwords = auth_env(tmp, uuid.uuid4().hex * 2)
    api = ApiServer("replay", env, tmp)
    try:
        api.wait_healthy(time.monotonic() + 120)
        tokens = {name: token(api.url, name, pw) for name, pw in passwords.items() if name != "norole"}
        yield {"url": api.url, "tokens": tokens, "job": job, "user": user}
    finally:
        api.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _get(server: dict[str, Any], path: str, who: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server['tokens'][who]}"} if who else {}
    return httpx.get(server["url"] + API + path, headers=headers, timeout=60, trust_env=False)


def test_replay_is_identical_for_those_who_may_read_investors_data(server: dict[str, Any]) -> None:
    job, user = server["job"], server["user"]
    for who in ("admin", SERVICE):
        resp = _get(server, f"/audit/calculations/{job.correlation_id}/{user}/replay", who)
        assert resp.status_code == 200, (who, resp.text)
        data = resp.json()["data"]
        assert (data["status"], data["userId"], data["correlationId"], data["jobRunId"]) == (
            "identical", user, job.correlation_id, job.id)
        assert data["differences"] == [] and data["storedCalcVersion"] == jobrun.CALC_VERSION
        assert data["storedDocumentSha256"] == data["replayedDocumentSha256"] and len(data["storedDocumentSha256"]) == 64


def test_replay_is_refused_to_viewer_and_anonymous(server: dict[str, Any]) -> None:
    path = f"/audit/calculations/{server['job'].correlation_id}/{server['user']}/replay"
    viewer = _get(server, path, "viewer")
    assert viewer.status_code == 403 and server["user"] not in viewer.text
    assert _get(server, path, None).status_code == 401


def test_unknown_calculations_are_404_with_the_reason(server: dict[str, Any]) -> None:
    job = server["job"]
    unknown_corr = _get(server, f"/audit/calculations/{uuid.UUID(int=1)}/{server['user']}/replay", "admin")
    assert unknown_corr.status_code == 404 and "no job run has correlation id" in unknown_corr.json()["detail"]
    stranger = str(uuid.UUID(int=2))
    unknown_user = _get(server, f"/audit/calculations/{job.correlation_id}/{stranger}/replay", "admin")
    assert unknown_user.status_code == 404
    assert f"user {stranger} has no calculation events in job run {job.id}" in unknown_user.json()["detail"]
    assert _get(server, f"/audit/calculations/{job.correlation_id}/not-a-uuid/replay", "admin").status_code == 422

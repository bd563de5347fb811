"""Preflight connection and provider checks against the real servers, a closed port and a local HTTP server."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import attrs
import pytest
from airflow.sdk import Connection

from overnight.adapters.connections import POSTGRES_CONN_ID, REDIS_CONN_ID, from_value
from overnight.ops import preflight
from tests.support.fake_provider import FakeProviderServer
from tests.support.ports import free_port

SECRET = "pa55-w0rd-XYZ"


def _real(conn_id: str) -> Connection:
    return from_value(conn_id, os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"])


def test_real_servers_answer(pg_dsn: str) -> None:
    assert preflight.check_postgres() == []
    assert preflight.check_redis() == []
    assert preflight.check_postgres(_real(POSTGRES_CONN_ID)) == []
    assert preflight.check_redis(_real(REDIS_CONN_ID)) == []


def test_closed_ports_name_the_connection_and_mask_the_password() -> None:
    port = free_port()
    pg = Connection(conn_id=POSTGRES_CONN_ID, conn_type="postgres", host="127.0.0.1", port=port, login="app",
                    password=SECRET, schema="overnight")
    rd = Connection(conn_id=REDIS_CONN_ID, conn_type="redis", host="127.0.0.1", port=port, password=SECRET, schema="0")
    for lines in (preflight.check_postgres(pg, timeout_s=2), preflight.check_redis(rd, timeout_s=2)):
        assert len(lines) == 1, lines
        line = lines[0]
        assert "\n" not in line and SECRET not in line and ":***@" in line
        assert f"127.0.0.1:{port}" in line
    assert preflight.check_postgres(pg, timeout_s=2)[0].startswith("overnight_postgres (postgres://app:***@")
    assert preflight.check_redis(rd, timeout_s=2)[0].startswith("overnight_redis (redis://:***@")


def test_wrong_postgres_password_is_masked(pg_dsn: str) -> None:
    real = _real(POSTGRES_CONN_ID)
    wrong = attrs.evolve(real, login="no_such_role_x", password=SECRET)
    lines = preflight.check_postgres(wrong)
    assert len(lines) == 1 and SECRET not in lines[0] and "no_such_role_x" in lines[0]


def test_http_providers_skipped_when_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", raising=False)
    problems, notes = preflight.check_http_providers()
    assert problems == []
    assert [n.split(":")[0] for n in notes] == ["overnight_rates_http", "overnight_prices_http"]
    assert all("skipped" in n for n in notes)


def test_http_providers_answer(fake_provider: FakeProviderServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", fake_provider.base_url)
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", fake_provider.base_url)
    problems, notes = preflight.check_http_providers()
    assert problems == []
    assert notes == ["overnight_rates_http: answered", "overnight_prices_http: answered"]
    assert len(fake_provider.requests_for("/latest")) == 1
    assert len(fake_provider.requests_for("/v7/finance/quote")) == 1


def test_http_provider_down_is_one_line_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP",
                       f'{{"conn_type": "http", "host": "http://127.0.0.1:{port}", "password": "{SECRET}"}}')
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", raising=False)
    problems, _ = preflight.check_http_providers(timeout_s=2)
    assert len(problems) == 1
    assert problems[0].startswith(f"overnight_rates_http (http://127.0.0.1:{port})")
    assert SECRET not in problems[0] and "\n" not in problems[0]


def test_http_provider_error_status_is_a_problem(fake_provider: FakeProviderServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", fake_provider.base_url)
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", raising=False)
    fake_provider.respond("/v7/finance/quote", status=503, body=b"maintenance")
    problems, _ = preflight.check_http_providers()
    assert len(problems) == 1 and problems[0].startswith("overnight_prices_http") and "503" in problems[0]


def test_pools_from_the_rest_api(fake_provider: FakeProviderServer) -> None:
    fake_provider.respond("/api/v2/pools", body={"pools": [{"name": "default_pool"}, {"name": "overnight_scoring"}],
                                                 "total_entries": 2})
    names = preflight.fetch_pools(fake_provider.base_url, token="tok-123")
    assert names == ["default_pool", "overnight_scoring"]
    (request,) = fake_provider.requests_for("/api/v2/pools")
    assert request.headers.get("authorization") == "Bearer tok-123"


def test_run_checks_with_everything_fed(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:


    from overnight.domain import sessions
    from overnight.domain.markets import load_markets

    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", raising=False)
    markets = load_markets().markets
    now = datetime.now(UTC)
    info = {m.dag_id: {"is_paused": False, "next_dagrun": sessions.next_run(m.code, m.lead, now, inclusive=False)[1]}
            for m in markets}
    report = preflight.run_checks(markets, now=now, dags_info=info, pools=["default_pool", "overnight_scoring"],
                                  skipped=["x: skipped"])
    assert report.problems == []
    assert report.warnings == ["x: skipped"]
    info[markets[0].dag_id] = {"is_paused": True, "next_dagrun": None}
    report = preflight.run_checks(markets, now=now, dags_info=info, pools=["default_pool"])
    assert [p.split(" ")[0] for p in report.problems] == ["pool", f"{markets[0].dag_id}:"]


def test_run_in_task_outside_airflow_skips_what_it_cannot_ask(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", "AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP",
                 "AIRFLOW_CONN_OVERNIGHT_AIRFLOW_API", "OVERNIGHT_AIRFLOW_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    report = preflight.run_in_task()
    assert report.problems == []
    assert any(w.startswith("market DAG state: skipped") for w in report.warnings)
    assert any(w.startswith("pools: skipped") for w in report.warnings)


def test_the_dag_reads_the_market_dags_through_the_task_sdk(pg_dsn: str, airflow_db: None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    """dag.test() runs the task under a real Task SDK supervisor: the market DAGs' state is read, not skipped.

    No scheduler runs here. Inside a market's lead window (XLON from 06:00 UTC, ...) the DAG's next run is
    that session's run, already due; a scheduler would create it at once and move on, but here nothing
    does, so once the grace has passed the preflight rightly reports that DAG as stuck, and fails.
    """
    import json
    import runpy
    from pathlib import Path

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    for name in ("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", "AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP"):
        monkeypatch.delenv(name, raising=False)
    from overnight.domain import sessions
    from overnight.domain.markets import load_markets

    def stuck_at(now: datetime) -> list[str]:
        """DAGs whose run fell due more than the grace ago: the calendar's word, not the preflight's."""
        return [m.dag_id for m in load_markets().markets
                if sessions.next_run(m.code, timedelta(0), now, inclusive=False)[1] - m.lead
                < now - preflight.NEXT_RUN_GRACE]

    if stuck_at(datetime.now(UTC)) != stuck_at(datetime.now(UTC) + timedelta(minutes=2)):
        time.sleep(125)  # a grace ends within the test: wait until the answer is settled
    stuck = stuck_at(datetime.now(UTC))
    module = runpy.run_path(str(Path(__file__).resolve().parents[3] / "dags" / "overnight_preflight.py"))
    dag_run = module["overnight_preflight"]().test()
    with create_session() as s:
        value = s.scalars(select(XComModel.value).where(
            XComModel.dag_id == "overnight_preflight", XComModel.run_id == dag_run.run_id,
            XComModel.task_id == "preflight", XComModel.key == "return_value")).one_or_none()
    if stuck:
        out = capfd.readouterr().out
        assert str(dag_run.state).endswith("failed"), out[-3000:]
        assert f"preflight: {len(stuck)} problem(s):" in out
        assert all(f"- {dag_id}: Airflow's next run is " in out for dag_id in stuck), out[-3000:]
        return
    assert str(dag_run.state).endswith("success"), "the preflight task failed: see its log above"
    report = json.loads(value) if isinstance(value, str) else value
    assert report["problems"] == 0
    assert not any(w.startswith("market DAG state") for w in report["warnings"])  # asked, not skipped
    assert any(w.startswith("pools: skipped") for w in report["warnings"])


"""Preflight connection and provider checks against the real servers, a closed port and a local HTTP server."""

from __future__ import annotations

import os
from datetime import UTC, datetime

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


# Monday 2026-12-07, 09:00 UTC, and each market DAG's next run (open - 2 h) by the exchanges' published hours: B3
# 10:00 Sao Paulo (UTC-3), NYSE 09:30 New York (UTC-5 in December), LSE 08:00 London (UTC; 06:00 today has passed),
# Tokyo 09:00 (UTC+9: 00:00 UTC on the 8th)
MONDAY_0900 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
NEXT_RUNS_AT_0900 = {
    "overnight_scoring_bvmf": datetime(2026, 12, 7, 11, 0, tzinfo=UTC),
    "overnight_scoring_xlon": datetime(2026, 12, 8, 6, 0, tzinfo=UTC),
    "overnight_scoring_xnys": datetime(2026, 12, 7, 12, 30, tzinfo=UTC),
    "overnight_scoring_xtks": datetime(2026, 12, 7, 22, 0, tzinfo=UTC),
}


def test_run_checks_with_everything_fed(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from overnight.domain.markets import load_markets

    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP", raising=False)
    markets = load_markets().markets
    assert sorted(m.dag_id for m in markets) == sorted(NEXT_RUNS_AT_0900)
    info = {dag_id: {"is_paused": False, "next_dagrun": at} for dag_id, at in NEXT_RUNS_AT_0900.items()}
    report = preflight.run_checks(markets, now=MONDAY_0900, dags_info=info,
                                  pools=["default_pool", "overnight_scoring"], skipped=["x: skipped"])
    assert (report.problems, report.warnings) == ([], ["x: skipped"])
    info["overnight_scoring_bvmf"] = {"is_paused": True, "next_dagrun": None}
    report = preflight.run_checks(markets, now=MONDAY_0900, dags_info=info, pools=["default_pool"])
    assert [p.split(" ")[0] for p in report.problems] == ["pool", "overnight_scoring_bvmf:"]
    assert report.problems[1] == ("overnight_scoring_bvmf: paused; no BVMF runs will start: "
                                  "`airflow dags unpause overnight_scoring_bvmf`")


def test_run_in_task_outside_airflow_skips_what_it_cannot_ask(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", "AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP",
                 "AIRFLOW_CONN_OVERNIGHT_AIRFLOW_API", "OVERNIGHT_AIRFLOW_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    report = preflight.run_in_task()
    assert report.problems == []
    assert any(w.startswith("market DAG state: skipped") for w in report.warnings)
    assert any(w.startswith("pools: skipped") for w in report.warnings)


@pytest.mark.parametrize(
    ("now", "stuck"),
    [
        pytest.param(MONDAY_0900, None, id="no-run-due"),
        # 11:30: BVMF's 11:00 run fell due 30 min ago (beyond the 15 min grace); no scheduler here creates it
        pytest.param(datetime(2026, 12, 7, 11, 30, tzinfo=UTC),
                     "overnight_scoring_bvmf: Airflow's next run is 2026-12-07 11:00 UTC but the BVMF calendar says "
                     "2026-12-08 11:00 UTC (session 2026-12-08, open - lead); check the scheduler is running and the "
                     "DAG is re-parsed (dag-processor)", id="bvmf-run-overdue"),
    ],
)
def test_the_dag_reads_the_market_dags_through_the_task_sdk(pg_dsn: str, airflow_db: None, now: datetime,
                                                            stuck: str | None, monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    """dag.test() runs the task under a real Task SDK supervisor: the market DAGs' state is read, not skipped.

    The clock is the test's (time-machine, for the DAGs' parse and the task alike). No scheduler runs here: inside
    a market's lead window the DAG's next run is that session's run, already due; a scheduler would create it at
    once and move on, but here nothing does, so once the grace has passed the preflight rightly reports that DAG
    as stuck, and fails.
    """
    import json
    import runpy
    from pathlib import Path

    import time_machine
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    for name in ("AIRFLOW_CONN_OVERNIGHT_RATES_HTTP", "AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP"):
        monkeypatch.delenv(name, raising=False)
    asked: list[dict] = []
    real = preflight.dags_info_from_sdk
    monkeypatch.setattr(preflight, "dags_info_from_sdk", lambda ids, ti: asked.append(real(ids, ti)) or asked[-1])
    with time_machine.travel(now, tick=True):
        module = runpy.run_path(str(Path(__file__).resolve().parents[3] / "dags" / "overnight_preflight.py"))
        dag_run = module["overnight_preflight"]().test()
    with create_session() as s:
        value = s.scalars(select(XComModel.value).where(
            XComModel.dag_id == "overnight_preflight", XComModel.run_id == dag_run.run_id,
            XComModel.task_id == "preflight", XComModel.key == "return_value")).one_or_none()
    (info,) = asked  # the market DAGs' state, read through the Task SDK
    out = capfd.readouterr().out
    if stuck:
        assert info["overnight_scoring_bvmf"] == {"is_paused": False, "next_dagrun": datetime(2026, 12, 7, 11, 0,
                                                                                               tzinfo=UTC)}
        assert str(dag_run.state).endswith("failed"), out[-3000:]
        assert f"preflight: 1 problem(s):\n- {stuck}" in out, out[-3000:]
        return
    assert {dag_id: i["next_dagrun"] for dag_id, i in info.items()} == NEXT_RUNS_AT_0900
    assert str(dag_run.state).endswith("success"), "the preflight task failed: see its log above"
    report = json.loads(value) if isinstance(value, str) else value
    assert report["problems"] == 0
    assert not any(w.startswith("market DAG state") for w in report["warnings"])  # asked, not skipped
    assert any(w.startswith("pools: skipped") for w in report["warnings"])

"""Asset events: a market run that ends completed or partial updates `overnight://recommendations/<MARKET>`.

Runs the DAG with dag.test() on real Postgres, Redis and Airflow metadata, then reads Airflow's
`asset_event` table: one event per DAG run, its extra naming the session, outcome, counts and job run.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import psycopg
import pytest

from overnight.dev import cli
from overnight.night import assets

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _events(uri: str) -> list[tuple[str | None, dict]]:
    """(source run id, extra) of every event on the asset `uri`, oldest first, from the metadata DB."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(AssetEvent.source_run_id, AssetEvent.extra, AssetEvent.source_dag_id, AssetEvent.source_task_id)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == uri).order_by(AssetEvent.id)
        ).all()
    market = uri.rsplit("/", 1)[1]
    for _, _, dag_id, task_id in rows:  # only that market's DAG, by its finalize task, updates its asset
        assert (dag_id, task_id) == (f"overnight_scoring_{market.lower()}", "finalize")
    return [(run_id, dict(extra)) for run_id, extra, _, _ in rows]


def _job(pg_dsn: str, market: str, session: date) -> tuple:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT id::text, correlation_id::text, status, users_processed, users_failed, dag_run_id, metrics"
            " FROM overnight_job_runs WHERE market = %s AND session_date = %s", (market, session)).fetchone()


def test_each_completed_run_records_one_asset_event_with_its_session_and_counts(pg_dsn, seeded, airflow_db):
    session = date(2026, 11, 30)
    uri = "overnight://recommendations/XTKS"
    before, others = _events(uri), _events("overnight://recommendations/XNYS")  # other tests' XTKS runs, if any
    first = cli.run_market("XTKS", session, quiet=True)
    job = _job(pg_dsn, "XTKS", session)
    assert first["status"] == "completed" and job[3] > 0
    expected = {
        "market": "XTKS", "session_date": "2026-11-30", "status": "completed", "users_processed": job[3],
        "users_failed": 0, "users_total": job[3], "recommendations_generated": job[6]["recommendations_generated"],
        "cache_status": "warmed", "correlation_id": job[1], "job_run_id": job[0], "dag_run_id": job[5],
    }
    assert _events(uri) == [*before, (job[5], expected)]

    cli.run_market("XTKS", session, quiet=True)  # a second DAG run continues the job run: a second event
    again = _job(pg_dsn, "XTKS", session)
    assert again[5] != job[5]
    # the job run's totals, whichever DAG run computed each user (issue 27: recommendations_generated too), and this
    # DAG run's own cache work: every user was already done, nothing new to cache
    resumed = {**expected, "dag_run_id": again[5], "cache_status": "nothing to warm"}
    assert _events(uri) == [*before, (job[5], expected), (again[5], resumed)]
    assert expected["recommendations_generated"] > 0
    assert _events("overnight://recommendations/XNYS") == others  # only the market that ran


def test_a_failed_run_records_no_asset_event(pg_dsn, seeded, airflow_db):
    from overnight.dev.cli import _load_dag

    before = _events("overnight://recommendations/XTKS")
    # a bad user id fails `start`; `finalize` still runs (all done), finds no job run and fails: no event
    bad = _load_dag("overnight_scoring_xtks").test(run_conf={"session_date": "2026-12-01", "user_ids": ["nope"]})
    assert str(bad.state).endswith("failed")
    finalize = next(t for t in bad.get_task_instances() if t.task_id == "finalize")
    assert str(finalize.state).endswith("failed")
    assert _events("overnight://recommendations/XTKS") == before


def _warmer(monkeypatch, setting: str | None):
    if setting is None:
        monkeypatch.delenv("OVERNIGHT_CACHE_WARMER_AFTER", raising=False)
    else:
        monkeypatch.setenv("OVERNIGHT_CACHE_WARMER_AFTER", setting)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "cache_warmer.py"))
    assert bag.import_errors == {}
    return bag.dags["overnight_cache_warmer"]


@pytest.mark.parametrize(
    ("setting", "uris"),
    [
        pytest.param(None, None, id="unset-manual-only"),
        pytest.param("", None, id="empty-manual-only"),
        pytest.param("all", ["BVMF", "XLON", "XNYS", "XTKS"], id="all-markets"),
        pytest.param(" xnys, BVMF ", ["BVMF", "XNYS"], id="listed-markets"),
    ],
)
def test_cache_warmer_can_be_scheduled_on_the_markets_assets(monkeypatch, setting, uris):
    from airflow.sdk import AssetAny

    dag = _warmer(monkeypatch, setting)
    if uris is None:
        assert dag.schedule is None
    else:
        assert dag.schedule == AssetAny(*(assets.recommendations_asset(c) for c in uris))
        assert [a.uri for a in dag.schedule.objects] == [f"overnight://recommendations/{c}" for c in uris]


@pytest.mark.parametrize(
    ("extras", "markets"),
    [
        pytest.param([{"market": "XNYS", "cache_status": "warmed"}], [], id="warmed-nothing-to-do"),
        pytest.param([{"market": "XNYS", "cache_status": "nothing to warm"}], [], id="nobody-served"),
        pytest.param([{"market": "XNYS", "cache_status": "not warmed"}], ["XNYS"], id="redis-was-down"),
        pytest.param([{"market": "XLON", "cache_status": "partially warmed"},
                      {"market": "XNYS", "cache_status": "warmed"}], ["XLON"], id="one-of-two"),
        pytest.param([{"market": "BVMF"}], ["BVMF"], id="no-cache-status-warms"),
    ],
)
def test_which_market_runs_need_the_warmer(extras, markets):
    assert assets.markets_needing_warm_cache(extras) == markets

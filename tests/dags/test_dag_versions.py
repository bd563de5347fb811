"""What the dag-processor stores does not depend on the clock, so daily runs do not pile up DAG versions.

Airflow 3 keeps a new DAG version whenever a DAG's serialized form changes after it has run. A `doc_md`
listing "the next sessions" from now() changed it every trading day (about 250 versions per DAG a year).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine

from tests.support.airflow_dags import sync_dags_folder

ROOT = Path(__file__).resolve().parents[2]
# Two moments a week apart, and one in another year: a Monday before and after the US DST change.
CLOCKS = [datetime(2026, 3, 2, 12, tzinfo=UTC), datetime(2026, 3, 9, 12, tzinfo=UTC),
          datetime(2027, 1, 5, 3, tzinfo=UTC)]


def _serialized_at(moment: datetime) -> dict[str, str]:
    """Every DAG of dags/ parsed afresh with the clock at `moment`, as the dag-processor serializes it."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    with time_machine.travel(moment, tick=False):
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert bag.import_errors == {}
        return {dag_id: json.dumps(DagSerialization.to_dict(dag), sort_keys=True, default=str)
                for dag_id, dag in bag.dags.items()}


def test_serialized_dags_are_the_same_a_week_and_a_year_apart():
    first, *others = [_serialized_at(moment) for moment in CLOCKS]
    assert {d for d in first if d.startswith("overnight_scoring_")} == {
        "overnight_scoring_xnys", "overnight_scoring_bvmf", "overnight_scoring_xlon", "overnight_scoring_xtks"}
    for moment, other in zip(CLOCKS[1:], others, strict=True):
        assert other.keys() == first.keys()
        changed = sorted(d for d in first if first[d] != other[d])
        assert changed == [], f"serialized differently at {moment.isoformat()} than at {CLOCKS[0].isoformat()}"


_sync_dags_folder = sync_dags_folder


@pytest.mark.usefixtures("airflow_db")
def test_three_scheduled_runs_on_three_days_leave_one_dag_version():
    from airflow.models.dag_version import DagVersion
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.timetables.base import DataInterval
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from sqlalchemy import func, select

    from overnight.domain import sessions
    from overnight.domain.markets import get_market

    market = get_market("XNYS")
    moment = datetime(2026, 3, 2, 12, tzinfo=UTC)
    run_ids = []
    for _ in range(3):
        session_date, run_at = sessions.next_run(market.code, market.lead, moment, inclusive=False)
        opens = sessions.session_open_utc(market.code, session_date)
        with time_machine.travel(run_at, tick=False):
            _sync_dags_folder()  # the dag-processor re-parses the file before each run
            with create_session() as session:
                dag = SerializedDagModel.get_dag(market.dag_id, session=session)
                run = dag.create_dagrun(
                    run_id=dag.timetable.generate_run_id(run_type=DagRunType.SCHEDULED, run_after=run_at,
                                                         data_interval=DataInterval(run_at, opens)),
                    logical_date=run_at, data_interval=(run_at, opens), run_after=run_at,
                    run_type=DagRunType.SCHEDULED, triggered_by=DagRunTriggeredByType.TIMETABLE,
                    state=DagRunState.SUCCESS, session=session,
                )
                assert run.get_task_instances(session=session)  # a version with task instances is "used"
                run_ids.append(run.run_id)
        moment = opens + timedelta(hours=1)
    assert run_ids == ["session__2026-03-02", "session__2026-03-03", "session__2026-03-04"]
    with create_session() as session:
        versions = session.scalar(select(func.count()).select_from(DagVersion).where(
            DagVersion.dag_id == market.dag_id))
    assert versions == 1

"""Tests for MarketSessionTimetable: runs at open - lead for every session, restrictions, run ids, serialization."""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import exchange_calendars
import pytest
from airflow.exceptions import AirflowTimetableInvalid
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction
from airflow.utils.types import DagRunType

from overnight.night import timetable as timetable_module
from overnight.night.timetable import MarketSessionTimetable

pytestmark = pytest.mark.filterwarnings("ignore:Series.values returning an ndarray")

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CODES = ("BVMF", "XLON", "XNYS", "XTKS")
TWO_HOURS = timedelta(hours=2)
NINETY_MINUTES = timedelta(minutes=90)


def utc(*args: int) -> datetime:
    """An aware UTC datetime."""
    return datetime(*args, tzinfo=UTC)


def first(tt: MarketSessionTimetable, earliest: datetime | None, *, catchup: bool = True) -> DagRunInfo | None:
    """The first scheduled run with no previous run."""
    return tt.next_dagrun_info(last_automated_data_interval=None, restriction=TimeRestriction(earliest, None, catchup))


def iterate(tt: MarketSessionTimetable, earliest: datetime, latest: datetime) -> list[DagRunInfo]:
    """All scheduled runs between earliest and latest, as the scheduler would chain them (catchup)."""
    infos: list[DagRunInfo] = []
    restriction = TimeRestriction(earliest, latest, True)
    last: DataInterval | None = None
    while (info := tt.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)) is not None:
        infos.append(info)
        last = info.data_interval
        assert len(infos) < 400, "runaway schedule"
    return infos


@pytest.fixture
def fake_now(monkeypatch: pytest.MonkeyPatch):
    """Sets the timetable's notion of now."""

    def set_now(value: datetime) -> None:
        monkeypatch.setattr(timetable_module, "_utcnow", lambda: value)

    return set_now


@pytest.mark.parametrize(
    ("code", "lead"),
    [pytest.param(code, TWO_HOURS, id=code) for code in DEFAULT_CODES]
    + [pytest.param("XNYS", NINETY_MINUTES, id="XNYS-90m"), pytest.param("XTKS", NINETY_MINUTES, id="XTKS-90m")],
)
def test_whole_year_runs_are_open_minus_lead_for_every_session(code: str, lead: timedelta) -> None:
    earliest, latest = utc(2026, 1, 1), utc(2026, 12, 31, 23, 59, 59)
    cal = exchange_calendars.get_calendar(code, start="2025-12-01", end="2027-01-31")
    expected_opens = [o.to_pydatetime() for o in cal.schedule["open"] if earliest <= o.to_pydatetime() - lead <= latest]
    infos = iterate(MarketSessionTimetable(code, lead), earliest, latest)
    assert [i.run_after for i in infos] == [o - lead for o in expected_opens]
    assert [i.data_interval for i in infos] == [(o - lead, o) for o in expected_opens]
    assert all(i.logical_date == i.run_after for i in infos)
    assert 230 < len(infos) < 260


NAMED_RUNS = [
    pytest.param("XNYS", TWO_HOURS, utc(2026, 3, 2), utc(2026, 3, 2, 12, 30), utc(2026, 3, 2, 14, 30), id="XNYS-EST"),
    pytest.param("XNYS", TWO_HOURS, utc(2026, 3, 7), utc(2026, 3, 9, 11, 30), utc(2026, 3, 9, 13, 30), id="XNYS-EDT"),
    pytest.param("XLON", TWO_HOURS, utc(2026, 3, 27), utc(2026, 3, 27, 6, 0), utc(2026, 3, 27, 8, 0), id="XLON-GMT"),
    pytest.param("XLON", TWO_HOURS, utc(2026, 3, 28), utc(2026, 3, 30, 5, 0), utc(2026, 3, 30, 7, 0), id="XLON-BST"),
    pytest.param(
        "XNYS", TWO_HOURS, utc(2026, 7, 2, 12), utc(2026, 7, 6, 11, 30), utc(2026, 7, 6, 13, 30), id="XNYS-jul-3-closed"
    ),
    pytest.param(
        "XLON", TWO_HOURS, utc(2026, 8, 29), utc(2026, 9, 1, 5, 0), utc(2026, 9, 1, 7, 0), id="XLON-bank-holiday"
    ),
    pytest.param(
        "BVMF", TWO_HOURS, utc(2026, 2, 14), utc(2026, 2, 18, 14, 0), utc(2026, 2, 18, 16, 0), id="BVMF-ash-wednesday"
    ),
    pytest.param(
        "BVMF", TWO_HOURS, utc(2026, 2, 18, 15), utc(2026, 2, 19, 11, 0), utc(2026, 2, 19, 13, 0), id="BVMF-thursday"
    ),
    pytest.param("XTKS", TWO_HOURS, utc(2026, 3, 7), utc(2026, 3, 8, 22, 0), utc(2026, 3, 9, 0, 0), id="XTKS-prev-day"),
    pytest.param("XNYS", NINETY_MINUTES, utc(2026, 3, 7), utc(2026, 3, 9, 12, 0), utc(2026, 3, 9, 13, 30), id="90m"),
    pytest.param(
        "XTKS", NINETY_MINUTES, utc(2026, 3, 7), utc(2026, 3, 8, 22, 30), utc(2026, 3, 9, 0, 0), id="XTKS-90m"
    ),
]


@pytest.mark.parametrize(("code", "lead", "earliest", "run_after", "opens"), NAMED_RUNS)
def test_named_runs(code: str, lead: timedelta, earliest: datetime, run_after: datetime, opens: datetime) -> None:
    info = first(MarketSessionTimetable(code, lead), earliest)
    assert info == DagRunInfo(run_after=run_after, data_interval=DataInterval(run_after, opens))


def test_next_run_follows_the_last_interval_and_skips_the_holiday() -> None:
    tt = MarketSessionTimetable("XNYS", TWO_HOURS)
    last = DataInterval(utc(2026, 7, 2, 11, 30), utc(2026, 7, 2, 13, 30))
    info = tt.next_dagrun_info(last_automated_data_interval=last, restriction=TimeRestriction(None, None, True))
    assert info is not None and info.run_after == utc(2026, 7, 6, 11, 30)


def test_lead_change_does_not_rerun_the_last_session() -> None:
    # last run was made with a 2h lead; the DAG now has 90m: the same session must not run again
    last = DataInterval(utc(2026, 3, 9, 11, 30), utc(2026, 3, 9, 13, 30))
    info = MarketSessionTimetable("XNYS", NINETY_MINUTES).next_dagrun_info(
        last_automated_data_interval=last, restriction=TimeRestriction(utc(2026, 1, 1), None, True)
    )
    assert info is not None and info.run_after == utc(2026, 3, 10, 12, 0)


def test_earliest_is_inclusive() -> None:
    tt = MarketSessionTimetable("XNYS", TWO_HOURS)
    assert first(tt, utc(2026, 3, 9, 11, 30)).run_after == utc(2026, 3, 9, 11, 30)
    assert first(tt, utc(2026, 3, 9, 11, 30, 1)).run_after == utc(2026, 3, 10, 11, 30)


CATCHUP_CASES = [
    # (now, earliest, last interval, catchup, expected run_after)
    pytest.param(utc(2026, 3, 9, 12), utc(2026, 1, 1), None, True, utc(2026, 1, 2, 12, 30), id="catchup-from-start"),
    pytest.param(
        utc(2026, 3, 9, 12), utc(2026, 1, 1), None, False, utc(2026, 3, 9, 11, 30), id="no-catchup-in-lead-window"
    ),
    pytest.param(
        utc(2026, 3, 9, 13, 30), utc(2026, 1, 1), None, False, utc(2026, 3, 10, 11, 30), id="no-catchup-at-open"
    ),
    pytest.param(
        utc(2026, 3, 9, 12),
        utc(2026, 1, 1),
        DataInterval(utc(2026, 1, 2, 12, 30), utc(2026, 1, 2, 14, 30)),
        False,
        utc(2026, 3, 9, 11, 30),
        id="no-catchup-skips-missed-sessions",
    ),
    pytest.param(
        utc(2026, 3, 9, 12),
        utc(2026, 1, 1),
        DataInterval(utc(2026, 1, 2, 12, 30), utc(2026, 1, 2, 14, 30)),
        True,
        utc(2026, 1, 5, 12, 30),
        id="catchup-continues-after-last",
    ),
    pytest.param(
        utc(2026, 3, 9, 12), utc(2026, 6, 1), None, False, utc(2026, 6, 1, 11, 30), id="no-catchup-future-start"
    ),
    pytest.param(utc(2026, 3, 9, 12), None, None, True, utc(2026, 3, 9, 11, 30), id="no-start-date-catchup"),
    pytest.param(utc(2026, 3, 9, 14), None, None, False, utc(2026, 3, 10, 11, 30), id="no-start-date-no-catchup"),
    pytest.param(
        utc(2026, 3, 9, 14),
        None,
        DataInterval(utc(2026, 3, 5, 12, 30), utc(2026, 3, 5, 14, 30)),
        True,
        utc(2026, 3, 6, 12, 30),
        id="no-start-date-with-last-run",
    ),
]


@pytest.mark.parametrize(("now", "earliest", "last", "catchup", "expected"), CATCHUP_CASES)
def test_catchup_and_earliest(
    fake_now,
    now: datetime,
    earliest: datetime | None,
    last: DataInterval | None,
    catchup: bool,
    expected: datetime,
) -> None:
    fake_now(now)
    info = MarketSessionTimetable("XNYS", TWO_HOURS).next_dagrun_info(
        last_automated_data_interval=last, restriction=TimeRestriction(earliest, None, catchup)
    )
    assert info is not None
    assert info.run_after == expected
    assert info.data_interval == DataInterval(expected, expected + TWO_HOURS)


def test_latest_stops_the_schedule() -> None:
    tt = MarketSessionTimetable("XNYS", TWO_HOURS)
    run = utc(2026, 3, 9, 11, 30)
    inclusive = tt.next_dagrun_info(last_automated_data_interval=None, restriction=TimeRestriction(run, run, True))
    assert inclusive is not None and inclusive.run_after == run
    before = TimeRestriction(run, run - timedelta(seconds=1), True)
    assert tt.next_dagrun_info(last_automated_data_interval=None, restriction=before) is None
    week = iterate(tt, utc(2026, 3, 9), utc(2026, 3, 13, 23, 59))
    assert [i.run_after.date() for i in week] == [date(2026, 3, d) for d in (9, 10, 11, 12, 13)]


@pytest.mark.parametrize(
    ("code", "run_after", "start", "end"),
    [
        pytest.param("XNYS", utc(2026, 3, 9, 5), utc(2026, 3, 9, 11, 30), utc(2026, 3, 9, 13, 30), id="before-run"),
        pytest.param("XNYS", utc(2026, 3, 9, 12), utc(2026, 3, 9, 11, 30), utc(2026, 3, 9, 13, 30), id="in-window"),
        pytest.param("XNYS", utc(2026, 3, 9, 13, 30), utc(2026, 3, 10, 11, 30), utc(2026, 3, 10, 13, 30), id="at-open"),
        pytest.param("XNYS", utc(2026, 7, 2, 21), utc(2026, 7, 6, 11, 30), utc(2026, 7, 6, 13, 30), id="holiday"),
        pytest.param("XTKS", utc(2026, 3, 8, 23), utc(2026, 3, 8, 22), utc(2026, 3, 9, 0), id="tokyo"),
    ],
)
def test_infer_manual_data_interval(code: str, run_after: datetime, start: datetime, end: datetime) -> None:
    tt = MarketSessionTimetable(code, TWO_HOURS)
    assert tt.infer_manual_data_interval(run_after=run_after) == DataInterval(start, end)


def test_run_ids() -> None:
    tt = MarketSessionTimetable("XTKS", TWO_HOURS)
    interval = DataInterval(utc(2026, 3, 8, 22), utc(2026, 3, 9, 0))
    assert (
        tt.generate_run_id(run_type=DagRunType.SCHEDULED, run_after=interval.start, data_interval=interval)
        == "session__2026-03-09"
    )
    # the id names the session even if the lead changed since the interval was computed
    assert (
        MarketSessionTimetable("XTKS", NINETY_MINUTES).generate_run_id(
            run_type=DagRunType.SCHEDULED, run_after=interval.start, data_interval=interval
        )
        == "session__2026-03-09"
    )
    triggered = utc(2026, 3, 8, 23, 5)
    manual = tt.generate_run_id(run_type=DagRunType.MANUAL, run_after=triggered, data_interval=interval)
    assert manual == f"manual__{triggered.isoformat()}"
    backfill = tt.generate_run_id(run_type=DagRunType.BACKFILL_JOB, run_after=interval.start, data_interval=interval)
    assert backfill == f"backfill__{interval.start.isoformat()}"


@pytest.mark.parametrize(
    ("code", "lead", "payload", "summary"),
    [
        pytest.param("XNYS", TWO_HOURS, {"market_code": "XNYS", "lead_seconds": 7200}, "2h before XNYS open", id="2h"),
        pytest.param(
            "XTKS", NINETY_MINUTES, {"market_code": "XTKS", "lead_seconds": 5400}, "90m before XTKS open", id="90m"
        ),
    ],
)
def test_serialize_round_trip(code: str, lead: timedelta, payload: dict, summary: str) -> None:
    tt = MarketSessionTimetable(code, lead)
    assert tt.serialize() == payload
    back = MarketSessionTimetable.deserialize(json.loads(json.dumps(tt.serialize())))
    assert back == tt and back.market_code == code and back.lead == lead
    assert back != MarketSessionTimetable(code, lead + timedelta(minutes=1))
    assert tt.summary == summary
    assert tt.description.startswith(f"{summary.split()[0]} before each {code} session opens")


@pytest.mark.parametrize(
    ("tt", "fragment"),
    [
        pytest.param(MarketSessionTimetable("XNYS", timedelta(0)), "more than 0", id="zero-lead"),
        pytest.param(MarketSessionTimetable("XNYS", timedelta(hours=24)), "less than 24h", id="day-lead"),
        pytest.param(MarketSessionTimetable("XNYZ", TWO_HOURS), "unknown calendar code 'XNYZ'", id="bad-code"),
    ],
)
def test_validate_rejects(tt: MarketSessionTimetable, fragment: str) -> None:
    with pytest.raises(AirflowTimetableInvalid, match=fragment):
        tt.validate()


def test_plugin_registers_the_timetable_with_airflows_loader() -> None:
    from airflow._shared.plugins_manager.plugins_manager import _load_plugins_from_plugin_directory

    try:
        plugins, errors = _load_plugins_from_plugin_directory(str(REPO / "plugins"))
    finally:
        sys.modules.pop("__init__", None)  # Airflow names a package plugin's module after its file
    assert errors == {}
    ours = [p for p in plugins if p.name == "overnight_timetables"]
    assert len(ours) == 1
    assert ours[0].timetables == [MarketSessionTimetable]  # same class object: qualname matches what DAGs use


def test_dag_serialization_round_trip(monkeypatch: pytest.MonkeyPatch, fake_now) -> None:
    from airflow import plugins_manager
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    monkeypatch.setattr(
        plugins_manager,
        "get_timetables_plugins",
        lambda: {"overnight.night.timetable.MarketSessionTimetable": MarketSessionTimetable},
    )
    fake_now(utc(2026, 3, 9, 12))
    with DAG(
        "overnight_scoring_xnys",
        schedule=MarketSessionTimetable("XNYS", TWO_HOURS),
        start_date=utc(2026, 1, 1),
        catchup=False,
    ) as dag:
        pass
    data = DagSerialization.to_dict(dag)
    assert data["dag"]["timetable"] == {
        "__type": "overnight.night.timetable.MarketSessionTimetable",
        "__var": {"market_code": "XNYS", "lead_seconds": 7200},
    }
    restored = DagSerialization.from_dict(data)
    assert restored.timetable == MarketSessionTimetable("XNYS", TWO_HOURS)
    info = restored.next_dagrun_info(last_automated_run_info=None)
    assert info is not None and info.run_after == utc(2026, 3, 9, 11, 30)

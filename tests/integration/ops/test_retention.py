"""Audit retention against the real Postgres: back-dated chunks of events, rows from before migration 0011,
partitions and job runs; exactly the old go."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from overnight.ops import retention
from overnight.ops.retention import Partition
from tests.support import reliability as R

DAYS = 730


def _now() -> datetime:
    """Today at noon on the 15th: close to the real now, with the cutoff well inside a month."""
    return datetime.now(UTC).replace(day=15, hour=12, minute=0, second=0, microsecond=0)


def _month(d: datetime, offset: int) -> date:
    index = d.year * 12 + d.month - 1 + offset
    return date(index // 12, index % 12 + 1, 1)


def _part(d: date) -> str:
    return f"calculation_chunks_{d:%Y_%m}"


def _exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def _event(conn: psycopg.Connection, corr: uuid.UUID, at: datetime) -> uuid.UUID:
    """A chunk of one user's CALC_STARTED and document created at `at`; returns its chunk id."""
    chunk_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO calculation_chunks (chunk_id, created_at, job_run_id, correlation_id, session_date, user_ids,"
        " events, generated_at, documents) VALUES (%s, %s, %s, %s, %s, ARRAY[%s::uuid], %s, ARRAY[%s::timestamptz],"
        " ARRAY['{}'])",
        (chunk_id, at, uuid.uuid4(), corr, at.date(), uuid.uuid4(),
         json.dumps([[["CALC_STARTED", 0, {"test": "retention"}]]]), at))
    return chunk_id


def _row_event(conn: psycopg.Connection, corr: uuid.UUID, at: datetime) -> uuid.UUID:
    """An event row as written before migration 0011 (`calculation_events_rows`); returns its id."""
    event_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO calculation_events_rows (event_id, correlation_id, user_id, event_type, payload, created_at)"
        " VALUES (%s, %s, %s, 'CALC_STARTED', %s, %s)",
        (event_id, corr, uuid.uuid4(), json.dumps({"test": "retention"}), at),
    )
    return event_id


def _job_run(conn: psycopg.Connection, started: datetime, users: int) -> uuid.UUID:
    job_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO overnight_job_runs (id, job_type, status, started_at, completed_at, correlation_id, market,"
        " session_date) VALUES (%s, 'scoring', 'completed', %s, %s, %s, 'XNYS', %s)",
        (job_id, started, started + timedelta(minutes=5), uuid.uuid4(), started.date()),
    )
    for _ in range(users):
        conn.execute("INSERT INTO overnight_job_users (job_run_id, user_id, status) VALUES (%s, %s, 'completed')",
                     (job_id, uuid.uuid4()))
    conn.execute("INSERT INTO overnight_job_prices (job_run_id, symbol, price, currency, as_of, source)"
                 " VALUES (%s, 'AAPL', 187.5, 'USD', %s, 'test')", (job_id, started))
    conn.execute("INSERT INTO overnight_job_assets (job_run_id, asset_id, symbol, market, class_name, currency,"
                 " fundamentals) VALUES (%s, 1, 'AAPL', 'XNYS', 'Stocks', 'USD', '{}')", (job_id,))
    return job_id


def _document(conn: psycopg.Connection, job_id: uuid.UUID, at: datetime) -> uuid.UUID:
    """A document row as written before migration 0011 (`recommendation_history_rows`); returns its user id."""
    user_id = uuid.uuid4()
    conn.execute("INSERT INTO recommendation_history_rows (user_id, generated_at, job_run_id, session_date, document)"
                 " VALUES (%s, %s, %s, %s, '{}')", (user_id, at, job_id, at.date()))
    return user_id


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        pytest.param("DEFAULT", Partition("p", None, None, True), id="default"),
        pytest.param(
            "FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00')",
            Partition("p", datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)), id="utc"),
        pytest.param(
            "FOR VALUES FROM ('2024-01-01 01:00:00+01') TO (MAXVALUE)",
            Partition("p", datetime(2024, 1, 1, tzinfo=UTC), None), id="offset-and-maxvalue"),
    ],
)
def test_parse_partition(expr: str, expected: Partition) -> None:
    assert retention.parse_partition("p", expr) == expected


def test_plan_drops_only_partitions_wholly_before_the_cutoff() -> None:
    cutoff = datetime(2024, 3, 15, 12, tzinfo=UTC)
    parts = [
        Partition("jan", datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)),
        Partition("feb", datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        Partition("mar", datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)),
        Partition("apr", datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 5, 1, tzinfo=UTC)),
        Partition("edge", datetime(2024, 2, 15, 12, tzinfo=UTC), cutoff),
        Partition("default", None, None, True),
    ]
    drop, trim = retention.plan(parts, cutoff)
    assert [p.name for p in drop] == ["jan", "feb", "edge"]
    assert [p.name for p in trim] == ["mar", "default"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, 730, id="default"),
        pytest.param({"OVERNIGHT_RETENTION_DAYS": " 400 "}, 400, id="set"),
        pytest.param({"OVERNIGHT_RETENTION_DAYS": "two years"}, ValueError, id="not-a-number"),
        pytest.param({"OVERNIGHT_RETENTION_DAYS": "7"}, ValueError, id="too-short"),
    ],
)
def test_retention_days(env: dict[str, str], expected: int | type[Exception]) -> None:
    if isinstance(expected, int):
        assert retention.retention_days(env) == expected
    else:
        with pytest.raises(expected, match="OVERNIGHT_RETENTION_DAYS"):
            retention.retention_days(env)


@pytest.fixture
def own_dsn() -> Iterator[str]:
    """A migrated application database of the test's own: every row the retention sees, the test wrote."""
    with R.scratch_database("retention") as dsn:
        yield dsn


def test_removes_exactly_what_is_older_than_the_cutoff(own_dsn: str) -> None:
    now = _now()
    cutoff = retention.cutoff_for(now, DAYS)
    corr = uuid.uuid4()  # this test's own events
    with psycopg.connect(own_dsn) as conn:
        first = _month(cutoff, -2)
        conn.execute("SELECT ensure_event_partitions(%s, 4)", (first,))  # cutoff month -2 .. +1
        conn.commit()
        old_default_at = now - timedelta(days=5 * 365)  # no partition that far back: the DEFAULT one
        young_default_at = now - timedelta(days=500)  # between the old test partitions and the live ones
        events = {
            "two months before": (_event(conn, corr, cutoff - timedelta(days=45)), False),
            "a day before": (_event(conn, corr, cutoff - timedelta(days=1)), False),
            "a second before": (_event(conn, corr, cutoff - timedelta(seconds=1)), False),
            "at the cutoff": (_event(conn, corr, cutoff), True),
            "a second after": (_event(conn, corr, cutoff + timedelta(seconds=1)), True),
            "a day after": (_event(conn, corr, cutoff + timedelta(days=1)), True),
            "old in default": (_event(conn, corr, old_default_at), False),
            "young in default": (_event(conn, corr, young_default_at), True),
            "now": (_event(conn, corr, now), True),
        }
        where = dict(conn.execute(
            "SELECT chunk_id, tableoid::regclass::text FROM calculation_chunks WHERE correlation_id = %s", (corr,)
        ).fetchall())
        assert where[events["old in default"][0]] == "calculation_chunks_default"
        assert where[events["young in default"][0]] == "calculation_chunks_default"
        rows = {  # written before migration 0011: retained alike (no partition that old: the DEFAULT one)
            "two months before": (_row_event(conn, corr, cutoff - timedelta(days=45)), False),
            "a second before": (_row_event(conn, corr, cutoff - timedelta(seconds=1)), False),
            "now": (_row_event(conn, corr, now), True),
        }
        assert where[events["a second before"][0]] == _part(_month(cutoff, 0))  # the straddling partition
        old_run = _job_run(conn, cutoff - timedelta(days=10), users=3)
        edge_run = _job_run(conn, cutoff + timedelta(minutes=1), users=2)
        young_run = _job_run(conn, now - timedelta(days=1), users=2)
        documents = {  # the older history rows are retained as the events are
            "two months before": (_document(conn, old_run, cutoff - timedelta(days=45)), False),
            "a second before": (_document(conn, old_run, cutoff - timedelta(seconds=1)), False),
            "at the cutoff": (_document(conn, edge_run, cutoff), True),
            "now": (_document(conn, young_run, now), True),
        }
        conn.commit()
        coming = [_part(_month(now, offset)) for offset in range(4)]  # this month and the next three
        missing = [name for name in coming if not _exists(conn, name)]

        result = retention.run(conn, now=now, days=DAYS)

        left = {r[0] for r in conn.execute(
            "SELECT chunk_id FROM calculation_chunks WHERE correlation_id = %s", (corr,))}
        for label, (chunk_id, kept) in events.items():
            assert (chunk_id in left) is kept, label
        left_rows = {r[0] for r in conn.execute(
            "SELECT event_id FROM calculation_events_rows WHERE correlation_id = %s", (corr,))}
        for label, (event_id, kept) in rows.items():
            assert (event_id in left_rows) is kept, label
        # the view shows what is left of both
        assert conn.execute("SELECT count(*) FROM calculation_events WHERE correlation_id = %s", (corr,)
                            ).fetchone()[0] == len(left) + len(left_rows)
        assert not _exists(conn, _part(first)) and not _exists(conn, _part(_month(cutoff, -1)))
        assert _exists(conn, _part(_month(cutoff, 0))) and _exists(conn, _part(_month(cutoff, 1)))
        for offset in range(4):  # this month and the next three
            assert _exists(conn, _part(_month(now, offset)))
        runs = {r[0] for r in conn.execute("SELECT id FROM overnight_job_runs WHERE id = ANY(%s)",
                                           ([old_run, edge_run, young_run],))}
        assert runs == {edge_run, young_run}
        users = dict(conn.execute("SELECT job_run_id, count(*) FROM overnight_job_users WHERE job_run_id = ANY(%s)"
                                  " GROUP BY job_run_id", ([old_run, edge_run, young_run],)).fetchall())
        assert users == {edge_run: 2, young_run: 2}
        priced = {r[0] for r in conn.execute("SELECT job_run_id FROM overnight_job_prices WHERE job_run_id = ANY(%s)",
                                             ([old_run, edge_run, young_run],))}
        assert priced == {edge_run, young_run}  # a job run's price snapshot goes with it
        snapped = {r[0] for r in conn.execute("SELECT job_run_id FROM overnight_job_assets WHERE job_run_id = ANY(%s)",
                                              ([old_run, edge_run, young_run],))}
        assert snapped == {edge_run, young_run}  # ... and its asset snapshot
        kept_docs = {r[0] for r in conn.execute("SELECT user_id FROM recommendation_history WHERE user_id = ANY(%s)",
                                                ([u for u, _ in documents.values()],))}
        for label, (user_id, kept) in documents.items():
            assert (user_id in kept_docs) is kept, label

    # The database holds only this test's rows. The cutoff is the 14th or 15th at noon, so "two months before"
    # (cutoff - 45 days) lies in a wholly dropped month, "a day before" and "a second before" in the cutoff's month.
    # The rows from before migration 0011 have partitions around the migration's month only: theirs are in DEFAULT.
    assert result == {
        "cutoff": cutoff.isoformat(),
        "retention_days": DAYS,
        "partitions_created": len(missing),
        "partitions_dropped": [_part(first), _part(_month(cutoff, -1))],
        "chunk_rows_in_dropped_partitions": 1,  # two months before
        "chunk_rows_deleted": 3,
        "chunk_rows_deleted_by_partition": {_part(_month(cutoff, 0)): 2, "calculation_chunks_default": 1},
        "event_rows_in_dropped_partitions": 0,
        "event_rows_deleted": 2,  # two months before, a second before
        "event_rows_deleted_by_partition": {"calculation_events_default": 2},
        "history_rows_in_dropped_partitions": 0,
        "history_rows_deleted": 2,  # two months before, a second before
        "job_runs_deleted": 1,  # old_run
        "job_users_deleted": 3,  # its three users
    }

    with psycopg.connect(own_dsn) as conn:
        again = retention.run(conn, now=now, days=DAYS)
        assert len(left) == sum(kept for _, kept in events.values())
    assert again["partitions_dropped"] == []
    assert again["chunk_rows_deleted"] == 0 and again["chunk_rows_in_dropped_partitions"] == 0
    assert again["event_rows_deleted"] == 0 and again["history_rows_deleted"] == 0
    assert again["job_runs_deleted"] == 0 and again["job_users_deleted"] == 0
    assert again["partitions_created"] == 0

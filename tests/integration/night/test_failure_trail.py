"""Every served user leaves a trace in the event store (issue 27, docs/audit.md): a failed attempt writes CALC_STARTED
and CALC_FAILED (stage, reason), a completed user exactly the four events of its calculation; the job run's error
summary is capped, the trail is not; and the spans carry the failure's cause."""

from __future__ import annotations

from datetime import date
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from overnight.domain.markets import get_market
from overnight.night import replay, runtime, telemetry, writing
from tests.support import pipeline_run
from tests.support.failing_prices import ProviderDownFor

MARKET = "XLON"
SESSION = date(2026, 10, 14)  # a Wednesday; no other test runs this session
BAD_KEY = "no-such-criteria"
REASON = f"criteria '{BAD_KEY}' has no version; add one"  # calculate.prepare_user's words
FOUR = ["CALC_STARTED", "INPUTS_CAPTURED", "SCORES_COMPUTED", "CALC_COMPLETED"]


def _served(conn: psycopg.Connection, market: str, session: date) -> list[str]:
    where, params = pipeline_run.audience(market, session).where()
    return [r[0] for r in conn.execute(f"SELECT u.id::text FROM users u WHERE {where} ORDER BY u.id", params)]


def _trail(conn: psycopg.Connection, correlation_id: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for uid, etype, payload in conn.execute(
            "SELECT user_id::text, event_type, payload FROM calculation_events WHERE correlation_id = %s"
            " ORDER BY user_id, created_at", (correlation_id,)):
        out.setdefault(uid, []).append((etype, payload))
    return out


@pytest.fixture
def victims(conn: psycopg.Connection, seeded: dict[str, int]) -> Any:
    """The first three users XLON serves on SESSION, their criteria key broken (put back after the test)."""
    served = _served(conn, MARKET, SESSION)
    chosen = served[:3]
    keys = dict(conn.execute("SELECT id::text, criteria_key FROM users WHERE id = ANY(%s::uuid[])", (chosen,)).fetchall())
    conn.execute("UPDATE users SET criteria_key = %s WHERE id = ANY(%s::uuid[])", (BAD_KEY, chosen))
    conn.commit()
    yield served, chosen, keys
    for uid, key in keys.items():
        conn.execute("UPDATE users SET criteria_key = %s WHERE id = %s", (key, uid))
    conn.commit()


def test_a_failed_user_has_started_and_failed_events_and_completed_users_exactly_four(
        conn: psycopg.Connection, victims: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    served, chosen, keys = victims
    monkeypatch.setattr(writing, "MAX_ERROR_DETAILS", 2)  # the summary's cap, lowered: 3 failures overflow it
    run = pipeline_run.run_pipeline(conn, MARKET, SESSION, "test-trail", force=True, batch_size=100)
    job = run.job
    trail = _trail(conn, job.correlation_id)
    for uid in chosen:
        assert trail[uid] == [
            ("CALC_STARTED", {"market": MARKET, "sessionDate": SESSION.isoformat(), "jobRunId": job.id,
                              "criteriaKey": BAD_KEY}),
            ("CALC_FAILED", {"stage": "criteria", "reason": REASON, "jobRunId": job.id})]
    completed = [u for u in served if u not in chosen]
    assert sorted(trail) == sorted(served)  # every served user is in the trail, failed ones included
    assert all([t for t, _ in trail[u]] == FOUR for u in completed)
    assert (run.summary["status"], run.summary["users_processed"], run.summary["users_failed"]) == (
        "partial", len(completed), 3)
    details = conn.execute("SELECT error_details FROM overnight_job_runs WHERE id = %s", (job.id,)).fetchone()[0]
    assert [u["userId"] for u in details["users"]] == chosen[:2]  # the summary is capped; the trail has all three
    # a failed user has no calculation to replay: the answer names the stage, as before
    with pytest.raises(replay.UnknownCalculation, match=f"at stage 'criteria' \\({REASON}\\)"):
        replay.replay_user(conn, job.correlation_id, chosen[0])

    # continuing the job run while they still fail the same way adds nothing to the trail
    pipeline_run.run_pipeline(conn, MARKET, SESSION, "test-trail-again", job=job, batch_size=100)
    assert _trail(conn, job.correlation_id) == trail

    # fixed, the next continuation completes them: the failed attempt stays, then the four of the calculation
    for uid, key in keys.items():
        conn.execute("UPDATE users SET criteria_key = %s WHERE id = %s", (key, uid))
    conn.commit()
    done = pipeline_run.run_pipeline(conn, MARKET, SESSION, "test-trail-fixed", job=job, batch_size=100)
    assert (done.summary["status"], done.summary["users_processed"], done.summary["users_failed"]) == (
        "completed", len(served), 0)
    after = _trail(conn, job.correlation_id)
    for uid in chosen:
        assert [t for t, _ in after[uid]] == ["CALC_STARTED", "CALC_FAILED", *FOUR]
        assert after[uid][2][1]["criteriaKey"] == keys[uid]
        assert replay.replay_user(conn, job.correlation_id, uid).status == "identical"
    assert all(after[u] == trail[u] for u in completed)


def test_users_no_try_of_their_batch_reached_are_failed_at_stage_batch_with_their_trail(
        conn: psycopg.Connection, seeded: dict[str, int]) -> None:
    session = date(2026, 10, 16)  # a Friday no other test runs
    served = _served(conn, MARKET, session)
    run = pipeline_run.start(conn, MARKET, session, "test-unattempted", force=True, batch_size=len(served))
    symbols = [r[0] for r in conn.execute(
        "SELECT a.symbol FROM holdings h JOIN assets a ON a.id = h.asset_id WHERE h.user_id = %s", (served[0],))]
    run = pipeline_run.score_all(conn, run, prices=ProviderDownFor(conn, set(symbols)), tolerate=(ConnectionError,))
    job, [batch] = run.job, run.batches
    assert run.results == [None] and (run.summary["status"], run.summary["users_failed"]) == ("failed", len(served))
    reason = (f"its batch ({batch['label']}) did not finish: its task failed on every try before reaching this user"
              " (see that task's log)")
    trail = _trail(conn, job.correlation_id)
    assert sorted(trail) == served
    assert all([(t, p.get("stage"), p.get("reason")) for t, p in trail[u]] == [
        ("CALC_STARTED", None, None), ("CALC_FAILED", "batch", reason)] for u in served)
    assert run.summary["failure_cause"] == f"no user of {len(served)} completed: {len(served)} failed ({len(served)} at batch)"
    writing.finalize(conn, job, planned=run.batches, results=[None], rates=run.rates.to_xcom())  # finalize retried
    assert _trail(conn, job.correlation_id) == trail  # nothing twice

    again = pipeline_run.run_pipeline(conn, MARKET, session, "test-unattempted-again", job=job,
                                      batch_size=len(served))
    assert (again.summary["status"], again.summary["users_processed"]) == ("completed", len(served))
    after = _trail(conn, job.correlation_id)
    assert all([t for t, _ in after[u]] == ["CALC_STARTED", "CALC_FAILED", *FOUR] for u in served)


@pytest.fixture
def spans() -> Any:
    """The spans the package records, kept in memory."""
    telemetry.set_provider(provider := telemetry.new_provider())
    provider.add_span_processor(SimpleSpanProcessor(exporter := InMemorySpanExporter()))
    yield exporter
    telemetry.set_provider(None)


def test_a_failed_job_spans_status_carries_its_cause(conn: psycopg.Connection, victims: Any, spans: Any) -> None:
    _, chosen, _ = victims
    market = get_market(MARKET)
    run = runtime.validate_params(market, {}, {"session_date": SESSION.isoformat(), "force": True,
                                               "user_ids": chosen}, interval_end=None, run_after=None)
    job = runtime.start(market, run, "test-span-cause")
    rates = runtime.fetch_rates(job)
    batches = runtime.plan(market, run, pipeline_run.CODES, job)
    summary = runtime.finalize(job, batches, [runtime.score_batch(b, job, rates, run.to_xcom()) for b in batches],
                               rates)
    assert summary is not None and summary["status"] == "failed"
    [span] = [s for s in spans.get_finished_spans() if s.name == telemetry.JOB_SPAN]
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "no user of 3 completed: 3 failed (3 at criteria)"


def test_starts_failure_records_a_span_with_its_cause(spans: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    market = get_market(MARKET)
    run = runtime.validate_params(market, {}, {"session_date": SESSION.isoformat()}, interval_end=None,
                                  run_after=None)
    monkeypatch.setenv("AIRFLOW_CONN_OVERNIGHT_POSTGRES", "postgresql://nobody@127.0.0.1:1/none")  # nothing listens
    with pytest.raises(psycopg.OperationalError) as raised:
        runtime.start(market, run, "test-start-fails")
    [span] = spans.get_finished_spans()
    assert (span.name, span.status.status_code) == (telemetry.JOB_SPAN, StatusCode.ERROR)
    assert span.status.description == f"OperationalError: {raised.value}"[:1000]
    assert (span.attributes["stage"], span.attributes["market"], span.attributes["session_date"],
            span.attributes["dag_run_id"]) == ("start", MARKET, SESSION.isoformat(), "test-start-fails")
    assert [e.name for e in span.events] == ["exception"]


"""The job span and its batch children, captured with an in-memory exporter from a real run."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from overnight.domain.markets import get_market
from overnight.night import runtime, telemetry


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = telemetry.new_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.set_provider(provider)
    yield exporter
    telemetry.set_provider(None)


def test_job_span_with_batch_children(seeded, spans):
    market = get_market("XTKS")
    run = runtime.validate_params(market, {"batch_size": 50}, {"session_date": "2026-12-04", "force": True},
                                  interval_end=None, run_after=None)
    job = runtime.start(market, run, "otel-test")
    rates = runtime.fetch_rates(job)
    batches = runtime.plan(market, run, ["BVMF", "XLON", "XNYS", "XTKS"], job)
    results = [runtime.score_batch(b, job, rates, run.to_xcom()) for b in batches]
    summary = runtime.finalize(job, batches, results, rates)
    finished = spans.get_finished_spans()
    jobs = [s for s in finished if s.name == "overnight-scoring-job"]
    kids = [s for s in finished if s.name == "overnight-scoring-batch"]
    assert len(jobs) == 1 and len(kids) == len(batches) > 1
    j = jobs[0]
    assert j.attributes["users_total"] == summary["users_total"] > 0
    assert j.attributes["users_success"] == summary["users_processed"]
    import os

    import psycopg

    from tests.support import reliability as R

    with psycopg.connect(os.environ["AIRFLOW_CONN_OVERNIGHT_POSTGRES"]) as conn:
        served = len(R.served(conn, "XTKS", run.session_date))
        metrics = conn.execute("SELECT metrics FROM overnight_job_runs WHERE id = %s", (job["id"],)).fetchone()[0]
        from overnight.night import trail

        scored = sum(len(p["scores"]) for _, _, t, p, _ in trail.read_calculated(conn, job["correlation_id"])
                     if t == "SCORES_COMPUTED")
        recommended = conn.execute("SELECT sum(jsonb_array_length(document::jsonb -> 'recommendations'))::int"
                                   " FROM recommendation_history WHERE job_run_id = %s", (job["id"],)).fetchone()[0]
    assert {key: j.attributes[key] for key in ("users_total", "users_success", "users_failed", "assets_scored",
                                               "recommendations_generated")} == {
        "users_total": served, "users_success": served, "users_failed": 0,  # the seed's users all calculate
        "assets_scored": scored, "recommendations_generated": recommended}
    for key in ("fetch_rates_ms", "process_users_ms", "cache_warm_ms"):  # the timings the job run recorded
        assert j.attributes[key] == metrics[key], key
    for k in kids:
        assert k.parent is not None and k.parent.span_id == j.context.span_id
        assert k.context.trace_id == j.context.trace_id
    assert sum(k.attributes["completed"] for k in kids) == summary["users_processed"]


def test_inside_airflows_task_span_the_nights_spans_are_its_children(spans):
    """With `[traces] otel_on`, Airflow's task runner makes `worker.<task>` the current span around the task
    (airflow.sdk.execution_time.task_runner._make_task_span): the batch and job spans hang under it, in its
    trace, and carry the correlation id and a link to the job span the run's other tasks name."""
    import uuid

    cid = str(uuid.uuid4())
    airflow_tracer = telemetry.provider().get_tracer("airflow.sdk.execution_time.task_runner")
    with airflow_tracer.start_as_current_span("worker.score_batch[2]") as task_span:
        telemetry.batch_span(cid, {"completed": 7, "started_at": 1.0e9, "ended_at": 1.0e9 + 2})
    with airflow_tracer.start_as_current_span("worker.finalize") as finalize_span:
        telemetry.job_span(cid, "2026-12-04T00:00:00+00:00", {"users_total": 7}, failed=False)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    batch, job = by_name["overnight-scoring-batch"], by_name["overnight-scoring-job"]
    job_trace, job_span_id = telemetry.job_ids(cid)
    for span, parent in ((batch, task_span), (job, finalize_span)):
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
        assert span.context.trace_id == parent.get_span_context().trace_id != job_trace
        assert span.attributes["overnight.correlation_id"] == cid
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [(job_trace, job_span_id)]
    assert batch.attributes["completed"] == 7 and batch.start_time == 1_000_000_000_000_000_000
    assert job.attributes["users_total"] == 7

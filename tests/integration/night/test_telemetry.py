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
        scored = conn.execute("SELECT count(*) FROM calculation_events e, jsonb_object_keys(e.payload -> 'scores')"
                              " WHERE e.correlation_id = %s AND e.event_type = 'SCORES_COMPUTED'",
                              (job["correlation_id"],)).fetchone()[0]
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

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
    for key in ("fetch_rates_ms", "process_users_ms", "cache_warm_ms", "users_failed", "assets_scored",
                "recommendations_generated"):
        assert key in j.attributes
    for k in kids:
        assert k.parent is not None and k.parent.span_id == j.context.span_id
        assert k.context.trace_id == j.context.trace_id
    assert sum(k.attributes["completed"] for k in kids) == summary["users_processed"]

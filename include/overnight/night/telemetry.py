"""OpenTelemetry: one `overnight-scoring-job` span per job run, one `overnight-scoring-batch` span per batch.

With Airflow's traces on (`[traces] otel_on`), Airflow 3.3's task runner opens a span around each task
(`worker.score_batch[3]`, ...) with the tracer provider it configured: the night's spans are then its
children, in the DAG run's trace, exported by Airflow's exporter, and each carries the correlation id
(`overnight.correlation_id`) and a link to the job span. Without it (no task span), the job span's ids are
derived from the correlation id: every batch span names it as its (remote) parent, and finalize records the
job span itself with those ids; this package's own provider exports when OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

JOB_SPAN = "overnight-scoring-job"
_lock = threading.Lock()
_provider: TracerProvider | None = None


class _Ids(RandomIdGenerator):
    """Random ids, except for the one span whose ids are pinned (the job span)."""

    def __init__(self) -> None:
        self.pinned = threading.local()

    def generate_span_id(self) -> int:
        return getattr(self.pinned, "span_id", None) or super().generate_span_id()

    def generate_trace_id(self) -> int:
        return getattr(self.pinned, "trace_id", None) or super().generate_trace_id()


_ids = _Ids()


def set_provider(provider: TracerProvider | None) -> None:
    """Replaces the tracer provider (tests pass one with an in-memory exporter)."""
    global _provider
    _provider = provider


def new_provider() -> TracerProvider:
    """Returns a provider using this module's id generator (for tests and for `provider()`)."""
    return TracerProvider(resource=Resource.create({"service.name": "overnight"}), id_generator=_ids)


def _airflow_task_span() -> trace.Span | None:
    """The span Airflow's task runner opened around this task (`[traces] otel_on`), else None."""
    span = trace.get_current_span()
    return span if span.get_span_context().is_valid else None


def provider() -> Any:
    """Returns the tracer provider: a test's, else Airflow's when its traces are on (the task span's), else the
    package's own, exporting over OTLP when an endpoint is configured."""
    global _provider
    with _lock:
        if _provider is None and _airflow_task_span() is not None:
            return trace.get_tracer_provider()  # Airflow configured it (configure_otel): its exporter
        if _provider is None:
            _provider = new_provider()
            if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return _provider


def job_ids(correlation_id: str) -> tuple[int, int]:
    """Returns (trace id, span id) of a job run's span, derived from its correlation id."""
    trace_id = uuid.UUID(correlation_id).int
    span_id = uuid.uuid5(uuid.UUID(correlation_id), "job-span").int >> 64
    return trace_id, span_id or 1


def _job_context(correlation_id: str) -> SpanContext:
    trace_id, span_id = job_ids(correlation_id)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _set_attributes(span: trace.Span, correlation_id: str | None, attributes: Mapping[str, Any]) -> None:
    if correlation_id is not None:
        span.set_attribute("overnight.correlation_id", correlation_id)
    for k, v in attributes.items():
        if isinstance(v, str | int | float | bool):
            span.set_attribute(k, v)


def _flush() -> None:
    flush = getattr(provider(), "force_flush", None)
    if flush is not None:
        flush(2000)


def _failed(span: Any, cause: str | BaseException | None) -> None:
    """Marks the span ERROR with the failure's cause as its description (an exception also as an event)."""
    if isinstance(cause, BaseException):
        span.record_exception(cause)
        cause = f"{type(cause).__name__}: {cause}"
    span.set_status(Status(StatusCode.ERROR, (cause or "overnight job failed")[:1000]))


def batch_span(correlation_id: str, attributes: Mapping[str, Any], error: BaseException | None = None) -> None:
    """Records a finished batch: a child of Airflow's task span when there is one, else of the job span; a
    batch that raised `error` has it as its status."""
    tracer = provider().get_tracer("overnight")
    start_ns = int(float(attributes.get("started_at", 0)) * 1e9) or None
    end_ns = int(float(attributes.get("ended_at", 0)) * 1e9) or None
    job = _job_context(correlation_id)
    if _airflow_task_span() is not None:  # the current context: Airflow's task span
        span = tracer.start_span("overnight-scoring-batch", start_time=start_ns, links=[Link(job)])
    else:
        parent = trace.set_span_in_context(NonRecordingSpan(job))
        span = tracer.start_span("overnight-scoring-batch", context=parent, start_time=start_ns)
    _set_attributes(span, correlation_id, attributes)
    if error is not None:
        _failed(span, error)
    span.end(end_time=end_ns)
    _flush()


def failed_start_span(attributes: Mapping[str, Any], exc: BaseException) -> None:
    """Records `start`'s failure (no job run, so no correlation id) with its cause: a child of Airflow's task
    span when there is one, else a trace of its own."""
    tracer = provider().get_tracer("overnight")
    if _airflow_task_span() is not None:
        span = tracer.start_span(JOB_SPAN)
    else:
        span = tracer.start_span(JOB_SPAN, context=trace.set_span_in_context(trace.INVALID_SPAN))
    span.set_attribute("stage", "start")
    _set_attributes(span, None, attributes)
    _failed(span, exc)
    span.end()
    _flush()


def job_span(correlation_id: str, started_at: str, attributes: Mapping[str, Any], failed: bool,
             cause: str | None = None) -> None:
    """Records the job run's span (start: the job's start; end: now) with its timing breakdown: a child of
    Airflow's `finalize` task span when there is one, else with the ids derived from the correlation id; a
    failed job's status carries `cause`."""
    tracer = provider().get_tracer("overnight")
    start_ns = int(datetime.fromisoformat(started_at).timestamp() * 1e9)
    if _airflow_task_span() is not None:
        span = tracer.start_span(JOB_SPAN, start_time=start_ns, links=[Link(_job_context(correlation_id))])
    else:
        trace_id, span_id = job_ids(correlation_id)
        _ids.pinned.trace_id, _ids.pinned.span_id = trace_id, span_id
        try:
            span = tracer.start_span(JOB_SPAN, context=trace.set_span_in_context(trace.INVALID_SPAN),
                                     start_time=start_ns)
        finally:
            _ids.pinned.trace_id = _ids.pinned.span_id = None
    _set_attributes(span, correlation_id, attributes)
    if failed:
        _failed(span, cause)
    span.end()
    _flush()

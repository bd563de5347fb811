"""Writing a night's results: events, documents and user rows in one transaction per chunk (each table one
statement of binary arrays), and the job run's outcome (`finalize`)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from overnight.domain.markets import load_markets
from overnight.domain.sessions import earlier_markets
from overnight.night import trail
from overnight.night.jobrun import (
    FAILED_EVENT,
    MAX_ERROR_DETAILS,
    Audience,
    JobRun,
    UserResult,
    _encode,
)

log = logging.getLogger(__name__)


def _write_snapshots(conn: psycopg.Connection, job: JobRun, chunk: trail.Chunk, offered: dict[str, Any]) -> None:
    """The snapshot rows the chunk's events point at that this batch has not offered yet (`offered`, the batch's:
    each is offered once per batch, and kept once per job run by ON CONFLICT DO NOTHING), committed at once, before
    the chunk's own transaction: another batch offering the same row waits for a commit of this short one, not for
    a chunk's, and the rows are there before any event that points at them. In sorted order, so that two batches
    never wait on each other's rows crosswise. `offered` holds the criteria versions ("criteria"), rates ids
    ("rates") and, per criteria version, the symbols ("scores") already offered: a chunk's shared scores are tens
    of thousands of (version, symbol) pairs, nearly all offered by an earlier chunk, so they are skipped by set
    difference, not looked up one by one (2.8 % of a batch in py-spy as tuples in one set). The score rows other
    batches of the job run wrote before are read once a batch and count as offered: offering an XNYS job run's
    35,730 rows again cost the backend 140 ms a batch (a conflict per row) besides Python's arrays, reading them
    27 ms."""
    seen_c: set[str] = offered.setdefault("criteria", set())
    seen_r: set[str] = offered.setdefault("rates", set())
    seen_s: dict[str, set[str]] = offered.setdefault("scores", {})
    if "stored" not in offered and (chunk.scores or chunk.reasons):
        # once a batch, at its first chunk with shared scores: what other batches of the job run wrote is not
        # offered again (the job run's rows: its criteria versions x assets, whatever the users)
        offered["stored"] = True
        for version, symbols in conn.execute("SELECT criteria_version, array_agg(symbol) FROM overnight_job_scores"
                                             " WHERE job_run_id = %s GROUP BY criteria_version", (job.id,)):
            seen_s.setdefault(version, set()).update(symbols)
    criteria = sorted((v, r) for v, r in chunk.criteria.items() if v not in seen_c)
    rates = sorted((k, r) for k, r in chunk.rates.items() if k not in seen_r)
    scores = chunk.score_rows(seen_s)
    if not (criteria or rates or scores):
        return
    conn.commit()  # ends the chunk's read transaction
    with conn.transaction():
        if criteria:
            conn.execute("INSERT INTO overnight_job_criteria (job_run_id, criteria_version, rules) SELECT %s, v,"
                         " r::jsonb FROM unnest(%b::text[], %b::text[]) AS t(v, r) ON CONFLICT DO NOTHING",
                         (job.id, [v for v, _ in criteria], [_encode(r) for _, r in criteria]))
        if rates:
            conn.execute("INSERT INTO overnight_job_rates (job_run_id, rates_id, rates) SELECT %s, k, r::jsonb"
                         " FROM unnest(%b::text[], %b::text[]) AS t(k, r) ON CONFLICT DO NOTHING",
                         (job.id, [k for k, _ in rates], [_encode(r) for _, r in rates]))
        if scores:
            conn.execute("INSERT INTO overnight_job_scores (job_run_id, criteria_version, symbol, score, reason)"
                         " SELECT %s, v, s, sc, r FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])"
                         " AS t(v, s, sc, r) ON CONFLICT DO NOTHING",
                         (job.id, [r[0] for r in scores], [r[1] for r in scores], [r[2] for r in scores],
                          [r[3] for r in scores]))
    seen_c.update(v for v, _ in criteria)
    seen_r.update(k for k, _ in rates)
    for version, symbol, _, _ in scores:
        seen_s.setdefault(version, set()).add(symbol)


def _write_chunk(conn: psycopg.Connection, job: JobRun, chunk: trail.Chunk, documents: list[str] | None = None,
                 generated_at: list[datetime] | None = None) -> None:
    """One row of `calculation_chunks` for the chunk's users (their snapshot rows written before:
    `_write_snapshots`)."""
    if not chunk.user_ids:
        return
    # Binary parameters (%b): psycopg's text form of an array escapes each element with a regular expression,
    # 20 % of a batch's samples in py-spy for the documents' text[] (a 5,284-user XNYS batch, `make run`).
    conn.execute(
        "INSERT INTO calculation_chunks (chunk_id, created_at, job_run_id, correlation_id, session_date, user_ids,"
        " events, generated_at, documents, symbols) VALUES (%s, %s, %s, %s, %s, %b::text[]::uuid[], %b::json,"
        " %b::timestamptz[], %b::text[], %b::text[])",
        (trail.new_chunk_id(), chunk.created_at, job.id, job.correlation_id, job.session_date, chunk.user_ids,
         _encode(chunk.events), generated_at, documents, sorted(chunk.symbols)))


def _write_failure_events(conn: psycopg.Connection, job: JobRun, failed: list[tuple[str, str, str]],
                          criteria_keys: dict[str, str]) -> None:
    """A failed attempt's trail (docs/audit.md): CALC_STARTED, as a completed user's, and CALC_FAILED with the stage
    and the reason, in a chunk of their own (no documents)."""
    now = datetime.now(UTC)
    after = now + timedelta(microseconds=1)
    chunk = trail.compact(((uid, [
        ("CALC_STARTED", now, {"market": job.market, "sessionDate": job.session_date, "jobRunId": job.id,
                               "criteriaKey": criteria_keys.get(uid)}, None),
        (FAILED_EVENT, after, {"stage": stage, "reason": message[:1000], "jobRunId": job.id}, None)], False)
        for uid, stage, message in failed))
    _write_chunk(conn, job, chunk)


def _write_results(
    conn: psycopg.Connection, job: JobRun, results: list[UserResult], failures: list[tuple[str, str, str]],
    criteria_keys: dict[str, str] | None = None, offered: dict[str, Any] | None = None,
) -> list[UserResult]:
    """Writes completed users (events, documents) and failures (their CALC_STARTED and CALC_FAILED) in one
    transaction; returns the new completed ones. `criteria_keys` (user id -> criteria key) goes in a failed user's
    CALC_STARTED as in a completed one's; `offered` is the batch's record of the snapshot rows it wrote."""
    chunk = trail.compact((r.user_id, r.events, r.scores_shared) for r in results)
    _write_snapshots(conn, job, chunk, offered if offered is not None else {})
    conn.commit()  # ends the chunk's read transaction, so each chunk's writes commit on their own
    with conn.transaction():
        fresh: set[str] = set()
        if results:
            returned = conn.execute(
                "INSERT INTO overnight_job_users AS j (job_run_id, user_id, status, assets_scored, recommendations,"
                " warned) SELECT %s, unnest(%s::uuid[]), 'completed', unnest(%s::int[]), unnest(%s::int[]),"
                " unnest(%s::bool[])"
                " ON CONFLICT (job_run_id, user_id) DO UPDATE SET status = 'completed', stage = NULL,"
                " error = NULL, updated_at = now(), assets_scored = EXCLUDED.assets_scored,"
                " recommendations = EXCLUDED.recommendations, warned = EXCLUDED.warned"
                " WHERE j.status <> 'completed' RETURNING user_id",
                (job.id, [r.user_id for r in results], [r.assets_scored for r in results],
                 [r.recommendations for r in results], [r.warned for r in results]),
            ).fetchall()
            fresh = {str(u) for (u,) in returned}
        failed_now: list[tuple[str, str, str]] = []
        if failures:
            # a row is returned when new or when its failure changed: a retry failing the same way writes nothing
            changed = {str(r[0]) for r in conn.execute(
                "INSERT INTO overnight_job_users AS j (job_run_id, user_id, status, stage, error)"
                " SELECT %s, u, 'failed', s, e FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS f(u, s, e)"
                " ON CONFLICT (job_run_id, user_id) DO UPDATE SET status = 'failed', stage = EXCLUDED.stage,"
                " error = EXCLUDED.error, updated_at = now() WHERE j.status <> 'completed'"
                " AND (j.status, j.stage, j.error) IS DISTINCT FROM ('failed', EXCLUDED.stage, EXCLUDED.error)"
                " RETURNING user_id",
                (job.id, [f[0] for f in failures], [f[1] for f in failures], [f[2][:1000] for f in failures]),
            )}
            failed_now = [f for f in failures if f[0] in changed]
            if failed_now:
                _write_failure_events(conn, job, failed_now, criteria_keys or {})
        new = [r for r in results if r.user_id in fresh]
        if not new:
            return []
        # Every document goes to the trail as its exact text (CALC_COMPLETED has its sha256), in the users' chunk
        # row; the latest row of a user is replaced only by a document of the same or a newer session (docs/audit.md).
        # The latest rows come in as binary arrays, the chunk row's own lists among them: through a temporary table
        # by COPY they cost the backend 62 µs a user (COPY 21, upsert 41; a 5,389-user XNYS batch, /proc schedstat),
        # this way 46, and the COPY text was Python's to build.
        if len(new) < len(results):  # a retry: some users were written before
            chunk = trail.compact((r.user_id, r.events, r.scores_shared) for r in new)
        documents, generated_at = [r.document_json for r in new], [r.generated_at for r in new]
        _write_chunk(conn, job, chunk, documents, generated_at)
        latest = {str(row[0]) for row in conn.execute(
            "INSERT INTO recommendations (user_id, job_run_id, correlation_id, generated_at, criteria_version,"
            " rates_stale, document, portfolio, session_date) SELECT u, %s::uuid, %s::uuid, g, v, st, d::jsonb,"
            " p::jsonb, %s::date"
            " FROM unnest(%b::text[]::uuid[], %b::timestamptz[], %b::text[], %b::bool[], %b::text[], %b::text[])"
            " AS t(u, g, v, st, d, p) ON CONFLICT (user_id) DO UPDATE SET"
            " job_run_id = EXCLUDED.job_run_id, correlation_id = EXCLUDED.correlation_id,"
            " generated_at = EXCLUDED.generated_at, criteria_version = EXCLUDED.criteria_version,"
            " rates_stale = EXCLUDED.rates_stale, document = EXCLUDED.document, portfolio = EXCLUDED.portfolio,"
            " session_date = EXCLUDED.session_date WHERE recommendations.session_date <= EXCLUDED.session_date"
            " RETURNING user_id",
            (job.id, job.correlation_id, job.session_date, [r.user_id for r in new], generated_at,
             [r.criteria_version for r in new], [r.document["ratesStale"] for r in new], documents,
             [r.portfolio_json for r in new]))}
        for r in new:
            r.latest = r.user_id in latest
    return new


# --------------------------------------------------------------------------- finalize


def finalize(
    conn: psycopg.Connection,
    job: JobRun,
    *,
    planned: list[dict[str, Any]] | None,
    results: list[dict[str, Any] | None],
    rates: dict[str, Any] | None,
    fetch_rates_ms: float | None = None,
) -> dict[str, Any]:
    """Writes the job-run row's outcome: completed, partial or failed, with counts and metrics. After a fan-out, the
    users of a batch whose task failed on every try get their row and trail first (`_trace_unattempted`)."""
    done_idx = {r["index"] for r in results if r}
    if rates is not None:  # the fan-out happened (without rates no batch ran: the run's error says why)
        _trace_unattempted(conn, job, [b for b in (planned or []) if b["index"] not in done_idx])
    # the whole job run's users, whichever execution or task attempt computed them (issue 27)
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),"
        " coalesce(sum(assets_scored) FILTER (WHERE status = 'completed'), 0),"
        " coalesce(sum(recommendations) FILTER (WHERE status = 'completed'), 0),"
        " count(*) FILTER (WHERE status = 'completed' AND warned) FROM overnight_job_users WHERE job_run_id = %s",
        (job.id,)).fetchone()
    assert row is not None  # an aggregate without GROUP BY always has its row
    completed, failed_rows, assets_scored, recommendations, warned = row
    failures = [
        {"userId": str(u), "stage": s, "message": e}
        for u, s, e in conn.execute(
            "SELECT user_id, stage, error FROM overnight_job_users WHERE job_run_id = %s AND status = 'failed'"
            " ORDER BY user_id LIMIT %s",
            (job.id, MAX_ERROR_DETAILS),
        )
    ]
    total = planned[0]["total"] if planned else 0
    done = [r for r in results if r]
    failed_batches = [b["label"] for b in (planned or []) if b["index"] not in done_idx]
    missing = max(0, total - completed - failed_rows)
    row = conn.execute("SELECT error_details FROM overnight_job_runs WHERE id = %s", (job.id,)).fetchone()
    details: dict[str, Any] = dict(row[0] or {}) if row else {}
    details.pop("users", None)
    details.pop("batches", None)
    if failures:
        details["users"] = failures
    if failed_batches:
        details["batches"] = failed_batches
    stale_prices = sorted(set().union(*(r.get("stale_prices", ()) for r in done)))
    unusable_prices = sorted(set().union(*(r.get("unusable_prices", ()) for r in done)))
    rates_missing = dict(sorted(((rates or {}).get("unavailable") or {}).items()))
    details.pop("rates", None)
    details.pop("prices", None)
    if rates_missing:
        details["rates"] = rates_missing
    if unusable_prices:
        details["prices"] = {"unusable": unusable_prices[:MAX_ERROR_DETAILS],
                             "reason": "quotes more than OVERNIGHT_MAX_PRICE_LAG_SESSIONS sessions of their market behind;"
                                       " their holders failed"}
    if planned is None or rates is None:
        status = "failed"
        details.setdefault("run", {"stage": "before fan-out", "message": "a step before the fan-out failed"})
    elif total and completed == 0:
        status = "failed"
    elif failed_rows or missing or failed_batches:
        status = "partial"
    else:
        status = "completed"
        details.pop("run", None)
    cache_states = {r["cache_status"] for r in done if r["users"]}
    cache = ("warmed" if cache_states <= {"warmed", "skipped"} and "warmed" in cache_states
             else "not warmed" if cache_states == {"failed"}
             else "partially warmed" if cache_states & {"failed", "partial"} else "nothing to warm")
    starts = [r["started_at"] for r in done]
    ends = [r["ended_at"] for r in done]
    execution = {  # this execution's own (this DAG run's batches), kept in its overnight_job_run_executions row
        "fetch_rates_ms": fetch_rates_ms,
        "process_users_ms": round((max(ends) - min(starts)) * 1000, 1) if done else 0,
        "cache_warm_ms": round(sum(r["cache_warm_ms"] for r in done), 1),
        "users_completed": sum(r["completed"] for r in done),
        "users_failed": sum(r["failed"] for r in done),
        "users_skipped_already_done": sum(r["skipped"] for r in done),
        "batches": len(planned or []),
        "batches_failed": len(failed_batches),
    }
    timings = _record_execution(conn, job, status, execution)
    executions = timings.pop("executions")
    metrics = {
        **timings,  # summed over the job run's executions
        "users_total": total,
        "batches": len(planned or []),
        "batches_failed": len(failed_batches),
        "assets_scored": assets_scored,
        "recommendations_generated": recommendations,
        "users_with_warnings": warned,
        "executions": executions,
        "users_skipped_already_done": execution["users_skipped_already_done"],  # this execution's
        "cache_status": cache,
        "cache_errors": sorted({r["cache_error"] for r in done if r.get("cache_error")})[:5],
        "rates_stale": bool(rates and rates.get("stale")),
        "rates_as_of": rates.get("as_of") if rates else None,
        "rates_missing": sorted(rates_missing),
        "stale_prices": len(stale_prices),
        "stale_price_symbols": stale_prices[:20],
        "unusable_prices": len(unusable_prices),
    }
    users_failed = failed_rows + missing
    conn.execute(
        "UPDATE overnight_job_runs SET status = %s, completed_at = clock_timestamp(), users_processed = %s, users_failed = %s,"
        " error_details = %s, metrics = %s WHERE id = %s",
        (status, completed, users_failed, json.dumps(details) if details else None, json.dumps(metrics), job.id),
    )
    conn.commit()
    cause = _failure_cause(conn, job, details, total, failed_rows, missing) if status == "failed" else None
    summary = {"status": status, "users_processed": completed, "users_failed": users_failed, **metrics}
    if cause is not None:
        summary["failure_cause"] = cause
    log.info("job run %s %s: %d processed, %d failed", job.id, status, completed, users_failed,
             extra={"correlation_id": job.correlation_id})
    return summary


UNATTEMPTED_STAGE = "batch"


def _trace_unattempted(conn: psycopg.Connection, job: JobRun, failed: list[dict[str, Any]]) -> None:
    """Every served user leaves a trace (docs/audit.md): the users of `failed` batches that no try of their task
    reached are failed at stage `batch`, their row and their CALC_STARTED and CALC_FAILED written as a failed
    calculation's (once: a finalize retried writes nothing more). A later execution attempts them again."""
    for b in failed:
        if "plan_id" in b:
            row = conn.execute("SELECT lo::text, hi::text, user_ids::text[] FROM overnight_job_batches"
                               " WHERE plan_id = %s AND batch_index = %s", (b["plan_id"], b["index"])).fetchone()
        else:  # planned before migration 0008: the range is in the descriptor
            row = (b.get("lo"), b.get("hi"), None)
        if row is None or row[0] is None:
            continue
        public = b.get("audience")
        earlier = (public["earlier"] if public else  # a descriptor without it (an in-process driver's): the calendars'
                   earlier_markets(job.market, date.fromisoformat(job.session_date), load_markets(check_codes=False).codes))
        audience = Audience(job.market, tuple(earlier), None if row[2] is None else tuple(row[2]))
        where, params = audience.where()
        params.update(lo=row[0], hi=row[1], job=job.id)
        users = conn.execute(
            f"SELECT u.id::text, u.criteria_key FROM users u WHERE {where} AND u.id >= %(lo)s AND u.id <= %(hi)s"
            " AND NOT EXISTS (SELECT 1 FROM overnight_job_users j WHERE j.job_run_id = %(job)s AND j.user_id = u.id)"
            " ORDER BY u.id", params).fetchall()
        if users:
            reason = (f"its batch ({b.get('label')}) did not finish: its task failed on every try before reaching "
                      "this user (see that task's log)")
            _write_results(conn, job, [], [(u, UNATTEMPTED_STAGE, reason) for u, _ in users], dict(users))
    conn.commit()


def _failure_cause(conn: psycopg.Connection, job: JobRun, details: dict[str, Any], total: int, failed_rows: int,
                   missing: int) -> str:
    """Why a job run failed, in words with no user id (the span's status; its collector is operations')."""
    run = details.get("run")
    if run:
        return f"{run.get('stage')}: {run.get('message')}"
    stages = conn.execute("SELECT stage, count(*) FROM overnight_job_users WHERE job_run_id = %s AND status = 'failed'"
                          " GROUP BY stage ORDER BY count(*) DESC, stage", (job.id,)).fetchall()
    why = ", ".join(f"{n} at {stage}" for stage, n in stages)
    return (f"no user of {total} completed: {failed_rows} failed" + (f" ({why})" if why else "")
            + (f", {missing} not calculated (their batches failed: {', '.join(details.get('batches', [])[:5])})"
               if missing else ""))


TIMINGS = ("fetch_rates_ms", "process_users_ms", "cache_warm_ms")


def _record_execution(conn: psycopg.Connection, job: JobRun, status: str, execution: dict[str, Any]) -> dict[str, Any]:
    """Writes this execution's outcome in its `overnight_job_run_executions` row; returns the job run's timings (each
    summed over its executions) and `executions`, their number."""
    if job.attempt is not None:
        conn.execute(
            "UPDATE overnight_job_run_executions SET status = %s, completed_at = clock_timestamp(),"
            " users_processed = %s, users_failed = %s, metrics = %s WHERE job_run_id = %s AND attempt = %s",
            (status, execution["users_completed"], execution["users_failed"], json.dumps(execution), job.id,
             job.attempt))
    row = conn.execute(
        "SELECT count(*), " + ", ".join(f"sum((metrics ->> '{k}')::float)" for k in TIMINGS)
        + " FROM overnight_job_run_executions WHERE job_run_id = %s", (job.id,)).fetchone()
    if job.attempt is None or row is None or not row[0]:  # started before migration 0010: this execution alone
        return {**{k: execution[k] for k in TIMINGS}, "executions": 1}
    return {**{k: round(v, 1) if v is not None else None for k, v in zip(TIMINGS, row[1:], strict=True)},
            "executions": row[0]}

"""The overnight scoring pipeline, free of Airflow: a batch streamed through load, calculate and write.

The night's steps, as the DAG wires them (`runtime`): start the job run (`jobrun.start_job`), fetch the
rates (`loading.fetch_rates`), plan the batches (`loading.plan_batches`), score each batch (`score_batch`,
here), and write the outcome (`writing.finalize`). Each step takes connections and small, JSON-able inputs
and returns small, JSON-able outputs, so the DAG only wires them. Bulk data moves between Postgres and
Redis, never through XCom.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from overnight.adapters.providers.base import (
    PriceProvider,
    PriceQuote,
    RatesSnapshot,
)
from overnight.adapters.pseudonyms import user_ref
from overnight.domain.recommendations import (
    DEFAULT_SCORE_FLOOR,
)
from overnight.domain.scoring import (
    CompiledRules,
    CriteriaError,
    FundamentalsTable,
    MemoEntry,
)
from overnight.night.calculate import Batch, calculate_chunk
from overnight.night.jobrun import CHUNK_SIZE, AssetRow, Audience, Contribution, JobRun
from overnight.night.loading import _load_chunk, job_quotes, last_known_quotes
from overnight.night.writing import _write_results

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector for a batch (reference counting still frees nearly everything at once).

    Measured on an 11,743-user batch: with the collector running, a fifth of the batch's CPU went to
    collections that found nothing to free, each scanning the batch's assets, users and results. Paused chunk by
    chunk, the collection that re-enabling set off after each chunk scanned every object the batch still held (its
    assets, fundamentals table, scores memo) and, from there, the task's whole heap: in py-spy (`--native`) of a
    10,779-user XNYS batch (`make run`), `gc_collect_main` was 11.1 % of the batch's samples. Now paused for the
    whole batch, and at its end what it made is moved to the oldest generation unscanned (`gc.freeze` then
    `gc.unfreeze`): 3.1 % with the pause over the batch but without that last step (one collection of everything
    at the end), none of the batch's 974 samples with it (docs/benchmarks.md). A cycle the batch made is collected
    by a later full collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()  # every tracked object to the permanent generation, none scanned...
            gc.unfreeze()  # ...and back to the oldest: the next young collection finds nothing to scan
            gc.enable()


def score_batch(
    conn: psycopg.Connection,
    job: JobRun,
    audience: Audience,
    rates: RatesSnapshot,
    batch: dict[str, Any],
    price_provider: PriceProvider,
    *,
    warm_cache: Callable[[list[tuple[str, str, str]]], int] | None,
    contribution: Contribution | None = None,
    score_floor: Decimal = DEFAULT_SCORE_FLOOR,
    chunk_size: int = CHUNK_SIZE,
    judge_prices: Callable[[dict[str, tuple[datetime, str]]], tuple[set[str], set[str]]] | None = None,
) -> dict[str, Any]:
    """Calculates the batch's pending users; one user's failure never stops the others.

    The batch streams through in chunks of `chunk_size` users (load, calculate, write, warm), so a task's
    memory does not grow with the batch. A systemic failure (database gone) raises and the task is
    retried; users written before are complete (events, row and document committed together) and skipped.
    `judge_prices` ({symbol: (as_of, market)} -> (stale, unusable)) flags stale quotes in the documents and
    drops unusable ones (docs/freshness.md).
    """
    t0, wall0 = time.perf_counter(), time.time()
    timings = {"load": 0.0, "calc": 0.0, "write": 0.0, "cache_warm": 0.0}
    counts = {"users": 0, "completed": 0, "skipped": 0, "failed": 0, "warned": 0, "assets_scored": 0,
              "recommendations_generated": 0}
    quotes: dict[str, PriceQuote | None] = {}  # the job run's quotes, looked up once per batch
    assets: dict[int, AssetRow] = {}  # loaded once per batch, whatever the chunks
    price_text: dict[str, str] = {}
    compiled: dict[str, CompiledRules | CriteriaError] = {}
    table = FundamentalsTable()
    memo: dict[str, dict[int, MemoEntry]] = {}  # shared criteria versions' scores, once per batch
    offered: dict[str, Any] = {}  # the job run's snapshot rows this batch wrote (`writing._write_snapshots`)
    cache_states: set[str] = set()
    cache_error = None
    stale_prices: set[str] = set()
    unusable_prices: set[str] = set()
    last_known: dict[str, PriceQuote] = {}  # symbols without a usable quote: their newest known price
    after: str | None = None
    with _gc_paused():  # the whole batch: no collection scans the heap (see `_gc_paused`)
        while True:
            t = time.perf_counter()
            users, assets, criteria, (last_read, n_read) = _load_chunk(conn, job, audience, batch, after, chunk_size,
                                                                       assets)
            if not n_read:
                break
            if not users:  # every user read was completed before (a retry): on to the next chunk
                after = last_read
                if n_read < chunk_size:
                    break
                continue
            missing = sorted({a.symbol for a in assets.values()}.difference(quotes))
            if missing:
                quotes.update(dict.fromkeys(missing))
                quotes.update(job_quotes(conn, job, price_provider, missing))
                too_old: dict[str, PriceQuote] = {}
                if judge_prices is not None:
                    market_of = {a.symbol: a.market for a in assets.values()}
                    stale, unusable = judge_prices(
                        {s: (q.as_of, market_of[s]) for s in missing if (q := quotes[s]) is not None})
                    stale_prices |= stale
                    unusable_prices |= unusable
                    too_old = {s: q for s in unusable if (q := quotes[s]) is not None}
                    quotes.update(dict.fromkeys(unusable))  # too old to score or buy: only to value holdings with
                # docs/allocation.md: a holding without a usable quote is valued at its newest known price, the
                # quote judged too old or an earlier job run's, whichever is newer
                unpriced_now = [s for s in missing if quotes[s] is None]
                for s, q in last_known_quotes(conn, job, unpriced_now).items():
                    if s not in too_old or q.as_of > too_old[s].as_of:
                        too_old[s] = q
                last_known.update(too_old)
            prices = {s: q for s, q in quotes.items() if q is not None}
            timings["load"] += time.perf_counter() - t
            t = time.perf_counter()
            shared = Batch(job, rates, assets, criteria, prices, contribution, compiled, price_text, table,
                           score_floor, frozenset(stale_prices), frozenset(unusable_prices), last_known=last_known,
                           memo=memo)
            results, failures = calculate_chunk(users, shared)
            timings["calc"] += time.perf_counter() - t
            t = time.perf_counter()
            new = _write_results(conn, job, results, failures,
                                 {u.id: u.criteria_key for u in users} if failures else None, offered=offered)
            timings["write"] += time.perf_counter() - t
            t = time.perf_counter()
            if warm_cache is not None and any(r.latest for r in new):
                try:
                    # only documents that are the users' latest: an older session's re-run leaves newer ones
                    warm_cache([(r.user_id, r.document_json, r.portfolio_json) for r in new if r.latest])
                    cache_states.add("warmed")
                except Exception as exc:  # noqa: BLE001 - the cache is optional: Postgres holds the results
                    cache_states.add("failed")
                    cache_error = f"{type(exc).__name__}: {exc}"
                    log.warning("cache not warmed for %s (chunk after user %s): %s", batch.get("label"),
                                user_ref(after), cache_error)  # a pseudonym: viewers read task logs
            timings["cache_warm"] += time.perf_counter() - t
            counts["users"] += len(users)
            counts["completed"] += len(new)
            counts["skipped"] += len(results) - len(new)
            counts["failed"] += len(failures)
            counts["warned"] += sum(r.warned for r in new)
            counts["assets_scored"] += sum(r.assets_scored for r in new)
            counts["recommendations_generated"] += sum(r.recommendations for r in new)
            log.info("%s: %d of %d users done", batch.get("label"), counts["users"],
                     batch.get("last", 0) - batch.get("first", 1) + 1)
            after = last_read
            if n_read < chunk_size:
                break
    cache_status = ("failed" if cache_states == {"failed"} else "partial" if "failed" in cache_states
                    else "warmed" if cache_states else "skipped")
    out = {
        "index": batch["index"],
        "label": batch.get("label"),
        **counts,
        "cache_status": cache_status,
        "cache_error": cache_error,
        "stale_prices": sorted(stale_prices),
        "unusable_prices": sorted(unusable_prices),
        **{f"{k}_ms": round(v * 1000, 1) for k, v in timings.items()},
        "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
        "started_at": wall0,
        "ended_at": time.time(),
    }
    log.info("batch %s: %d users, %d completed, %d failed, %.0f ms", batch.get("label"), counts["users"],
             counts["completed"], counts["failed"], out["duration_ms"], extra={"correlation_id": job.correlation_id})
    return out

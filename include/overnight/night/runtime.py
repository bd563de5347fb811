"""What each task of a market DAG does, given plain values: parameters, connections, providers.

No Airflow import: the DAG factory passes in what it read from the task context.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from overnight.adapters import db
from overnight.adapters.connections import ConnectionNotConfigured, get_connection
from overnight.adapters.providers.base import PriceProvider, RatesProvider, RatesSnapshot
from overnight.adapters.providers.db import DbPriceProvider, DbRatesProvider
from overnight.domain import freshness, money, sessions
from overnight.domain.markets import Market
from overnight.domain.recommendations import DEFAULT_SCORE_FLOOR
from overnight.night import jobrun, loading, pipeline, telemetry, writing

log = logging.getLogger(__name__)

RATES_CONN_ID = "overnight_rates_http"
PRICES_CONN_ID = "overnight_prices_http"
PARAM_NAMES = ("session_date", "user_ids", "batch_size", "contribution", "force", "recalculate")
_AMOUNT = re.compile(r"^\d{1,12}(\.\d{1,4})?$")
SCORE_FLOOR_ENV = "OVERNIGHT_SCORE_FLOOR"
CONTRIBUTION_EXAMPLE = '{"amount": "1500", "currency": "USD"}'


class ParamError(ValueError):
    """The run's parameters are unusable; the message lists each problem and what to pass."""


@dataclass(frozen=True)
class RunParams:
    """A run's validated parameters."""

    session_date: date
    user_ids: tuple[str, ...] | None
    batch_size: int
    contribution: jobrun.Contribution | None
    force: bool
    recalculate: bool = False  # a recalculation of `user_ids` (after an invalidation): a job run of its own

    def to_xcom(self) -> dict[str, Any]:
        """Returns a small JSON-able dict, without the user ids (XCom is read by every viewer, docs/access.md):
        `plan_batches` keeps them with the plan in Postgres (`overnight_job_batches`)."""
        return {
            "session_date": self.session_date.isoformat(),
            "user_ids_count": len(self.user_ids) if self.user_ids is not None else None,
            "batch_size": self.batch_size,
            "contribution": self.contribution.to_json() if self.contribution is not None else None,
            "force": self.force,
            "recalculate": self.recalculate,
        }

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> RunParams:
        """Inverse of `to_xcom`, but for the user ids, which it does not carry."""
        ids = data.get("user_ids")
        c = data.get("contribution")
        return cls(date.fromisoformat(data["session_date"]), tuple(ids) if ids is not None else None,
                   int(data["batch_size"]), jobrun.Contribution(Decimal(c["amount"]), c["currency"]) if c else None,
                   bool(data["force"]), bool(data.get("recalculate", False)))


def validate_params(
    market: Market, params: dict[str, Any], conf: dict[str, Any], *, interval_end: datetime | None,
    run_after: datetime | None,
) -> RunParams:
    """Checks a run's params and --conf; raises ParamError naming every problem, before anything is written."""
    problems: list[str] = []
    unknown = sorted(set(conf) - set(PARAM_NAMES))
    if unknown:
        problems.append(f"unknown --conf keys {unknown}; known: {list(PARAM_NAMES)}")
    merged = {**params, **{k: v for k, v in conf.items() if k in PARAM_NAMES}}
    session: date | None = None
    raw_date = merged.get("session_date")
    if raw_date not in (None, ""):
        try:
            session = sessions.validate_session_date(market.code, str(raw_date))
        except ValueError as exc:
            problems.append(f"session_date: {exc}")
    else:
        try:
            if interval_end is not None:
                session = sessions.session_for_run(market.code, timedelta(0), interval_end)
            else:
                moment = run_after or datetime.now(UTC)
                session = sessions.next_run(market.code, timedelta(0), moment, inclusive=False)[0]
        except ValueError as exc:
            problems.append(f"session: {exc}")
    user_ids = merged.get("user_ids")
    ids: tuple[str, ...] | None = None
    if user_ids not in (None, []):
        if not isinstance(user_ids, list):
            problems.append(f"user_ids: expected a list of user ids (UUIDs), got {type(user_ids).__name__}")
        else:
            bad = []
            for u in user_ids:
                try:
                    uuid.UUID(str(u))
                except ValueError:
                    bad.append(str(u)[:40])
            if bad:
                problems.append(f"user_ids: not UUIDs: {bad[:5]}")
            ids = tuple(str(uuid.UUID(str(u))) for u in user_ids if str(u)[:40] not in bad)
    raw_bs = merged.get("batch_size")
    batch_size = market.batch_size or jobrun.DEFAULT_BATCH_SIZE
    if raw_bs is not None:
        if isinstance(raw_bs, bool) or not isinstance(raw_bs, int) or raw_bs < 1 or raw_bs > 100_000:
            problems.append(f"batch_size: expected an integer from 1 to 100000, got {raw_bs!r}")
        else:
            batch_size = raw_bs
    contribution: jobrun.Contribution | None = None
    raw_c = merged.get("contribution")
    if raw_c not in (None, "", {}):
        try:
            contribution = parse_contribution(raw_c)
        except ValueError as exc:
            problems.append(f"contribution: {exc}")
    force = merged.get("force", False)
    if not isinstance(force, bool):
        problems.append(f"force: expected true or false, got {force!r}")
    recalculate = merged.get("recalculate", False)
    if not isinstance(recalculate, bool):
        problems.append(f"recalculate: expected true or false, got {recalculate!r}")
    elif recalculate and not ids:
        problems.append("recalculate: needs user_ids, the users to recalculate")
    if problems:
        raise ParamError(f"{market.dag_id}: bad parameters: " + "; ".join(problems))
    assert session is not None
    return RunParams(session, ids, batch_size, contribution, bool(force), bool(recalculate))


def parse_contribution(raw: Any) -> jobrun.Contribution:
    """Parses the `contribution` parameter, an amount with its currency; raises ValueError saying what to pass."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an amount with its currency such as {CONTRIBUTION_EXAMPLE}, got {raw!r}; "
                         "a bare number is ambiguous (1500 yen is not 1500 dollars)")
    unknown = sorted(set(raw) - {"amount", "currency"})
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected {CONTRIBUTION_EXAMPLE}")
    amount, currency = raw.get("amount"), raw.get("currency")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
        raise ValueError(f"'currency' must be a 3-letter ISO 4217 code such as USD, got {currency!r}")
    try:
        unit = money.minor_unit(currency)
    except money.CurrencyError as exc:
        raise ValueError(str(exc)) from None
    text = str(amount) if isinstance(amount, str | int) and not isinstance(amount, bool) else ""
    if not _AMOUNT.match(text):
        raise ValueError(f"'amount' must be a non-negative amount such as \"1500.00\", got {amount!r}")
    value = Decimal(text)
    if value != value.quantize(unit):
        raise ValueError(f"'amount' {text} has more decimals than {currency} has ({-int(unit.as_tuple().exponent)})")
    return jobrun.Contribution(value, currency)


def score_floor() -> Decimal:
    """The score at or below which an asset is never bought: `OVERNIGHT_SCORE_FLOOR`, default 0."""
    raw = os.environ.get(SCORE_FLOOR_ENV, "").strip()
    if not raw:
        return DEFAULT_SCORE_FLOOR
    try:
        value = Decimal(raw)
    except ArithmeticError:
        value = Decimal("NaN")
    if not value.is_finite():
        raise ValueError(f"{SCORE_FLOOR_ENV}={raw!r} is not a number; set a score such as 0 or 2.5, or unset it")
    return value


def start(market: Market, run: RunParams, dag_run_id: str) -> dict[str, Any]:
    """Records the job run (status started) and returns the job for the next tasks; a failure is also a span."""
    try:
        with db.connect() as conn:
            job = jobrun.start_job(conn, market.code, run.session_date, dag_run_id, force=run.force,
                                   job_type=jobrun.RECALCULATION if run.recalculate else jobrun.JOB_TYPE)
    except Exception as exc:
        telemetry.failed_start_span({"market": market.code, "session_date": run.session_date.isoformat(),
                                     "dag_run_id": dag_run_id}, exc)
        raise
    return job.to_xcom()


def _http_conn(conn_id: str) -> tuple[str, str | None] | None:
    """The provider's base URL and API key from its Airflow connection (type http), None when it is not set.

    Airflow parses the standard forms: `http://api.example.com:8443/v1`, a host with a protocol
    (`http://https://api.example.com/v1` or JSON `{"host": "https://api.example.com"}`), else the `scheme` extra,
    else https for a `https://` URI or port 443; the path is `schema`; the key is the password or the `api_key`
    extra."""
    try:
        conn = get_connection(conn_id)
    except ConnectionNotConfigured:
        return None
    extra = conn.extra_dejson or {}
    host = (conn.host or "").rstrip("/")
    if "://" in host:  # Airflow keeps the URI form's port apart from a host with a protocol
        base = host + (f":{conn.port}" if conn.port and host.count(":") < 2 else "")
    else:
        scheme = extra.get("scheme") or ("https" if conn.conn_type == "https" or conn.port == 443 else "http")
        port = f":{conn.port}" if conn.port else ""
        base = f"{scheme}://{host}{port}"
    if conn.schema:
        base = f"{base}/{conn.schema.strip('/')}"
    return base, conn.password or extra.get("api_key")


def rates_provider(conn: Any) -> RatesProvider:
    """Returns the HTTP rates provider when `overnight_rates_http` is set, else the database one."""
    http = _http_conn(RATES_CONN_ID)
    if http is None:
        return DbRatesProvider(conn)
    from overnight.adapters.providers.http_rates import HttpRatesProvider

    return HttpRatesProvider(http[0], api_key=http[1])


def price_provider(conn: Any) -> PriceProvider:
    """Returns the HTTP price provider when `overnight_prices_http` is set, else the database one."""
    http = _http_conn(PRICES_CONN_ID)
    if http is None:
        return DbPriceProvider(conn)
    from overnight.adapters import cache
    from overnight.adapters.providers.http_prices import HttpPriceProvider
    from overnight.adapters.providers.ratelimit import RedisRateLimiter

    limiter = RedisRateLimiter(cache.connect(), "ratelimit:prices", rate_per_s=float(
        os.environ.get("OVERNIGHT_PRICES_RATE_PER_S", "5")), burst=10)
    return HttpPriceProvider(http[0], api_key=http[1], rate_limiter=limiter)


def _lead(code: str) -> timedelta:
    """The market's configured lead (markets.yaml), or the default for a market no longer listed."""
    from overnight.domain.markets import DEFAULT_LEAD, UnknownMarketError, get_market

    try:
        return get_market(code).lead
    except UnknownMarketError:
        return DEFAULT_LEAD


def reference_moment(job: jobrun.JobRun, now: datetime | None = None) -> datetime:
    """The moment the job run is judged at (docs/freshness.md): its session's scheduled run, or now if earlier."""
    scheduled = freshness.scheduled_run(job.market, _lead(job.market), date.fromisoformat(job.session_date))
    return freshness.reference_moment(scheduled, now or datetime.now(UTC))


def document_deadline(job: jobrun.JobRun) -> datetime:
    """Until when the job run's documents are fresh: the market's next session's run + the grace period."""
    return freshness.document_deadline(job.market, _lead(job.market), date.fromisoformat(job.session_date),
                                       freshness.grace())


def fetch_rates(job_x: dict[str, Any], run_x: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fetches exchange rates once for the run (every currency it may convert through, the run's contribution
    currency included), judged at the run's reference moment; records a clear error on the job run if it cannot."""
    job = jobrun.JobRun.from_xcom(job_x)
    given = (run_x or {}).get("contribution")
    t0 = time.perf_counter()
    with db.connect() as conn:
        try:
            currencies = loading.needed_currencies(conn, also=[given["currency"]] if given else ())
            snap = loading.fetch_rates(conn, rates_provider(conn), currencies,
                                        max_lag_publications=freshness.max_rates_lag_publications(),
                                        now=reference_moment(job),
                                        margin=freshness.rates_margin())
        except Exception as exc:
            conn.rollback()
            jobrun.record_job_error(conn, job, "fetch_rates", str(exc))
            raise
    out = snap.to_xcom()
    out["fetch_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    log.info("rates as of %s from %s (%d currencies, stale=%s)", snap.as_of, snap.source, len(snap.rates),
             snap.stale)
    return out


def audience(market: Market, run: RunParams, all_codes: list[str]) -> jobrun.Audience:
    """Returns who this market serves on the run's session."""
    earlier = sessions.earlier_markets(market.code, run.session_date, all_codes)
    return jobrun.Audience(market.code, tuple(earlier), run.user_ids)


def plan(market: Market, run: RunParams, all_codes: list[str], job_x: dict[str, Any]) -> list[dict[str, Any]]:
    """Plans the user batches of the run: each batch's user-id range (and, for a run naming users, its users) is
    stored in `overnight_job_batches` under a new plan id; the descriptors returned (the XCom every viewer reads)
    carry the plan id, the batch's number and positions, never a user id (docs/access.md)."""
    job = jobrun.JobRun.from_xcom(job_x)
    aud = audience(market, run, all_codes)
    plan_id = str(uuid.uuid4())
    named = sorted(aud.user_ids) if aud.user_ids is not None else None  # canonical UUID text sorts as Postgres does
    with db.connect() as conn:
        batches = loading.plan_batches(conn, aud, run.batch_size)
        with conn.transaction():
            with conn.cursor().copy("COPY overnight_job_batches (job_run_id, plan_id, batch_index, lo, hi, user_ids)"
                                    " FROM STDIN") as cp:
                for b in batches:
                    mine = None if named is None else named[bisect_left(named, b["lo"]):bisect_right(named, b["hi"])]
                    cp.write_row((job.id, plan_id, b["index"], b["lo"], b["hi"], mine))
    total = batches[0]["total"] if batches else 0
    log.info("%s %s: %d users in %d batches (earlier markets that day: %s)", market.code, run.session_date,
             total, len(batches), ", ".join(aud.earlier) or "none")
    public = jobrun.Audience(aud.market, aud.earlier).to_xcom()
    return [{**{k: v for k, v in b.items() if k not in ("lo", "hi")}, "plan_id": plan_id, "audience": public}
            for b in batches]


def resolve_batch(conn: Any, batch: dict[str, Any]) -> tuple[dict[str, Any], jobrun.Audience]:
    """A planned batch's descriptor with its user-id range (`lo`, `hi`) read back from `overnight_job_batches`,
    and its audience with the run's user ids in that range (when the run names users)."""
    aud = jobrun.Audience.from_xcom(batch["audience"])
    if "lo" in batch:  # planned before migration 0008 (a DAG run in flight across the upgrade): its XCom has it
        return batch, aud
    row = conn.execute("SELECT lo::text, hi::text, user_ids::text[] FROM overnight_job_batches"
                       " WHERE plan_id = %s AND batch_index = %s", (batch["plan_id"], batch["index"])).fetchone()
    conn.commit()
    if row is None:
        raise RuntimeError(f"batch {batch['index'] + 1} ({batch.get('label')}) of plan {batch['plan_id']} is not in "
                           "overnight_job_batches (deleted by retention?); clear plan_batches to plan the run again")
    ids = None if row[2] is None else tuple(row[2])
    return {**batch, "lo": row[0], "hi": row[1]}, jobrun.Audience(aud.market, aud.earlier, ids)


def score_batch(batch: dict[str, Any], job_x: dict[str, Any], rates_x: dict[str, Any], run_x: dict[str, Any]
                ) -> dict[str, Any]:
    """Scores one batch of users and warms their cache entries."""
    job = jobrun.JobRun.from_xcom(job_x)
    run = RunParams.from_xcom(run_x)
    rates = RatesSnapshot.from_xcom(rates_x)
    from overnight.adapters import cache  # redis is imported by the tasks that use it, not by every task's DAG parse

    redis_client = None
    try:
        redis_client = cache.connect()
    except Exception as exc:  # noqa: BLE001 - a bad Redis URL must not lose the night
        log.warning("redis client not created: %s", exc)

    setting = freshness.cache_ttl_setting()

    def warm(docs: list[tuple[str, str, str]]) -> int:
        if redis_client is None:
            raise ConnectionError("no Redis client")
        deadline = document_deadline(job) if setting else None
        return cache.warm(redis_client, docs, ttl_s=freshness.cache_ttl_seconds(setting, deadline, datetime.now(UTC)))

    judged_at, max_lag_sessions = reference_moment(job), freshness.max_price_lag_sessions()

    def judge_prices(quotes: dict[str, tuple[datetime, str]]) -> tuple[set[str], set[str]]:
        return freshness.judge_quotes(quotes, judged_at, max_lag_sessions)

    started = time.time()
    try:
        with db.connect() as conn:
            batch, aud = resolve_batch(conn, batch)
            out = pipeline.score_batch(conn, job, aud, rates, batch, price_provider(conn), warm_cache=warm,
                                       contribution=run.contribution, score_floor=score_floor(),
                                       judge_prices=judge_prices)
    except Exception as exc:
        telemetry.batch_span(job.correlation_id, {"index": batch["index"], "label": batch.get("label"),
                                                  "market": job.market, "correlation_id": job.correlation_id,
                                                  "started_at": started, "ended_at": time.time()}, error=exc)
        raise
    telemetry.batch_span(job.correlation_id, {**out, "market": job.market, "correlation_id": job.correlation_id})
    return out


def finalize(job_x: dict[str, Any] | None, planned: list[dict[str, Any]] | None,
             results: list[dict[str, Any] | None], rates_x: dict[str, Any] | None) -> dict[str, Any] | None:
    """Writes the job-run outcome; returns the summary (None when the run never started)."""
    if job_x is None:
        log.error("the start task did not record a job run (bad parameters or database down); nothing to finalize")
        return None
    job = jobrun.JobRun.from_xcom(job_x)
    with db.connect() as conn:
        summary = writing.finalize(conn, job, planned=planned, results=results, rates=rates_x,
                                    fetch_rates_ms=(rates_x or {}).get("fetch_ms"))
    attrs = {**summary, "users_success": summary["users_processed"], "market": job.market,
             "session_date": job.session_date, "correlation_id": job.correlation_id}
    telemetry.job_span(job.correlation_id, job.started_at, attrs, failed=summary["status"] == "failed",
                       cause=summary.get("failure_cause"))
    return summary

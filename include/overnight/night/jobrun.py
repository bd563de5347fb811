"""A night's job run and the types its steps share: ids, audience, users, results, constants.

The job-run row is started here (`start_job`) and run-level errors recorded; the steps are in
`loading`, `calculate`, `writing` and `pipeline`."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg

from overnight import __version__
from overnight.domain import money
from overnight.domain.recommendations import (
    ALLOCATION_POLICY,
    Target,
)
from overnight.domain.scoring import (
    SCORING_VERSION,
)

log = logging.getLogger(__name__)


JOB_TYPE = "scoring"  # a market's night: one job run per market and session
RECALCULATION = "recalculation"  # named users recalculated after an invalidation: one job run per DAG run
CACHE_WARM = "cache-warm"  # the cache warmer's runs (no market)
RATES_BASE = "USD"
DEFAULT_BATCH_SIZE = 500
EVENT_TYPES = ("CALC_STARTED", "INPUTS_CAPTURED", "SCORES_COMPUTED", "CALC_COMPLETED")  # a completed user's four
FAILED_EVENT = "CALC_FAILED"  # a failed user's terminal event, after its CALC_STARTED (docs/audit.md)
MAX_ERROR_DETAILS = 1000
_JSON = msgspec.json.Encoder()
CHUNK_SIZE = 1000  # users loaded, calculated and written together inside a batch (bounds a task's memory)
CENT = Decimal("0.01")
# What a calculation's result depends on besides its inputs: the package and the scoring and allocation rules.
# A replay by another calcVersion says so instead of comparing (docs/audit.md).
# ... and the minor-units table's source and version (the `iso4217` package: a new ISO list can change an amount),
# so a replay after an upgrade says why it differs
CALC_VERSION = (f"{__version__}+scoring.{SCORING_VERSION}.allocation.{ALLOCATION_POLICY}"
                f".{money.MINOR_UNITS_SOURCE}")
HISTORY_TABLE = "recommendation_history"


# --------------------------------------------------------------------------- job run


@dataclass(frozen=True)
class JobRun:
    """The job run a DAG run works on: identified by market and session date."""

    id: str
    correlation_id: str
    market: str
    session_date: str
    started_at: str
    resumed: bool = False
    attempt: int | None = None  # this execution's row in overnight_job_run_executions (None: started before 0010)
    job_type: str = JOB_TYPE

    def to_xcom(self) -> dict[str, Any]:
        """Returns the small dict passed between tasks."""
        return dict(self.__dict__)

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> JobRun:
        """Inverse of `to_xcom`."""
        return cls(**data)


def ensure_partitions(conn: psycopg.Connection, today: date) -> None:
    """Creates the audit partitions of this month and the next two (idempotent)."""
    conn.execute("SELECT ensure_event_partitions(%s, 3)", (today.replace(day=1),))


def start_job(
    conn: psycopg.Connection, market: str, session_date: date, dag_run_id: str, *, force: bool = False,
    job_type: str = JOB_TYPE,
) -> JobRun:
    """Upserts the `started` job-run row of (market, session); `force` starts a new calculation. A `recalculation`
    is identified by its DAG run instead (each one a calculation of its own, never the session's night). Each call
    records an execution (`overnight_job_run_executions`), or continues the one its DAG run left started."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"overnight:{market}:{session_date}",))
        ensure_partitions(conn, datetime.now(UTC).date())
        sql = ("SELECT id, correlation_id, started_at FROM overnight_job_runs"
               " WHERE market = %s AND session_date = %s AND job_type = %s")
        params: tuple[Any, ...] = (market, session_date, job_type)
        if job_type == RECALCULATION:
            sql, params = sql + " AND dag_run_id = %s", (*params, dag_run_id)
        row = conn.execute(sql + " ORDER BY started_at DESC LIMIT 1", params).fetchone()
        if row is not None and not force:
            conn.execute(
                "UPDATE overnight_job_runs SET status = 'started', completed_at = NULL, dag_run_id = %s"
                " WHERE id = %s",
                (dag_run_id, row[0]),
            )
            return JobRun(str(row[0]), str(row[1]), market, session_date.isoformat(), row[2].isoformat(), True,
                          start_execution(conn, str(row[0]), dag_run_id), job_type)
        job_id, corr, now = uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)
        conn.execute(
            "INSERT INTO overnight_job_runs (id, job_type, status, started_at, correlation_id, market,"
            " session_date, dag_run_id) VALUES (%s, %s, 'started', %s, %s, %s, %s, %s)",
            (job_id, job_type, now, corr, market, session_date, dag_run_id),
        )
        attempt = start_execution(conn, str(job_id), dag_run_id)
    log.info("job run %s started", job_id, extra={"correlation_id": str(corr), "market": market})
    return JobRun(str(job_id), str(corr), market, session_date.isoformat(), now.isoformat(), False, attempt, job_type)


def start_execution(conn: psycopg.Connection, job_id: str, dag_run_id: str | None) -> int:
    """Records an execution of the job run (`started`) and returns its attempt number; a DAG run whose execution is
    still `started` (its `start` task retried) continues that one."""
    last = conn.execute("SELECT attempt, dag_run_id, status FROM overnight_job_run_executions WHERE job_run_id = %s"
                        " ORDER BY attempt DESC LIMIT 1", (job_id,)).fetchone()
    if last is not None and last[1] == dag_run_id and last[2] == "started":
        return int(last[0])
    attempt = 1 if last is None else int(last[0]) + 1
    conn.execute("INSERT INTO overnight_job_run_executions (job_run_id, attempt, dag_run_id, status)"
                 " VALUES (%s, %s, %s, 'started')", (job_id, attempt, dag_run_id))
    return attempt


def record_job_error(conn: psycopg.Connection, job: JobRun, stage: str, message: str) -> None:
    """Records a run-level error (a step before the fan-out failed) on the job-run row."""
    conn.execute(
        "UPDATE overnight_job_runs SET error_details = coalesce(error_details, '{}'::jsonb) || %s::jsonb"
        " WHERE id = %s",
        (json.dumps({"run": {"stage": stage, "message": message[:2000]}}), job.id),
    )
    conn.commit()


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Audience:
    """Which users a market serves on a session: theirs, none of whose markets open earlier."""

    market: str
    earlier: tuple[str, ...]
    user_ids: tuple[str, ...] | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        """Returns the SQL condition on `users u` and its parameters."""
        sql = "u.active AND u.markets @> ARRAY[%(market)s]::text[] AND NOT (u.markets && %(earlier)s::text[])"
        params: dict[str, Any] = {"market": self.market, "earlier": list(self.earlier)}
        if self.user_ids is not None:
            sql += " AND u.id = ANY(%(user_ids)s::uuid[])"
            params["user_ids"] = list(self.user_ids)
        return sql, params

    def to_xcom(self) -> dict[str, Any]:
        """Returns a small JSON-able dict."""
        return {"market": self.market, "earlier": list(self.earlier),
                "user_ids": list(self.user_ids) if self.user_ids is not None else None}

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> Audience:
        """Inverse of `to_xcom`."""
        ids = data.get("user_ids")
        return cls(data["market"], tuple(data["earlier"]), tuple(ids) if ids is not None else None)


# --------------------------------------------------------------------------- score a batch


class UserFailure(Exception):
    """One user cannot be calculated; `stage` says where (load, criteria, targets, prices, ...)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass
class AssetRow:
    """An asset as the batch loaded it."""

    id: int
    symbol: str
    market: str
    class_name: str
    currency: str
    fundamentals: dict[str, Any]


@dataclass
class UserRow:
    """A user and their inputs as the batch loaded them."""

    id: str
    base_currency: str
    default_contribution: Decimal | None
    markets: list[str]
    criteria_key: str
    holdings: list[tuple[int, Any]] = field(default_factory=list)
    watchlist: list[int] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


@dataclass
class UserResult:
    """What one user's calculation produced: four events and two documents."""

    user_id: str
    events: list[tuple[str, datetime, dict[str, Any], list[str] | None]]
    document: dict[str, Any]
    portfolio: dict[str, Any]
    criteria_version: str
    generated_at: datetime
    assets_scored: int
    recommendations: int
    warned: bool = False  # calculated with a warning (a holding could not be valued)
    document_json: str = ""  # the document as stored in Redis and `recommendation_history`; CALC_COMPLETED has its sha256
    latest: bool = True  # the writer set the user's `recommendations` row (no newer session's document is there)
    scores_shared: bool = False  # scored from the batch's memo: the scores go to overnight_job_scores (`trail`)

    @functools.cached_property
    def portfolio_json(self) -> str:
        """The portfolio summary as stored in Postgres and Redis (encoded once)."""
        return _encode(self.portfolio)


def _num(d: Decimal) -> str:
    """A decimal as plain text without trailing zeros (116.78000000 -> 116.78, 1E+2 -> 100)."""
    text = str(d)  # plain unless the exponent is positive or the number tiny: then `format` (3x slower)
    if "E" in text:
        text = format(d, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _encode(value: Any) -> str:
    """Compact JSON of the documents and events (msgspec: several times faster than json on this path)."""
    return _JSON.encode(value).decode()


def _fmt(d: Decimal, places: Decimal = CENT) -> str:
    """`d` rounded to `places` as plain text (str of a decimal with exponent -2 is never scientific)."""
    return str(d.quantize(CENT)) if places is CENT else format(d.quantize(places), "f")


@dataclass(frozen=True)
class Contribution:
    """A run's contribution for every user: an amount in a currency, converted to each user's base currency."""

    amount: Decimal
    currency: str

    def to_json(self) -> dict[str, str]:
        """Returns {"amount", "currency"} as the run parameter gives it."""
        return {"amount": money.text(self.amount), "currency": self.currency}

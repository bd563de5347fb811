"""Builds one overnight scoring DAG per market: start, rates, plan, mapped batches, finalize."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Param, TriggerRule, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from overnight.domain import freshness
from overnight.domain.markets import Market, format_lead
from overnight.night import alerts, assets, jobrun, runtime
from overnight.night.timetable import MarketSessionTimetable

log = logging.getLogger(__name__)

APPROVED_TAGS = frozenset({"overnight", "scoring", "operations", "cache", "audit"})
DEFAULT_ARGS: dict[str, Any] = {
    "owner": "overnight",
    "retries": 3,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)


def _params(market: Market) -> dict[str, Param]:
    default_bs = market.batch_size or jobrun.DEFAULT_BATCH_SIZE
    return {
        "session_date": Param(
            None, type=["null", "string"], format="date", title="Session date",
            description=f"The {market.code} session to calculate (YYYY-MM-DD). Empty: the session of this "
            "run (scheduled) or the next session to open (manual). Must be a trading day of the market.",
        ),
        "user_ids": Param(
            None, type=["null", "array"], items={"type": "string"}, title="Only these users",
            description="Limit the run to these user ids (UUIDs) among the users this market serves that day. "
            "Empty: everyone it serves.",
        ),
        "batch_size": Param(
            default_bs, type="integer", minimum=1, maximum=100_000, title="Users per batch",
            description="Users per mapped task; grows by itself so that one run maps at most 256 tasks.",
        ),
        "contribution": Param(
            None, type=["null", "object"], title="Contribution (amount and currency)",
            properties={"amount": {"type": ["string", "integer"], "pattern": r"^\d{1,12}(\.\d{1,4})?$",
                                   "minimum": 0, "maximum": 10**12 - 1},  # text, or a whole number as the run takes
                        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            required=["amount", "currency"], additionalProperties=False,
            description="Amount every served user invests this run, with its currency, e.g. "
            "{\"amount\": \"1500\", \"currency\": \"USD\"}: converted at the run's exchange rates into each "
            "user's base currency and rounded down to its minor unit (docs/allocation.md). "
            "Empty: each user's own default contribution.",
        ),
        "force": Param(
            False, type="boolean", title="Force a new calculation",
            description="Start a new calculation for this session (new correlation id, new job-run row, new "
            "events) instead of continuing the existing one. Leave off to resume or re-run safely.",
        ),
        "recalculate": Param(
            False, type="boolean", title="Recalculate these users",
            description="With user ids: a new calculation of those users for the session, in a job run of its own "
            "(job type recalculation), as an invalidation through the dashboard API asks (docs/design.md). "
            "The session's night is left as it is.",
        ),
    }


def _doc(market: Market) -> str:
    """The DAG's Markdown docs: a pure function of the market entry (no clock, no calendar lookups).

    The serialized DAG must not change from one day to the next, or Airflow 3 keeps a new DAG version per
    trading day: the upcoming runs are shown by Airflow itself (the DAG header's "Next run",
    `airflow dags next-execution`), not listed here.
    """
    lead = format_lead(market.lead)
    deadline = market.lead - alerts.DEADLINE_BEFORE_OPEN
    deadline_text = (
        f"**Deadline**: a run not finished {format_lead(alerts.DEADLINE_BEFORE_OPEN)} before the open is "
        f"recorded as a `deadline_missed` alert on its job run (Airflow `DeadlineAlert`, {format_lead(deadline)} "
        "after the run's logical date)."
        if deadline > timedelta(0)
        else f"**Deadline**: none (the lead of {lead} leaves no time before the 15-minute deadline)."
    )
    return f"""# Overnight scoring: {market.code}

Pre-computes every served user's recommendations **{lead} before each {market.code} session opens**
(exact in UTC across DST changes, holidays and late opens; schedule from `exchange-calendars`).

A user is scored once per day, by the earliest-opening of their configured markets that trade that day;
this DAG serves the users for whom that is {market.code}.

**Tasks**: `start` (job-run row `started`, correlation id) → `fetch_rates` (once, shared through XCom)
→ `plan_batches` (users this market serves) → `score_batch` (mapped: scores, recommendations, four
audit events, Postgres, Redis `recs:{{userId}}`) → `finalize` (completed / partial / failed, and the asset event).
The `score_batch` tasks run in the pool `{market.scoring_pool}` (shared by the markets that use it: it bounds
their database and provider load together; `airflow pools import include/pools.json` creates it).

**Asset**: `finalize` updates `{assets.recommendations_uri(market.code)}` when the run ends completed or
partial (a failed run emits nothing). The event's extra: `market`, `session_date`, `status`,
`users_processed`, `users_failed`, `users_total`, `recommendations_generated`, `cache_status`,
`correlation_id`, `job_run_id`, `dag_run_id`. Schedule your DAG on it with
`schedule=[Asset("{assets.recommendations_uri(market.code)}")]`.

**Re-running is safe**: the job run is identified by market and session date; a retry, a clear or a new
trigger for the same session continues it (completed users are skipped). Set `force` for a fresh one.

{deadline_text}

**Next runs**: the DAG header's *Next run*, or
`airflow dags next-execution {market.dag_id} -n 5 --field run_after` (UTC).

**Trigger**: `airflow dags trigger {market.dag_id} --conf '{{"session_date": "YYYY-MM-DD"}}'`
or `make run MARKET={market.code} DATE=YYYY-MM-DD`.
"""


def _context_session(ctx: Mapping[str, Any]) -> tuple[datetime | None, datetime | None]:
    dag_run = ctx["dag_run"]
    end = getattr(dag_run, "data_interval_end", None)
    run_after = getattr(dag_run, "run_after", None)
    return end, run_after


def build_market_dag(market: Market, all_codes: list[str]) -> DAG:
    """Returns the scoring DAG of one market; everything it serializes depends only on `market` and `all_codes`."""

    recommendations = assets.recommendations_asset(market.code)

    @dag(
        dag_id=market.dag_id,
        schedule=MarketSessionTimetable(market.code, market.lead),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["overnight", "scoring"],
        params=_params(market),
        doc_md=_doc(market),
        description=f"Overnight recommendations, {format_lead(market.lead)} before the {market.code} open",
        dagrun_timeout=timedelta(hours=6),
        on_failure_callback=alerts.on_dag_failure,
        deadline=alerts.market_deadline(market),
    )
    def overnight_scoring() -> None:
        # start's and plan_batches' XComs carry no user id (docs/access.md); start's return value stays out of its
        # log all the same (the job's row, the run's parameters: nothing an operator needs twice)
        @task(multiple_outputs=False, show_return_value_in_logs=False)  # one XCom row per task, not one per key
        def start() -> dict[str, Any]:
            """Validates the parameters, then records the job run (status started)."""
            ctx = get_current_context()
            end, run_after = _context_session(ctx)
            try:
                freshness.check_settings()  # a bad setting fails the run here, before anything is written
                run = runtime.validate_params(market, dict(ctx["params"]), dict(ctx["dag_run"].conf or {}),
                                              interval_end=end, run_after=run_after)
            except (runtime.ParamError, freshness.FreshnessConfigError) as exc:
                raise AirflowFailException(str(exc)) from None
            job = runtime.start(market, run, ctx["dag_run"].run_id)
            log.info("job run %s for %s session %s (correlation %s, resumed=%s)", job["id"], market.code,
                     run.session_date, job["correlation_id"], job["resumed"])
            return {"job": job, "run": run.to_xcom()}

        @task(multiple_outputs=False)
        def fetch_rates(started: dict[str, Any]) -> dict[str, Any]:
            """Fetches exchange rates once; every batch uses the same ones."""
            return runtime.fetch_rates(started["job"], started["run"])

        @task
        def plan_batches(started: dict[str, Any]) -> list[dict[str, Any]]:
            """Plans the batches of users this market serves on the session (their id ranges in Postgres; the XCom
            names batches by number and position only)."""
            ctx = get_current_context()
            end, run_after = _context_session(ctx)
            # the run's user ids are not in start's XCom: read again from the run's parameters (checked by start)
            run = runtime.validate_params(market, dict(ctx["params"]), dict(ctx["dag_run"].conf or {}),
                                          interval_end=end, run_after=run_after)
            return runtime.plan(market, run, all_codes, started["job"])

        @task(map_index_template="{{ batch_label }}", pool=market.scoring_pool, multiple_outputs=False,
              execution_timeout=timedelta(hours=1))
        def score_batch(batch: dict[str, Any], started: dict[str, Any], rates: dict[str, Any]) -> dict[str, Any]:
            """Scores one batch of users (one user's failure never stops the others)."""
            get_current_context()["batch_label"] = batch["label"]  # type: ignore[typeddict-unknown-key]
            return runtime.score_batch(batch, started["job"], rates, started["run"])

        @task(trigger_rule=TriggerRule.ALL_DONE, retries=3, outlets=[recommendations], multiple_outputs=False)
        def finalize() -> dict[str, Any]:
            """Writes the job-run row (completed, partial or failed); a run with recommendations emits the asset event."""
            ctx = get_current_context()
            ti = ctx["ti"]
            started = ti.xcom_pull(task_ids="start")
            planned = ti.xcom_pull(task_ids="plan_batches")
            rates = ti.xcom_pull(task_ids="fetch_rates")
            results = [ti.xcom_pull(task_ids="score_batch", map_indexes=b["index"]) for b in planned or []]
            summary = runtime.finalize(started["job"] if started else None, planned, results, rates)
            if summary is None or summary["status"] == "failed":
                raise AirflowFailException(f"overnight run failed: {summary or 'no job run was started'}")
            ctx["outlet_events"][recommendations].extra = assets.event_extra(
                market.code, started["job"], summary, ctx["dag_run"].run_id)
            return summary

        started = start()
        rates = fetch_rates(started)  # type: ignore[arg-type]  # an XComArg stands for the dict at run time
        batches = plan_batches(started)  # type: ignore[arg-type]
        results = score_batch.partial(started=started, rates=rates).expand(batch=batches)
        results >> finalize()

    return overnight_scoring()

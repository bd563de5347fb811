"""Pre-flight checks: is everything the night needs in place? Each check returns one line per problem
(the freshness settings, the connections, the HTTP providers, the pools, the calendars, the market DAGs).

Problems fail the `overnight_preflight` DAG (one line each); warnings are only logged. The checks that
need Airflow's own state take it as data (`check_pools(required, existing)`, `check_next_runs(dags, ...)`),
so they are tested without a scheduler; the DAG task fetches that data: the market DAGs' pause state and
next run through the Task SDK (the running task instance's public `get_dag`), the pools through the public REST API
(the Task SDK has no pool call) when an API connection is configured, else that check is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overnight.adapters.connections import (
    POSTGRES_CONN_ID,
    REDIS_CONN_ID,
    ConnectionNotConfigured,
    failure_line,
    get_connection,
    reach_postgres,
    reach_redis,
    redacted,
)
from overnight.adapters.redaction import redact
from overnight.domain import freshness, sessions
from overnight.domain.markets import Market

if TYPE_CHECKING:
    from airflow.sdk import Connection

log = logging.getLogger(__name__)

POOLS_FILE = Path(__file__).resolve().parents[2] / "pools.json"  # include/pools.json, in the image too
API_CONN_ID = "overnight_airflow_api"
API_TOKEN_ENV = "OVERNIGHT_AIRFLOW_API_TOKEN"
PRICE_PROBE_SYMBOL_ENV = "OVERNIGHT_PREFLIGHT_PRICE_SYMBOL"
HORIZON_DAYS = 60
NEXT_RUN_GRACE = timedelta(minutes=15)
TIMEOUT_S = 5.0


@dataclass
class Report:
    """The outcome of the checks: problems fail the DAG, warnings are logged, notes say what was checked."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def failure_message(self) -> str:
        """The exception text: a count, then one line per problem."""
        return f"preflight: {len(self.problems)} problem(s):\n" + "\n".join(f"- {p}" for p in self.problems)


# --------------------------------------------------------------------------- connections


def _info(conn_id: str, info: Connection | None) -> tuple[Connection | None, list[str]]:
    if info is not None:
        return info, []
    try:
        return get_connection(conn_id), []
    except ConnectionNotConfigured as exc:
        return None, [f"{conn_id}: not configured: {exc}"]


def check_postgres(info: Connection | None = None, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Problems reaching the `overnight_postgres` connection with `select 1` (password masked)."""
    info, problems = _info(POSTGRES_CONN_ID, info)
    if info is None:
        return problems
    try:
        reach_postgres(info, timeout_s, application_name="overnight-preflight")
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        return [f"{info.conn_id} ({redacted(info)}): {failure_line(exc, info)}; check host, port, "
                "database and credentials, and that the server is up"]
    return []


def check_redis(info: Connection | None = None, timeout_s: float = TIMEOUT_S) -> list[str]:
    """Problems reaching the `overnight_redis` connection with PING (password masked)."""
    info, problems = _info(REDIS_CONN_ID, info)
    if info is None:
        return problems
    try:
        reach_redis(info, timeout_s)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        return [f"{info.conn_id} ({redacted(info)}): {failure_line(exc, info)}; check host, port, "
                "database number and password, and that the server is up"]
    return []


def check_http_providers(timeout_s: float = TIMEOUT_S) -> tuple[list[str], list[str]]:
    """(problems, notes) for the optional HTTP providers: one cheap request each, skipped when not configured."""
    from overnight.adapters.providers.http_prices import HttpPriceProvider
    from overnight.adapters.providers.http_rates import HttpRatesProvider
    from overnight.night import runtime

    problems: list[str] = []
    notes: list[str] = []
    probes = (
        (runtime.RATES_CONN_ID, HttpRatesProvider, lambda p: p.fetch_rates("USD", ["EUR"])),
        (runtime.PRICES_CONN_ID, HttpPriceProvider,
         lambda p: p.fetch_prices([os.environ.get(PRICE_PROBE_SYMBOL_ENV, "AAPL")])),
    )
    for conn_id, cls, probe in probes:
        http = runtime._http_conn(conn_id)
        if http is None:
            notes.append(f"{conn_id}: not configured, skipped (the database provider is used)")
            continue
        base, key = http
        try:
            with cls(base, api_key=key, timeout_s=timeout_s, max_attempts=1) as provider:
                probe(provider)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            problems.append(f"{conn_id} ({redact(base, [key])}): {redact(failure_line(exc), [key])}")
        else:
            notes.append(f"{conn_id}: answered")
    return problems, notes


# --------------------------------------------------------------------------- pools


def required_pools(markets: Iterable[Market]) -> dict[str, list[str]]:
    """Pool name -> who needs it: each market's scoring pool (`overnight_scoring` unless markets.yaml names one)."""
    needed: dict[str, list[str]] = {}
    for market in markets:
        needed.setdefault(market.scoring_pool, []).append(f"{market.dag_id}.score_batch")
    return needed


def packaged_pools(path: Path = POOLS_FILE) -> set[str]:
    """The pools include/pools.json defines (`airflow pools import` format); empty when the file is unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def check_pools(required: Mapping[str, list[str]], existing: Iterable[str]) -> list[str]:
    """One problem per required pool that does not exist: without it the scheduler never starts those tasks."""
    have = set(existing)
    packaged = packaged_pools()
    problems = []
    for name, users in sorted(required.items()):
        if name in have:
            continue
        fix = (f"`airflow pools import {POOLS_FILE.name}` (the file ships in include/, in the image at "
               f"/opt/airflow/include/{POOLS_FILE.name}; `make airflow-setup` loads airflow_settings.yaml in a "
               "checkout)" if name in packaged else
               f"`airflow pools set {name} <slots> '<description>'` (markets.yaml names it; include/pools.json "
               "does not define it)")
        problems.append(f"pool '{name}' does not exist (needed by {', '.join(users)}): its tasks would wait "
                        f"forever; create it with {fix}")
    return problems


def api_access(environ: Mapping[str, str] | None = None) -> tuple[str, str | None, str | None, str | None] | None:
    """(base URL, token, login, password) for Airflow's public REST API, or None when not configured.

    From the optional connection `overnight_airflow_api` (host = the api-server URL; password = a token,
    or login + password for `POST /auth/token`), else `OVERNIGHT_AIRFLOW_API_TOKEN` with `AIRFLOW__API__BASE_URL`.
    """
    env = environ if environ is not None else os.environ
    try:
        info = get_connection(API_CONN_ID)
    except ConnectionNotConfigured:
        info = None
    if info is not None and info.host:
        if "://" in info.host:
            base = info.host.rstrip("/")
        else:
            port = f":{info.port}" if info.port else ""
            base = f"{info.extra_dejson.get('scheme', 'http')}://{info.host}{port}"
        if info.login:
            return base, None, info.login, info.password
        return base, info.password or env.get(API_TOKEN_ENV), None, None
    token = env.get(API_TOKEN_ENV)
    url = env.get("AIRFLOW__API__BASE_URL")
    if token and url:
        return url.rstrip("/"), token, None, None
    return None


def fetch_pools(base_url: str, token: str | None = None, login: str | None = None, password: str | None = None,
                timeout_s: float = TIMEOUT_S) -> list[str]:
    """The pool names the api-server knows (GET /api/v2/pools), authenticating with a token or login."""
    import httpx

    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        if token is None and login is not None:
            resp = client.post("/auth/token", json={"username": login, "password": password or ""})
            resp.raise_for_status()
            token = str(resp.json()["access_token"])
        names: list[str] = []
        offset = 0
        while True:
            resp = client.get("/api/v2/pools", params={"limit": 100, "offset": offset},
                              headers={"Authorization": f"Bearer {token}"} if token else {})
            resp.raise_for_status()
            body = resp.json()
            page = [p["name"] for p in body.get("pools", [])]
            names.extend(page)
            offset += len(page)
            if not page or offset >= int(body.get("total_entries", 0)):
                return names


# --------------------------------------------------------------------------- calendar and DAG state


def check_horizon(codes: Iterable[str], today: date, days: int = HORIZON_DAYS) -> tuple[list[str], list[str]]:
    """(problems, warnings): calendar data already ended is a problem, ending within `days` a warning."""
    problems: list[str] = []
    warnings: list[str] = []
    for code in sorted(set(codes)):
        lines = sessions.horizon_warnings([code], today, days)
        if lines:
            (problems if sessions.calendar_horizon(code) < today else warnings).extend(lines)
    return problems, warnings


def check_next_runs(markets: Iterable[Market], dags_info: Mapping[str, Mapping[str, Any] | None], now: datetime,
                    grace: timedelta = NEXT_RUN_GRACE) -> list[str]:
    """One problem per market DAG that is missing, paused, or whose next run is not where the calendar says.

    `dags_info[dag_id]` holds `is_paused` and `next_dagrun` (the next run's logical date = open - lead), or None
    when Airflow does not know the DAG. A next run that fell due less than `grace` ago is fine (being created).
    """
    problems: list[str] = []
    for market in sorted(markets, key=lambda m: m.code):
        dag_id = market.dag_id
        info = dags_info.get(dag_id)
        if info is None:
            problems.append(f"{dag_id}: not found in Airflow; see the import errors (dags/overnight_scoring.py, "
                            "dags/overnight_market_errors.py) and the dag-processor log")
            continue
        if info.get("is_paused"):
            problems.append(f"{dag_id}: paused; no {market.code} runs will start: `airflow dags unpause {dag_id}`")
            continue
        try:
            session, expected = sessions.next_run(market.code, market.lead, now, inclusive=False)
        except ValueError as exc:
            problems.append(f"{dag_id}: {exc}")
            continue
        raw = info.get("next_dagrun")
        actual = raw if isinstance(raw, datetime) else datetime.fromisoformat(str(raw)) if raw else None
        if actual is None:
            problems.append(f"{dag_id}: Airflow has no next run; the calendar says {expected:%Y-%m-%d %H:%M} UTC "
                            f"for the {session} session: check the dag-processor log for this DAG")
            continue
        actual = actual.astimezone(UTC)
        if actual == expected:
            continue
        if now - grace <= actual <= now:
            try:
                due_session = sessions.session_for_run(market.code, market.lead, actual)
                if sessions.run_time(market.code, market.lead, due_session) == actual:
                    continue  # the run of the session that just fell due: the scheduler is creating it
            except ValueError:
                pass
        problems.append(
            f"{dag_id}: Airflow's next run is {actual:%Y-%m-%d %H:%M} UTC but the {market.code} calendar says "
            f"{expected:%Y-%m-%d %H:%M} UTC (session {session}, open - lead); check the scheduler is running and "
            "the DAG is re-parsed (dag-processor)"
        )
    return problems


def dags_info_from_sdk(dag_ids: Iterable[str], ti: Any) -> dict[str, dict[str, Any] | None]:
    """Pause state and next run of each DAG, asked by the running task's instance `ti` (the Task SDK's public
    `RuntimeTaskInstanceProtocol.get_dag`; None: not found).

    Raises RuntimeError outside a running task (no task instance to ask) or when the API server fails.
    """
    if ti is None or not hasattr(ti, "get_dag"):
        raise RuntimeError("not inside a running Airflow task (no task instance to ask the Task SDK)")
    out: dict[str, dict[str, Any] | None] = {}
    for dag_id in dag_ids:
        try:
            dag = ti.get_dag(dag_id)
        except Exception as exc:
            text = str(exc)
            if "404" in text or "not found" in text.lower():
                out[dag_id] = None
                continue
            raise RuntimeError(f"{dag_id}: {failure_line(exc)}") from exc
        out[dag_id] = {"is_paused": dag.is_paused, "next_dagrun": dag.next_dagrun}
    return out


# --------------------------------------------------------------------------- all together


def run_checks(markets: list[Market], *, now: datetime | None = None,
               dags_info: Mapping[str, Mapping[str, Any] | None] | None = None,
               pools: Iterable[str] | None = None, skipped: Iterable[str] = ()) -> Report:
    """Runs every check; `dags_info` / `pools` None means that check could not be fed (a warning, not a problem)."""
    now = now or datetime.now(UTC)
    report = Report()
    report.problems += freshness.settings_problems()
    report.problems += check_postgres()
    report.problems += check_redis()
    http_problems, http_notes = check_http_providers()
    report.problems += http_problems
    report.notes += http_notes
    if pools is not None:
        report.problems += check_pools(required_pools(markets), pools)
    horizon_problems, horizon_warnings = check_horizon([m.code for m in markets], now.date())
    report.problems += horizon_problems
    report.warnings += horizon_warnings
    if dags_info is not None:
        report.problems += check_next_runs(markets, dags_info, now)
    report.warnings += list(skipped)
    return report


def run_in_task(now: datetime | None = None, ti: Any = None) -> Report:
    """The DAG task's body: loads the markets, fetches Airflow's state where it can (`ti`: the running task's
    instance, from its context), runs every check."""
    from overnight.domain.markets import load_markets

    loaded = load_markets()
    extra_problems = [str(e) for e in loaded.errors]
    skipped: list[str] = []
    dags_info: dict[str, dict[str, Any] | None] | None
    try:
        dags_info = dags_info_from_sdk([m.dag_id for m in loaded.markets], ti)
    except Exception as exc:  # noqa: BLE001 - outside a task (no supervisor) this check cannot run
        dags_info = None
        skipped.append(f"market DAG state: skipped: the Task SDK could not be asked ({failure_line(exc)})")
    pools: list[str] | None = None
    access = api_access()
    if access is None:
        skipped.append(
            f"pools: skipped: the Task SDK cannot list pools and no REST API access is configured; set the "
            f"connection {API_CONN_ID} (host = api-server URL, login/password or a token as password) or "
            f"{API_TOKEN_ENV} with AIRFLOW__API__BASE_URL"
        )
    else:
        try:
            pools = fetch_pools(*access)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            secrets = [access[1], access[3]]
            extra_problems.append(f"pools: the Airflow API at {access[0]} did not list the pools: "
                                  f"{redact(failure_line(exc), secrets)}; check {API_CONN_ID}")
    report = run_checks(loaded.markets, now=now, dags_info=dags_info, pools=pools, skipped=skipped)
    report.problems = extra_problems + report.problems
    return report

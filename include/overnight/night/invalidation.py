"""Invalidating cached advice (docs/design.md, docs/access.md): one user's `recs:`/`portfolio:` keys dropped and the
time recorded, so the dashboard stops presenting the older document as current; optionally that user's recalculation,
a DAG run of their serving market with `user_ids` and `recalculate`; or every user's keys (the cache cleared).

Used by the dashboard's `POST /api/v1/cache/...` routes and by `make invalidate`
(`python -m overnight.night.invalidation`)."""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis

from overnight.adapters import cache
from overnight.domain import freshness, sessions
from overnight.domain.markets import load_markets

log = logging.getLogger(__name__)

RECALCULATION_WAIT = timedelta(hours=6)  # the market DAG's dagrun_timeout: a recalculation not ended by then never will


class UnknownUser(LookupError):
    """The users table does not know this user id."""


class NoServingMarket(LookupError):
    """None of the user's markets is in markets.yaml with a session ahead: no DAG can recalculate them."""


@dataclass(frozen=True)
class Recalculation:
    """The DAG run asked to recalculate a user: its DAG, run id, market and session."""

    dag_id: str
    dag_run_id: str
    market: str
    session_date: date
    paused: bool = False

    def to_json(self) -> dict[str, Any]:
        """Returns the API's camelCase object."""
        return {"dagId": self.dag_id, "dagRunId": self.dag_run_id, "market": self.market,
                "sessionDate": self.session_date.isoformat(), "dagPaused": self.paused}


def invalidate_user(conn: psycopg.Connection, client: redis.Redis | None, user_id: str, by: str | None) -> dict[str, Any]:
    """Drops the user's cached keys and records the invalidation (now, by whom); returns what was done. Raises
    UnknownUser for an id the users table does not know. Redis unreachable: the keys stay, the record is written (the
    dashboard reads Postgres for an invalidated user whose key is gone, and says so for one whose key is not)."""
    try:
        uid = str(uuid.UUID(str(user_id)))
    except ValueError:
        raise ValueError(f"user id {str(user_id)[:80]!r} is not a UUID") from None
    if conn.execute("SELECT 1 FROM users WHERE id = %s", (uid,)).fetchone() is None:
        raise UnknownUser(f"user {uid} is not in the users table")
    deleted, cache_error = 0, None
    if client is not None:
        try:
            deleted = cache.invalidate(client, uid)
        except redis.RedisError as exc:
            cache_error = f"{type(exc).__name__}: {exc}"
            log.warning("invalidation: Redis keys of a user not dropped: %s", cache_error)
    at = conn.execute(
        "INSERT INTO overnight_invalidations (user_id, invalidated_at, invalidated_by) VALUES (%s, clock_timestamp(), %s)"
        " ON CONFLICT (user_id) DO UPDATE SET invalidated_at = EXCLUDED.invalidated_at,"
        " invalidated_by = EXCLUDED.invalidated_by, dag_id = NULL, dag_run_id = NULL, session_date = NULL"
        " RETURNING invalidated_at", (uid, by)).fetchone()[0]  # type: ignore[index]
    conn.commit()
    return {"userId": uid, "keysDeleted": deleted, "invalidatedAt": at.isoformat(), "cacheError": cache_error}


def invalidate_all(client: redis.Redis, batch: int = cache.INVALIDATE_BATCH) -> dict[str, Any]:
    """Drops every user's cached keys (SCAN in batches + UNLINK: Redis is never blocked); returns the count. The
    documents in Postgres stay current: the dashboard serves them until the cache is warmed again."""
    return {"keysDeleted": cache.invalidate_all(client, batch=batch)}


def recalculation_session(conn: psycopg.Connection, user_id: str, now: datetime | None = None) -> tuple[str, date]:
    """The (market, session) whose DAG recalculates the user now: the session of their current document while that
    is current (its market's next run + grace not passed), else the next session of any of their markets; the market
    is the one serving them on that session (README: the earliest-opening of their markets open that day)."""
    now = now or datetime.now(UTC)
    row = conn.execute("SELECT u.markets, r.session_date, r.document ->> 'market' FROM users u"
                       " LEFT JOIN recommendations r ON r.user_id = u.id WHERE u.id = %s", (user_id,)).fetchone()
    if row is None:
        raise UnknownUser(f"user {user_id} is not in the users table")
    markets = load_markets(check_codes=False)
    leads = {m.code: m.lead for m in markets.markets}
    mine = [c for c in row[0] if c in leads]
    if not mine:
        raise NoServingMarket(f"user {user_id}: none of their markets {list(row[0])} is in markets.yaml")
    session, doc_market = row[1], row[2]
    if session is not None and doc_market in leads:
        deadline = freshness.document_deadline(doc_market, leads[doc_market], session, freshness.grace())
        market = sessions.serving_market(mine, session)
        if market is not None and now <= deadline:
            return market, session
    upcoming = min(sessions.next_run(c, timedelta(0), now, inclusive=False)[0] for c in mine)
    market = sessions.serving_market(mine, upcoming)
    if market is None:  # pragma: no cover - the earliest next session is a session of one of them
        raise NoServingMarket(f"user {user_id}: no market of theirs has a session on {upcoming}")
    return market, upcoming


Trigger = Callable[[str, str, dict[str, Any]], bool]
"""(dag_id, run_id, conf) -> whether the DAG is paused; raises LookupError when Airflow does not know the DAG."""


def rest_trigger(base_url: str, token: str, timeout_s: float = 10.0) -> Trigger:
    """Triggers through Airflow's public REST API as the caller (their bearer token: the run's triggering user is
    theirs, and Airflow checks they may trigger that DAG)."""
    import httpx

    def trigger(dag_id: str, run_id: str, conf: dict[str, Any]) -> bool:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, trust_env=False) as http:
            resp = http.post(f"/api/v2/dags/{dag_id}/dagRuns",
                             json={"dag_run_id": run_id, "logical_date": None, "conf": conf})
            if resp.status_code == 404:
                raise LookupError(f"Airflow does not know {dag_id}; is the dag-processor running (make airflow)?")
            if resp.status_code == 403:
                raise PermissionError(f"Airflow refused to trigger {dag_id} for this login (403): it needs the "
                                      "permission to trigger that DAG's runs")
            resp.raise_for_status()
            details = http.get(f"/api/v2/dags/{dag_id}")
            return bool(details.status_code == 200 and details.json().get("is_paused"))

    return trigger


def cli_trigger() -> Trigger:
    """Triggers with the `airflow` command line (`make invalidate`: where the metadata database is configured)."""
    import json
    import shutil
    import subprocess

    airflow = shutil.which("airflow") or str(Path(sys.executable).with_name("airflow"))

    def trigger(dag_id: str, run_id: str, conf: dict[str, Any]) -> bool:
        proc = subprocess.run([airflow, "dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            raise LookupError(f"`airflow dags trigger {dag_id}` failed ({tail[0][:300]}); is the dag-processor "
                              "running (make airflow)?")
        details = subprocess.run([airflow, "dags", "details", dag_id, "--output", "json"], capture_output=True,
                                 text=True, timeout=120)
        try:
            data = json.loads(details.stdout)
        except ValueError:
            return False
        row = data[0] if isinstance(data, list) and data else data
        return bool(isinstance(row, dict) and str(row.get("is_paused")).lower() == "true")

    return trigger


def request_recalculation(conn: psycopg.Connection, user_id: str, trigger: Trigger,
                          now: datetime | None = None) -> Recalculation:
    """Triggers the serving market's DAG for the user (`user_ids`, `recalculate`, the session) through `trigger`
    (Airflow's REST API as the caller, or its command line) and records the run on the user's invalidation;
    raises UnknownUser, NoServingMarket, or LookupError when Airflow does not know the DAG."""
    market, session = recalculation_session(conn, user_id, now)
    dag_id = f"overnight_scoring_{market.lower()}"
    run_id = f"recalculation__{uuid.uuid4()}"  # names nobody: the user id is in the run's conf only (docs/access.md)
    conf = {"session_date": session.isoformat(), "user_ids": [user_id], "recalculate": True}
    paused = trigger(dag_id, run_id, conf)
    conn.execute("UPDATE overnight_invalidations SET dag_id = %s, dag_run_id = %s, session_date = %s WHERE user_id = %s",
                 (dag_id, run_id, session, user_id))
    conn.commit()
    log.info("recalculation asked: %s run %s for session %s (paused=%s)", dag_id, run_id, session, paused)
    return Recalculation(dag_id, run_id, market, session, paused)


def main(argv: list[str] | None = None) -> int:
    """`make invalidate USER=<id> [RECALCULATE=1] | ALL=1`."""
    parser = argparse.ArgumentParser(prog="python -m overnight.night.invalidation", description=__doc__)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user id whose cached advice to drop")
    who.add_argument("--all", action="store_true", help="drop every user's cached keys (the documents stay)")
    parser.add_argument("--recalculate", action="store_true", help="with --user: also trigger their recalculation")
    args = parser.parse_args(argv)
    if args.recalculate and not args.user:
        parser.error("--recalculate needs --user")
    from overnight.adapters import db

    client = cache.connect()
    try:
        if args.all:
            print(f"invalidated every user: {invalidate_all(client)['keysDeleted']} keys deleted")
            return 0
        with db.connect() as conn:
            try:
                done = invalidate_user(conn, client, args.user, "make invalidate")
                print(f"invalidated user {done['userId']}: {done['keysDeleted']} keys deleted"
                      + (f" (Redis: {done['cacheError']})" if done["cacheError"] else ""))
                if args.recalculate:
                    r = request_recalculation(conn, done["userId"], cli_trigger())
                    print(f"recalculation: {r.dag_id} run {r.dag_run_id}, session {r.session_date}"
                          + (" (the DAG is paused: unpause it to run)" if r.paused else ""))
            except (ValueError, LookupError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())

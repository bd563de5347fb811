"""Replay: a past calculation recomputed from its audit events and its job run's snapshots alone, and compared.

A user's calculation is rebuilt from what the trail stored: `INPUTS_CAPTURED` (holdings, watchlist, markets,
targets, criteria version, rates, contribution, score floor, calcVersion), `CALC_STARTED` (criteria key), the
job run's snapshots (`overnight_job_prices`, `overnight_job_assets`, `overnight_job_criteria`, `overnight_job_rates`,
`overnight_job_scores`: each event expanded as it was calculated, `trail.expand`). No live table is read
(`assets`, `prices`, `criteria_sets`, `allocation_targets`, `holdings`, `users`): a change to any of them after
the night changes nothing here. The pipeline's own `prepare_user`, scoring and `finish_user` run on the rebuilt
inputs, and the result is compared with the stored events and the stored document (`recommendation_history`,
whose sha256 `CALC_COMPLETED` records): `identical`, or the fields that differ. Timestamps of the replay itself
(event times, `durationMs`) are not compared; the document's `generatedAt` is the recorded one. A calculation
recorded by another `calcVersion` is answered `other_version`, never passed off as a match. docs/audit.md.

No Airflow import: `python -m overnight.night.replay` (`make replay`) and the API route use it as it is.
One module (~430 lines) on purpose: what the trail stored, its rebuilt inputs and their comparison are read
together when a replay differs; the calculation itself is the pipeline's (`calculate`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg

from overnight.adapters.providers.base import PriceQuote, RatesSnapshot
from overnight.domain.recommendations import Target
from overnight.night import calculate, jobrun, loading, trail
from overnight.night.calculate import NO_PRICE, NO_PRICE_KNOWN, Batch
from overnight.night.jobrun import CALC_VERSION, EVENT_TYPES, FAILED_EVENT, AssetRow, Contribution, JobRun, UserRow

IDENTICAL, DIFFERENT, OTHER_VERSION = "identical", "different", "other_version"
NOT_COMPARED = {"CALC_COMPLETED": ("durationMs",)}  # timings of the calculation itself
MAX_DIFFERENCES = 200


class ReplayError(LookupError):
    """A calculation cannot be replayed; the message says what is missing, where, and what to do."""


class UnknownCalculation(ReplayError):
    """No such job run, user or calculation (the API's 404)."""


class IncompleteCalculation(ReplayError):
    """The calculation exists but its events or snapshots are incomplete (the API's 409)."""


@dataclass
class ReplayResult:
    """One user's replay: `status` is identical, different or other_version; `differences` name each field."""

    user_id: str
    correlation_id: str
    job_run_id: str
    market: str
    session_date: str
    status: str
    stored_calc_version: str | None
    replay_calc_version: str = CALC_VERSION
    stored_sha256: str | None = None
    replayed_sha256: str | None = None
    differences: list[str] = field(default_factory=list)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The API's camelCase object."""
        return {
            "userId": self.user_id, "correlationId": self.correlation_id, "jobRunId": self.job_run_id,
            "market": self.market, "sessionDate": self.session_date, "status": self.status,
            "storedCalcVersion": self.stored_calc_version, "replayCalcVersion": self.replay_calc_version,
            "storedDocumentSha256": self.stored_sha256, "replayedDocumentSha256": self.replayed_sha256,
            "differences": self.differences, "note": self.note,
        }

    def text(self) -> str:
        """What `make replay` prints: the status first, then one line per difference."""
        head = (f"{self.status}: user {self.user_id}, job run {self.job_run_id} ({self.market} {self.session_date},"
                f" correlation id {self.correlation_id}), calcVersion {self.stored_calc_version}")
        if self.status == OTHER_VERSION:
            head += f" (this code is {self.replay_calc_version})"
        lines = [head]
        if self.note:
            lines.append(f"  note: {self.note}")
        lines += [f"  {d}" for d in self.differences]
        return "\n".join(lines)


# --------------------------------------------------------------------------- comparing


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def diff(stored: Any, replayed: Any, path: str = "") -> list[str]:
    """The differences between two JSON values, one line per field: `path: stored X, replayed Y`."""
    if isinstance(stored, dict) and isinstance(replayed, dict):
        out: list[str] = []
        for key in sorted(stored.keys() | replayed.keys(), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in replayed:
                out.append(f"{sub}: stored {_show(stored[key])}, replayed (absent)")
            elif key not in stored:
                out.append(f"{sub}: stored (absent), replayed {_show(replayed[key])}")
            else:
                out += diff(stored[key], replayed[key], sub)
        return out
    if isinstance(stored, list) and isinstance(replayed, list):
        out = []
        for i in range(max(len(stored), len(replayed))):
            sub = f"{path}[{i}]"
            if i >= len(replayed):
                out.append(f"{sub}: stored {_show(stored[i])}, replayed (absent)")
            elif i >= len(stored):
                out.append(f"{sub}: stored (absent), replayed {_show(replayed[i])}")
            else:
                out += diff(stored[i], replayed[i], sub)
        return out
    if stored == replayed and type(stored) is type(replayed):
        return []
    return [f"{path or '(document)'}: stored {_show(stored)}, replayed {_show(replayed)}"]


def _comparable(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    skip = NOT_COMPARED.get(event_type, ())
    return {k: v for k, v in payload.items() if k not in skip}


# --------------------------------------------------------------------------- what the trail stored


@dataclass
class _Stored:
    """One user's stored calculation: the four events (payload, time) and the stored document text."""

    events: dict[str, tuple[dict[str, Any], datetime]] = field(default_factory=dict)
    document: str | None = None


def _job(conn: psycopg.Connection, correlation_id: str) -> JobRun:
    try:
        corr = str(uuid.UUID(str(correlation_id)))
    except ValueError:
        raise UnknownCalculation(f"correlation id {str(correlation_id)[:80]!r} is not a UUID; take it from a job "
                                 "run (GET /overnight/api/v1/job-runs, or overnight_job_runs.correlation_id)") from None
    row = conn.execute("SELECT id, market, session_date, started_at FROM overnight_job_runs"
                       " WHERE correlation_id = %s", (corr,)).fetchone()
    if row is None:
        raise UnknownCalculation(f"no job run has correlation id {corr} (overnight_job_runs); it is mistyped, or the "
                                 "job run is older than the audit retention (OVERNIGHT_RETENTION_DAYS) and was purged")
    return JobRun(str(row[0]), corr, row[1], row[2].isoformat(), row[3].astimezone(UTC).isoformat())


def _user_id(raw: str) -> str:
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        raise UnknownCalculation(f"user id {str(raw)[:80]!r} is not a UUID") from None


def _stored(conn: psycopg.Connection, job: JobRun, user_ids: list[str] | None) -> dict[str, _Stored]:
    """The users' calculations as calculated: their stored events expanded with the job run's snapshots
    (`trail.expand`), and their stored documents."""
    out: dict[str, _Stored] = {}
    try:
        rows = trail.read_calculated(conn, job.correlation_id, user_ids)
    except trail.MissingSnapshot as exc:
        raise IncompleteCalculation(f"job run {job.id}: {exc}; the calculation cannot be rebuilt from the trail"
                                    ) from None
    # oldest first: a user's last attempt last, its CALC_STARTED the calculation's (docs/audit.md)
    for uid, _, etype, payload, created in rows:
        out.setdefault(uid, _Stored()).events[etype] = (payload, created)
    for uid in [u for u, s in out.items() if FAILED_EVENT in s.events and "CALC_COMPLETED" not in s.events]:
        del out[uid]  # a failed user's trail (CALC_STARTED, CALC_FAILED): no calculation to replay (`_no_events`)
    keys = [(uid, (s.events["CALC_COMPLETED"][0].get("document") or {}).get("generatedAt"))
            for uid, s in out.items() if "CALC_COMPLETED" in s.events]
    for uid, text in trail.read_documents(conn, job.correlation_id, [(u, g) for u, g in keys if g]).items():
        out[uid].document = text
    return out


def _no_events(conn: psycopg.Connection, job: JobRun, user_id: str) -> UnknownCalculation:
    row = conn.execute("SELECT status, stage, error FROM overnight_job_users WHERE job_run_id = %s AND user_id = %s",
                       (job.id, user_id)).fetchone()
    where = f"job run {job.id} ({job.market} {job.session_date}, correlation id {job.correlation_id})"
    if row is not None and row[0] == "failed":
        return UnknownCalculation(f"user {user_id} failed in {where} at stage {row[1]!r} ({row[2]}): there is no "
                                  "calculation to replay; fix the cause and re-run the session")
    return UnknownCalculation(f"user {user_id} has no calculation events in {where}: the user was not served by "
                              "that job run (see overnight_job_users), or its events are past the audit retention")


# --------------------------------------------------------------------------- rebuilding the inputs


@dataclass
class _Rebuilt:
    user: UserRow
    criteria: tuple[str, tuple[str, int, Any]]
    group: str  # users of one group share a Batch: same rates, contribution, floor and excluded quotes
    rates: RatesSnapshot
    contribution: Contribution | None
    score_floor: Decimal
    no_price: frozenset[str]
    stale: frozenset[str]
    completed_at: datetime
    last_known: dict[str, PriceQuote]


def _rebuild(uid: str, stored: _Stored, assets: dict[str, AssetRow]) -> _Rebuilt:
    inputs = stored.events["INPUTS_CAPTURED"][0]
    started = stored.events["CALC_STARTED"][0]
    scores = stored.events["SCORES_COMPUTED"][0]
    completed_payload, completed_time = stored.events["CALC_COMPLETED"]
    missing = sorted(s for s in list(inputs["holdings"]) + list(inputs["watchlist"]) if s not in assets)
    if missing:
        raise IncompleteCalculation(f"user {uid}: the job run's asset snapshot (overnight_job_assets) lacks "
                                    f"{', '.join(missing[:10])}; the calculation cannot be rebuilt from the trail")
    key = started["criteriaKey"]
    version = int(str(inputs["criteriaVersion"]).rsplit("@v", 1)[1])
    given = inputs.get("contributionGiven")
    contribution = Contribution(Decimal(given["amount"]), given["currency"]) if given else None
    user = UserRow(
        uid, inputs["baseCurrency"], None if given else Decimal(inputs["contribution"]), list(inputs["markets"]), key,
        holdings=[(assets[s].id, Decimal(q)) for s, q in inputs["holdings"].items()],
        watchlist=[assets[s].id for s in inputs["watchlist"]],
        targets=[Target(name, Decimal(lo), Decimal(hi)) for name, lo, hi in inputs["targets"]],
    )
    # The night's judgement of its rates (docs/freshness.md): which of the user's conversions used a stale rate.
    stale_in = inputs.get("ratesStaleIn", list(inputs["rates"]) if inputs["ratesStale"] else [])
    rates = RatesSnapshot(inputs["ratesBase"], {k: Decimal(v) for k, v in inputs["rates"].items()},
                          datetime.fromisoformat(inputs["ratesAsOf"]), "replay", bool(inputs["ratesStale"]),
                          stale_in=frozenset(stale_in))
    # Symbols the user saw without a usable price had no quote in their batch: they stay without one here.
    # Holdings valued at their newest known price (docs/allocation.md) had no usable quote either; the price they
    # were valued at is the night's, kept in the event.
    known = inputs.get("lastKnownPrices") or []
    last_known = {k["symbol"]: PriceQuote(k["symbol"], Decimal(k["price"]), k["currency"],
                                          datetime.fromisoformat(k["asOf"])) for k in known}
    no_price = frozenset([s for s, reason in scores["unscored"].items() if reason == NO_PRICE]
                         + [u["symbol"] for u in inputs["unpricedHoldings"] if u.get("reason") in (NO_PRICE, NO_PRICE_KNOWN)]
                         + list(last_known))
    generated = (completed_payload.get("document") or {}).get("generatedAt")
    completed_at = datetime.fromisoformat(generated) if generated else completed_time.astimezone(UTC)
    stale = frozenset(inputs.get("stalePrices") or ())  # the night's judgement of its quotes (docs/freshness.md)
    group = _show([inputs["rates"], inputs["ratesBase"], inputs["ratesAsOf"], inputs["ratesStale"], sorted(stale_in), given,
                   inputs["scoreFloor"], sorted(no_price), sorted(stale), known])
    return _Rebuilt(user, (key, (f"{key}@v{version}", version, inputs["criteria"])), group, rates, contribution,
                    Decimal(inputs["scoreFloor"]), no_price, stale, completed_at, last_known)


# --------------------------------------------------------------------------- replaying


def replay(conn: psycopg.Connection, correlation_id: str, user_ids: list[str] | None = None) -> list[ReplayResult]:
    """Replays the calculations of a job run (every user, or `user_ids`), in bulk; returns one result per user.

    Raises UnknownCalculation for an unknown correlation id or a requested user without events, and
    IncompleteCalculation when a user's events or the job run's snapshot are incomplete."""
    job = _job(conn, correlation_id)
    wanted = None if user_ids is None else [_user_id(u) for u in user_ids]
    stored = _stored(conn, job, wanted)
    for uid in wanted or []:
        if uid not in stored:
            raise _no_events(conn, job, uid)
    results: dict[str, ReplayResult] = {}
    todo: dict[str, _Stored] = {}
    for uid, s in sorted(stored.items()):
        absent = [t for t in EVENT_TYPES if t not in s.events]
        if absent:
            raise IncompleteCalculation(
                f"user {uid}, correlation id {job.correlation_id}: events missing from calculation_events: "
                f"{', '.join(absent)} (has {', '.join(t for t in EVENT_TYPES if t in s.events) or 'none'}); "
                "a calculation writes all four in one transaction, so rows were deleted or the partition dropped")
        version = s.events["INPUTS_CAPTURED"][0].get("calcVersion")
        if version is None:
            results[uid] = _result(job, uid, OTHER_VERSION, None, s, note=(
                "recorded before calculations carried a calcVersion and an asset snapshot: it cannot be replayed"))
        else:
            todo[uid] = s
    if todo:
        symbols = sorted({sym for s in todo.values() for k in ("holdings", "watchlist")
                          for sym in s.events["INPUTS_CAPTURED"][0][k]})
        assets = {r[1]: loading.snapshot_asset(r) for r in conn.execute(
            loading.SNAPSHOT_SELECT + " AND symbol = ANY(%s)", (job.id, symbols)).fetchall()}
        quotes = {sym: PriceQuote(sym, price, ccy.strip(), as_of.astimezone(UTC)) for sym, price, ccy, as_of in conn.execute(
            "SELECT symbol, price, currency, as_of FROM overnight_job_prices WHERE job_run_id = %s AND symbol = ANY(%s)",
            (job.id, symbols)).fetchall()}
        rebuilt = [_rebuild(uid, s, assets) for uid, s in todo.items()]
        for batch, users in _batches(job, rebuilt, assets, quotes):
            calculated, failures = calculate.calculate_chunk(users, batch)
            for r in calculated:
                results[r.user_id] = _compare(job, todo[r.user_id], r)
            for uid, stage, message in failures:
                s = todo[uid]
                results[uid] = _result(job, uid, DIFFERENT, s.events["INPUTS_CAPTURED"][0].get("calcVersion"), s,
                                       differences=[f"the replay failed at stage {stage!r}: {message}"])
    return [results[uid] for uid in sorted(results)]


def _batches(job: JobRun, rebuilt: list[_Rebuilt], assets: dict[str, AssetRow], quotes: dict[str, PriceQuote]
             ) -> list[tuple[Batch, list[UserRow]]]:
    """Users grouped into Batches sharing rates, contribution, floor, quotes and one version per criteria key."""
    bins: list[tuple[_Rebuilt, dict[str, tuple[str, int, Any]], list[_Rebuilt]]] = []
    for rb in rebuilt:
        key, criteria = rb.criteria
        for first, crit, members in bins:
            if first.group == rb.group and crit.get(key, criteria) == criteria:
                crit[key] = criteria
                members.append(rb)
                break
        else:
            bins.append((rb, {key: criteria}, [rb]))
    by_id = {a.id: a for a in assets.values()}
    out = []
    for first, by_key, members in bins:
        ids = {aid for rb in members for aid, _ in rb.user.holdings} | {aid for rb in members for aid in rb.user.watchlist}
        prices = {s: q for s, q in quotes.items() if s not in first.no_price}
        batch = Batch(job, first.rates, {aid: by_id[aid] for aid in sorted(ids)}, by_key, prices, first.contribution,
                      score_floor=first.score_floor, stale_prices=first.stale, completed_at={rb.user.id: rb.completed_at for rb in members},
                      last_known=first.last_known)
        out.append((batch, [rb.user for rb in members]))
    return out


def _result(job: JobRun, uid: str, status: str, version: str | None, stored: _Stored, **extra: Any) -> ReplayResult:
    sha = (stored.events.get("CALC_COMPLETED", ({}, None))[0].get("document") or {}).get("sha256")
    return ReplayResult(uid, job.correlation_id, job.id, job.market, job.session_date, status, version,
                        stored_sha256=sha, **extra)


def _compare(job: JobRun, stored: _Stored, result: jobrun.UserResult) -> ReplayResult:
    """Compares a replayed calculation with the stored one: events field by field, the document by its sha256."""
    differences: list[str] = []
    replayed_events = {etype: json.loads(msgspec.json.encode(payload)) for etype, _, payload, _ in result.events}
    for etype in EVENT_TYPES:
        differences += diff(_comparable(etype, stored.events[etype][0]), _comparable(etype, replayed_events[etype]),
                            etype)
    stored_sha = (stored.events["CALC_COMPLETED"][0].get("document") or {}).get("sha256")
    replayed_sha = hashlib.sha256(result.document_json.encode()).hexdigest()
    if stored.document is None:
        differences.append("document: no stored copy in recommendation_history for this calculation")
    else:
        copy_sha = hashlib.sha256(stored.document.encode()).hexdigest()
        if copy_sha != stored_sha:
            differences.append(f"document: the stored copy's sha256 {copy_sha} is not the trail's {stored_sha}")
        if replayed_sha != stored_sha:
            found = diff(json.loads(stored.document), json.loads(result.document_json))
            differences += found or [f"document: same fields, other bytes (sha256 stored {stored_sha}, "
                                     f"replayed {replayed_sha})"]
    version = stored.events["INPUTS_CAPTURED"][0].get("calcVersion")
    status = OTHER_VERSION if version != CALC_VERSION else DIFFERENT if differences else IDENTICAL
    note = (f"recorded by calcVersion {version}, replayed by {CALC_VERSION}: differences may be the new rules'"
            if status == OTHER_VERSION else None)
    if len(differences) > MAX_DIFFERENCES:
        differences = differences[:MAX_DIFFERENCES] + [f"... and {len(differences) - MAX_DIFFERENCES} more"]
    return ReplayResult(result.user_id, job.correlation_id, job.id, job.market, job.session_date, status, version,
                        stored_sha256=stored_sha, replayed_sha256=replayed_sha, differences=differences, note=note)


def replay_user(conn: psycopg.Connection, correlation_id: str, user_id: str) -> ReplayResult:
    """Replays one user's calculation in the job run of `correlation_id`."""
    return replay(conn, correlation_id, [user_id])[0]


def find_calculation(conn: psycopg.Connection, user_id: str, *, job_run_id: str | None = None,
                     session: date | None = None, market: str | None = None) -> str:
    """The correlation id of a user's calculation: in a job run, of a market's session, or else the latest one (of
    the newest session, the dashboard's document; the last calculated when a session was re-run)."""
    uid = _user_id(user_id)
    if job_run_id is not None:
        try:
            jid = str(uuid.UUID(str(job_run_id)))
        except ValueError:
            raise UnknownCalculation(f"job run id {str(job_run_id)[:80]!r} is not a UUID") from None
        row = conn.execute("SELECT correlation_id FROM overnight_job_runs WHERE id = %s", (jid,)).fetchone()
        if row is None:
            raise UnknownCalculation(f"no job run {jid} in overnight_job_runs (mistyped, or purged by retention)")
        return str(row[0])
    # the chunks holding the user (the GIN index on user_ids), then the rows from before migration 0011
    cond = ""
    params: dict[str, Any] = {"u": uid}
    if session is not None or market is not None:
        if session is None or market is None:
            raise UnknownCalculation("give both a session date and a market (e.g. SESSION=2026-12-01 MARKET=XNYS)")
        cond = " AND h.session_date = %(s)s AND j.market = %(m)s"
        params.update(s=session, m=market.upper())
    sql = ("SELECT j.correlation_id, h.session_date, h.generated_at FROM (SELECT c.job_run_id, c.session_date,"
           " c.generated_at[array_position(c.user_ids, %(u)s::uuid)] AS generated_at FROM calculation_chunks c"
           " WHERE c.user_ids @> ARRAY[%(u)s::uuid]) h JOIN overnight_job_runs j ON j.id = h.job_run_id"
           " WHERE h.generated_at IS NOT NULL" + cond +
           " UNION ALL SELECT j.correlation_id, h.session_date, h.generated_at FROM recommendation_history_rows h"
           " JOIN overnight_job_runs j ON j.id = h.job_run_id WHERE h.user_id = %(u)s" + cond)
    row = conn.execute(sql + " ORDER BY 2 DESC, 3 DESC LIMIT 1", params).fetchone()
    if row is None:
        what = f" for {market} {session}" if session is not None else ""
        raise UnknownCalculation(f"user {uid} has no calculation{what} in recommendation_history: the id is "
                                 "mistyped, the user was not calculated (then or ever), or it was before replay existed")
    return str(row[0])


def main(argv: list[str] | None = None) -> int:
    """Command line (`make replay`): replays a user's calculation and prints `identical` or the differences."""
    parser = argparse.ArgumentParser(prog="python -m overnight.night.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--user", required=True, help="the user's id (UUID)")
    parser.add_argument("--job", default="", help="a job run id (default: the user's latest calculation)")
    parser.add_argument("--session", default="", help="with --market: that session's calculation (YYYY-MM-DD)")
    parser.add_argument("--market", default="", help="with --session: the market, e.g. XNYS")
    args = parser.parse_args(argv)
    from overnight.adapters import db

    try:
        session = date.fromisoformat(args.session) if args.session else None
    except ValueError:
        print(f"error: SESSION={args.session!r} is not a date YYYY-MM-DD", file=sys.stderr)
        return 2
    try:
        with db.connect() as conn:
            corr = find_calculation(conn, args.user, job_run_id=args.job or None, session=session,
                                    market=args.market or None)
            result = replay_user(conn, corr, args.user)
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"error: connection 'overnight_postgres': {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(result.text())
    return 0 if result.status == IDENTICAL else 1


if __name__ == "__main__":
    sys.exit(main())

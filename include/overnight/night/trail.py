"""The audit trail's layout: a user's events as calculated and as stored, and back (docs/audit.md).

A calculation makes its four events whole (`calculate.finish_user`); the replay compares whole events. What
belongs to the job run is stored once, in its snapshots, and a user's events point at it:
- INPUTS_CAPTURED: `criteria` of a shared version is in `overnight_job_criteria` (by `criteriaVersion`), `rates` in
  `overnight_job_rates` (by `ratesId`, the rates' digest), and `prices` becomes `pricedSymbols`: the quotes the
  calculation used, whose prices are `overnight_job_prices`'.
- SCORES_COMPUTED: names its `criteriaVersion` and `universe` (every asset in scope, scored or not); the scores of a
  shared criteria version are in `overnight_job_scores`, one row per version and asset; a version no other user
  of the batch has (a user's own criteria) keeps its rules, `scores` and `unscored` in the user's events.
Everything else is the user's and stored whole. A chunk of users is one row of `calculation_chunks`; the views
`calculation_events` and `recommendation_history` show one row per event and per document.

No Airflow. `compact` is pure; the `read_*` functions take a psycopg connection.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from overnight.domain.scoring import NO_USABLE_PRICE
from overnight.night.jobrun import _encode, _num

MAX_CHUNK_USERS = 1 << 16  # the user's position lives in 17 bits of an event id (migration 0011)
_US = timedelta(microseconds=1)
# An asset not scored for want of a usable price or of an exchange rate: the quotes a batch may use (docs/freshness.md)
# and the rates an execution fetched are the batch's and the execution's, not a function of (criteria version,
# asset), so these reasons stay in the user's event; the shared table holds scores and missing fundamentals only.
_NO_RATE = "no exchange rate for "


def _own(reason: str) -> bool:
    return reason == NO_USABLE_PRICE or reason.startswith(_NO_RATE)


def new_chunk_id() -> str:
    """A random (version 4) UUID whose last 20 bits are zero: an event's id puts its user's and its own position
    there (`overnight_event_id`, migration 0011)."""
    h = bytearray(os.urandom(16))
    h[6] = (h[6] & 0x0F) | 0x40
    h[8] = (h[8] & 0x3F) | 0x80
    h[13], h[14], h[15] = h[13] & 0xF0, 0, 0
    return str(uuid.UUID(bytes=bytes(h)))


def rates_id(rates: dict[str, str]) -> str:
    """The digest that names a set of rates in `overnight_job_rates` (the first 16 hex digits of its sha256)."""
    return hashlib.sha256(_encode(dict(sorted(rates.items()))).encode()).hexdigest()[:16]


@dataclass
class Chunk:
    """One chunk's row and the snapshot rows its users point at."""

    user_ids: list[str] = field(default_factory=list)
    events: list[list[list[Any]]] = field(default_factory=list)  # per user: [type, µs after created_at, payload]
    created_at: datetime | None = None
    symbols: set[str] = field(default_factory=set)
    criteria: dict[str, Any] = field(default_factory=dict)  # criteria version -> rules
    rates: dict[str, dict[str, str]] = field(default_factory=dict)  # rates id -> rates
    # shared criteria versions' outcomes: version -> {symbol: score text}, and version -> {symbol: reason not scored}
    scores: dict[str, dict[str, str]] = field(default_factory=dict)
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)

    def score_rows(self, skip: dict[str, set[str]] | None = None) -> list[tuple[str, str, str | None, str | None]]:
        """`overnight_job_scores` rows (version, symbol, score, reason), sorted, but for the symbols `skip` names
        for a version."""
        rows: list[tuple[str, str, str | None, str | None]] = []
        for version in self.scores.keys() | self.reasons.keys():
            scores, reasons = self.scores.get(version, {}), self.reasons.get(version, {})
            done = skip.get(version, set()) if skip else set()
            rows.extend((version, s, scores.get(s), reasons.get(s)) for s in (scores.keys() | reasons.keys()) - done)
        rows.sort()
        return rows


def compact(users: Iterable[tuple[str, list[tuple[str, datetime, dict[str, Any], Any]], bool]]) -> Chunk:
    """The stored form of the users' events (user id, [(type, time, payload, _)], shared): what belongs to the job
    run taken out into the snapshot rows (`shared`: the user's criteria version is several users', its scores go to
    `overnight_job_scores`)."""
    chunk = Chunk()
    stored: list[list[tuple[str, datetime, dict[str, Any]]]] = []
    last_rates: Any = None  # the users of a batch share one rates dict: its digest is taken once (`rates_id`)
    rid = ""
    for uid, events, shared in users:
        out = []
        version = None
        for etype, at, payload, _ in events:
            if etype == "INPUTS_CAPTURED":
                payload = dict(payload)
                version = payload["criteriaVersion"]
                if shared:
                    chunk.criteria.setdefault(version, payload.pop("criteria"))
                rates = payload.pop("rates")
                if rates is not last_rates:
                    rid, last_rates = rates_id(rates), rates
                    chunk.rates.setdefault(rid, rates)
                payload["ratesId"] = rid
                payload["pricedSymbols"] = sorted(payload.pop("prices"))
            elif etype == "SCORES_COMPUTED":
                scores, unscored = payload["scores"], payload["unscored"]
                universe = sorted(scores.keys() | unscored.keys())
                chunk.symbols.update(universe)
                if version is not None and shared:
                    payload = {"criteriaVersion": version, "universe": universe}
                    chunk.scores.setdefault(version, {}).update(scores)
                    if unscored:
                        own = {}
                        reasons = chunk.reasons.setdefault(version, {})
                        for s, why in unscored.items():
                            if _own(why):  # the batch's quotes or the execution's rates: the user's
                                own[s] = why
                            else:
                                reasons[s] = why
                        if own:
                            payload["unscored"] = own
                else:
                    payload = {"criteriaVersion": version, "universe": universe, "scores": scores,
                               "unscored": unscored}
            out.append((etype, at, payload))
        chunk.user_ids.append(uid)
        stored.append(out)
    if len(chunk.user_ids) > MAX_CHUNK_USERS:
        raise ValueError(f"a chunk of {len(chunk.user_ids)} users: at most {MAX_CHUNK_USERS} (the writer's chunks are "
                         "CHUNK_SIZE users)")
    base = min((at for out in stored for _, at, _ in out), default=None)
    chunk.created_at = base
    if base is not None:
        chunk.events = [[[etype, (at - base) // _US, payload] for etype, at, payload in out] for out in stored]
    return chunk


# --------------------------------------------------------------------------- reading


EVENTS_SQL = (
    "SELECT p.uid::text, overnight_event_id(c.chunk_id, p.n, e.n), e.ev ->> 0, (e.ev -> 2)::jsonb,"
    " c.created_at + (e.ev ->> 1)::bigint * interval '1 microsecond'"
    " FROM calculation_chunks c"
    " CROSS JOIN LATERAL unnest(c.user_ids) WITH ORDINALITY AS p(uid, n)"
    " CROSS JOIN LATERAL json_array_elements(c.events -> (p.n::int - 1)) WITH ORDINALITY AS e(ev, n)"
    " WHERE c.correlation_id = %(corr)s{chunk_users}{users}"
    " UNION ALL SELECT user_id::text, event_id, event_type, payload, created_at FROM calculation_events_rows"
    " WHERE correlation_id = %(corr)s{row_users}"
)


def events_sql(for_users: bool) -> str:
    """The SQL of a job run's events (`%(corr)s`), of the users `%(users)s` (a uuid[]) when `for_users`: rows of
    (user id, event id, type, payload, time), the older rows (`calculation_events_rows`) included. The chunks are
    found by the GIN index on their users."""
    return EVENTS_SQL.format(
        chunk_users=" AND c.user_ids && %(users)s::uuid[]" if for_users else "",
        users=" AND p.uid = ANY(%(users)s::uuid[])" if for_users else "",
        row_users=" AND user_id = ANY(%(users)s::uuid[])" if for_users else "")


def read_events(conn: psycopg.Connection, correlation_id: str, user_ids: list[str] | None
                ) -> list[tuple[str, str, str, dict[str, Any], datetime]]:
    """A job run's events, as stored, oldest first: (user id, event id, type, payload, time)."""
    params: dict[str, Any] = {"corr": correlation_id, "users": user_ids}
    return conn.execute(events_sql(user_ids is not None) + " ORDER BY 5, 2", params).fetchall()


def read_documents(conn: psycopg.Connection, correlation_id: str, keys: list[tuple[str, str]]) -> dict[str, str]:
    """The stored documents of (user id, generatedAt) in a job run: user id -> exact text."""
    if not keys:
        return {}
    rows = conn.execute(
        "WITH k AS (SELECT * FROM unnest(%(u)s::uuid[], %(g)s::timestamptz[]) AS k(u, g))"
        " SELECT p.uid::text, c.documents[p.n] FROM calculation_chunks c"
        " CROSS JOIN LATERAL unnest(c.user_ids) WITH ORDINALITY AS p(uid, n)"
        " JOIN k ON k.u = p.uid AND k.g = c.generated_at[p.n]"
        " WHERE c.correlation_id = %(corr)s AND c.user_ids && %(u)s::uuid[] AND c.documents[p.n] IS NOT NULL"
        " UNION ALL SELECT h.user_id::text, h.document FROM recommendation_history_rows h"
        " JOIN overnight_job_runs j ON j.id = h.job_run_id JOIN k ON k.u = h.user_id AND k.g = h.generated_at"
        " WHERE j.correlation_id = %(corr)s",
        {"u": [u for u, _ in keys], "g": [g for _, g in keys], "corr": correlation_id}).fetchall()
    return {u: text for u, text in rows}


@dataclass
class Snapshots:
    """What a job run's events point at: criteria rules, rates, quotes' prices as the events show them, and the
    scores of shared criteria versions."""

    criteria: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, dict[str, str]] = field(default_factory=dict)
    prices: dict[str, str] = field(default_factory=dict)
    scores: dict[str, dict[str, tuple[str | None, str | None]]] = field(default_factory=dict)


def read_snapshots(conn: psycopg.Connection, job_run_id: str, payloads: list[dict[str, dict[str, Any]]]) -> Snapshots:
    """The snapshot rows the users' stored events (`{type: payload}` each) point at, read in four queries."""
    versions: set[str] = set()
    rids: set[str] = set()
    symbols: set[str] = set()
    scored: set[str] = set()
    for p in payloads:
        inputs, scores = p.get("INPUTS_CAPTURED") or {}, p.get("SCORES_COMPUTED") or {}
        if "criteria" not in inputs and "criteriaVersion" in inputs:
            versions.add(inputs["criteriaVersion"])
        if "ratesId" in inputs:
            rids.add(inputs["ratesId"])
        symbols.update(inputs.get("pricedSymbols") or ())
        if "universe" in scores and "scores" not in scores:
            scored.add(scores["criteriaVersion"])
    snap = Snapshots()
    if versions:
        snap.criteria = dict(conn.execute("SELECT criteria_version, rules FROM overnight_job_criteria"
                                          " WHERE job_run_id = %s AND criteria_version = ANY(%s)",
                                          (job_run_id, sorted(versions))).fetchall())
    if rids:
        snap.rates = dict(conn.execute("SELECT rates_id, rates FROM overnight_job_rates WHERE job_run_id = %s"
                                       " AND rates_id = ANY(%s)", (job_run_id, sorted(rids))).fetchall())
    if symbols:
        snap.prices = {s: _num(p) for s, p in conn.execute(
            "SELECT symbol, price FROM overnight_job_prices WHERE job_run_id = %s AND symbol = ANY(%s)",
            (job_run_id, sorted(symbols)))}
    if scored:
        for version, symbol, score, reason in conn.execute(
                "SELECT criteria_version, symbol, score, reason FROM overnight_job_scores WHERE job_run_id = %s"
                " AND criteria_version = ANY(%s)", (job_run_id, sorted(scored))):
            snap.scores.setdefault(version, {})[symbol] = (score, reason)
    return snap


class MissingSnapshot(LookupError):
    """A stored event points at a snapshot row that is not there."""


def expand(etype: str, payload: dict[str, Any], snap: Snapshots) -> dict[str, Any]:
    """An event as it was calculated, from its stored form and the job run's snapshots. Events stored whole (before migration 0011) come back as they are;
    raises MissingSnapshot naming the row that is missing."""
    if etype == "INPUTS_CAPTURED" and "pricedSymbols" in payload:
        out = dict(payload)
        version, rid = out["criteriaVersion"], out.pop("ratesId")
        if "criteria" not in out and version not in snap.criteria:
            raise MissingSnapshot(f"overnight_job_criteria has no row for criteria version {version}")
        if rid not in snap.rates:
            raise MissingSnapshot(f"overnight_job_rates has no row for ratesId {rid}")
        missing = [s for s in out["pricedSymbols"] if s not in snap.prices]
        if missing:
            raise MissingSnapshot(f"overnight_job_prices has no quote for {', '.join(missing[:10])}")
        if "criteria" not in out:
            out["criteria"] = snap.criteria[version]
        out["rates"] = snap.rates[rid]
        out["prices"] = {s: snap.prices[s] for s in out.pop("pricedSymbols")}
        return out
    if etype == "SCORES_COMPUTED" and "universe" in payload:
        if "scores" in payload:
            return {"scores": payload["scores"], "unscored": payload["unscored"]}
        version = payload["criteriaVersion"]
        table = snap.scores.get(version, {})
        own = payload.get("unscored") or {}
        scores: dict[str, str] = {}
        unscored: dict[str, str] = {}
        for s in payload["universe"]:
            if s in own:
                unscored[s] = own[s]
                continue
            if s not in table:
                raise MissingSnapshot(f"overnight_job_scores has no row for criteria version {version}, asset {s}")
            score, reason = table[s]
            if score is not None:
                scores[s] = score
            else:
                unscored[s] = reason or ""
        return {"scores": scores, "unscored": unscored}
    return payload


def read_calculated(conn: psycopg.Connection, correlation_id: str, user_ids: list[str] | None = None
                    ) -> list[tuple[str, str, str, dict[str, Any], datetime]]:
    """A job run's events as they were calculated, oldest first: (user id, event id, type, payload, time), each
    payload expanded with the job run's snapshots (`expand`); raises MissingSnapshot naming what is missing."""
    rows = read_events(conn, correlation_id, user_ids)
    if not rows:
        return []
    row = conn.execute("SELECT id FROM overnight_job_runs WHERE correlation_id = %s", (correlation_id,)).fetchone()
    by_user: dict[str, dict[str, dict[str, Any]]] = {}
    for uid, _, etype, payload, _ in rows:
        by_user.setdefault(uid, {})[etype] = payload
    snap = read_snapshots(conn, str(row[0]), list(by_user.values())) if row else Snapshots()
    return [(uid, str(eid), etype, expand(etype, payload, snap), at) for uid, eid, etype, payload, at in rows]

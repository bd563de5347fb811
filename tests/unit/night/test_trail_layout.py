"""The trail's stored form loses nothing: a user's events, compacted (`trail.compact`) and expanded again with
the snapshot rows the chunk wrote (`trail.expand`), are the events as calculated, for random users; what belongs
to the job run leaves the user's events, and what is the user's stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from overnight.night import trail

SYMBOLS = [f"S{i}" for i in range(40)]
REASONS = ["no usable price", "no exchange rate for ARS", "missing fundamental 'roe'"]
T0 = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)


@st.composite
def user(draw: Any, uid: int) -> tuple[str, list[tuple[str, datetime, dict[str, Any], None]], bool]:
    universe = draw(st.lists(st.sampled_from(SYMBOLS), unique=True, max_size=12))
    version = draw(st.sampled_from(["tpl-1@v1", "tpl-2@v3", f"own-{uid}@v1"]))
    shared = not version.startswith("own")
    # a shared version's outcome on an asset is the same for every user (a function of version and asset: a score
    # or a missing fundamental), but for the reasons that are the user's batch's (no usable price, no rate)
    scores: dict[str, str] = {}
    unscored: dict[str, str] = {}
    for s in universe:
        batch_reason = draw(st.sampled_from([None, None, None, REASONS[0], REASONS[1]]))
        if batch_reason is not None:
            unscored[s] = batch_reason
        elif hash((version, s)) % 3 == 2:
            unscored[s] = REASONS[2]
        else:
            scores[s] = f"{(hash((version, s)) % 9) - 2}"
    holdings = {s: draw(st.sampled_from(["0", "1.5", "200"])) for s in universe[:3]}
    inputs = {"jobRunId": "j", "criteriaVersion": version, "criteria": [{"metric": "roe", "points": version}],
              "prices": {s: f"{len(s)}.5" for s in list(holdings) + list(scores)},
              "rates": {"USD": "1", "BRL": draw(st.sampled_from(["5.35", "5.4"]))}, "ratesBase": "USD",
              "holdings": holdings, "watchlist": universe[3:], "calcVersion": "x"}
    at = [T0 + timedelta(microseconds=draw(st.integers(0, 10**6)) + i) for i in range(4)]
    return str(uid), [("CALC_STARTED", at[0], {"criteriaKey": version.split("@")[0]}, None),
                      ("INPUTS_CAPTURED", at[1], inputs, None),
                      ("SCORES_COMPUTED", at[2], {"scores": scores, "unscored": unscored}, None),
                      ("CALC_COMPLETED", at[3], {"durationMs": 1.0}, None)], shared


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10**6), unique=True, min_size=1, max_size=8).flatmap(
    lambda ids: st.tuples(*(user(i) for i in ids))))
def test_compact_then_expand_gives_the_events_back(users: tuple[Any, ...]) -> None:
    chunk = trail.compact(users)
    snap = trail.Snapshots(criteria=dict(chunk.criteria), rates=dict(chunk.rates),
                           prices={s: p for _, events, _ in users for s, p in events[1][2]["prices"].items()})
    for version, symbol, score, reason in chunk.score_rows():
        snap.scores.setdefault(version, {})[symbol] = (score, reason)
    assert chunk.user_ids == [u for u, _, _ in users]
    assert chunk.created_at == min(at for _, events, _ in users for _, at, _, _ in events)
    for (uid, events, shared), stored in zip(users, chunk.events, strict=True):
        assert [e[0] for e in stored] == [e[0] for e in events]
        for (etype, at, payload, _), (_, offset, kept) in zip(events, stored, strict=True):
            assert chunk.created_at + timedelta(microseconds=offset) == at
            assert trail.expand(etype, kept, snap) == payload, (uid, etype)
        inputs, scores = stored[1][2], stored[2][2]
        assert "prices" not in inputs and "rates" not in inputs  # the job run's, stored once
        assert ("criteria" in inputs) is not shared and ("scores" in scores) is not shared
        assert scores["universe"] == sorted(events[2][2]["scores"].keys() | events[2][2]["unscored"].keys())
        assert set(scores["universe"]) <= chunk.symbols
        if shared:  # only the batch's reasons stay with the user
            assert set(scores.get("unscored", {}).values()) <= {"no usable price", "no exchange rate for ARS"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10**6), unique=True, min_size=1, max_size=8).flatmap(
    lambda ids: st.tuples(*(user(i) for i in ids))), st.data())
def test_a_chunk_offers_each_shared_row_once_and_skips_what_the_batch_offered(users: tuple[Any, ...],
                                                                              data: Any) -> None:
    """The writer offers `score_rows(skip)`: every (version, symbol) once, sorted (two batches never wait on each
    other's rows crosswise), without the rows an earlier chunk of the batch offered; each user's ratesId is the
    digest of the rates they used (taken once per rates object)."""
    chunk = trail.compact(users)
    every = chunk.score_rows()
    assert every == sorted(every)
    assert len({(v, s) for v, s, _, _ in every}) == len(every)
    shared_pairs = {(e[2]["criteriaVersion"], s) for _, events, shared in users if shared for e in events[1:2]
                    for s in events[2][2]["scores"]}
    assert shared_pairs <= {(v, s) for v, s, score, _ in every if score is not None}
    offered = data.draw(st.sets(st.sampled_from(every))) if every else set()
    skip: dict[str, set[str]] = {}
    for version, symbol, _, _ in offered:
        skip.setdefault(version, set()).add(symbol)
    assert chunk.score_rows(skip) == [r for r in every if r not in offered]
    for (_, events, _), stored in zip(users, chunk.events, strict=True):
        assert stored[1][2]["ratesId"] == trail.rates_id(events[1][2]["rates"])
        assert chunk.rates[stored[1][2]["ratesId"]] == events[1][2]["rates"]

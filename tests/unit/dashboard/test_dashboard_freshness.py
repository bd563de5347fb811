"""The dashboard's `stale` and `staleReason` (docs/freshness.md) on the real XNYS calendar, clock set by the
test: a Friday document is fresh all weekend until Monday's run + 2 h, from the fast path and the general one."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from overnight.dashboard import json_body, models
from overnight.dashboard.docview import OVERDUE, view_from_document

UID = "00a41595-d052-5458-a63d-f21b399f9df9"
FRIDAY_DOC: dict[str, Any] = {
    "userId": UID,
    "generatedAt": "2026-11-20T12:40:00+00:00",  # XNYS's Friday run (12:30 UTC, open 14:30 UTC EST)
    "recommendations": [
        {"assetId": "1758", "symbol": "RWT", "score": "15", "amount": "894.12", "currency": "USD",
         "allocationGap": "18.16", "breakdown": {"criteriaCount": 4, "topContributor": "payout_ratio"}},
    ],
    "portfolioSummary": {"totalValue": "2025386.79", "baseCurrency": "USD", "allocations": {"Stocks": "61.38"}},
    "dataFreshness": {"pricesAsOf": "2026-11-19T21:00:00+00:00", "ratesAsOf": "2026-11-19T15:00:00+00:00",
                      "criteriaVersion": "tpl-01@v1"},
    "totalInvestable": "4500.00",
    "ratesStale": False,
    "stalePrices": [],
    "correlationId": "a817c98d-329a-4e9c-acff-56274b3ac73c",
    "market": "XNYS",
    "sessionDate": "2026-11-20",
}
RESPONSE = pydantic.TypeAdapter(models.DashboardResponse)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _general(doc: dict[str, Any], now: datetime) -> bytes:
    data = view_from_document(UID, doc, from_cache=True, now=now).to_json()
    return RESPONSE.dump_json(RESPONSE.validate_python({"data": data}))


def _never_asked(market: str, session: str) -> str | None:
    raise AssertionError(f"the fast path asked about {market}'s run after {session}: no run is due yet")


@pytest.mark.parametrize("moment", [
    pytest.param("2026-11-21T09:00", id="saturday"),
    pytest.param("2026-11-22T23:59", id="sunday"),
    pytest.param("2026-11-23T12:29", id="monday-before-its-run"),
])
def test_a_friday_document_is_fresh_over_the_weekend(moment: str) -> None:
    now = _at(moment)
    view = view_from_document(UID, FRIDAY_DOC, from_cache=False, now=now)  # a Postgres fallback
    assert (view.stale, view.stale_reason, view.next_run_due) == (False, None, False)
    # Before Monday's run is due nothing is looked up: the Redis hit costs no query.
    fast = json_body.cached_dashboard_body(UID, json.dumps(FRIDAY_DOC).encode(), now=now, next_run=_never_asked)
    assert fast == _general(FRIDAY_DOC, now)
    assert (json.loads(fast or b"{}")["data"]["stale"], json.loads(fast or b"{}")["data"]["staleReason"]) == (
        False, None)


# Monday 2026-11-23: XNYS opens 09:30 EST = 14:30 UTC; its run is due at 12:30 UTC (lead 2 h) and the Friday
# document is fresh until 14:30 UTC (grace 2 h), unless that run fails: then stale at once (docs/freshness.md).
@pytest.mark.parametrize(("moment", "next_run", "expected"), [
    pytest.param("2026-11-23T12:30", "run_failed", (True, "run_failed"), id="due-failed-at-once"),
    pytest.param("2026-11-23T12:35", "run_failed", (True, "run_failed"), id="failed-at-12:35"),
    pytest.param("2026-11-23T14:30", "run_failed", (True, "run_failed"), id="failed-at-the-deadline"),
    pytest.param("2026-11-23T12:35", "run_unfinished", (False, None), id="still-running"),
    pytest.param("2026-11-23T12:35", "run_missing", (False, None), id="not-started-yet"),
    pytest.param("2026-11-23T14:30", "user_not_updated", (False, None), id="finished-doc-on-its-way"),
    pytest.param("2026-11-23T14:31", "run_missing", (True, "run_missing"), id="after-the-deadline-missing"),
    pytest.param("2026-11-23T14:31", "run_failed", (True, "run_failed"), id="after-the-deadline-failed"),
])
def test_a_failed_next_run_makes_the_document_stale_at_once(moment: str, next_run: str,
                                                            expected: tuple[bool, str | None]) -> None:
    now = _at(moment)
    asked: list[tuple[str, str]] = []

    def known(market: str, session: str) -> str | None:
        asked.append((market, session))
        return next_run

    fast = json_body.cached_dashboard_body(UID, json.dumps(FRIDAY_DOC).encode(), now=now, next_run=known)
    assert asked == [("XNYS", "2026-11-20")]
    data = json.loads(fast or b"{}")["data"]
    assert (data["stale"], data["staleReason"]) == expected
    # not known yet (not read in the last seconds): the general path asks Postgres
    assert json_body.cached_dashboard_body(UID, json.dumps(FRIDAY_DOC).encode(), now=now,
                                           next_run=lambda m, s: None) is None
    assert json_body.cached_dashboard_body(UID, json.dumps(FRIDAY_DOC).encode(), now=now) is None


def test_overdue_after_mondays_run_plus_grace_goes_to_the_general_path() -> None:
    now = _at("2026-11-23T14:31")
    view = view_from_document(UID, FRIDAY_DOC, from_cache=True, now=now)
    assert (view.stale, view.stale_reason) == (True, OVERDUE)  # the store then says why (run missing, failed...)
    assert json_body.cached_dashboard_body(UID, json.dumps(FRIDAY_DOC).encode(), now=now) is None


@pytest.mark.parametrize(("change", "moment", "reason"), [
    pytest.param({"ratesStale": True}, "2026-11-21T09:00", "rates_stale", id="rates-stale-on-saturday"),
    pytest.param({"generatedAt": None}, "2026-11-21T09:00", "unknown_age", id="unknown-age"),
    pytest.param({"market": None, "sessionDate": None}, "2026-11-21T12:39", None, id="legacy-under-24h"),
    pytest.param({"market": None, "sessionDate": None}, "2026-11-21T12:41", "expired", id="legacy-over-24h"),
    pytest.param({"market": "XNYS", "sessionDate": "2026-11-21"}, "2026-11-21T12:41", "expired",
                 id="not-a-session-24h-rule"),
])
def test_other_reasons(change: dict[str, Any], moment: str, reason: str | None) -> None:
    doc = copy.deepcopy(FRIDAY_DOC) | change
    view = view_from_document(UID, doc, from_cache=True, now=_at(moment))
    assert (view.stale, view.stale_reason) == (reason is not None, reason)
    fast = json_body.cached_dashboard_body(UID, json.dumps(doc).encode(), now=_at(moment))
    assert fast == _general(doc, _at(moment))

"""What the dashboard shows of a stored document: user ids, times, freshness (`staleness`) and the
view (`DashboardView`). Pure helpers, no I/O."""

from __future__ import annotations

import functools
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from overnight.domain import freshness

log = logging.getLogger(__name__)


STALE_AFTER = timedelta(hours=24)


class InvalidUserId(ValueError):
    """The user id is not a UUID."""


class UnknownUser(LookupError):
    """Neither the users table nor any recommendations know this user id."""


# --------------------------------------------------------------------------- pure helpers


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_user_id(raw: str) -> str:
    """Returns the canonical UUID string of `raw`; raises InvalidUserId when it is not a UUID."""
    if type(raw) is str and _CANONICAL_UUID.fullmatch(raw):  # already canonical: as uuid.UUID would write it
        return raw
    try:
        return str(uuid.UUID(str(raw)))
    except (ValueError, AttributeError, TypeError):
        raise InvalidUserId(f"user id {str(raw)[:80]!r} is not a UUID (e.g. 3f2b1c9e-...-...)") from None


def parse_time(value: Any) -> datetime | None:
    """Returns an aware UTC datetime from an ISO string or datetime (naive ones taken as UTC); None if unusable."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


OVERDUE = "overdue"  # past its deadline; the store says why (run failed, missing, unfinished, user not updated)
DUE = "due"  # its market's next run is due (past its scheduled time, not its deadline): fresh unless it failed


@functools.lru_cache(maxsize=64)
def _lead(code: str) -> timedelta | None:
    """The lead of a market in markets.yaml, None when it is not listed (its documents use the 24 h rule)."""
    from overnight.domain.markets import get_market

    try:
        return get_market(code).lead
    except (LookupError, ValueError):
        return None


def _grace() -> timedelta:
    """The grace period setting; a bad value is logged and the default used (a request never fails on it)."""
    try:
        return freshness.grace()
    except freshness.FreshnessConfigError as exc:
        log.warning("dashboard: %s; using %s", exc, freshness.DEFAULT_GRACE)
        return freshness.DEFAULT_GRACE


def _deadline(market: Any, session_date: Any,
              generated_at: datetime | None) -> tuple[datetime | None, datetime | None]:
    """(`fresh_until`, the scheduled time of the market's next run; None for the 24 h rule)."""
    if type(market) is str and type(session_date) is str:
        lead = _lead(market)
        if lead is not None:
            try:
                session = date.fromisoformat(session_date)
                return (freshness.document_deadline(market, lead, session, _grace()),
                        freshness.next_run_time(market, lead, session))
            except ValueError as exc:  # not a session, outside the calendar's data: the 24 h rule
                log.warning("dashboard: %s session %s: %s; judging its documents by age", market, session_date, exc)
    return (generated_at + STALE_AFTER if generated_at is not None else None), None


def fresh_until(market: Any, session_date: Any, generated_at: datetime | None) -> datetime | None:
    """Until when a document is fresh (docs/freshness.md): its market's next session's run + the grace period;
    24 h after `generated_at` for a document without a known market and session."""
    return _deadline(market, session_date, generated_at)[0]


def staleness(generated_at: datetime | None, rates_stale: bool, market: Any = None, session_date: Any = None,
              now: datetime | None = None) -> str | None:
    """Why a document is stale, None when fresh: `rates_stale`, `unknown_age`, `expired` (no market, over 24 h)
    or OVERDUE (its market's next run + grace has passed; `DashboardStore.overdue_reason` says why); DUE when
    that next run's scheduled time has passed but not its deadline: fresh unless that run failed (`resolved`)."""
    if generated_at is None:
        return freshness.UNKNOWN_AGE
    if rates_stale:
        return freshness.RATES_STALE
    until, next_run_at = _deadline(market, session_date, generated_at)
    now = now or datetime.now(UTC)
    if until is None or now <= until:
        return DUE if next_run_at is not None and now >= next_run_at else None
    return OVERDUE if next_run_at is not None else freshness.EXPIRED


def resolved(reason: str | None, next_run: str) -> str | None:
    """The final `staleReason` of a document judged `reason` (OVERDUE or DUE), given what happened to its market's
    next run (`next_run`: `DashboardStore.overdue_reason`): after the deadline that is the reason; before it, only
    a failed run makes the document stale (docs/freshness.md)."""
    if reason == OVERDUE:
        return next_run
    if reason == DUE:
        return freshness.RUN_FAILED if next_run == freshness.RUN_FAILED else None
    return reason


@dataclass(frozen=True)
class DashboardView:
    """What the dashboard shows for one user; `recommendations` are the document's items, unchanged."""

    user_id: str
    recommendations: list[dict[str, Any]]
    total_investable: str | None
    base_currency: str | None
    data_freshness: dict[str, Any] | None
    from_cache: bool
    stale: bool
    correlation_id: str | None = None
    portfolio_summary: dict[str, Any] | None = None
    unallocated: dict[str, Any] | None = None
    unpriced_holdings: list[dict[str, Any]] | None = None
    last_known_prices: list[dict[str, Any]] | None = None
    stale_reason: str | None = None
    next_run_due: bool = False  # fresh unless its market's next run, due now, failed: the store looks (not shown)

    def to_json(self) -> dict[str, Any]:
        """Returns the API's camelCase `data` object."""
        return {
            "userId": self.user_id,
            "recommendations": self.recommendations,
            "totalInvestable": self.total_investable,
            "baseCurrency": self.base_currency,
            "dataFreshness": self.data_freshness,
            "fromCache": self.from_cache,
            "stale": self.stale,
            "correlationId": self.correlation_id,
            "portfolioSummary": self.portfolio_summary,
            "unallocated": self.unallocated,
            "unpricedHoldings": self.unpriced_holdings,
            "lastKnownPrices": self.last_known_prices,
            "staleReason": self.stale_reason,
        }


def view_from_document(
    user_id: str, doc: dict[str, Any], *, from_cache: bool, base_currency: str | None = None,
    now: datetime | None = None,
) -> DashboardView:
    """Builds the view of a `CachedRecommendations` document (from Redis or the recommendations row).

    `dataFreshness` is the document's own object (pricesAsOf, ratesAsOf, criteriaVersion) with the
    document's `generatedAt` added, so the client sees both when it was built and on what inputs.
    """
    generated = parse_time(doc.get("generatedAt"))
    freshness = dict(doc.get("dataFreshness") or {})
    freshness["generatedAt"] = generated.isoformat() if generated else doc.get("generatedAt")
    summary = doc.get("portfolioSummary") or None
    recs = doc.get("recommendations")
    if not isinstance(recs, list):
        raise ValueError(f"recommendations document of user {user_id}: 'recommendations' is not a list")
    base = (summary or {}).get("baseCurrency") or base_currency
    if base is None and recs:
        base = recs[0].get("currency")
    reason = staleness(generated, bool(doc.get("ratesStale")), doc.get("market"), doc.get("sessionDate"), now)
    due = reason == DUE
    if due:
        reason = None
    return DashboardView(
        user_id=user_id,
        recommendations=recs,
        total_investable=doc.get("totalInvestable"),
        base_currency=base.strip() if isinstance(base, str) else base,
        data_freshness=freshness,
        from_cache=from_cache,
        stale=reason is not None,
        correlation_id=doc.get("correlationId"),
        portfolio_summary=summary,
        unallocated=doc.get("unallocated"),
        unpriced_holdings=doc.get("unpricedHoldings"),
        last_known_prices=doc.get("lastKnownPrices"),
        stale_reason=reason,
        next_run_due=due,
    )


def _iso(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    return v

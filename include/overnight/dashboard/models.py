"""The dashboard API's response models (pydantic): what the OpenAPI schema publishes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# --------------------------------------------------------------------------- response models


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Breakdown(_Model):
    """Why an asset was recommended."""

    criteriaCount: int | None = None
    topContributor: str | None = None


class Recommendation(_Model):
    """One recommendation, as the overnight run wrote it (decimals as strings)."""

    assetId: str
    symbol: str
    score: str
    amount: str
    currency: str
    allocationGap: str
    breakdown: Breakdown | None = None
    allocationGapAfter: str | None = None


class Unallocated(_Model):
    """The part of the contribution the allocation policy did not place (docs/allocation.md)."""

    amount: str
    reason: str | None = None
    message: str | None = None


class DataFreshness(_Model):
    """When the document was generated (`generatedAt`) and the as-of times of the inputs it used."""

    generatedAt: str | None = None
    pricesAsOf: str | None = None
    ratesAsOf: str | None = None
    criteriaVersion: str | None = None


class Dashboard(BaseModel):
    """A user's recommendations. `fromCache`: served from Redis (else Postgres); `stale`: built on stale
    exchange rates, or its market's next run + grace has passed without replacing it (docs/freshness.md);
    `staleReason` says why (rates_stale, run_failed, run_missing, run_unfinished, user_not_updated, ...).
    A known user not calculated yet has no recommendations and is stale (not_calculated)."""

    userId: str
    recommendations: list[Recommendation]
    totalInvestable: str | None
    baseCurrency: str | None
    dataFreshness: DataFreshness | None
    fromCache: bool
    stale: bool
    correlationId: str | None = None
    portfolioSummary: dict[str, Any] | None = None
    unallocated: Unallocated | None = None
    unpricedHoldings: list[dict[str, Any]] | None = None
    lastKnownPrices: list[dict[str, Any]] | None = None  # holdings valued at an older price (docs/allocation.md)
    staleReason: str | None = None


class DashboardResponse(BaseModel):
    """`GET /api/v1/dashboard/{user_id}`."""

    data: Dashboard


class JobRun(BaseModel):
    """One `overnight_job_runs` row with its duration and freshness (`ageSeconds` since completion;
    `stale` with `staleReason` when it used stale rates, failed, has not completed, or its market's next
    run + grace has passed; docs/freshness.md)."""

    id: str
    jobType: str  # scoring (a market's night), recalculation (users after an invalidation) or cache-warm
    market: str | None  # None for a cache-warm job run
    sessionDate: str
    status: str
    startedAt: str
    completedAt: str | None
    durationSeconds: float | None
    usersProcessed: int
    usersFailed: int
    usersTotal: int | None
    correlationId: str
    dagRunId: str | None
    ratesStale: bool
    ratesAsOf: str | None
    cacheStatus: str | None
    ageSeconds: float | None
    stale: bool
    staleReason: str | None = None
    ratesMissing: list[str] = []
    stalePrices: int = 0


class JobRunsResponse(BaseModel):
    """`GET /api/v1/job-runs`: newest first."""

    data: list[JobRun]


class MarketHistory(BaseModel):
    """A market's latest job run and its last runs, oldest first."""

    market: str
    latest: JobRun
    history: list[JobRun]


class MarketsResponse(BaseModel):
    """`GET /api/v1/markets`: per market, the last runs (the page's table and chart)."""

    data: list[MarketHistory]


class JobRunRef(BaseModel):
    """The job run an event belongs to."""

    id: str
    market: str
    sessionDate: str
    status: str


class AssetEvent(BaseModel):
    """The SCORES_COMPUTED event of a calculation whose universe held the asset, with its `outcome` there: `scored`
    (`score`), `unpriced` (no usable price) or `unscored` (`reason`: no exchange rate, a missing fundamental).
    `userId` is shown only to holders of the "Overnight recommendations" permission (else null);
    `userRef` is the user's pseudonym for everyone: stable, not reversible (docs/access.md)."""

    eventId: str
    eventType: str
    userId: str | None
    userRef: str
    correlationId: str
    createdAt: str
    symbol: str
    score: str | None
    outcome: Literal["scored", "unpriced", "unscored"]
    reason: str | None = None
    jobRun: JobRunRef | None


class Cursor(BaseModel):
    """Pass both back as `before` and `before_id` for the next (older) page."""

    before: str
    beforeId: str


class AssetEventsResponse(BaseModel):
    """`GET /api/v1/audit/assets/{symbol}`: newest first; `next` is null on the last page."""

    data: list[AssetEvent]
    next: Cursor | None


class ReplayResult(BaseModel):
    """A calculation recomputed from its audit events and its job run's snapshots alone (docs/audit.md).
    `status`: `identical` (every event field and the document's sha256 match), `different` (`differences` names
    each field: `path: stored X, replayed Y`) or `other_version` (recorded by another `calcVersion`: the
    differences may be the rules', and the answer does not pretend otherwise)."""

    userId: str
    correlationId: str
    jobRunId: str
    market: str
    sessionDate: str
    status: Literal["identical", "different", "other_version"]
    storedCalcVersion: str | None
    replayCalcVersion: str
    storedDocumentSha256: str | None
    replayedDocumentSha256: str | None
    differences: list[str]
    note: str | None


class ReplayResponse(BaseModel):
    """`GET /api/v1/audit/calculations/{correlation_id}/{user_id}/replay`."""

    data: ReplayResult


class RecalculationRef(BaseModel):
    """The DAG run asked to recalculate the user (`dagPaused`: it waits until the DAG is unpaused)."""

    dagId: str
    dagRunId: str
    market: str
    sessionDate: str
    dagPaused: bool


class Invalidation(BaseModel):
    """A user's cached advice dropped (`keysDeleted` of `recs:` and `portfolio:`) at `invalidatedAt`; until a document
    generated later lands, the dashboard answers `stale` with `staleReason` `recalculating` (a recalculation was asked
    and has not ended) or `invalidated`. `cacheError`: Redis could not be reached (the record stands)."""

    userId: str
    keysDeleted: int
    invalidatedAt: str
    cacheError: str | None
    recalculation: RecalculationRef | None


class InvalidationResponse(BaseModel):
    """`POST /api/v1/cache/invalidate/{user_id}`."""

    data: Invalidation


class CacheCleared(BaseModel):
    """Every `recs:` and `portfolio:` key dropped (SCAN in batches + UNLINK); the documents in Postgres stay current."""

    keysDeleted: int


class CacheClearedResponse(BaseModel):
    """`POST /api/v1/cache/invalidate-all`."""

    data: CacheCleared


class CalculationEvent(BaseModel):
    """One event of a calculation, its payload as stored (docs/audit.md)."""

    eventId: str
    eventType: str
    createdAt: str
    payload: dict[str, Any]


class Calculation(BaseModel):
    """A user's events in one job run: the four of a completed calculation, after a CALC_STARTED and CALC_FAILED per
    failed attempt (a failed user has only those), oldest first."""

    userId: str
    correlationId: str
    jobRun: JobRunRef | None
    events: list[CalculationEvent]


class CalculationResponse(BaseModel):
    """`GET /api/v1/audit/calculations/{correlation_id}/{user_id}`."""

    data: Calculation

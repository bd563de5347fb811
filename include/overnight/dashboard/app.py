"""The dashboard's FastAPI app, mounted by the `overnight_dashboard` plugin at `/overnight` on the api-server.

Every route, the page, its static assets and the OpenAPI docs included, runs behind Airflow's own
authentication (`get_user`: bearer token or the UI's `_token` cookie) and the auth manager's answers,
declared once on the app so no route can ship open (`overnight.dashboard.api_auth`, docs/access.md): operations
routes need "may read DAGs", personal data (a user's dashboard, user ids) the "Overnight
recommendations" permission. Anonymous API calls get 401 JSON; a browser opening the page without a
session is sent to Airflow's login page. Data access lives in `overnight.dashboard.store`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
import swagger_ui_bundle
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from overnight.dashboard.api_auth import (
    AuthCache,
    airflow_auth,
    bearer_token,
    may_read_personal_data,
    requires_operations,
    requires_personal_data,
    ttl_from_env,
)
from overnight.dashboard.store import (
    HISTORY_PER_MARKET,
    MAX_LIMIT,
    OVERDUE,
    DashboardStore,
    InvalidUserId,
    StoreUnavailable,
    UnknownUser,
    parse_time,
    parse_user_id,
    staleness,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
AUDIT_CONCURRENCY = 2  # /audit queries at once per worker, of the Postgres pool's 8: the dashboard keeps the rest
AUDIT_WAIT_S = 2.0  # an /audit call waiting longer than this for its turn gets 503
_SYMBOL_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # any printable text; control characters (NUL) are refused

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
    staleReason: str | None = None


class DashboardResponse(BaseModel):
    """`GET /api/v1/dashboard/{user_id}`."""

    data: Dashboard


class JobRun(BaseModel):
    """One `overnight_job_runs` row with its duration and freshness (`ageSeconds` since completion;
    `stale` with `staleReason` when it used stale rates, failed, has not completed, or its market's next
    run + grace has passed; docs/freshness.md)."""

    id: str
    jobType: str
    market: str
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
    """A calculation event that scored the asset; `score` is the asset's score in it (null: unscored).
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


# --------------------------------------------------------------------------- the dashboard's JSON, pre-encoded

_JSON = msgspec.json.Encoder()
_REC_STR_FIELDS = ("assetId", "symbol", "score", "amount", "currency", "allocationGap")
_REC_FIELDS = frozenset(Recommendation.model_fields)
_UNALLOCATED_FIELDS = {"amount": str, "reason": str, "message": str}
_BREAKDOWN_FIELDS = {"criteriaCount": int, "topContributor": str}
_FRESHNESS_FIELDS = dict.fromkeys(DataFreshness.model_fields, str)
_INT64 = 2**63
_GZIP_MIN_BYTES = 1024  # Airflow's GZipMiddleware(minimum_size=1024)


def _plain(value: Any) -> bool:
    """True for JSON that msgspec and pydantic write byte for byte alike: str, 64-bit int, bool, null, lists, objects."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return -_INT64 <= value < _INT64
    if kind is list:
        return all(_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False  # floats (formatting differs), anything else


def _as_model(obj: Any, fields: Mapping[str, type]) -> dict[str, Any] | None:
    """`obj` as an `extra="allow"` model of optional `fields` serialises it (declared fields first, then the
    extras); None when a field holds another type or an extra is not plain JSON."""
    if type(obj) is not dict:
        return None
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        value = obj.get(name)
        if value is not None and type(value) is not kind:
            return None
        out[name] = value
    return out if _add_extras(obj, out, out) else None


def _add_extras(obj: dict[str, Any], declared: Any, out: dict[str, Any]) -> bool:
    """Copies `obj`'s keys not in `declared` into `out`; False when one is not plain JSON."""
    for key, value in obj.items():
        if key not in declared:
            if not _plain(value):
                return False
            out[key] = value
    return True


def _recommendation(rec: Any) -> dict[str, Any] | None:
    if type(rec) is not dict:
        return None
    out: dict[str, Any] = {}
    for name in _REC_STR_FIELDS:
        if type(value := rec.get(name)) is not str:
            return None
        out[name] = value
    breakdown = rec.get("breakdown")
    if breakdown is not None and (breakdown := _as_model(breakdown, _BREAKDOWN_FIELDS)) is None:
        return None
    out["breakdown"] = breakdown
    after = rec.get("allocationGapAfter")
    if after is not None and type(after) is not str:
        return None
    out["allocationGapAfter"] = after
    return out if _add_extras(rec, _REC_FIELDS, out) else None


def dashboard_body(data: dict[str, Any]) -> bytes | None:
    """Returns `{"data": data}` as `DashboardResponse` validates and serialises it (the same bytes, ~10x
    cheaper), or None when a value is not already of its declared type (then pydantic must coerce or refuse)."""
    recs = [_recommendation(r) for r in data["recommendations"]]
    freshness = data["dataFreshness"]
    if freshness is not None and (freshness := _as_model(freshness, _FRESHNESS_FIELDS)) is None:
        return None
    summary = data["portfolioSummary"]
    unallocated, unpriced = data.get("unallocated"), data.get("unpricedHoldings")
    if unallocated is not None and ((unallocated := _as_model(unallocated, _UNALLOCATED_FIELDS)) is None
                                    or unallocated["amount"] is None):
        return None
    if unpriced is not None and not (type(unpriced) is list and _plain(unpriced)
                                     and all(type(u) is dict for u in unpriced)):
        return None
    if (None in recs or type(data["userId"]) is not str or type(data["fromCache"]) is not bool
            or type(data["stale"]) is not bool or (data.get("staleReason") is not None and type(data.get("staleReason")) is not str)
            or (summary is not None and not (type(summary) is dict and _plain(summary)))
            or any(data[k] is not None and type(data[k]) is not str
                   for k in ("totalInvestable", "baseCurrency", "correlationId"))):
        return None
    return _JSON.encode({"data": {
        "userId": data["userId"], "recommendations": recs, "totalInvestable": data["totalInvestable"],
        "baseCurrency": data["baseCurrency"], "dataFreshness": freshness, "fromCache": data["fromCache"],
        "stale": data["stale"], "correlationId": data["correlationId"], "portfolioSummary": summary,
        "unallocated": unallocated, "unpricedHoldings": unpriced,
        "staleReason": data.get("staleReason"),
    }})


def _typed(model: type[BaseModel], name: str, nested: Mapping[str, Any] | None = None) -> Any:
    """A msgspec struct with `model`'s declared fields in its order (types as declared, or `nested`'s), which
    refuses extra fields: it decodes exactly the objects the response model serialises as they are."""
    fields = [(field, (nested or {}).get(field, info.annotation)) if info.is_required()
              else (field, (nested or {}).get(field, info.annotation), info.default)
              for field, info in model.model_fields.items()]
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True)


_CachedBreakdown = _typed(Breakdown, "CachedBreakdown")
_CachedRecommendation = _typed(Recommendation, "CachedRecommendation", {"breakdown": _CachedBreakdown | None})
_CachedUnallocated = _typed(Unallocated, "CachedUnallocated")


class _CachedDocument(msgspec.Struct):
    """The fields of a cached `CachedRecommendations` document that the dashboard shows, typed."""

    recommendations: list[_CachedRecommendation]  # type: ignore[valid-type]  # built from the response model
    generatedAt: str | None = None
    dataFreshness: dict[str, Any] | None = None
    portfolioSummary: dict[str, Any] | None = None
    totalInvestable: str | None = None
    ratesStale: bool | None = None
    correlationId: str | None = None
    market: str | None = None
    sessionDate: str | None = None
    unallocated: _CachedUnallocated | None = None  # type: ignore[valid-type]  # built from the response model
    unpricedHoldings: list[dict[str, Any]] | None = None


_decode_cached = msgspec.json.Decoder(_CachedDocument).decode


def cached_dashboard_body(user_id: str, raw: bytes, now: datetime | None = None) -> bytes | None:
    """`dashboard_body` of the view of a cached document, straight from its JSON: typed and validated by
    msgspec in one pass, with the same bytes; None for anything but a document as the overnight run writes
    it (extras, other types, invalid JSON), which then takes the general path."""
    try:
        doc = _decode_cached(raw)
    except msgspec.DecodeError:  # ValidationError included
        return None
    generated = parse_time(doc.generatedAt)
    given = dict(doc.dataFreshness or {})
    given["generatedAt"] = generated.isoformat() if generated else doc.generatedAt
    if (freshness := _as_model(given, _FRESHNESS_FIELDS)) is None:
        return None
    summary = doc.portfolioSummary or None
    if summary is not None and not _plain(summary):
        return None
    unpriced = doc.unpricedHoldings
    if unpriced is not None and not (_plain(unpriced) and all(type(u) is dict for u in unpriced)):
        return None
    recs = doc.recommendations
    base = (summary or {}).get("baseCurrency") or (recs[0].currency if recs else None)  # type: ignore[attr-defined]
    if base is not None and type(base) is not str:
        return None
    reason = staleness(generated, bool(doc.ratesStale), doc.market, doc.sessionDate, now)
    if reason == OVERDUE:  # why needs a query: the general path asks Postgres
        return None
    return _JSON.encode({"data": {
        "userId": user_id, "recommendations": recs, "totalInvestable": doc.totalInvestable,
        "baseCurrency": base.strip() if base is not None else None, "dataFreshness": freshness, "fromCache": True,
        "stale": reason is not None, "correlationId": doc.correlationId,
        "portfolioSummary": summary, "unallocated": doc.unallocated, "unpricedHoldings": unpriced,
        "staleReason": reason,
    }})


async def dashboard_answer(store: DashboardStore, user_id: str) -> bytes | dict[str, Any]:
    """A user's dashboard as `DashboardResponse` writes it (pre-encoded bytes), or, for a value pydantic must
    coerce or refuse, the `data` object to hand to it. The cached document is decoded typed when it is as the
    overnight run writes it; a miss asks Postgres without asking Redis again. Raises InvalidUserId,
    UnknownUser, StoreUnavailable."""
    uid = parse_user_id(user_id)
    raw = await store.cached_raw(uid)
    if raw is not None and (body := cached_dashboard_body(uid, raw)) is not None:
        return body
    data = (await store.dashboard(uid, ask_cache=raw is not None)).to_json()
    return dashboard_body(data) or data


def _encoded(body: bytes, accept_encoding: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """`body` gzipped when the client takes gzip and the api-server's GZipMiddleware would, with the headers
    that say so. The middleware builds a compressor with a 32 KB window for every response (~110 us); one
    sized to the body, at level 1, takes ~25 us (4% larger), and the middleware passes a gzipped body through."""
    if len(body) < _GZIP_MIN_BYTES or "gzip" not in accept_encoding:  # the middleware's own test
        return body, []
    window_bits = max(9, min(15, (len(body) - 1).bit_length()))
    gz = zlib.compressobj(1, zlib.DEFLATED, 16 + window_bits, 4)
    return gz.compress(body) + gz.flush(), [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]


def json_response(body: bytes, accept_encoding: str) -> Response:
    """A JSON response of pre-encoded `body`, gzipped as `_encoded` says."""
    content, headers = _encoded(body, accept_encoding)
    response = Response(content, media_type="application/json")
    response.raw_headers[:0] = headers  # where Starlette puts the headers it is given
    return response


# --------------------------------------------------------------------------- auth


def store_unavailable(exc: StoreUnavailable) -> JSONResponse:
    """The 503 answer when Postgres cannot serve; the store's reason goes to the log, not to the caller."""
    log.error("overnight dashboard: %s", exc)
    return JSONResponse({"detail": "the overnight database is unavailable; try again shortly"}, status_code=503)


def _pseudonym_key() -> bytes:
    """The key of the audit's user pseudonyms: derived from Airflow's JWT secret (the same in every api-server
    worker, never shown), else random per process."""
    secret = os.environ.get("AIRFLOW__API_AUTH__JWT_SECRET", "")
    if not secret:
        try:
            from airflow.configuration import conf

            secret = conf.get("api_auth", "jwt_secret", fallback="") or ""
        except Exception:  # noqa: BLE001 - no Airflow config: a key of this process
            secret = ""
    if not secret:
        return os.urandom(32)
    return hmac.new(secret.encode(), b"overnight audit user pseudonym v1", hashlib.sha256).digest()


def pseudonym(key: bytes, user_id: str) -> str:
    """A user's pseudonym in the audit: `u_` and 16 hex digits of HMAC-SHA256(key, user id)."""
    return "u_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:16]


def _declare_security(app: FastAPI) -> None:
    """Adds Airflow's security schemes to every operation of the app's OpenAPI schema (the docs' login form)."""
    from overnight.dashboard.api_auth import openapi_security

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemes, requirement = openapi_security()
            schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(schemes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.setdefault("security", requirement)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _login_redirect(request: Request) -> RedirectResponse | None:
    """For a browser page request without a session: the auth manager's login URL, coming back here."""
    accepts_html = "text/html" in request.headers.get("accept", "")
    if request.method != "GET" or not accepts_html or f"{API_PREFIX}/" in request.url.path:
        return None
    try:
        from airflow.api_fastapi.app import get_auth_manager

        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(get_auth_manager().get_url_login(next_url=target), status_code=303)
    except Exception:  # noqa: BLE001 - without a login URL, the plain 401 stands
        log.exception("overnight dashboard: no login URL from the auth manager")
        return None


# --------------------------------------------------------------------------- the app


_SWAGGER_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css"})


def create_app(
    *,
    static_dir: Path | None = None,
    template_dir: Path | None = None,
    store: DashboardStore | None = None,
    dependencies: list[Any] | None = None,
    auth_cache: AuthCache | None = None,
) -> FastAPI:
    """Builds the dashboard app; `dependencies` defaults to Airflow's auth remembered in `auth_cache` (default:
    `OVERNIGHT_AUTH_CACHE_TTL_S`); tests of the logic may pass their own. `app.state` keeps the store and
    the cache, for `FastPaths`."""
    store = store or DashboardStore()
    if dependencies is None and auth_cache is None:
        auth_cache = AuthCache(ttl_from_env())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await store.aclose()

    app = FastAPI(
        title="Overnight dashboard",
        version="1",
        description="Pre-computed recommendations, job runs and the audit trail of the overnight package. "
        "Authenticate with a bearer token from `POST /auth/token` (or the Airflow UI's session).",
        # Airflow's answer is remembered per token for a few seconds (`overnight.dashboard.api_auth`): its revocation
        # check is a metadata-database query per request, which cost more than the dashboard itself.
        dependencies=airflow_auth(auth_cache) if dependencies is None else dependencies,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    if dependencies is None:
        _declare_security(app)
    app.state.store = store
    app.state.auth_cache = auth_cache
    pseudonym_key = _pseudonym_key()
    audit_slots = asyncio.Semaphore(AUDIT_CONCURRENCY)

    async def take_audit_slot() -> JSONResponse | None:
        """Takes one of AUDIT_CONCURRENCY slots (release it after), waiting AUDIT_WAIT_S at most: long audit
        queries must not take the dashboard's connections. Returns the 503 to answer when none came free."""
        try:
            async with asyncio.timeout(AUDIT_WAIT_S):
                await audit_slots.acquire()
        except TimeoutError:
            return JSONResponse({"detail": f"too many audit queries at once (at most {AUDIT_CONCURRENCY} per "
                                           "worker); try again shortly"}, status_code=503,
                                headers={"Retry-After": "1"})
        return None
    operations = [Depends(requires_operations)]
    static_files = {p.name: p for p in static_dir.iterdir() if p.is_file()} if static_dir else {}
    templates = None
    if template_dir is not None:
        import jinja2

        templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)), autoescape=True)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 401 and (redirect := _login_redirect(request)) is not None:
            return redirect
        return await http_exception_handler(request, exc)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return store_unavailable(exc)

    # ------------------------------------------------------------------ API

    @app.get(f"{API_PREFIX}/dashboard/{{user_id}}", response_model=DashboardResponse,
             dependencies=[Depends(requires_personal_data)],
             responses={403: {"description": "No 'Overnight recommendations' permission"},
                        404: {"description": "Unknown user"}, 422: {"description": "Not a UUID"}})
    async def dashboard(request: Request,
                        user_id: Annotated[str, PathParam(description="The user's id (UUID)", max_length=64,
                                                           json_schema_extra={"format": "uuid"})]
                        ) -> Response | dict[str, Any]:
        """A user's recommendations: Redis `recs:{id}` first, else the `recommendations` table."""
        try:
            answer = await dashboard_answer(store, user_id)
        except InvalidUserId as exc:
            raise HTTPException(422, str(exc)) from None
        except UnknownUser as exc:
            raise HTTPException(404, str(exc)) from None
        if isinstance(answer, dict):  # a value not of its declared type: pydantic coerces or refuses it
            return {"data": answer}
        return json_response(answer, request.headers.get("accept-encoding", ""))

    @app.get(f"{API_PREFIX}/job-runs", response_model=JobRunsResponse, dependencies=operations)
    async def job_runs(
        market: Annotated[str | None, Query(min_length=1, max_length=32, pattern=_SYMBOL_PATTERN,
                                            description="Only this market (e.g. XNYS)")] = None,
        status: Annotated[Literal["started", "completed", "partial", "failed"] | None,
                          Query(description="Only runs in this status")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="At most this many rows")] = 50,
    ) -> dict[str, Any]:
        """Recent `overnight_job_runs` rows, newest first, with counts, duration and freshness."""
        return {"data": await store.job_runs(market=market, status=status, limit=limit)}

    @app.get(f"{API_PREFIX}/ping", include_in_schema=False)
    async def ping() -> dict[str, str]:
        """Authenticated no-op: the baseline the benchmark compares the dashboard with."""
        return {"status": "ok"}

    @app.get(f"{API_PREFIX}/markets", response_model=MarketsResponse, dependencies=operations)
    async def markets(
        runs: Annotated[int, Query(ge=1, le=100, description="Runs per market")] = HISTORY_PER_MARKET,
    ) -> dict[str, Any]:
        """Per market: its latest job run and its last `runs` runs, oldest first."""
        history = await store.market_history(runs)
        return {"data": [{"market": m, "latest": h[-1], "history": h} for m, h in sorted(history.items())]}

    @app.get(f"{API_PREFIX}/audit/assets/{{symbol}}", response_model=AssetEventsResponse, dependencies=operations,
             responses={503: {"description": "Postgres unavailable, or too many audit queries: retry shortly"}})
    async def asset_events(
        request: Request,
        symbol: Annotated[str, PathParam(min_length=1, max_length=64, pattern=_SYMBOL_PATTERN)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
        before: Annotated[datetime | None, Query(description="Only events created before this ISO time")] = None,
        before_id: Annotated[UUID | None, Query(description="With `before`: the last event id of the previous "
                                                            "page (ties on the same time)")] = None,
    ) -> dict[str, Any] | JSONResponse:
        """Every calculation event that scored `symbol` (newest first), with its correlation id and job run;
        user ids only for holders of "Overnight recommendations", a pseudonym (`userRef`) for everyone."""
        if (busy := await take_audit_slot()) is not None:
            return busy
        try:
            events, cursor = await store.asset_events(
                symbol, limit=limit, before=before, before_id=str(before_id) if before_id and before else None)
        finally:
            audit_slots.release()
        show_ids = may_read_personal_data(request)
        for event in events:
            event["userRef"] = pseudonym(pseudonym_key, event["userId"])
            if not show_ids:
                event["userId"] = None
        return {"data": events, "next": cursor}

    @app.get(f"{API_PREFIX}/audit/calculations/{{correlation_id}}/{{user_id}}/replay", response_model=ReplayResponse,
             dependencies=[Depends(requires_personal_data)],
             responses={403: {"description": "No 'Overnight recommendations' permission"},
                        404: {"description": "Unknown job run, or no calculation of that user in it"},
                        409: {"description": "The calculation's events or snapshots are incomplete"},
                        422: {"description": "Not a UUID"},
                        503: {"description": "Postgres unavailable, or too many audit queries: retry shortly"}})
    async def replay_calculation(
        correlation_id: Annotated[UUID, PathParam(description="The job run's correlation id")],
        user_id: Annotated[str, PathParam(description="The user's id (UUID)", max_length=64,
                                          json_schema_extra={"format": "uuid"})],
    ) -> dict[str, Any] | JSONResponse:
        """Recomputes a user's calculation from the audit trail alone and compares it with what was stored:
        `identical`, or each differing field. Personal data (the user's amounts): "Overnight recommendations"."""
        from overnight.night.replay import IncompleteCalculation, UnknownCalculation

        if (busy := await take_audit_slot()) is not None:
            return busy
        try:
            return {"data": await store.replay(str(correlation_id), user_id)}
        except InvalidUserId as exc:
            raise HTTPException(422, str(exc)) from None
        except UnknownCalculation as exc:
            raise HTTPException(404, str(exc)) from None
        except IncompleteCalculation as exc:
            raise HTTPException(409, str(exc)) from None
        finally:
            audit_slots.release()

    # ------------------------------------------------------------------ page, assets, docs

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=operations)
    async def page() -> HTMLResponse:
        """The Overnight page: job runs per market, a chart, a user lookup."""
        if templates is None:
            raise HTTPException(404, "this app was built without its page template")
        history = await store.market_history(HISTORY_PER_MARKET)
        latest = [h[-1] for _, h in sorted(history.items())]
        payload = json.dumps([{"market": m, "history": h} for m, h in sorted(history.items())])
        html = templates.get_template("overnight.html").render(
            latest=latest, history_json=payload.replace("<", "\\u003c").replace(">", "\\u003e"),
            runs_per_market=HISTORY_PER_MARKET)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        """The page's own assets (served here, behind the same auth, never from a CDN)."""
        path = static_files.get(name)
        if path is None:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        """This app's OpenAPI schema, with its mount point as the server URL."""
        schema = dict(app.openapi())
        schema["servers"] = [{"url": request.scope.get("root_path") or "/"}]
        return JSONResponse(schema)

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        """Swagger UI's own files, from the swagger-ui-bundle package (no CDN)."""
        if name not in _SWAGGER_FILES:
            raise HTTPException(404, f"no docs asset {name!r}")
        return FileResponse(Path(swagger_ui_bundle.swagger_ui_path) / name)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI for this app, its assets served by the plugin."""
        return get_swagger_ui_html(
            openapi_url="openapi.json", title="Overnight dashboard API",
            swagger_js_url="docs-assets/swagger-ui-bundle.js", swagger_css_url="docs-assets/swagger-ui.css",
            swagger_favicon_url="static/favicon.svg" if "favicon.svg" in static_files else "",
        )

    return app


# --------------------------------------------------------------------------- the hot routes, without FastAPI

_PING_PATH = f"{API_PREFIX}/ping"
_DASHBOARD_PATH = f"{API_PREFIX}/dashboard/"
_PING_BODY = b'{"status":"ok"}'  # what the app's JSONResponse writes for {"status": "ok"}
_MAX_USER_ID = 64  # the route's max_length


def _route_path(scope: Mapping[str, Any]) -> str:
    """The request's path below the app's mount point (`root_path`), as Starlette's router reads it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


class FastPaths:
    """ASGI front of the dashboard app for the two routes that are called at every login of every user
    (`GET /api/v1/dashboard/{user_id}`) and by the benchmark beside it (`GET /api/v1/ping`).

    It answers them itself, with the same status, headers and bytes as the app, when the request has no
    query string and a bearer token that Airflow accepted within the auth cache's TTL (the entry the
    app's own auth dependency wrote, with the token's permissions: exactly the tokens the app would let
    through without asking Airflow; a dashboard also needs that entry's personal-data permission). Everything else goes to the FastAPI app, which stays the one place that defines the
    routes, their errors and their OpenAPI schema: a token's first call, session cookies, query
    strings, an invalid or unknown user (422/404), a document pydantic must coerce. Postgres down gets the
    app's 503 from here, so a hung database is not asked twice.
    FastAPI's routing, dependency solving and response objects cost about a quarter of a dashboard hit.
    """

    def __init__(self, app: Any, store: DashboardStore, cache: AuthCache | None) -> None:
        self.app, self.store, self.cache = app, store, cache

    @classmethod
    def of(cls, app: FastAPI) -> FastPaths:
        """The front of an app from `create_app` (its store and auth cache)."""
        return cls(app, app.state.store, app.state.auth_cache)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]
                and self.cache is not None and self.cache.ttl_s > 0):
            try:
                answer = await self._answer(scope)
            except StoreUnavailable as exc:  # the app's answer, without asking Postgres a second time
                await store_unavailable(exc)(scope, receive, send)
                return
            if answer is not None:
                body, headers = answer
                headers.append((b"content-length", str(len(body)).encode()))
                headers.append((b"content-type", b"application/json"))
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: dict[str, Any]) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        """The body and headers of a 200 answer, or None for "let the app answer"."""
        path = _route_path(scope)
        ping = path == _PING_PATH
        user_id = path[len(_DASHBOARD_PATH):] if path.startswith(_DASHBOARD_PATH) else ""
        if not ping and (not user_id or "/" in user_id or len(user_id) > _MAX_USER_ID):
            return None
        authorization = accept_encoding = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get reads them
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"accept-encoding" and accept_encoding is None:
                accept_encoding = value.decode("latin-1")
        token = bearer_token(authorization)
        assert self.cache is not None
        access = None if token is None else self.cache.get(AuthCache.key(token, "bearer"))
        if access is None:
            return None
        if ping:
            return _PING_BODY, []
        if not access.personal_data:  # the app answers its 403
            return None
        try:
            answer = await dashboard_answer(self.store, user_id)
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - 404, 422 and the rest: the app gives its own answer
            return None
        return None if isinstance(answer, dict) else _encoded(answer, accept_encoding or "")

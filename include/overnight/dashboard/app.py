"""The dashboard's FastAPI app, mounted by the `overnight_dashboard` plugin at `/overnight` on the api-server.

Every route, the page, its static assets and the OpenAPI docs included, runs behind Airflow's own
authentication (`get_user`: bearer token or the UI's `_token` cookie) and the auth manager's answers,
declared once on the app so no route can ship open (`overnight.dashboard.api_auth`, docs/access.md): operations
routes need "may read DAGs", personal data (a user's dashboard, user ids) the "Overnight
recommendations" permission. Anonymous API calls get 401 JSON; a browser opening the page without a
session is sent to Airflow's login page. Data access lives in `store`; the response models in `models`,
the pre-encoded dashboard JSON in `json_body`, the hot routes' ASGI front in `fastpath`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import swagger_ui_bundle
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from overnight.adapters.pseudonyms import pseudonym, pseudonym_key
from overnight.dashboard.api_auth import (
    AuthCache,
    airflow_auth,
    login_name,
    may_read_personal_data,
    requires_bearer,
    requires_operations,
    requires_personal_data,
    ttl_from_env,
)
from overnight.dashboard.docview import InvalidUserId, UnknownUser
from overnight.dashboard.json_body import dashboard_answer, json_response
from overnight.dashboard.models import (
    AssetEventsResponse,
    CacheClearedResponse,
    CalculationResponse,
    DashboardResponse,
    InvalidationResponse,
    JobRunsResponse,
    MarketsResponse,
    ReplayResponse,
)
from overnight.dashboard.pgpool import StoreUnavailable
from overnight.dashboard.store import HISTORY_PER_MARKET, MAX_LIMIT, DashboardStore

log = logging.getLogger(__name__)


API_PREFIX = "/api/v1"
AUDIT_CONCURRENCY = 2  # /audit queries at once per worker, of the Postgres pool's 8: the dashboard keeps the rest
AUDIT_WAIT_S = 2.0  # an /audit call waiting longer than this for its turn gets 503
AUDIT_PER_LOGIN = 1  # /audit queries at once per login and worker: more get 429 at once (docs/access.md)


def _login(request: Request) -> str:
    """Who is asking, for the per-login /audit cap: the auth manager's user id."""
    user = getattr(getattr(request.state, "overnight_access", None), "user", None)
    get_id = getattr(user, "get_id", None)  # every Airflow auth manager's user has one (BaseUser)
    return f"{type(user).__name__}:{get_id() if callable(get_id) else user}"
_SYMBOL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
CorrelationId = Annotated[UUID, PathParam(description="The job run's correlation id")]
UserId = Annotated[str, PathParam(description="The user's id (UUID)", max_length=64, json_schema_extra={"format": "uuid"})]
_CALCULATION_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "No 'Overnight recommendations' permission"}, 422: {"description": "Not a UUID"},
    503: {"description": "Postgres unavailable, or too many audit queries: retry shortly"}}  # any printable text; control characters (NUL) are refused


# --------------------------------------------------------------------------- auth


def _api_base_url(request: Request) -> str:
    """This api-server's own URL for its REST API: `[api] base_url` when set (behind a proxy), else the request's."""
    import os

    configured = os.environ.get("AIRFLOW__API__BASE_URL", "")
    if not configured:
        try:
            from airflow.configuration import conf

            configured = conf.get("api", "base_url", fallback="") or ""
        except Exception:  # noqa: BLE001 - no Airflow configuration: the request's own origin
            configured = ""
    return configured.rstrip("/") or f"{request.url.scheme}://{request.url.netloc}"


def store_unavailable(exc: StoreUnavailable) -> JSONResponse:
    """The 503 answer when Postgres cannot serve; the store's reason goes to the log, not to the caller."""
    log.error("overnight dashboard: %s", exc)
    return JSONResponse({"detail": "the overnight database is unavailable; try again shortly"}, status_code=503)


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
    audit_per_login: int = AUDIT_PER_LOGIN,
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
    audit_key = pseudonym_key(server=True)  # the api-server may read the Variable from the metadata database
    audit_slots = asyncio.Semaphore(AUDIT_CONCURRENCY)
    audit_by_login: dict[str, int] = {}  # login -> its /audit calls running now (entries go when back at 0)

    async def take_audit_slot(request: Request) -> tuple[JSONResponse | None, Callable[[], None]]:
        """Takes one of the login's `audit_per_login` slots (429 at once when it has none left: one caller's flood
        is its own), then one of the worker's AUDIT_CONCURRENCY slots, waiting AUDIT_WAIT_S at most (503 when none
        came free): long audit queries must not take the dashboard's connections. Returns the answer to give when
        busy, else None, and the function that gives both slots back (call it exactly once)."""
        login = _login(request)
        if audit_by_login.get(login, 0) >= audit_per_login:
            return JSONResponse({"detail": f"this login has {audit_per_login} audit quer"
                                           f"{'y' if audit_per_login == 1 else 'ies'} running already (at most "
                                           f"{audit_per_login} at once per login); wait for it"},
                                status_code=429, headers={"Retry-After": "1"}), lambda: None
        audit_by_login[login] = audit_by_login.get(login, 0) + 1

        def give_back_login() -> None:
            left = audit_by_login.get(login, 1) - 1
            if left > 0:
                audit_by_login[login] = left
            else:
                audit_by_login.pop(login, None)

        try:
            async with asyncio.timeout(AUDIT_WAIT_S):
                await audit_slots.acquire()
        except TimeoutError:
            give_back_login()
            return JSONResponse({"detail": f"too many audit queries at once (at most {AUDIT_CONCURRENCY} per "
                                           "worker); try again shortly"}, status_code=503,
                                headers={"Retry-After": "1"}), lambda: None
        except BaseException:  # a cancelled request: nothing taken stays taken
            give_back_login()
            raise

        def give_back() -> None:
            audit_slots.release()
            give_back_login()

        return None, give_back

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
    async def dashboard(request: Request, response: Response,
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
            response.headers["Cache-Control"] = "no-store"
            return {"data": answer}
        return json_response(answer, request.headers.get("accept-encoding", ""))

    # State-changing routes: personal data, and a bearer token only (a cookie alone is refused: docs/access.md)
    state_changing = [Depends(requires_personal_data), Depends(requires_bearer)]

    @app.post(f"{API_PREFIX}/cache/invalidate/{{user_id}}", response_model=InvalidationResponse,
              dependencies=state_changing,
              responses={403: {"description": "No 'Overnight recommendations' permission, or no bearer token"},
                         404: {"description": "Unknown user"}, 409: {"description": "No DAG can recalculate the user"},
                         422: {"description": "Not a UUID"}})
    async def invalidate_user(
        request: Request, response: Response,
        user_id: Annotated[str, PathParam(description="The user's id (UUID)", max_length=64,
                                          json_schema_extra={"format": "uuid"})],
        recalculate: Annotated[bool, Query(description="Also recalculate the user: a run of their serving market's "
                                                       "DAG with their id")] = False,
    ) -> dict[str, Any]:
        """Drops the user's cached advice (`recs:`, `portfolio:`) and records when; the dashboard then says the older
        document is `invalidated`, or `recalculating` until the recalculation asked here lands (docs/design.md)."""
        from overnight.night import invalidation

        # Triggered through Airflow's public REST API with the caller's own bearer token (required on this route):
        # the run is theirs, and Airflow checks they may trigger the DAG.
        token = request.headers.get("authorization", "").partition(" ")[2]
        trigger = invalidation.rest_trigger(_api_base_url(request), token) if recalculate else None
        try:
            data = await store.invalidate(user_id, login_name(request), recalculate=recalculate, trigger=trigger)
        except InvalidUserId as exc:
            raise HTTPException(422, str(exc)) from None
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None
        except invalidation.UnknownUser as exc:
            raise HTTPException(404, str(exc)) from None
        except LookupError as exc:  # NoServingMarket, or Airflow does not know the DAG
            raise HTTPException(409, str(exc)) from None
        response.headers["Cache-Control"] = "no-store"
        return {"data": data}

    @app.post(f"{API_PREFIX}/cache/invalidate-all", response_model=CacheClearedResponse, dependencies=state_changing,
              responses={403: {"description": "No 'Overnight recommendations' permission, or no bearer token"},
                         503: {"description": "Redis unavailable"}})
    async def invalidate_all() -> dict[str, Any]:
        """Drops every user's cached keys without blocking Redis (SCAN in batches, UNLINK); the dashboard serves the
        documents from Postgres, as current as they were, until the cache is warmed again."""
        return {"data": await store.invalidate_all()}

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
        request: Request, response: Response,
        symbol: Annotated[str, PathParam(min_length=1, max_length=64, pattern=_SYMBOL_PATTERN)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
        before: Annotated[datetime | None, Query(description="Only calculations written before this ISO time (in "
                                                             "chunks of users written together)")] = None,
        before_id: Annotated[UUID | None, Query(description="With `before`: the last event id of the previous "
                                                            "page (the page goes on after it)")] = None,
    ) -> dict[str, Any] | JSONResponse:
        """Every calculation whose universe held `symbol` (its SCORES_COMPUTED event, newest first by chunk) with the outcome
        there (scored, unpriced, unscored), its correlation id and job run; user ids only for holders of "Overnight
        recommendations", a pseudonym (`userRef`) for everyone."""
        busy, give_back = await take_audit_slot(request)
        if busy is not None:
            return busy
        try:
            events, cursor = await store.asset_events(
                symbol, limit=limit, before=before, before_id=str(before_id) if before_id and before else None)
        finally:
            give_back()
        show_ids = may_read_personal_data(request)
        for event in events:
            event["userRef"] = pseudonym(audit_key, event["userId"])
            if not show_ids:
                event["userId"] = None
        response.headers["Cache-Control"] = "no-store"  # user ids for holders of personal data
        return {"data": events, "next": cursor}

    @app.get(f"{API_PREFIX}/audit/calculations/{{correlation_id}}/{{user_id}}", response_model=CalculationResponse,
             dependencies=[Depends(requires_personal_data)],
             responses={**_CALCULATION_ERRORS, 404: {"description": "No events of that user in that job run"}})
    async def calculation_events(request: Request, response: Response, correlation_id: CorrelationId,
                                 user_id: UserId) -> dict[str, Any] | JSONResponse:
        """One calculation's events with their payloads (the four; a failed attempt's CALC_STARTED and CALC_FAILED):
        the user's holdings and amounts, so "Overnight recommendations" only."""
        busy, give_back = await take_audit_slot(request)
        if busy is not None:
            return busy
        try:
            data = await store.calculation(str(correlation_id), user_id)
        except InvalidUserId as exc:
            raise HTTPException(422, str(exc)) from None
        finally:
            give_back()
        if data is None:
            raise HTTPException(404, f"no events of user {user_id} in the job run of correlation id {correlation_id}"
                                     " (not served by it, or past the audit retention)")
        response.headers["Cache-Control"] = "no-store"
        return {"data": data}

    @app.get(f"{API_PREFIX}/audit/calculations/{{correlation_id}}/{{user_id}}/replay", response_model=ReplayResponse,
             dependencies=[Depends(requires_personal_data)],
             responses={**_CALCULATION_ERRORS,
                        404: {"description": "Unknown job run, or no calculation of that user in it"},
                        409: {"description": "The calculation's events or snapshots are incomplete"}})
    async def replay_calculation(request: Request, response: Response, correlation_id: CorrelationId,
                                 user_id: UserId) -> dict[str, Any] | JSONResponse:
        """Recomputes a user's calculation from the audit trail alone and compares it with what was stored:
        `identical`, or each differing field. Personal data (the user's amounts): "Overnight recommendations"."""
        from overnight.night.replay import IncompleteCalculation, UnknownCalculation

        busy, give_back = await take_audit_slot(request)
        if busy is not None:
            return busy
        try:
            # the store gives the slot back when its thread ends (not when this request does: a cancelled
            # request leaves the replay running, and the slot with it)
            data = await store.replay(str(correlation_id), user_id, done=give_back)
            response.headers["Cache-Control"] = "no-store"
            return {"data": data}
        except InvalidUserId as exc:
            raise HTTPException(422, str(exc)) from None
        except UnknownCalculation as exc:
            raise HTTPException(404, str(exc)) from None
        except IncompleteCalculation as exc:
            raise HTTPException(409, str(exc)) from None

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

"""Tests for overnight.dashboard.app.FastPaths: the dashboard's and ping's answers without FastAPI are the app's own
answers, byte for byte, and only for tokens the app's auth already accepted; everything else reaches the app."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import jwt
import pytest
from fastapi import Depends, HTTPException, Request

from overnight.dashboard import app as api
from overnight.dashboard import fastpath, json_body
from overnight.dashboard.api_auth import NO_PERSONAL_DATA, Access, AuthCache, cached_auth
from overnight.dashboard.docview import DashboardView, UnknownUser, parse_user_id, view_from_document
from overnight.dashboard.pgpool import StoreUnavailable

SECRET = "k" * 64
T0 = 1_800_000_000.0
UID = "00a41595-d052-5458-a63d-f21b399f9df9"
REC = {"assetId": "1758", "symbol": "RWT", "score": "15", "amount": "894.12", "currency": "USD",
       "allocationGap": "18.16", "breakdown": {"criteriaCount": 4, "topContributor": "payout_ratio"}}
DOC: dict[str, Any] = {
    "userId": UID, "generatedAt": "2026-11-22T08:26:56.196272+00:00", "recommendations": [REC] * 12,
    "portfolioSummary": {"totalValue": "2025386.79", "baseCurrency": "USD"},
    "dataFreshness": {"pricesAsOf": "2026-11-22T02:26:22+00:00"}, "totalInvestable": "4500.00",
    "ratesStale": False, "correlationId": "a817c98d-329a-4e9c-acff-56274b3ac73c",
}


def _token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(T0 + 3600)}, SECRET, algorithm="HS512")


class Airflow:
    """Airflow's get_user / requires_access_dag as the app sees them: verify the JWT, refuse revoked tokens."""

    def __init__(self) -> None:
        self.now, self.revoked, self.checks = T0, set[str](), 0

    async def authenticate(self, request: Request, _oauth: Any, bearer: Any) -> str:
        self.checks += 1
        token = bearer.credentials if bearer is not None else request.cookies.get("_token")
        if not token:
            raise HTTPException(401, "Not authenticated")
        if token in self.revoked:
            raise HTTPException(403, "Invalid JWT token")
        return str(jwt.decode(token, SECRET, algorithms=["HS512"], options={"verify_exp": False})["sub"])

    def grants(self, user: str) -> Access:
        """Everyone may read DAGs; `ops-*` users do not hold "Overnight recommendations"."""
        return Access(user=user, operations=True, personal_data=not user.startswith("ops-"))


class Store:
    """The store's reads: one user whose document is cached; any other valid id is unknown. With `down`,
    the cache misses and Postgres fails (counted)."""

    def __init__(self) -> None:
        self.doc, self.down, self.postgres_calls = DOC, False, 0

    async def cached_raw(self, user_id: str) -> bytes | None:
        return json.dumps(self.doc).encode() if user_id == UID and not self.down else None

    async def dashboard(self, user_id: str, ask_cache: bool = True) -> DashboardView:
        if self.down:
            self.postgres_calls += 1
            raise StoreUnavailable("cannot reach the overnight database at 127.0.0.1:1 (connection refused)")
        if parse_user_id(user_id) != UID:
            raise UnknownUser(f"user {user_id} is not in the users table")
        return view_from_document(UID, self.doc, from_cache=True)

    async def aclose(self) -> None:
        return None


class Counting:
    """Counts the requests that reach the FastAPI app."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await self.app(scope, receive, send)


@pytest.fixture
def stack() -> tuple[FastPathsUnderTest, Airflow]:
    airflow = Airflow()
    cache = AuthCache(ttl_s=5, clock=lambda: airflow.now, wall=lambda: airflow.now)
    app = api.create_app(store=Store(),  # type: ignore[arg-type]
                         dependencies=[Depends(cached_auth(airflow.authenticate, airflow.grants, cache))],
                         auth_cache=cache)
    inner = Counting(app)
    return FastPathsUnderTest(fastpath.FastPaths(inner, app.state.store, cache), inner), airflow


class FastPathsUnderTest:
    def __init__(self, front: fastpath.FastPaths, inner: Counting) -> None:
        self.front, self.inner = front, inner

    def get(self, path: str, headers: dict[str, str], query: bytes = b"") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One GET through the front, mounted at /overnight as the api-server mounts it."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": f"/overnight{path}", "raw_path": f"/overnight{path}".encode(),
                 "root_path": "/overnight", "query_string": query, "server": ("t", 80), "client": ("c", 1),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.front(scope, receive, send))
        start = sent[0]
        return start["status"], sorted(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


BEARER = {"authorization": f"Bearer {_token('app-team')}", "accept-encoding": "gzip, deflate"}


@pytest.mark.parametrize("extras", [False, True], ids=["typed-document", "document-with-extras"])
@pytest.mark.parametrize("encoding", ["gzip, deflate", ""], ids=["gzip", "identity"])
@pytest.mark.parametrize("path", [f"/api/v1/dashboard/{UID}", "/api/v1/ping"], ids=["dashboard", "ping"])
def test_a_remembered_token_is_answered_without_the_app_with_the_apps_own_bytes(
        stack: tuple[FastPathsUnderTest, Airflow], path: str, encoding: str, extras: bool) -> None:
    under, airflow = stack
    if extras:  # not the typed document: the general path, still without the app
        under.front.store.doc = {**DOC, "recommendations": [{**REC, "rank": 1}] * 12}  # type: ignore[attr-defined]
    headers = {**BEARER, "accept-encoding": encoding}
    first = under.get(path, headers)  # the app: Airflow is asked, the answer remembered
    assert (under.inner.calls, airflow.checks) == (1, 1)
    fast = under.get(path, headers)
    assert under.inner.calls == 1, "a remembered token's request still went through FastAPI"
    by_app = under.get(path, headers, query=b"x=1")  # a query string: always the app
    assert under.inner.calls == 2
    assert first == fast == by_app and fast[0] == 200
    assert ((b"cache-control", b"no-store") in fast[1]) is path.endswith(UID)  # investors' data only
    if path.endswith("ping"):
        assert fast[2] == b'{"status":"ok"}'
    elif encoding:
        assert (b"content-encoding", b"gzip") in fast[1]
        assert zlib.decompress(fast[2], 16 + zlib.MAX_WBITS) == json_body.dashboard_body(
            view_from_document(UID, under.front.store.doc, from_cache=True).to_json())  # type: ignore[attr-defined]


def test_unknown_credentials_cookies_and_errors_reach_the_app(stack: tuple[FastPathsUnderTest, Airflow]) -> None:
    under, airflow = stack
    path = f"/api/v1/dashboard/{UID}"
    assert under.get(path, {})[0] == 401
    calls = under.inner.calls
    assert under.get(path, {"cookie": f"_token={_token('ui-user')}"})[0] == 200
    assert under.get(path, {"cookie": f"_token={_token('ui-user')}"})[0] == 200
    assert under.inner.calls == calls + 2, "session cookies are the app's, always"
    under.get(path, BEARER)  # now remembered
    calls = under.inner.calls
    status, _, body = under.get("/api/v1/dashboard/00000000-0000-0000-0000-000000000001", BEARER)
    assert status == 404 and b"not in the users table" in body
    status, _, body = under.get("/api/v1/dashboard/not-a-uuid", BEARER)
    assert status == 422 and b"not a UUID" in body
    assert under.get("/api/v1/dashboard/" + "a" * 65, BEARER)[0] == 422
    assert under.get(f"/api/v1/dashboard/{UID}/more", BEARER)[0] == 404
    assert under.inner.calls == calls + 4, "errors are the app's answers"


def test_a_revoked_token_is_refused_once_its_memory_expires(stack: tuple[FastPathsUnderTest, Airflow]) -> None:
    under, airflow = stack
    path = f"/api/v1/dashboard/{UID}"
    assert under.get(path, BEARER)[0] == 200
    airflow.revoked.add(BEARER["authorization"].removeprefix("Bearer "))
    assert under.get(path, BEARER)[0] == 200  # within the TTL: remembered, as documented
    airflow.now += 5
    assert under.get(path, BEARER)[0] == 403


def test_another_tokens_memory_does_not_open_the_fast_path(stack: tuple[FastPathsUnderTest, Airflow]) -> None:
    under, airflow = stack
    under.get("/api/v1/ping", BEARER)
    other = {"authorization": f"Bearer {_token('someone-else')}"}
    calls = under.inner.calls
    assert under.get("/api/v1/ping", other)[0] == 200
    assert under.inner.calls == calls + 1 and airflow.checks == 2


def test_a_remembered_token_without_personal_data_gets_the_apps_403(stack: tuple[FastPathsUnderTest, Airflow]
                                                                      ) -> None:
    under, airflow = stack
    ops = {"authorization": f"Bearer {_token('ops-viewer')}"}
    assert under.get("/api/v1/ping", ops)[0] == 200  # remembered, with its permissions
    calls = under.inner.calls
    assert under.get("/api/v1/ping", ops)[0] == 200 and under.inner.calls == calls  # ping: the fast path
    status, _, body = under.get(f"/api/v1/dashboard/{UID}", ops)
    assert status == 403 and json.loads(body) == {"detail": NO_PERSONAL_DATA}
    assert under.inner.calls == calls + 1 and airflow.checks == 1  # the app's answer, from the memory


def test_route_path_below_the_mount_point() -> None:
    assert fastpath._route_path({"path": "/overnight/api/v1/ping", "root_path": "/overnight"}) == "/api/v1/ping"
    assert fastpath._route_path({"path": "/api/v1/ping", "root_path": ""}) == "/api/v1/ping"
    assert fastpath._route_path({"path": "/overnightx/api", "root_path": "/overnight"}) == "/overnightx/api"


def test_postgres_down_is_the_apps_503_and_postgres_is_asked_once(stack: tuple[FastPathsUnderTest, Airflow]) -> None:
    under, _ = stack
    path = f"/api/v1/dashboard/{UID}"
    under.get(path, BEARER)  # the token is remembered
    store = under.front.store
    store.down = True  # type: ignore[attr-defined]
    by_app = under.get(path, BEARER, query=b"x=1")
    assert store.postgres_calls == 1  # type: ignore[attr-defined]
    calls = under.inner.calls
    fast = under.get(path, BEARER)
    assert under.inner.calls == calls and store.postgres_calls == 2, "the app asked Postgres a second time"  # type: ignore[attr-defined]
    assert fast == by_app and fast[0] == 503
    assert json.loads(fast[2]) == {"detail": "the overnight database is unavailable; try again shortly"}

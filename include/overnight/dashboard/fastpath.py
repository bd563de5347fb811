"""The hot routes without FastAPI: the dashboard and ping answered by a thin ASGI front
(`FastPaths`), every other path handed to the app."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from overnight.dashboard.api_auth import (
    AuthCache,
    bearer_token,
)
from overnight.dashboard.app import API_PREFIX, store_unavailable
from overnight.dashboard.json_body import _encoded, dashboard_answer
from overnight.dashboard.pgpool import StoreUnavailable
from overnight.dashboard.store import DashboardStore

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

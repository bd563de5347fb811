"""The dashboard's auth: Airflow's `get_user` and "may read DAGs" check, with a short per-token memory.

Airflow authenticates a token by verifying the JWT and then asking the metadata database whether
its `jti` was revoked (`RevokedToken.is_revoked`): a blocking query, run on the event loop, for
every request. That check cost more than the whole dashboard answer, so `cached_auth` remembers
Airflow's *positive* answer ("this token is a user who may read DAGs") for `ttl_s` seconds
(`OVERNIGHT_AUTH_CACHE_TTL_S`, default 5; 0 turns the memory off):

- the key is a SHA-256 of the credential Airflow would use (the bearer token, else the `_token`
  cookie) and of the request's `dag_id` parameter, if any; no token is kept in memory;
- an entry never outlives the token's own `exp`, so an expired token is refused on time;
- a revoked token (logout) is refused at the latest `ttl_s` seconds after its revocation;
- refusals (401, 403) are never remembered: every bad or missing credential gets Airflow's own answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

AUTH_CACHE_TTL_S = 5.0
AUTH_CACHE_MAX_ENTRIES = 4096
COOKIE_NAME = "_token"  # Airflow's COOKIE_NAME_JWT_TOKEN

Authenticate = Callable[..., Awaitable[Any]]  # get_user(request, oauth_token, bearer_credentials) -> user
Authorize = Callable[[Request, Any], None]  # requires_access_dag("GET")(request, user), raises 403


def ttl_from_env() -> float:
    """Returns `OVERNIGHT_AUTH_CACHE_TTL_S` (seconds, >= 0), default 5."""
    raw = os.environ.get("OVERNIGHT_AUTH_CACHE_TTL_S", "").strip()
    try:
        return max(0.0, float(raw)) if raw else AUTH_CACHE_TTL_S
    except ValueError:
        raise ValueError(f"OVERNIGHT_AUTH_CACHE_TTL_S={raw!r} is not a number of seconds (e.g. 5, or 0 for off)"
                         ) from None


def token_expiry(token: str) -> float | None:
    """Returns the `exp` claim (epoch seconds) of a JWT that Airflow already validated; None if it has none."""
    import jwt

    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


class AuthCache:
    """Bounded memory of accepted credentials: key -> (valid until, user). Used from one event loop only."""

    def __init__(self, ttl_s: float = AUTH_CACHE_TTL_S, max_entries: int = AUTH_CACHE_MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: dict[bytes, tuple[float, Any]] = {}

    @staticmethod
    def key(token: str, scope: str = "") -> bytes:
        """Returns the memory key of a credential within a scope (a SHA-256: the token itself is not kept)."""
        return hashlib.sha256(f"{scope}\x00{token}".encode()).digest()

    def get(self, key: bytes) -> Any | None:
        """Returns the remembered user, or None when unknown or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            self._entries.pop(key, None)
            return None
        return entry[1]

    def put(self, key: bytes, user: Any, token_exp: float | None) -> None:
        """Remembers `user` for `ttl_s` seconds, never past `token_exp`; a token without `exp` is not remembered."""
        now = self._clock()
        if token_exp is None or self.ttl_s <= 0:
            return
        until = min(now + self.ttl_s, token_exp)
        if until <= now:
            return
        if key not in self._entries and len(self._entries) >= self.max_entries:
            self._prune(now)
        self._entries[key] = (until, user)

    def _prune(self, now: float) -> None:
        for k in [k for k, (until, _) in self._entries.items() if until <= now]:
            del self._entries[k]
        while len(self._entries) >= self.max_entries:  # still full: the oldest go first
            del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)


_bearer_scheme = HTTPBearer(auto_error=False)


def cached_auth(authenticate: Authenticate, authorize: Authorize, cache: AuthCache) -> Callable[..., Awaitable[Any]]:
    """Returns a dependency: `authenticate` then `authorize` (in a thread) on a miss; remembered on success.

    One dependency without sub-dependencies (FastAPI solving each costs ~25 us a request): the bearer
    header is read with FastAPI's own `HTTPBearer`, called directly. Concurrent misses of one key wait
    for a single check (Airflow's revocation query blocks the event loop: 8 clients whose entry expired
    together would otherwise run it 8 times in a row) and share its answer, refusal included.
    """
    checking: dict[bytes, asyncio.Future[Any]] = {}

    async def check(request: Request, bearer: HTTPAuthorizationCredentials | None) -> Any:
        user = await authenticate(request, None, bearer)  # raises 401/403 as Airflow answers
        await run_in_threadpool(authorize, request, user)  # raises 403 when the user may not read DAGs
        return user

    async def authorized_user(request: Request) -> Any:
        bearer = await _bearer_scheme(request)
        # The credential Airflow's get_user uses: an explicit bearer token wins over the session cookie.
        token = bearer.credentials if bearer is not None else request.cookies.get(COOKIE_NAME)
        if not token or cache.ttl_s <= 0:
            return await check(request, bearer)
        dag_id = request.path_params.get("dag_id") or request.query_params.get("dag_id") or ""
        key = cache.key(token, dag_id)
        if (user := cache.get(key)) is not None:
            return user
        if (pending := checking.get(key)) is not None:
            try:
                return await asyncio.shield(pending)
            except HTTPException:
                raise  # Airflow's answer for this very credential
            except Exception:  # noqa: BLE001 - the first check broke otherwise: make our own
                return await check(request, bearer)
        checking[key] = pending = asyncio.get_running_loop().create_future()
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even with no waiter
        try:
            user = await check(request, bearer)
        except BaseException as exc:
            pending.set_exception(exc if isinstance(exc, Exception) else RuntimeError("auth check cancelled"))
            raise
        finally:
            checking.pop(key, None)
        cache.put(key, user, token_expiry(token))
        pending.set_result(user)
        return user

    return authorized_user


def openapi_security() -> tuple[dict[str, Any], list[dict[str, list[str]]]]:
    """Returns the security schemes and requirement Airflow's `get_user` declares (for the OpenAPI docs)."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, oauth2_scheme
    from fastapi.encoders import jsonable_encoder

    schemes = {s.scheme_name: jsonable_encoder(s.model, by_alias=True, exclude_none=True)
               for s in (oauth2_scheme, bearer_scheme)}
    return schemes, [{name: []} for name in schemes]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, read as FastAPI's `HTTPBearer` reads it; else None."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    return credentials if scheme.lower() == "bearer" and credentials else None


def airflow_auth(cache: AuthCache | None = None) -> list[Any]:
    """Airflow's authentication and "may read DAGs" check as the app's dependencies, remembered in `cache`
    (none, or a TTL of 0: asked every time)."""
    from airflow.api_fastapi.core_api.security import get_user, requires_access_dag

    if cache is None or cache.ttl_s <= 0:
        return [Depends(get_user), Depends(requires_access_dag("GET"))]
    return [Depends(cached_auth(get_user, requires_access_dag("GET"), cache))]

"""The dashboard's auth: Airflow's `get_user` and the auth manager's two answers, with a short per-token memory.

Two permissions (docs/access.md), each asked of Airflow's auth manager with fixed details, never with
anything taken from the request:

- operations, "may read DAGs": `is_authorized_dag(method="GET", user=user)` (all DAGs; a request's
  `?dag_id=` never narrows the question, so a per-DAG permission cannot open the plugin);
- personal data: `is_authorized_custom_view(method="GET", resource_name="Overnight recommendations")`.

Airflow authenticates a token by verifying the JWT and then asking the metadata database whether
its `jti` was revoked: a blocking query for every request, which cost more than the whole dashboard
answer. So `cached_auth` remembers an accepted credential with both answers (an `Access`) for `ttl_s`
seconds (`OVERNIGHT_AUTH_CACHE_TTL_S`, default 5; 0 turns the memory off):

- the key is a SHA-256 of where the credential came from and the credential, exactly as `get_user`
  chooses it: the bearer token when the request has one (even beside a valid cookie), else the
  `_token` cookie; no token is kept in memory;
- a token whose `exp` is not a number, not finite, or more than `MAX_TOKEN_LIFETIME_S` from now (ahead
  or behind: `-10**400` too) is refused (403 "Invalid JWT token"), before Airflow is asked;
- an entry lives `ttl_s` seconds on the monotonic clock and never past the token's own `exp`, so an
  expired token is refused on time and a revoked one (logout) within `ttl_s`;
- refusals (401, 403) are never remembered: every bad or missing credential gets Airflow's own answer;
- the memory holds at most `max_entries`; inserting evicts the oldest entry in O(1).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

AUTH_CACHE_TTL_S = 5.0
AUTH_CACHE_MAX_ENTRIES = 4096
MAX_TOKEN_LIFETIME_S = 366 * 86400  # an `exp` further ahead than this is not a token Airflow issued
COOKIE_NAME = "_token"  # Airflow's COOKIE_NAME_JWT_TOKEN
PERSONAL_DATA_RESOURCE = "Overnight recommendations"
INVALID_TOKEN = "Invalid JWT token"  # Airflow's own detail for a token it refuses
NO_OPERATIONS = ("Forbidden: this route needs permission to read DAGs (operations); "
                 "ask an Airflow admin for it (docs/access.md)")
NO_PERSONAL_DATA = (f"Forbidden: investors' data needs the '{PERSONAL_DATA_RESOURCE}' permission; "
                    "ask an Airflow admin for it (docs/access.md)")
NO_ACCESS = (f"Forbidden: the Overnight dashboard needs permission to read DAGs or the "
             f"'{PERSONAL_DATA_RESOURCE}' permission (docs/access.md)")
STATE_ATTR = "overnight_access"


@dataclass(frozen=True, slots=True)
class Access:
    """An authenticated user and what the auth manager lets them read here."""

    user: Any
    operations: bool  # may read DAGs: job runs, markets, the audit trail with pseudonyms
    personal_data: bool  # "Overnight recommendations": dashboards, user ids


Authenticate = Callable[..., Awaitable[Any]]  # get_user(request, oauth_token, bearer_credentials) -> user
Grants = Callable[[Any], Access]  # asks the auth manager (blocking: run in a thread)


def ttl_from_env() -> float:
    """Returns `OVERNIGHT_AUTH_CACHE_TTL_S` (seconds, >= 0), default 5."""
    raw = os.environ.get("OVERNIGHT_AUTH_CACHE_TTL_S", "").strip()
    try:
        ttl = float(raw) if raw else AUTH_CACHE_TTL_S
    except ValueError:
        ttl = math.nan
    if not math.isfinite(ttl):
        raise ValueError(f"OVERNIGHT_AUTH_CACHE_TTL_S={raw!r} is not a number of seconds (e.g. 5, or 0 for off)")
    return max(0.0, ttl)


class InvalidExpiry(ValueError):
    """A token's `exp` claim is not a finite time within `MAX_TOKEN_LIFETIME_S` of now (either way)."""


def token_expiry(token: str, now: float | None = None) -> float | None:
    """Returns the `exp` claim (epoch seconds) of a JWT, unverified; None when it has none or is not a JWT
    (Airflow refuses those). Raises InvalidExpiry for an `exp` that is not a finite number of seconds
    within `MAX_TOKEN_LIFETIME_S` of `now`, before or after (never OverflowError: huge integers are compared,
    not converted)."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    if not isinstance(claims, dict) or "exp" not in claims:
        return None
    exp = claims["exp"]
    at = time.time() if now is None else now
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidExpiry(f"exp is a {type(exp).__name__}, not a number")
    if isinstance(exp, float) and not math.isfinite(exp):
        raise InvalidExpiry("exp is not finite")
    # compared before any conversion, both bounds: +-10**400 is an int no float holds (float() would raise)
    if not at - MAX_TOKEN_LIFETIME_S <= exp <= at + MAX_TOKEN_LIFETIME_S:
        raise InvalidExpiry("exp is more than a year away")
    return float(exp)


class AuthCache:
    """Bounded memory of accepted credentials: key -> (valid until, monotonic; Access). One event loop only."""

    def __init__(self, ttl_s: float = AUTH_CACHE_TTL_S, max_entries: int = AUTH_CACHE_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.ttl_s, self.max_entries, self._clock, self._wall = ttl_s, max(1, max_entries), clock, wall
        self._entries: OrderedDict[bytes, tuple[float, Any]] = OrderedDict()  # oldest insert first

    @staticmethod
    def key(token: str, source: str = "bearer") -> bytes:
        """Returns the memory key of a credential and where it came from ("bearer" or "cookie"), a SHA-256."""
        return hashlib.sha256(f"{source}\x00{token}".encode()).digest()

    def get(self, key: bytes) -> Any | None:
        """Returns the remembered value, or None when unknown or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            self._entries.pop(key, None)
            return None
        return entry[1]

    def put(self, key: bytes, value: Any, token_exp: float | None) -> None:
        """Remembers `value` for `ttl_s` seconds, never past `token_exp` (epoch seconds); a token without a
        finite `exp` is not remembered. Evicts expired entries at the old end, then the oldest while full."""
        if token_exp is None or self.ttl_s <= 0 or not math.isfinite(token_exp):
            return
        now = self._clock()
        left = min(self.ttl_s, token_exp - self._wall())
        if not left > 0:
            return
        entries = self._entries
        entries.pop(key, None)
        while entries and (len(entries) >= self.max_entries or next(iter(entries.values()))[0] <= now):
            entries.popitem(last=False)
        entries[key] = (now + left, value)

    def __len__(self) -> int:
        return len(self._entries)


_bearer_scheme = HTTPBearer(auto_error=False)


def credential(request: Request, bearer: HTTPAuthorizationCredentials | None) -> tuple[str, str | None]:
    """Where the credential Airflow's `get_user` uses comes from, and the credential: an explicit bearer
    token wins over the session cookie."""
    if bearer is not None and bearer.scheme.lower() == "bearer":
        return "bearer", bearer.credentials
    return "cookie", request.cookies.get(COOKIE_NAME)


def cached_auth(authenticate: Authenticate, grants: Grants, cache: AuthCache) -> Callable[..., Awaitable[Any]]:
    """Returns the app's dependency: the request's `Access` (also in `request.state.overnight_access`).

    On a miss: the token's `exp` is checked, then `authenticate` (Airflow's `get_user`), then `grants`
    (in a thread); a user with neither permission gets 403. Concurrent misses of one key wait for a
    single check and share its answer, refusal included; whatever happens to that check (an error, a
    cancelled request), the waiters are released (`finally`), and one whose check broke makes its own.
    """
    checking: dict[bytes, asyncio.Future[Access]] = {}

    async def check(request: Request, bearer: HTTPAuthorizationCredentials | None,
                    token: str | None) -> tuple[Access, float | None]:
        try:
            exp = token_expiry(token) if token else None
        except InvalidExpiry:
            raise HTTPException(403, INVALID_TOKEN) from None
        user = await authenticate(request, None, bearer)  # raises 401/403 as Airflow answers
        access = await run_in_threadpool(grants, user)
        if not (access.operations or access.personal_data):
            raise HTTPException(403, NO_ACCESS)
        return access, exp

    async def shared(key: bytes, request: Request, bearer: HTTPAuthorizationCredentials | None,
                     token: str) -> Access:
        if (pending := checking.get(key)) is not None:
            try:
                return await asyncio.shield(pending)
            except HTTPException:
                raise  # Airflow's answer for this very credential
            except Exception:  # noqa: BLE001 - the first check broke otherwise: make our own
                return (await check(request, bearer, token))[0]
        checking[key] = pending = asyncio.get_running_loop().create_future()
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even with no waiter
        try:
            access, exp = await check(request, bearer, token)
            cache.put(key, access, exp)
            pending.set_result(access)
            return access
        except Exception as exc:
            pending.set_exception(exc)
            raise
        finally:  # cancelled, or anything else: nobody waits forever
            checking.pop(key, None)
            if not pending.done():
                pending.set_exception(RuntimeError("the shared auth check did not finish"))

    async def authorized(request: Request) -> Access:
        bearer = await _bearer_scheme(request)
        source, token = credential(request, bearer)
        access: Access | None
        if not token or cache.ttl_s <= 0:
            access = (await check(request, bearer, token))[0]
        else:
            key = cache.key(token, source)
            if (access := cache.get(key)) is None:
                access = await shared(key, request, bearer, token)
        setattr(request.state, STATE_ATTR, access)
        return access

    return authorized


def _access(request: Request) -> Access:
    access = getattr(request.state, STATE_ATTR, None)
    if not isinstance(access, Access):  # the app's own dependency did not run: a wiring error, never data
        raise HTTPException(403, NO_ACCESS)
    return access


def requires_operations(request: Request) -> None:
    """Route dependency: 403 unless the request's user may read DAGs (resolved by the app's dependency)."""
    if not _access(request).operations:
        raise HTTPException(403, NO_OPERATIONS)


def requires_personal_data(request: Request) -> None:
    """Route dependency: 403 unless the request's user holds "Overnight recommendations"."""
    if not _access(request).personal_data:
        raise HTTPException(403, NO_PERSONAL_DATA)


NO_BEARER = ("Forbidden: this route changes state and takes a bearer token only (Authorization: Bearer <token> from "
             "POST /auth/token), never the UI's session cookie, which a browser sends from any site (docs/access.md)")


def requires_bearer(request: Request) -> None:
    """Route dependency of the state-changing routes: 403 unless the request authenticated with a bearer token (Airflow
    then uses it, even beside a cookie); a cookie alone never changes state (no cross-site request forgery)."""
    if bearer_token(request.headers.get("authorization")) is None:
        raise HTTPException(403, NO_BEARER)


def login_name(request: Request) -> str | None:
    """The authenticated user's login name (`BaseUser.get_name`), for the records of what they changed."""
    user = getattr(getattr(request.state, STATE_ATTR, None), "user", None)
    get_name = getattr(user, "get_name", None)
    return str(get_name()) if callable(get_name) else None


def may_read_personal_data(request: Request) -> bool:
    """Whether the request's user holds "Overnight recommendations" (e.g. to show user ids)."""
    return _access(request).personal_data


def airflow_grants(user: Any) -> Access:
    """Asks Airflow's auth manager both questions, with fixed details (docs/access.md). Fails closed under
    the stock SimpleAuthManager, which says yes to every custom view for every viewer: personal data then
    goes to ADMIN and the service logins only, with a warning (`auth_manager.personal_data_granted`)."""
    from airflow.api_fastapi.app import get_auth_manager

    from overnight.dashboard.auth_manager import personal_data_granted

    manager = get_auth_manager()
    return Access(
        user=user,
        operations=bool(manager.is_authorized_dag(method="GET", user=user)),
        personal_data=personal_data_granted(manager, user),
    )


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
    """Airflow's authentication and the auth manager's answers as the app's dependency, remembered in `cache`
    (none, or a TTL of 0: asked every time)."""
    from airflow.api_fastapi.core_api.security import get_user

    # `is None`, not `or`: an empty AuthCache is falsy (it has a length), and swapping it for a TTL-0 one
    # would leave FastPaths reading a memory nothing ever writes (every request asking Airflow again)
    return [Depends(cached_auth(get_user, airflow_grants, AuthCache(0.0) if cache is None else cache))]

"""Tests for overnight.api_auth: the dashboard's short memory of Airflow's "this token may read DAGs" answer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from overnight import api_auth
from overnight.api_auth import AuthCache, cached_auth

SECRET = "s" * 64
T0 = 1_800_000_000.0


def _token(sub: str, exp: float | None = T0 + 3600, **claims: Any) -> str:
    payload = {"sub": sub, **claims} | ({} if exp is None else {"exp": int(exp)})
    return jwt.encode(payload, SECRET, algorithm="HS512")


class FakeAirflow:
    """Stands in for Airflow's get_user (verifies the JWT at the fake clock) and requires_access_dag("GET")."""

    def __init__(self) -> None:
        self.now = T0
        self.revoked: set[str] = set()
        self.authn_calls = 0
        self.authz_calls: list[tuple[str, str | None]] = []
        self.delay = 0.0

    async def authenticate(self, request: Request, _oauth: str | None, bearer: Any) -> str:
        self.authn_calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        token = bearer.credentials if bearer is not None else request.cookies.get("_token")
        if not token:
            raise HTTPException(401, "Not authenticated")
        try:
            claims = jwt.decode(token, SECRET, algorithms=["HS512"], options={"verify_exp": False})
        except jwt.InvalidTokenError:
            raise HTTPException(403, "Invalid JWT token") from None
        if "exp" in claims and self.now >= claims["exp"]:
            raise HTTPException(401, "Token Expired")
        if token in self.revoked:
            raise HTTPException(403, "Invalid JWT token")
        return str(claims["sub"])

    def authorize(self, request: Request, user: str) -> None:
        self.authz_calls.append((user, request.query_params.get("dag_id")))
        if user == "norole":
            raise HTTPException(403, "Forbidden")


@pytest.fixture
def fake() -> FakeAirflow:
    return FakeAirflow()


@pytest.fixture
def cache(fake: FakeAirflow) -> AuthCache:
    return AuthCache(ttl_s=5, clock=lambda: fake.now)


def _app(fake: FakeAirflow, cache: AuthCache) -> FastAPI:
    app = FastAPI(dependencies=[Depends(cached_auth(fake.authenticate, fake.authorize, cache))])

    @app.get("/x")
    async def x() -> dict[str, str]:
        return {"data": "secret"}

    return app


@pytest.fixture
def get(fake: FakeAirflow, cache: AuthCache) -> Iterator[Any]:
    """GETs /x on an app whose only dependency is `cached_auth`; returns (status, body)."""
    app = _app(fake, cache)

    def call(token: str | None = None, cookie: str | None = None, query: str = "") -> tuple[int, Any]:
        async def go() -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            cookies = {"_token": cookie} if cookie else {}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         cookies=cookies) as client:
                return await client.get(f"/x{query}", headers=headers)

        resp = asyncio.run(go())
        return resp.status_code, resp.json()

    yield call


def _concurrently(app: FastAPI, token: str, n: int = 8) -> list[int]:
    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            resps = await asyncio.gather(*(client.get("/x", headers={"Authorization": f"Bearer {token}"})
                                           for _ in range(n)))
        return [r.status_code for r in resps]

    return asyncio.run(go())


def test_concurrent_misses_of_one_token_make_one_check(fake: FakeAirflow, cache: AuthCache) -> None:
    fake.delay = 0.05
    app = _app(fake, cache)
    assert _concurrently(app, _token("admin")) == [200] * 8
    assert (fake.authn_calls, len(fake.authz_calls)) == (1, 1)
    assert _concurrently(app, "not-a-jwt") == [403] * 8  # one refusal, shared by the requests that waited for it
    assert fake.authn_calls == 2
    assert _concurrently(app, "not-a-jwt", 1) == [403] and fake.authn_calls == 3  # and not remembered


def test_a_cancelled_check_does_not_fail_the_requests_waiting_for_it(fake: FakeAirflow, cache: AuthCache) -> None:
    from starlette.requests import Request as StarletteRequest

    fake.delay = 0.05
    dependency = cached_auth(fake.authenticate, fake.authorize, cache)
    token = _token("admin")

    def request() -> StarletteRequest:
        return StarletteRequest({"type": "http", "method": "GET", "path": "/x", "query_string": b"",
                                 "headers": [(b"authorization", f"Bearer {token}".encode())], "path_params": {}})

    async def go() -> Any:
        first = asyncio.create_task(dependency(request()))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(dependency(request()))
        await asyncio.sleep(0.01)
        first.cancel()  # e.g. its client went away
        return await second

    assert asyncio.run(go()) == "admin"
    assert fake.authn_calls == 2  # the waiter made its own check


def test_an_accepted_token_is_remembered_for_the_ttl(get: Any, fake: FakeAirflow) -> None:
    token = _token("admin")
    assert get(token) == (200, {"data": "secret"})
    assert (fake.authn_calls, len(fake.authz_calls)) == (1, 1)
    fake.now += 4.9
    assert get(token)[0] == 200
    assert (fake.authn_calls, len(fake.authz_calls)) == (1, 1)  # answered from memory
    fake.now += 0.2  # past the TTL: Airflow is asked again
    assert get(token)[0] == 200
    assert (fake.authn_calls, len(fake.authz_calls)) == (2, 2)


def test_a_revoked_token_is_refused_once_the_ttl_has_passed(get: Any, fake: FakeAirflow) -> None:
    token = _token("admin")
    assert get(token)[0] == 200
    fake.revoked.add(token)
    fake.now += 5.0
    assert get(token) == (403, {"detail": "Invalid JWT token"})


def test_never_remembered_past_the_tokens_exp(get: Any, fake: FakeAirflow) -> None:
    token = _token("admin", exp=T0 + 2)
    assert get(token)[0] == 200
    fake.now += 1.9
    assert get(token)[0] == 200 and fake.authn_calls == 1
    fake.now += 0.1  # at exp, well inside the TTL
    assert get(token) == (401, {"detail": "Token Expired"})


def test_refusals_are_never_remembered(get: Any, fake: FakeAirflow) -> None:
    for _ in range(2):
        assert get() == (401, {"detail": "Not authenticated"})
        assert get("not-a-jwt") == (403, {"detail": "Invalid JWT token"})
        assert get(jwt.encode({"sub": "admin", "exp": T0 + 60}, "another-secret" * 5, algorithm="HS512"))[0] == 403
        assert get(_token("norole")) == (403, {"detail": "Forbidden"})
    assert fake.authn_calls == 8 and [u for u, _ in fake.authz_calls] == ["norole", "norole"]


def test_tokens_without_exp_are_not_remembered(get: Any, fake: FakeAirflow) -> None:
    token = _token("admin", exp=None)
    assert get(token)[0] == 200 and get(token)[0] == 200
    assert fake.authn_calls == 2


def test_each_token_and_dag_id_has_its_own_entry(get: Any, fake: FakeAirflow, cache: AuthCache) -> None:
    admin, viewer = _token("admin"), _token("viewer")
    assert get(admin)[0] == get(viewer)[0] == 200
    assert get(admin, query="?dag_id=a")[0] == 200
    assert get(admin)[0] == get(viewer)[0] == get(admin, query="?dag_id=a")[0] == 200
    assert fake.authz_calls == [("admin", None), ("viewer", None), ("admin", "a")]
    assert len(cache) == 3
    assert all(len(k) == 32 and admin.encode() not in k for k in cache._entries)  # digests, not tokens


def test_cookie_is_used_without_a_bearer_and_a_bearer_wins_over_it(get: Any, fake: FakeAirflow) -> None:
    good = _token("admin")
    assert get(cookie=good)[0] == 200
    assert get(cookie=good)[0] == 200 and fake.authn_calls == 1  # the cookie's token is remembered too
    assert get("not-a-jwt", cookie=good)[0] == 403  # as Airflow's get_user: the explicit credential decides


def test_ttl_zero_remembers_nothing(fake: FakeAirflow) -> None:
    cache = AuthCache(ttl_s=0, clock=lambda: fake.now)
    cache.put(cache.key("t"), "admin", T0 + 60)
    assert len(cache) == 0 and cache.get(cache.key("t")) is None


def test_cache_is_bounded(fake: FakeAirflow) -> None:
    cache = AuthCache(ttl_s=5, max_entries=3, clock=lambda: fake.now)
    for i in range(3):
        cache.put(cache.key(f"t{i}"), i, T0 + 60)
    fake.now += 1
    cache.put(cache.key("t3"), 3, T0 + 60)  # full: the oldest goes
    assert len(cache) == 3 and cache.get(cache.key("t0")) is None and cache.get(cache.key("t3")) == 3
    cache.put(cache.key("t4"), 4, T0 + 1.5)
    fake.now += 1  # t4 expired
    cache.put(cache.key("t5"), 5, T0 + 60)  # full: the expired entry goes first
    assert cache.get(cache.key("t2")) == 2 and cache.get(cache.key("t5")) == 5 and len(cache) == 3


@pytest.mark.parametrize(
    ("raw", "ttl"),
    [pytest.param("", 5.0, id="default"), pytest.param("0", 0.0, id="off"), pytest.param(" 2.5 ", 2.5, id="float"),
     pytest.param("-1", 0.0, id="negative-is-off")],
)
def test_ttl_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, ttl: float) -> None:
    monkeypatch.setenv("OVERNIGHT_AUTH_CACHE_TTL_S", raw)
    assert api_auth.ttl_from_env() == ttl


def test_ttl_from_env_refuses_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_AUTH_CACHE_TTL_S", "five")
    with pytest.raises(ValueError, match="OVERNIGHT_AUTH_CACHE_TTL_S='five'"):
        api_auth.ttl_from_env()

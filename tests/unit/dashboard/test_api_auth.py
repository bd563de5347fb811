"""Tests for overnight.dashboard.api_auth: the dashboard's short memory of Airflow's answers (who, and may they read
DAGs / personal data), hardened: absurd `exp`, waiters always released, monotonic TTL, bearer vs cookie keys,
a bounded memory with O(1) inserts. The real api-server's side is tests/e2e/test_access.py."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from overnight.dashboard import api_auth
from overnight.dashboard.api_auth import Access, AuthCache, cached_auth

SECRET = "s" * 64
T0 = 1_800_000_000.0


def _token(sub: str, exp: Any = T0 + 3600, **claims: Any) -> str:
    payload = {"sub": sub, **claims} | ({} if exp is None else {"exp": exp if not isinstance(exp, float) else int(exp)})
    return jwt.encode(payload, SECRET, algorithm="HS512")


class RawJson(str):
    """A claim value written into the claims JSON exactly as given (e.g. `-1e309`, which json reads as -inf)."""


def _claims_json(claims: dict[str, Any]) -> bytes:
    """The claims as Python's json writes them, with each RawJson value spliced in as written."""
    raw = {f"@raw{i}@": v for i, v in enumerate(v for v in claims.values() if isinstance(v, RawJson))}
    text = json.dumps({k: (next(m for m, r in raw.items() if r is v) if isinstance(v, RawJson) else v)
                       for k, v in claims.items()})
    for marker, value in raw.items():
        text = text.replace(f'"{marker}"', value)
    return text.encode()


def _raw_token(claims: dict[str, Any]) -> str:
    """A token whose claims JSON is written as given (e.g. `Infinity`, `NaN`, a 400-digit integer, `-1e309`)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = b64(b'{"alg":"HS512","typ":"JWT"}') + b"." + b64(_claims_json(claims))
    return (signing + b"." + b64(hmac.new(SECRET.encode(), signing, hashlib.sha512).digest())).decode()


class FakeAirflow:
    """Stands in for Airflow's get_user (verifies the JWT at the fake clock) and the auth manager's answers."""

    def __init__(self) -> None:
        self.now = T0
        self.revoked: set[str] = set()
        self.authn_calls = 0
        self.grant_calls: list[str] = []
        self.delay = 0.0
        self.grants_error: Exception | None = None

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

    def grants(self, user: str) -> Access:
        self.grant_calls.append(user)
        if self.grants_error is not None:
            raise self.grants_error
        return Access(user=user, operations=user != "norole", personal_data=user in ("admin", "service"))


@pytest.fixture
def fake() -> FakeAirflow:
    return FakeAirflow()


@pytest.fixture
def cache(fake: FakeAirflow) -> AuthCache:
    return AuthCache(ttl_s=5, clock=lambda: fake.now, wall=lambda: fake.now)


def _app(fake: FakeAirflow, cache: AuthCache) -> FastAPI:
    app = FastAPI(dependencies=[Depends(cached_auth(fake.authenticate, fake.grants, cache))])

    @app.get("/x")
    async def x() -> dict[str, str]:
        return {"data": "secret"}

    @app.get("/personal", dependencies=[Depends(api_auth.requires_personal_data)])
    async def personal() -> dict[str, str]:
        return {"data": "personal"}

    return app


@pytest.fixture
def get(fake: FakeAirflow, cache: AuthCache) -> Iterator[Any]:
    """GETs a path (default /x) on an app whose only app dependency is `cached_auth`; returns (status, body)."""
    app = _app(fake, cache)

    def call(token: str | None = None, cookie: str | None = None, query: str = "", path: str = "/x"
             ) -> tuple[int, Any]:
        async def go() -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            cookies = {"_token": cookie} if cookie else {}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         cookies=cookies) as client:
                return await client.get(f"{path}{query}", headers=headers)

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
    assert (fake.authn_calls, len(fake.grant_calls)) == (1, 1)
    assert _concurrently(app, "not-a-jwt") == [403] * 8  # one refusal, shared by the requests that waited for it
    assert fake.authn_calls == 2
    assert _concurrently(app, "not-a-jwt", 1) == [403] and fake.authn_calls == 3  # and not remembered


def test_a_cancelled_check_does_not_fail_the_requests_waiting_for_it(fake: FakeAirflow, cache: AuthCache) -> None:
    from starlette.requests import Request as StarletteRequest

    fake.delay = 0.05
    dependency = cached_auth(fake.authenticate, fake.grants, cache)
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

    assert asyncio.run(go()).user == "admin"
    assert fake.authn_calls == 2  # the waiter made its own check


def test_an_accepted_token_is_remembered_for_the_ttl(get: Any, fake: FakeAirflow) -> None:
    token = _token("admin")
    assert get(token) == (200, {"data": "secret"})
    assert (fake.authn_calls, len(fake.grant_calls)) == (1, 1)
    fake.now += 4.9
    assert get(token)[0] == 200
    assert (fake.authn_calls, len(fake.grant_calls)) == (1, 1)  # answered from memory
    fake.now += 0.2  # past the TTL: Airflow is asked again
    assert get(token)[0] == 200
    assert (fake.authn_calls, len(fake.grant_calls)) == (2, 2)


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
        assert get(_token("norole")) == (403, {"detail": api_auth.NO_ACCESS})
    assert fake.authn_calls == 8 and fake.grant_calls == ["norole", "norole"]


def test_tokens_without_exp_are_not_remembered(get: Any, fake: FakeAirflow) -> None:
    token = _token("admin", exp=None)
    assert get(token)[0] == 200 and get(token)[0] == 200
    assert fake.authn_calls == 2


def test_each_token_has_its_own_entry_and_dag_id_changes_nothing(get: Any, fake: FakeAirflow, cache: AuthCache
                                                                   ) -> None:
    admin, viewer = _token("admin"), _token("viewer")
    assert get(admin)[0] == get(viewer)[0] == 200
    assert get(admin, query="?dag_id=a")[0] == get(viewer, query="?dag_id=b")[0] == 200  # same entries
    assert fake.grant_calls == ["admin", "viewer"]  # the auth manager is asked about the user only
    assert len(cache) == 2
    assert all(len(k) == 32 and admin.encode() not in k for k in cache._entries)  # digests, not tokens


def test_personal_data_needs_its_own_permission_and_is_remembered_with_the_token(get: Any, fake: FakeAirflow
                                                                                  ) -> None:
    assert get(_token("viewer"), path="/personal") == (403, {"detail": api_auth.NO_PERSONAL_DATA})
    assert get(_token("viewer"), path="/personal", query="?dag_id=overnight_scoring_xnys")[0] == 403
    assert get(_token("service"), path="/personal") == (200, {"data": "personal"})
    assert get(_token("service"), path="/personal")[0] == 200
    assert fake.grant_calls == ["viewer", "service"]  # remembered: no second round trip


def test_cookie_is_used_without_a_bearer_and_a_bearer_wins_over_it(get: Any, fake: FakeAirflow) -> None:
    good = _token("admin")
    assert get(cookie=good)[0] == 200
    assert get(cookie=good)[0] == 200 and fake.authn_calls == 1  # the cookie's token is remembered too
    forged = jwt.encode({"sub": "admin", "exp": int(T0 + 60)}, "another-secret" * 5, algorithm="HS512")
    for _ in range(2):  # as Airflow's get_user: the explicit credential decides, remembered cookie or not
        assert get(forged, cookie=good) == (403, {"detail": "Invalid JWT token"})
        assert get("not-a-jwt", cookie=good) == (403, {"detail": "Invalid JWT token"})
    calls = fake.authn_calls
    assert get(good)[0] == 200 and fake.authn_calls == calls + 1  # a bearer has its own entry, not the cookie's


ABSURD_EXPIRIES = [
    pytest.param({"exp": 10**400}, id="int-beyond-float"),
    pytest.param({"exp": -10**400}, id="negative-int-beyond-float"),  # was OverflowError: a 500
    pytest.param({"exp": RawJson("-1e309")}, id="float-literal-below-float"),  # json reads it as -inf
    pytest.param({"exp": RawJson("1e309")}, id="float-literal-beyond-float"),
    pytest.param({"exp": "-1e309"}, id="string-minus-1e309"),
    pytest.param({"exp": -1e300}, id="finite-float-centuries-ago"),
    pytest.param({"exp": T0 - 3 * 366 * 86400 - 10**8}, id="years-ago"),
    pytest.param({"exp": math.inf}, id="infinity"),
    pytest.param({"exp": -math.inf}, id="minus-infinity"),
    pytest.param({"exp": math.nan}, id="nan"),
    pytest.param({"exp": "1800003600"}, id="string"),
    pytest.param({"exp": True}, id="bool"),
    pytest.param({"exp": [1]}, id="list"),
    pytest.param({"exp": T0 + 3 * 366 * 86400 + 10**8}, id="years-ahead"),
]


@pytest.mark.parametrize("claims", ABSURD_EXPIRIES)
def test_an_absurd_exp_is_refused_before_airflow_is_asked(get: Any, fake: FakeAirflow, claims: dict[str, Any]
                                                          ) -> None:
    token = _raw_token({"sub": "admin", **claims})
    assert get(token) == (403, {"detail": "Invalid JWT token"})
    assert get(cookie=token) == (403, {"detail": "Invalid JWT token"})
    assert fake.authn_calls == 0


def test_fifty_concurrent_absurd_and_forged_tokens_are_all_answered(fake: FakeAirflow, cache: AuthCache) -> None:
    fake.delay = 0.01
    app = _app(fake, cache)
    tokens = [_raw_token({"sub": "admin", "exp": 10**400}), _raw_token({"sub": "admin", "exp": math.inf}),
              _raw_token({"sub": "admin", "exp": -10**400}), _raw_token({"sub": "admin", "exp": RawJson("-1e309")}),
              jwt.encode({"sub": "admin", "exp": int(T0 + 60)}, "x" * 64, algorithm="HS512"), "not-a-jwt"]

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            calls = [client.get("/x", headers={"Authorization": f"Bearer {tokens[i % len(tokens)]}"})
                     for i in range(50)]
            return [r.status_code for r in await asyncio.wait_for(asyncio.gather(*calls), 5)]

    assert asyncio.run(go()) == [403] * 50


def test_waiters_are_released_when_the_check_breaks(fake: FakeAirflow, cache: AuthCache) -> None:
    from starlette.requests import Request as StarletteRequest

    fake.delay, fake.grants_error = 0.05, RuntimeError("auth manager broke")
    dependency = cached_auth(fake.authenticate, fake.grants, cache)
    token = _token("admin")

    def request() -> StarletteRequest:
        return StarletteRequest({"type": "http", "method": "GET", "path": "/x", "query_string": b"",
                                 "headers": [(b"authorization", f"Bearer {token}".encode())], "path_params": {}})

    async def go() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*(dependency(request()) for _ in range(8)),
                                                     return_exceptions=True), 5)

    results = asyncio.run(go())
    assert [type(r) for r in results] == [RuntimeError] * 8  # each one answered (500), none waits forever
    assert len(cache) == 0


def test_the_ttl_runs_on_the_monotonic_clock(fake: FakeAirflow) -> None:
    mono, wall = [100.0], [T0]
    cache = AuthCache(ttl_s=5, clock=lambda: mono[0], wall=lambda: wall[0])
    cache.put(cache.key("t"), "admin", T0 + 3600)
    wall[0] -= 3600  # someone sets the wall clock back an hour: the entry's 5 s do not grow
    mono[0] += 4.9
    assert cache.get(cache.key("t")) == "admin"
    mono[0] += 0.1
    assert cache.get(cache.key("t")) is None
    assert AuthCache()._clock is time.monotonic  # the default


@pytest.mark.parametrize("exp", [-10**400, 10**400, -(2**1100), RawJson("-1e309"), RawJson("-1E400")],
                         ids=["-10**400", "10**400", "-2**1100", "-1e309", "-1E400"])
def test_token_expiry_raises_only_invalid_expiry_for_huge_values(exp: Any) -> None:
    with pytest.raises(api_auth.InvalidExpiry):
        api_auth.token_expiry(_raw_token({"sub": "a", "exp": exp}), now=T0)


def test_token_expiry_reads_a_valid_exp() -> None:
    assert api_auth.token_expiry(_token("a", exp=T0 + 60), now=T0) == T0 + 60
    assert api_auth.token_expiry(_token("a", exp=T0 - 60), now=T0) == T0 - 60  # expired: Airflow's 401 to give
    assert api_auth.token_expiry(_token("a", exp=None), now=T0) is None
    assert api_auth.token_expiry("not-a-jwt", now=T0) is None


def test_ttl_zero_remembers_nothing(fake: FakeAirflow) -> None:
    cache = AuthCache(ttl_s=0, clock=lambda: fake.now)
    cache.put(cache.key("t"), "admin", T0 + 60)
    assert len(cache) == 0 and cache.get(cache.key("t")) is None


def test_cache_is_bounded(fake: FakeAirflow) -> None:
    cache = AuthCache(ttl_s=5, max_entries=3, clock=lambda: fake.now, wall=lambda: fake.now)
    for i in range(3):
        cache.put(cache.key(f"t{i}"), i, T0 + 60)
    fake.now += 1
    cache.put(cache.key("t3"), 3, T0 + 60)  # full: the oldest goes
    assert len(cache) == 3 and cache.get(cache.key("t0")) is None and cache.get(cache.key("t3")) == 3
    fake.now += 4.5  # t1, t2 expired: they go first, from the old end
    cache.put(cache.key("t4"), 4, T0 + 60)
    assert len(cache) == 2 and cache.get(cache.key("t3")) == 3 and cache.get(cache.key("t4")) == 4


class _CountingDict(OrderedDict):  # type: ignore[type-arg]
    looked = 0

    def values(self) -> Any:
        type(self).looked += 1
        return super().values()

    def items(self) -> Any:
        raise AssertionError("an insert must not scan the entries")

    def __iter__(self) -> Any:
        raise AssertionError("an insert must not scan the entries")


def test_an_insert_into_a_full_cache_does_not_scan_it(fake: FakeAirflow) -> None:
    cache = AuthCache(ttl_s=5, max_entries=1000, clock=lambda: fake.now, wall=lambda: fake.now)
    cache._entries = _CountingDict()
    for i in range(5000):
        cache.put(cache.key(f"t{i}"), i, T0 + 60)
    assert len(cache) == 1000 and cache.get(cache.key("t4999")) == 4999 and cache.get(cache.key("t3999")) is None
    assert _CountingDict.looked <= 2 * 5000  # the oldest entry, once or twice per insert


@pytest.mark.parametrize(
    ("raw", "ttl"),
    [pytest.param("", 5.0, id="default"), pytest.param("0", 0.0, id="off"), pytest.param(" 2.5 ", 2.5, id="float"),
     pytest.param("-1", 0.0, id="negative-is-off")],
)
def test_ttl_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, ttl: float) -> None:
    monkeypatch.setenv("OVERNIGHT_AUTH_CACHE_TTL_S", raw)
    assert api_auth.ttl_from_env() == ttl


@pytest.mark.parametrize("raw", ["five", "inf", "nan"])
def test_ttl_from_env_refuses_words_and_non_finite(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("OVERNIGHT_AUTH_CACHE_TTL_S", raw)
    with pytest.raises(ValueError, match=f"OVERNIGHT_AUTH_CACHE_TTL_S='{raw}'"):
        api_auth.ttl_from_env()


def test_the_app_dependency_writes_the_very_cache_it_was_given(fake: FakeAirflow, cache: AuthCache,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`airflow_auth(cache)` remembers in `cache` itself, the memory FastPaths reads; an empty cache is falsy
    (it has a length), and once was swapped for a TTL-0 one: FastPaths then never answered, every request
    asked Airflow again (the benchmark's hit and no-op throughput fell fivefold)."""
    import airflow.api_fastapi.core_api.security as security

    monkeypatch.setattr(security, "get_user", fake.authenticate)
    monkeypatch.setattr(api_auth, "airflow_grants", fake.grants)
    app = FastAPI(dependencies=api_auth.airflow_auth(cache))

    @app.get("/x")
    async def x() -> dict[str, str]:
        return {"data": "secret"}

    assert len(cache) == 0 and not cache  # the trap: empty is falsy
    token = _token("admin")

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [(await client.get("/x", headers={"Authorization": f"Bearer {token}"})).status_code
                    for _ in range(3)]

    assert asyncio.run(go()) == [200, 200, 200]
    assert len(cache) == 1 and cache.get(AuthCache.key(token, "bearer")) is not None
    assert fake.authn_calls == 1  # remembered: Airflow was asked once

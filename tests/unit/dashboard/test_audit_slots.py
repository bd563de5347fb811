"""The /audit concurrency cap holds for replays whose requests are cancelled: a cancelled request leaves its
replay's thread running (and its query, up to the statement timeout), so the slot is given back when the
thread ends, not when the request does. Otherwise cancelling and asking again runs any number at once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi import Depends, Request

from overnight.dashboard import app as api
from overnight.dashboard import store as store_module
from overnight.dashboard.api_auth import Access
from overnight.dashboard.app import AUDIT_CONCURRENCY
from overnight.dashboard.store import DashboardStore

REPLAY_S = 1.0  # how long one replay's thread works (the rounds of cancelled calls take ~0.3 s)


def _grant_all(request: Request) -> None:
    request.state.overnight_access = Access(user="test", operations=True, personal_data=True)


class Replays:
    """Stands in for Postgres and `replay_user` inside the store's thread: counts the replays running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = self.started = self.finished = 0

    def connect(self, *_: Any, **__: Any) -> Any:
        class Conn:
            read_only = False

            def __enter__(self) -> Conn:
                return self

            def __exit__(self, *_: Any) -> None:
                return None

        return Conn()

    def replay_user(self, _conn: Any, correlation_id: str, user_id: str) -> Any:
        with self.lock:
            self.running += 1
            self.started += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(REPLAY_S)
        finally:
            with self.lock:
                self.running -= 1
                self.finished += 1

        class Result:
            def to_json(self) -> dict[str, Any]:
                return {"userId": user_id, "correlationId": correlation_id, "jobRunId": str(uuid.uuid4()),
                        "market": "XNYS", "sessionDate": "2026-11-25", "status": "identical",
                        "storedCalcVersion": "v", "replayCalcVersion": "v", "storedDocumentSha256": None,
                        "replayedDocumentSha256": None, "differences": [], "note": None}

        return Result()


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> Replays:
    from overnight.night import replay

    fake = Replays()
    monkeypatch.setattr(store_module.psycopg, "connect", fake.connect)
    monkeypatch.setattr(replay, "replay_user", fake.replay_user)
    return fake


def test_cancelled_replays_keep_their_slot_until_their_thread_ends(replays: Replays) -> None:
    store = DashboardStore(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="")
    app = api.create_app(store=store, dependencies=[Depends(_grant_all)], audit_per_login=10 * AUDIT_CONCURRENCY)

    def path() -> str:
        return f"/api/v1/audit/calculations/{uuid.uuid4()}/{uuid.uuid4()}/replay"

    async def go() -> tuple[list[int], float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for _ in range(6):  # rounds of impatient callers: ask, give up after 50 ms, ask again
                calls = [asyncio.create_task(client.get(path())) for _ in range(2 * AUDIT_CONCURRENCY)]
                await asyncio.sleep(0.05)
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
            t0 = time.monotonic()  # the replays left running still hold the slots: this one waits for them
            answered = await client.get(path())
            waited = time.monotonic() - t0
            deadline = time.monotonic() + 10
            while replays.running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            after = await asyncio.gather(*(client.get(path()) for _ in range(AUDIT_CONCURRENCY)))
        return [answered.status_code, *(r.status_code for r in after)], waited

    statuses, waited = asyncio.run(go())
    assert replays.started >= AUDIT_CONCURRENCY + 1, "the test never had more than the cap asking"
    assert replays.most <= AUDIT_CONCURRENCY, f"{replays.most} replays ran at once (cap {AUDIT_CONCURRENCY})"
    assert statuses == [200] * (AUDIT_CONCURRENCY + 1)  # every slot came back once the threads ended
    assert waited >= 0.3  # it got its turn from a finished thread, not from a cancelled request
    assert replays.running == 0 and replays.finished == replays.started


def test_a_replay_that_fails_before_its_thread_gives_its_slot_back(replays: Replays) -> None:
    store = DashboardStore(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="")
    app = api.create_app(store=store, dependencies=[Depends(_grant_all)], audit_per_login=10 * AUDIT_CONCURRENCY)

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            bad = [await client.get(f"/api/v1/audit/calculations/{uuid.uuid4()}/not-a-uuid/replay")
                   for _ in range(AUDIT_CONCURRENCY + 1)]
            good = await client.get(f"/api/v1/audit/calculations/{uuid.uuid4()}/{uuid.uuid4()}/replay")
        return [r.status_code for r in [*bad, good]]

    assert asyncio.run(go()) == [422] * (AUDIT_CONCURRENCY + 1) + [200]


def _grant_by_header(request: Request) -> None:
    request.state.overnight_access = Access(user=request.headers["x-login"], operations=True, personal_data=True)


def test_one_login_runs_one_audit_query_at_a_time_others_are_not_held_up(replays: Replays) -> None:
    """The per-login cap (AUDIT_PER_LOGIN): a login's second call while its first runs gets 429 at once, saying
    why; another login's call runs meanwhile; once the first is done, the login may ask again."""
    assert api.AUDIT_PER_LOGIN == 1 < AUDIT_CONCURRENCY
    store = DashboardStore(pg_dsn="postgresql://nobody@127.0.0.1:1/none", redis_url="")
    app = api.create_app(store=store, dependencies=[Depends(_grant_by_header)])

    def path() -> str:
        return f"/api/v1/audit/calculations/{uuid.uuid4()}/{uuid.uuid4()}/replay"

    async def go() -> list[tuple[str, int, float, str]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            async def call(login: str, delay: float = 0) -> tuple[str, int, float, str]:
                await asyncio.sleep(delay)
                t0 = time.monotonic()
                r = await client.get(path(), headers={"x-login": login})
                return login, r.status_code, time.monotonic() - t0, r.text

            first = await asyncio.gather(call("alice"), call("alice", 0.2), call("bob", 0.2))
            again = await call("alice")
            return [*first, again]

    (a1, a1_status, _, _), (_, a2_status, a2_took, a2_text), (_, bob_status, _, _), (_, again, _, _) = asyncio.run(go())
    assert (a1_status, a2_status, bob_status, again) == (200, 429, 200, 200)
    assert a2_took < REPLAY_S / 2 and "at most 1 at once per login" in a2_text  # refused at once, saying why
    assert replays.most == 2  # alice's first and bob's ran together

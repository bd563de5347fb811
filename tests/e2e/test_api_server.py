"""The Overnight plugin on a real `airflow api-server`: auth, data, fallbacks, hostile input, and the page in Chromium.

Two api-servers start side by side on this run's fresh databases: the normal one, and one whose
`overnight_redis` connection points at a TCP listener that never answers (a hung Redis). Both run the
auth manager `make airflow` runs (`OvernightSimpleAuthManager`); tokens come from its `POST /auth/token`
for admin, viewer (operations only: 403 on dashboards), the service login overnight_app (dashboards) and
`norole:` (authenticated, no permission at all). The hostile access tests are in test_access.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import psycopg
import pytest
import redis

from overnight.adapters import cache
from overnight.dashboard.api_auth import NO_PERSONAL_DATA
from tests.support import reliability as R
from tests.support.api_server import SERVICE, ApiServer, auth_env, token
from tests.support.pipeline_run import run_market

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SESSION = date(2026, 11, 25)
JWT_SECRET = uuid.uuid4().hex
HOSTILE = ["'", '"', "'; DROP TABLE users;--", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "ÄÖÜ-€-日本",
           "%27%20OR%20%271%27%3D%271", "\\", "<script>alert(1)</script>", "a" * 300, "%00"]


class SilentServer:
    """Accepts TCP connections and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for s in self.held:
            s.close()
        self.sock.close()


@pytest.fixture(scope="module")
def stack(airflow_db: None, pg_dsn: str, seeded: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Scored data, and the two api-servers (normal, hung Redis) with tokens for admin, viewer, the service
    login overnight_app and norole (authenticated, no role), under the auth manager `make airflow` runs."""
    redis_url = os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"]
    scored = run_market(pg_dsn, "XNYS", SESSION, "test-e2e-api", redis_url=redis_url, batch_size=300,
                    latest=True)
    job = scored.job
    with psycopg.connect(pg_dsn) as conn:
        served = R.served(conn, "XNYS", SESSION)
        user_id, doc = conn.execute(
            "SELECT user_id::text, document FROM recommendations WHERE correlation_id = %s"
            " AND jsonb_array_length(document->'recommendations') > 1 ORDER BY user_id LIMIT 1",
            (job.correlation_id,)).fetchone()
    tmp = Path(tempfile.mkdtemp(prefix="overnight-e2e-"))
    env, passwords = auth_env(tmp, JWT_SECRET)
    silent = SilentServer()
    main = ApiServer("main", env, tmp)
    hung = ApiServer("hung-redis", {**env, "AIRFLOW_CONN_OVERNIGHT_REDIS": f"redis://127.0.0.1:{silent.port}/0"},
                     tmp)
    try:
        deadline = time.monotonic() + 120
        main.wait_healthy(deadline)
        hung.wait_healthy(deadline)
        tokens = {name: token(main.url, name, pw) for name, pw in passwords.items()}
        yield {"main": main, "hung": hung, "tokens": tokens, "user_id": user_id, "doc": doc, "job": job,
               "summary": scored.summary, "served": served,
               "redis": redis.Redis.from_url(redis_url), "pg_dsn": pg_dsn, "passwords": passwords, "tmp": tmp}
    finally:
        for server in (main, hung):
            server.stop()
        silent.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _get(stack: dict[str, Any], path: str, *, who: str | None = "admin", server: str = "main",
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = dict(headers or {})
    if who:
        h["Authorization"] = f"Bearer {stack['tokens'][who]}"
    return httpx.get(stack[server].url + path, headers=h, timeout=10, follow_redirects=False, trust_env=False)


def _dash(user: str) -> str:
    return f"/overnight/api/v1/dashboard/{user}"


# --------------------------------------------------------------------------- authentication / authorization

ROUTES = [_dash("7f0c2b1e-5a4d-4c3b-9e8f-0a1b2c3d4e5f"), "/overnight/api/v1/job-runs", "/overnight/api/v1/markets",
          "/overnight/api/v1/audit/assets/AAPL", "/overnight/", "/overnight/static/overnight.js",
          "/overnight/docs", "/overnight/openapi.json"]


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_needs_a_user(stack: dict[str, Any], path: str) -> None:
    anon = _get(stack, path, who=None)
    assert anon.status_code == 401 and anon.json() == {"detail": "Not authenticated"}
    bad = _get(stack, path, who=None, headers={"Authorization": "Bearer not-a-jwt"})
    assert bad.status_code == 403 and bad.json() == {"detail": "Invalid JWT token"}
    assert _get(stack, path, who="norole").status_code == 403
    personal = path.startswith(_dash(""))
    viewer = _get(stack, path, who="viewer")
    assert viewer.status_code == (403 if personal else 200)
    if personal:
        assert viewer.json() == {"detail": NO_PERSONAL_DATA}
    assert _get(stack, path, who=SERVICE).status_code == (404 if personal else 200)  # a random user: unknown


def test_token_signed_with_another_secret_is_refused(stack: dict[str, Any]) -> None:
    import jwt

    claims = jwt.decode(stack["tokens"]["admin"], options={"verify_signature": False})
    forged = jwt.encode(claims, "not-the-secret", algorithm="HS512")
    resp = _get(stack, _dash(stack["user_id"]), who=None, headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 403 and resp.json() == {"detail": "Invalid JWT token"}
    cookie = httpx.get(stack["main"].url + _dash(stack["user_id"]), cookies={"_token": forged}, trust_env=False)
    assert cookie.status_code == 403 and cookie.json() == {"detail": "Invalid JWT token"}


def test_revoked_token_is_refused_within_the_auth_cache_ttl(stack: dict[str, Any]) -> None:
    """The plugin remembers Airflow's "may read DAGs" per token for a few seconds; a logout ends it within that."""
    from overnight.dashboard.api_auth import AUTH_CACHE_TTL_S

    headers = {"Authorization": f"Bearer {token(stack['main'].url, SERVICE, stack['passwords'][SERVICE])}"}
    assert _get(stack, _dash(stack["user_id"]), who=None, headers=headers).status_code == 200  # now remembered
    logout = httpx.get(stack["main"].url + "/api/v2/auth/logout", headers=headers, trust_env=False)
    assert logout.status_code == 307 and logout.headers["location"].endswith("/auth/login"), logout.text
    revoked = time.monotonic()
    while (resp := _get(stack, _dash(stack["user_id"]), who=None, headers=headers)).status_code == 200:
        assert time.monotonic() - revoked < AUTH_CACHE_TTL_S + 1, "a revoked token is still served after the TTL"
        time.sleep(0.2)
    assert resp.status_code == 403 and resp.json() == {"detail": "Invalid JWT token"}
    assert _get(stack, "/overnight/api/v1/ping", who=None, headers=headers).status_code == 403


def test_expired_token_is_refused_at_exp_even_when_remembered(stack: dict[str, Any]) -> None:
    import jwt

    claims = jwt.decode(stack["tokens"][SERVICE], options={"verify_signature": False})
    now = int(time.time())
    short = jwt.encode({**claims, "jti": uuid.uuid4().hex, "iat": now, "nbf": now, "exp": now + 2}, JWT_SECRET,
                       algorithm="HS512")
    headers = {"Authorization": f"Bearer {short}"}
    assert _get(stack, _dash(stack["user_id"]), who=None, headers=headers).status_code == 200  # remembered until exp
    time.sleep(max(0.0, now + 2 - time.time()) + 0.2)
    resp = _get(stack, _dash(stack["user_id"]), who=None, headers=headers)
    assert resp.status_code == 401 and resp.json() == {"detail": "Token Expired"}


def test_browser_without_session_is_sent_to_login(stack: dict[str, Any]) -> None:
    resp = _get(stack, "/overnight/", who=None, headers={"Accept": "text/html"})
    assert resp.status_code == 303
    assert resp.headers["location"] == "/auth/login?next=%2Fovernight%2F"
    api = _get(stack, _dash(stack["user_id"]), who=None, headers={"Accept": "text/html,application/json"})
    assert api.status_code == 401  # API routes never redirect


def test_plugin_is_registered_with_its_external_view(stack: dict[str, Any]) -> None:
    plugins = _get(stack, "/api/v2/plugins").json()["plugins"]
    mine = next(p for p in plugins if p["name"] == "overnight_dashboard")
    assert mine["fastapi_apps"][0]["url_prefix"] == "/overnight"
    view = mine["external_views"][0]
    assert (view["href"], view["url_route"], view["destination"]) == ("overnight/", "overnight", "nav")
    assert [m["name"] for m in mine["fastapi_root_middlewares"]] == ["Overnight dashboard, built at start-up"]


def test_the_dashboard_is_built_at_start_up_not_by_a_users_first_request(stack: dict[str, Any]) -> None:
    log = stack["main"].log_path.read_text(errors="replace")
    built = log.find("frozen out of the cyclic GC")  # logged when the dashboard app is built
    started = log.find("Application startup complete")  # uvicorn, before it takes any request
    assert started != -1, "no start-up line in the api-server log"
    assert built != -1 and built < started, (
        f"the dashboard was not built during the api-server's start-up:\n{log[max(0, started - 600):started + 100]}")


# --------------------------------------------------------------------------- data


def test_dashboard_from_cache_then_from_postgres_with_the_same_recommendations(stack: dict[str, Any]) -> None:
    uid = stack["user_id"]
    client: redis.Redis = stack["redis"]
    client.set(cache.recs_key(uid), json.dumps(stack["doc"]), ex=cache.TTL_SECONDS)
    hit = _get(stack, _dash(uid))
    assert hit.status_code == 200, hit.text
    client.delete(cache.recs_key(uid))
    miss = _get(stack, _dash(uid))
    client.set(cache.recs_key(uid), json.dumps(stack["doc"]), ex=cache.TTL_SECONDS)
    assert miss.status_code == 200, miss.text
    h, m = hit.json()["data"], miss.json()["data"]
    assert (h["fromCache"], m["fromCache"]) == (True, False)
    assert h["recommendations"] == m["recommendations"] == stack["doc"]["recommendations"]
    assert {k: v for k, v in h.items() if k != "fromCache"} == {k: v for k, v in m.items() if k != "fromCache"}
    assert sorted(h) == ["baseCurrency", "correlationId", "dataFreshness", "fromCache", "lastKnownPrices",
                         "portfolioSummary", "recommendations", "stale", "staleReason", "totalInvestable",
                         "unallocated", "unpricedHoldings", "userId"]
    # SESSION's document is past its freshness (XNYS's next session's run + 2 h), and no test runs that session
    assert (h["stale"], h["staleReason"]) == (True, "run_missing")
    assert h["totalInvestable"] == stack["doc"]["totalInvestable"]
    assert h["dataFreshness"]["criteriaVersion"] == stack["doc"]["dataFreshness"]["criteriaVersion"]


def test_the_fast_path_answers_as_the_app_does(stack: dict[str, Any]) -> None:
    """A remembered token's dashboard and ping come from `FastPaths`; a query string always reaches FastAPI:
    through the real api-server and its middleware, both answers are the same."""
    uid = stack["user_id"]
    stack["redis"].set(cache.recs_key(uid), json.dumps(stack["doc"]), ex=cache.TTL_SECONDS)
    for path in (_dash(uid), "/overnight/api/v1/ping"):
        for encoding in ("gzip", "identity"):
            answers = [_get(stack, path + query, headers={"Accept-Encoding": encoding}) for query in ("", "", "?via=app")]
            assert {a.status_code for a in answers} == {200}
            assert answers[1].content == answers[2].content, path  # httpx has undone any gzip
            keep = ("content-type", "content-encoding", "vary")
            assert {k: answers[1].headers.get(k) for k in keep} == {k: answers[2].headers.get(k) for k in keep}
            if path.endswith("ping"):
                assert answers[1].json() == {"status": "ok"}
            else:
                assert answers[1].json()["data"]["fromCache"] is True
                gzipped = encoding == "gzip" and len(answers[1].content) >= 1024  # Airflow's GZipMiddleware's minimum
                assert answers[1].headers.get("content-encoding") == ("gzip" if gzipped else None)


def test_hung_redis_still_serves_from_postgres(stack: dict[str, Any]) -> None:
    """(How fast is `make bench`'s business: a 2 s limit here failed on a loaded machine.)"""
    for _ in range(3):
        resp = _get(stack, _dash(stack["user_id"]), server="hung")
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        assert data["fromCache"] is False and data["recommendations"] == stack["doc"]["recommendations"]


@pytest.mark.parametrize(
    ("user", "status"),
    [
        pytest.param(str(uuid.uuid4()), 404, id="unknown-user"),
        pytest.param("not-a-uuid", 422, id="words"),
        pytest.param("12345", 422, id="digits"),
        pytest.param(quote("'; DROP TABLE users;--", safe=""), 422, id="sql"),
        pytest.param("x" * 65, 422, id="too-long"),
    ],
)
def test_dashboard_unknown_and_malformed_users(stack: dict[str, Any], user: str, status: int) -> None:
    resp = _get(stack, _dash(user))
    assert resp.status_code == status and "data" not in resp.json()


def test_job_runs_and_validation(stack: dict[str, Any]) -> None:
    runs = _get(stack, "/overnight/api/v1/job-runs?market=XNYS&limit=500").json()["data"]
    run = next(r for r in runs if r["id"] == stack["job"].id)
    summary = stack["summary"]  # the seeded users are all valid: every one XNYS serves calculated
    served = len(stack["served"])
    assert (summary["status"], summary["users_processed"], summary["users_failed"]) == ("completed", served, 0)
    assert (run["status"], run["usersProcessed"], run["usersFailed"]) == ("completed", served, 0)
    with psycopg.connect(stack["pg_dsn"]) as conn:
        took = conn.execute("SELECT extract(epoch FROM completed_at - started_at)::float8 FROM overnight_job_runs"
                            " WHERE id = %s", (stack["job"].id,)).fetchone()[0]
    assert run["durationSeconds"] == pytest.approx(took, abs=5e-4)  # to the millisecond
    assert (run["stale"], run["staleReason"]) == (True, "next_run_due")  # XNYS's next session's run is long due
    assert len(_get(stack, "/overnight/api/v1/job-runs?limit=1").json()["data"]) == 1
    for query in ("limit=0", "limit=501", "limit=abc", "status=bogus"):
        assert _get(stack, f"/overnight/api/v1/job-runs?{query}").status_code == 422, query
    markets = _get(stack, "/overnight/api/v1/markets").json()["data"]
    assert any(m["market"] == "XNYS" and m["latest"]["id"] == stack["job"].id for m in markets)


def test_audit_events_for_an_asset_with_keyset_pages(stack: dict[str, Any]) -> None:
    symbol = stack["doc"]["recommendations"][0]["symbol"]
    first = _get(stack, f"/overnight/api/v1/audit/assets/{quote(symbol)}?limit=3").json()
    assert len(first["data"]) == 3 and first["next"] is not None
    assert all(e["eventType"] == "SCORES_COMPUTED" and e["jobRun"] for e in first["data"])
    nxt = first["next"]
    second = _get(stack, f"/overnight/api/v1/audit/assets/{quote(symbol)}?limit=3"
                         f"&before={quote(nxt['before'])}&before_id={nxt['beforeId']}").json()
    assert second["data"] and not {e["eventId"] for e in first["data"]} & {e["eventId"] for e in second["data"]}
    assert second["data"][0]["createdAt"] <= first["data"][-1]["createdAt"]
    assert _get(stack, f"/overnight/api/v1/audit/assets/{quote(symbol)}?before=yesterday").status_code == 422


def test_hostile_input_is_harmless(stack: dict[str, Any]) -> None:
    with psycopg.connect(stack["pg_dsn"]) as conn:
        before = conn.execute("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM calculation_events),"
                              " (SELECT count(*) FROM recommendations)").fetchone()
    got, want = {}, {}
    for raw in HOSTILE:
        text = unquote(raw)  # what the server decodes the path or query value to
        slash, bad = "/" in text, "\x00" in text  # a slash leaves the route; NUL is refused by the pattern
        for kind, path, longest in (
                ("audit", f"/overnight/api/v1/audit/assets/{quote(raw, safe='%')}", 64),
                ("audit-raw", f"/overnight/api/v1/audit/assets/{raw}", 64),
                ("job-runs", f"/overnight/api/v1/job-runs?market={quote(raw, safe='%')}", 32),
                ("dashboard", _dash(quote(raw, safe="%")), None)):
            resp = _get(stack, path)
            got[kind, raw] = resp.status_code, (resp.json().get("data") if resp.status_code == 200 else None)
            if slash and kind != "job-runs":
                want[kind, raw] = 404, None  # no route has a slash in its parameter
            elif kind == "dashboard" or bad or len(text) > longest:
                want[kind, raw] = 422, None  # not a user id; NUL; too long
            else:
                want[kind, raw] = 200, []  # a harmless search that finds nothing
    assert got == want
    with psycopg.connect(stack["pg_dsn"]) as conn:
        after = conn.execute("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM calculation_events),"
                             " (SELECT count(*) FROM recommendations)").fetchone()
    assert after == before


def test_openapi_docs(stack: dict[str, Any]) -> None:
    docs = _get(stack, "/overnight/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "https://" not in docs.text  # no CDN: Swagger UI's files come from the plugin
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"docs-assets/{asset}" in docs.text
        got = _get(stack, f"/overnight/docs-assets/{asset}")
        assert got.status_code == 200 and len(got.content) > 10_000
    assert _get(stack, "/overnight/docs-assets/..%2Fapi.py").status_code == 404
    schema = _get(stack, "/overnight/openapi.json").json()
    assert schema["servers"] == [{"url": "/overnight"}]
    assert {"/api/v1/dashboard/{user_id}", "/api/v1/job-runs", "/api/v1/audit/assets/{symbol}"} <= set(schema["paths"])


# --------------------------------------------------------------------------- the page in Chromium


def _chromium() -> str:
    """The browser `make test` installs (`make browser`); a skip naming the command when it is missing (in CI, a
    failure)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        pytest.skip("no Chromium on PATH: run `make browser` (as root: apt-get update && apt-get install -y chromium)")
    return found


class Cdp:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, proxy=None)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr[:80]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expr: str, timeout: float = 20) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                value = self.js(expr)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expr!r}; at {self.js('location.href')}")

    def close(self) -> None:
        self.ws.close()


def test_page_in_chromium(stack: dict[str, Any]) -> None:
    binary = _chromium()
    profile = Path(tempfile.mkdtemp(prefix="overnight-chromium-"))
    proc = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1400",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            assert time.monotonic() < end and proc.poll() is None, "Chromium did not start its DevTools endpoint"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
        cdp = Cdp(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        base = stack["main"].url
        _insert_runs(stack["pg_dsn"], BADGE_RUNS)  # the newest runs of XLON, XTKS and BVMF, for the table's badges
        # No session: the page sends the browser to Airflow's login, which comes back to the page.
        cdp.call("Page.navigate", url=f"{base}/overnight/")
        cdp.wait("location.pathname.startsWith('/auth/login') && !!document.querySelector('input[type=password]')")
        cdp.js("document.querySelector('input[name=username]').focus()")
        cdp.call("Input.insertText", text="admin")
        cdp.js("document.querySelector('input[type=password]').focus()")
        cdp.call("Input.insertText", text=stack["passwords"]["admin"])
        cdp.js("document.querySelector('button[type=submit]').click()")
        cdp.wait("location.pathname === '/overnight/' && !!document.querySelector('#runs tbody tr')", 30)
        markets = cdp.js("[...document.querySelectorAll('#runs tbody tr')].map(r => r.dataset.market)")
        assert "XNYS" in markets
        row = cdp.js("document.querySelector('#runs tr[data-market=XNYS]').innerText")
        served = len(stack["served"])  # market, session, status, users processed / total, failed
        assert row.split("\t")[:5] == ["XNYS", SESSION.isoformat(), "completed", f"{served} / {served}", "0"], row
        # The table's freshness badges (docs/freshness.md): class and text, with the reason when stale.
        badges = cdp.js("Object.fromEntries(['XLON', 'XTKS', 'BVMF'].map(m => [m, [...document.querySelectorAll("
                        "`#runs tr[data-market=${m}] td:last-child .badge`)].map(b => [b.className, b.innerText])]))")
        assert badges == {
            "XLON": [["badge fresh", "fresh"]],
            "XTKS": [["badge stale", "stale: run failed"]],
            "BVMF": [["badge stale", "stale: rates stale"], ["badge stale", "stale rates"]],
        }
        # The charts are drawn by the page's script, which may still be loading when the table is there.
        cdp.wait("document.querySelectorAll('#charts svg rect').length >= 1")
        assert cdp.js("document.querySelectorAll('#charts svg polyline').length") >= 1
        # Look a user up: the cached recommendations, then (key deleted) the same from Postgres.
        uid = stack["user_id"]
        stack["redis"].set(cache.recs_key(uid), json.dumps(stack["doc"]), ex=cache.TTL_SECONDS)
        cdp.js(f"document.getElementById('user-id').value = {json.dumps(uid)}")
        cdp.js("document.querySelector('#lookup button').click()")
        cdp.wait("!!document.querySelector('#recs tbody tr')")
        assert "from cache" in cdp.js("document.getElementById('lookup-summary').innerText")
        symbols = cdp.js("[...document.querySelectorAll('#recs tbody tr td:first-child')].map(td => td.innerText)")
        assert symbols == [r["symbol"] for r in stack["doc"]["recommendations"]]
        # The gap columns say what they measure (docs/allocation.md): out of the portfolio plus the contribution.
        titles = dict(cdp.js("[...document.querySelectorAll('#recs thead th')].map(t => [t.innerText, t.title])"))
        assert "before the buys" in titles["Allocation gap"] and "plus the contribution" in titles["Allocation gap"]
        assert "after the recommended buys" in titles["Gap after"] and titles["Symbol"] == ""
        # Money the policy could not place is shown with its reason; none left over, no line.
        for amount in ("0.00", "123.45"):
            left = {**stack["doc"], "unallocated": {"amount": amount, "reason": "targets_full",
                                                    "message": "Stocks reached the maximum of their target range"}}
            stack["redis"].set(cache.recs_key(uid), json.dumps(left), ex=cache.TTL_SECONDS)
            cdp.js("document.getElementById('lookup-result').textContent = ''")
            cdp.js("document.querySelector('#lookup button').click()")
            cdp.wait("!!document.querySelector('#recs tbody tr')")
            shown = cdp.js("(document.getElementById('lookup-unallocated') || {}).innerText || null")
            assert (shown is None) == (amount == "0.00"), shown
        assert cdp.js("document.getElementById('lookup-unallocated').innerText") == (
            f"Unallocated: 123.45 {stack['doc']['portfolioSummary']['baseCurrency']}"
            " (Stocks reached the maximum of their target range)")
        # The lookup's freshness badge: a document built on stale rates says so, with the reason; one whose
        # market's next run is far ahead (session 2027-06-15) is fresh.
        for change, shown in (({"ratesStale": True}, ("badge stale", "stale: rates stale")),
                              ({"ratesStale": False, "sessionDate": "2027-06-15"}, ("badge fresh", "fresh"))):
            stack["redis"].set(cache.recs_key(uid), json.dumps({**stack["doc"], **change}), ex=cache.TTL_SECONDS)
            api = _get(stack, _dash(uid)).json()["data"]
            assert (api["stale"], api["staleReason"]) == (
                (True, "rates_stale") if change["ratesStale"] else (False, None))
            cdp.js("document.getElementById('lookup-result').textContent = ''")
            cdp.js("document.querySelector('#lookup button').click()")
            cdp.wait("!!document.querySelector('#recs tbody tr')")
            badge = cdp.js("[...document.querySelectorAll('#lookup-summary .badge')]"
                           ".filter(b => b.classList.contains('stale') || b.classList.contains('fresh')).map(b => [b.className, b.innerText])")
            assert badge == [list(shown)], badge
        ARTIFACTS.mkdir(exist_ok=True)
        shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        (ARTIFACTS / "overnight-page.png").write_bytes(base64.b64decode(shot["data"]))
        stack["redis"].delete(cache.recs_key(uid))
        cdp.js("document.querySelector('#lookup button').click()")
        cdp.wait("(document.getElementById('lookup-summary') || {}).innerText?.includes('from Postgres')")
        cdp.js("document.getElementById('user-id').value = 'nope'")
        cdp.js("document.querySelector('#lookup button').click()")
        cdp.wait("document.getElementById('lookup-result').innerText.includes('422')")
        # The UI's nav entry frames the page at /plugin/overnight.
        cdp.call("Page.navigate", url=f"{base}/plugin/overnight")
        cdp.wait("[...document.querySelectorAll('iframe')].some(f => f.src.includes('/overnight/'))", 30)
    finally:
        if cdp is not None:
            cdp.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)
        stack["redis"].set(cache.recs_key(stack["user_id"]), json.dumps(stack["doc"]), ex=cache.TTL_SECONDS)
        with psycopg.connect(stack["pg_dsn"]) as conn:
            conn.execute("DELETE FROM overnight_job_runs WHERE id = ANY(%s)", ([r[0] for r in BADGE_RUNS],))


# Job runs for the table's badges, newer than any other of their market: (id, market, status, metrics).
# Session 2027-06-15 (a Tuesday all three trade): its next session's run + 2 h is still ahead, so only the
# status and the rates make a row stale.
BADGE_RUNS = [
    (uuid.uuid4(), "XLON", "completed", {"rates_stale": False}),
    (uuid.uuid4(), "XTKS", "failed", {"rates_stale": False}),
    (uuid.uuid4(), "BVMF", "completed", {"rates_stale": True}),
]


def _insert_runs(pg_dsn: str, runs: list[tuple[uuid.UUID, str, str, dict[str, Any]]]) -> None:
    with psycopg.connect(pg_dsn) as conn:
        for run_id, market, status, metrics in runs:
            conn.execute(
                "INSERT INTO overnight_job_runs (id, job_type, status, started_at, completed_at, correlation_id,"
                " market, session_date, users_processed, users_failed, metrics) VALUES (%s, 'scoring', %s,"
                " clock_timestamp(), clock_timestamp(), %s, %s, '2027-06-15', 10, 0, %s)",
                (run_id, status, uuid.uuid4(), market, json.dumps(metrics)))


@pytest.mark.measurement  # a measuring tool, not a check: collected only with OVERNIGHT_MEASURE_LATENCY=1
def test_measure_latency(stack: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Runs `python -m overnight.dev.api_latency` once against the api-server (200 sequential calls per case)."""
    from overnight.dev import api_latency

    assert api_latency.main(["--url", stack["main"].url, "--token", stack["tokens"]["admin"],
                             "--user", stack["user_id"], "--redis-url", os.environ["AIRFLOW_CONN_OVERNIGHT_REDIS"]]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["hit"]["n"] == result["miss"]["n"] == 200

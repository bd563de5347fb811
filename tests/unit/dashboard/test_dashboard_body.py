"""Tests for overnight.dashboard.app.dashboard_body: the pre-encoded dashboard JSON is byte for byte what the response model
would produce, and anything pydantic would coerce or refuse is left to pydantic."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pydantic
import pytest
from fastapi import Depends, Request

from overnight.dashboard import app as api
from overnight.dashboard import json_body, models
from overnight.dashboard.api_auth import Access
from overnight.dashboard.docview import DashboardView, view_from_document

UID = "00a41595-d052-5458-a63d-f21b399f9df9"
DOC: dict[str, Any] = {
    "userId": UID,
    "generatedAt": "2026-11-22T08:26:56.196272+00:00",
    "recommendations": [
        {"assetId": "1758", "symbol": "RWT", "score": "15", "amount": "894.12", "currency": "USD",
         "allocationGap": "18.16", "breakdown": {"criteriaCount": 4, "topContributor": "payout_ratio"}},
        {"assetId": "2055", "symbol": "VPOM", "score": "20", "amount": "605.88", "currency": "USD",
         "allocationGap": "19.76", "breakdown": {"criteriaCount": 2, "topContributor": "debt_to_equity"}},
    ],
    "portfolioSummary": {"totalValue": "2025386.79", "baseCurrency": "USD",
                         "allocations": {"Stocks": "61.38", "Real estate": "13.94"}},
    "dataFreshness": {"pricesAsOf": "2026-11-22T02:26:22+00:00", "ratesAsOf": "2026-11-22T07:26:22+00:00",
                      "criteriaVersion": f"user-{UID}@v1"},
    "totalInvestable": "4500.00",
    "ratesStale": False,
    "correlationId": "a817c98d-329a-4e9c-acff-56274b3ac73c",
    "market": "XNYS",
    "sessionDate": "2026-11-23",
}
RESPONSE = pydantic.TypeAdapter(models.DashboardResponse)


def _grant_all(request: Request) -> None:
    """The app's auth dependency for tests of the logic: a user who holds both permissions."""
    request.state.overnight_access = Access(user="test", operations=True, personal_data=True)


def _variant(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    change(doc)
    return doc


def _data(doc: dict[str, Any]) -> dict[str, Any]:
    return view_from_document(UID, doc, from_cache=True).to_json()


def _pydantic(data: dict[str, Any]) -> bytes:
    """What FastAPI makes of `{"data": data}` with `response_model=DashboardResponse`."""
    return RESPONSE.dump_json(RESPONSE.validate_python({"data": data}))


LAST_KNOWN = [{"symbol": "RWT", "price": "40", "currency": "USD", "asOf": "2026-11-20T21:00:00+00:00"}]
SAME = [
    pytest.param(DOC, id="as-written"),
    pytest.param(_variant(lambda d: d.update(lastKnownPrices=LAST_KNOWN)), id="last-known-prices"),
    pytest.param(_variant(lambda d: d["recommendations"][0].pop("breakdown")), id="no-breakdown"),
    pytest.param(_variant(lambda d: d["recommendations"][0].update(breakdown=None)), id="null-breakdown"),
    pytest.param(_variant(lambda d: d["recommendations"][0]["breakdown"].pop("topContributor")), id="partial-breakdown"),
    pytest.param(_variant(lambda d: d["recommendations"][1]["breakdown"].update(extra=[1, {"a": None}])),
                 id="breakdown-extra"),
    pytest.param(_variant(lambda d: d["recommendations"][0].update(note="x", rank=3, tags=["a"], ok=True, n=None)),
                 id="recommendation-extras"),
    pytest.param(_variant(lambda d: d["recommendations"][0].update({"symbol": "ÄÖÜ-€-日本 \n\t\x01\x7f\u2028</script>"})),
                 id="unicode-and-control-characters"),
    pytest.param(_variant(lambda d: d.update(recommendations=[])), id="no-recommendations"),
    pytest.param(_variant(lambda d: d.update(dataFreshness={"ratesAsOf": None, "source": "ecb"})), id="freshness-extra"),
    pytest.param(_variant(lambda d: d.pop("dataFreshness")), id="no-freshness"),
    pytest.param(_variant(lambda d: d.update(portfolioSummary=None, totalInvestable=None, correlationId=None)),
                 id="nulls"),
    pytest.param(_variant(lambda d: d["portfolioSummary"].update(count=2**62, flags=[True, False], empty={})),
                 id="summary-values"),
    pytest.param(_variant(lambda d: d.update(generatedAt="2020-01-01T00:00:00", ratesStale=True)), id="stale"),
]


@pytest.mark.parametrize("doc", SAME)
def test_same_bytes_as_the_response_model(doc: dict[str, Any]) -> None:
    data = _data(doc)
    assert json_body.dashboard_body(data) == _pydantic(data)


def test_same_bytes_for_a_view_built_by_hand() -> None:
    data = DashboardView(UID, [], None, "EUR", None, from_cache=False, stale=True).to_json()
    assert json_body.dashboard_body(data) == _pydantic(data)


LEFT_TO_PYDANTIC = [
    pytest.param(lambda d: d["recommendations"][0].update(score=15), id="number-for-a-string"),
    pytest.param(lambda d: d["recommendations"][0].pop("symbol"), id="missing-required"),
    pytest.param(lambda d: d["recommendations"][0]["breakdown"].update(criteriaCount="4"), id="string-for-an-int"),
    pytest.param(lambda d: d["recommendations"][0]["breakdown"].update(criteriaCount=True), id="bool-for-an-int"),
    pytest.param(lambda d: d["recommendations"][0]["breakdown"].update(criteriaCount=4.0), id="float-for-an-int"),
    pytest.param(lambda d: d["recommendations"][0].update(breakdown="none"), id="breakdown-not-an-object"),
    pytest.param(lambda d: d["recommendations"][0].update(weight=0.1), id="float-extra"),
    pytest.param(lambda d: d["recommendations"][0].update(big=2**70), id="huge-int-extra"),
    pytest.param(lambda d: d["recommendations"].append("RWT"), id="recommendation-not-an-object"),
    pytest.param(lambda d: d["dataFreshness"].update(pricesAsOf=20261122), id="freshness-number"),
    pytest.param(lambda d: d["portfolioSummary"].update(totalValue=2025386.79), id="summary-float"),
    pytest.param(lambda d: d.update(totalInvestable=4500), id="total-number"),
]


@pytest.mark.parametrize("change", LEFT_TO_PYDANTIC)
def test_values_pydantic_would_coerce_or_refuse_are_left_to_it(change: Callable[[dict[str, Any]], Any]) -> None:
    data = _data(_variant(change))
    assert json_body.dashboard_body(data) is None


class FakeStore:
    """The store's reads, serving one document through the general path (no raw cache entry)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    async def cached_raw(self, user_id: str) -> bytes | None:
        return None

    async def dashboard(self, user_id: str, ask_cache: bool = True) -> DashboardView:
        return view_from_document(user_id, self.doc, from_cache=True)

    async def aclose(self) -> None:
        return None


def _get(doc: dict[str, Any]) -> httpx.Response:
    app = api.create_app(store=FakeStore(doc), dependencies=[Depends(_grant_all)])  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(f"/api/v1/dashboard/{UID}")

    return asyncio.run(go())


def test_the_route_serves_the_pre_encoded_body() -> None:
    resp = _get(DOC)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.content == _pydantic(_data(DOC))
    assert resp.headers["cache-control"] == "no-store"  # investors' data: never kept by a browser (docs/access.md)


def test_every_form_of_a_dashboard_answer_is_no_store() -> None:
    """Pre-encoded (plain and gzipped) and through the response model: `Cache-Control: no-store` each time."""
    assert ("cache-control", "no-store") in json_body.json_response(b"{}", "").headers.items()
    assert json_body.json_response(b'{"x": "' + b"y" * 2000 + b'"}', "gzip").headers["cache-control"] == "no-store"
    coerced = _get(_variant(lambda d: d["recommendations"][0]["breakdown"].update(criteriaCount="4")))
    assert coerced.status_code == 200 and coerced.headers["cache-control"] == "no-store"


def test_the_route_falls_back_to_the_response_model() -> None:
    coerced = _get(_variant(lambda d: d["recommendations"][0]["breakdown"].update(criteriaCount="4")))
    assert coerced.status_code == 200
    assert json.loads(coerced.content)["data"]["recommendations"][0]["breakdown"]["criteriaCount"] == 4
    with pytest.raises(Exception, match="validation error"):  # as before: a malformed document is a server error
        _get(_variant(lambda d: d["recommendations"][0].update(score=15)))


@pytest.mark.parametrize(
    ("accept", "size", "gzipped"),
    [
        pytest.param("gzip, deflate", 1609, True, id="gzip"),
        pytest.param("br;q=1, gzip;q=0.5", 40_000, True, id="gzip-large"),
        pytest.param("", 1609, False, id="no-accept-encoding"),
        pytest.param("deflate, br", 1609, False, id="no-gzip"),
        pytest.param("gzip", 1023, False, id="below-the-middlewares-minimum"),
    ],
)
def test_json_response_gzips_as_the_api_servers_middleware_would(accept: str, size: int, gzipped: bool) -> None:
    import zlib

    body = json.dumps({"data": "x" * (size - 12)}).encode()
    assert len(body) == size
    resp = json_body.json_response(body, accept)
    assert resp.media_type == "application/json"
    if gzipped:
        assert resp.headers["content-encoding"] == "gzip" and resp.headers["vary"] == "Accept-Encoding"
        assert zlib.decompress(resp.body, 16 + zlib.MAX_WBITS) == body
        assert int(resp.headers["content-length"]) == len(resp.body) < size
    else:
        assert "content-encoding" not in resp.headers and resp.body == body


def test_the_route_gzips_for_a_client_that_takes_it() -> None:
    doc = _variant(lambda d: d["recommendations"].extend(copy.deepcopy(d["recommendations"]) * 2))
    assert len(json_body.dashboard_body(_data(doc)) or b"") > 1024
    app = api.create_app(store=FakeStore(doc), dependencies=[Depends(_grant_all)])  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(f"/api/v1/dashboard/{UID}", headers={"Accept-Encoding": "gzip"})

    resp = asyncio.run(go())
    assert resp.headers["content-encoding"] == "gzip"
    assert resp.content == _pydantic(_data(doc))  # httpx decodes it


# --------------------------------------------------------------------------- straight from the cached JSON

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _general(doc: Any) -> bytes:
    """The general path's answer for a cached document: view, then the response model."""
    data = view_from_document(UID, doc, from_cache=True, now=NOW).to_json()
    return _pydantic(data)


TYPED = ["as-written", "last-known-prices", "no-breakdown", "null-breakdown", "partial-breakdown", "unicode-and-control-characters",
         "no-recommendations", "freshness-extra", "no-freshness", "nulls", "summary-values", "stale"]


@pytest.mark.parametrize(("doc", "typed"), [pytest.param(*p.values, p.id in TYPED, id=p.id) for p in SAME])
def test_cached_body_is_the_general_paths_bytes(doc: dict[str, Any], typed: bool) -> None:
    """The typed path answers the general path's bytes for the documents it takes; the others it leaves (None)."""
    fast = json_body.cached_dashboard_body(UID, json.dumps(doc).encode(), now=NOW)
    assert fast == (_general(doc) if typed else None)


@pytest.mark.parametrize("doc", [p for p in SAME if p.id in TYPED])
def test_documents_as_the_run_writes_them_take_the_typed_path(doc: dict[str, Any]) -> None:
    assert json_body.cached_dashboard_body(UID, json.dumps(doc).encode(), now=NOW) == _general(doc)


@pytest.mark.parametrize("change", [*LEFT_TO_PYDANTIC,
                                    pytest.param(lambda d: d.update(ratesStale="no"), id="stale-flag-a-string"),
                                    pytest.param(lambda d: d.update(generatedAt=20261122), id="time-a-number"),
                                    pytest.param(lambda d: d["portfolioSummary"].update(baseCurrency=7),
                                                 id="base-currency-a-number")])
def test_anything_else_is_left_to_the_general_path(change: Callable[[dict[str, Any]], Any]) -> None:
    assert json_body.cached_dashboard_body(UID, json.dumps(_variant(change)).encode(), now=NOW) is None


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"recommendations": {}}', b"", b'{"recommendations":[]}x'])
def test_invalid_json_is_left_to_the_general_path(raw: bytes) -> None:
    assert json_body.cached_dashboard_body(UID, raw) is None


def test_base_currency_and_freshness_follow_the_view() -> None:
    doc = _variant(lambda d: d["portfolioSummary"].update(baseCurrency=""))
    doc["recommendations"][0]["currency"] = " EUR "
    doc["generatedAt"] = "2026-11-22T09:26:56.196272+01:00"  # another offset: shown in UTC
    fast = json_body.cached_dashboard_body(UID, json.dumps(doc).encode(), now=NOW)
    assert fast == _general(doc)
    data = json.loads(fast or b"{}")["data"]
    assert data["baseCurrency"] == "EUR" and data["dataFreshness"]["generatedAt"] == "2026-11-22T08:26:56.196272+00:00"
    assert data["stale"] is False and data["fromCache"] is True


def test_last_known_prices_reach_the_app_from_every_path() -> None:
    """docs/allocation.md: a holding valued at an older price is said so on the dashboard: the typed path, the
    general one and an overdue document whose next run is known (its reason looked up) all carry the list."""
    doc = _variant(lambda d: d.update(lastKnownPrices=LAST_KNOWN))
    for body in (json_body.cached_dashboard_body(UID, json.dumps(doc).encode(), now=NOW), _general(doc)):
        assert json.loads(body or b"{}")["data"]["lastKnownPrices"] == LAST_KNOWN
    later = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)  # days past the document's next run: overdue
    overdue = json_body.cached_dashboard_body(UID, json.dumps(doc).encode(), now=later,
                                              next_run=lambda market, session: "run_failed")
    data = json.loads(overdue or b"{}")["data"]
    assert (data["lastKnownPrices"], data["staleReason"]) == (LAST_KNOWN, "run_failed")
    assert json.loads(json_body.cached_dashboard_body(UID, json.dumps(DOC).encode(), now=NOW) or b"{}"
                      )["data"]["lastKnownPrices"] is None  # none: null, as the model says

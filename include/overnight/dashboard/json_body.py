"""The dashboard's JSON, pre-encoded: a stored document is answered byte for byte as its response
model would encode it, without pydantic on the hot path (gzip when it pays)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import msgspec
from fastapi.responses import Response
from pydantic import BaseModel

from overnight.dashboard.docview import DUE, OVERDUE, parse_time, parse_user_id, resolved, staleness
from overnight.dashboard.models import Breakdown, DataFreshness, Recommendation, Unallocated
from overnight.dashboard.store import DashboardStore

# --------------------------------------------------------------------------- the dashboard's JSON, pre-encoded

_JSON = msgspec.json.Encoder()
_REC_STR_FIELDS = ("assetId", "symbol", "score", "amount", "currency", "allocationGap")
_REC_FIELDS = frozenset(Recommendation.model_fields)
_UNALLOCATED_FIELDS = {"amount": str, "reason": str, "message": str}
_BREAKDOWN_FIELDS = {"criteriaCount": int, "topContributor": str}
_FRESHNESS_FIELDS = dict.fromkeys(DataFreshness.model_fields, str)
_INT64 = 2**63
_GZIP_MIN_BYTES = 1024  # Airflow's GZipMiddleware(minimum_size=1024)


def _plain(value: Any) -> bool:
    """True for JSON that msgspec and pydantic write byte for byte alike: str, 64-bit int, bool, null, lists, objects."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return -_INT64 <= value < _INT64
    if kind is list:
        return all(_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False  # floats (formatting differs), anything else


def _as_model(obj: Any, fields: Mapping[str, type]) -> dict[str, Any] | None:
    """`obj` as an `extra="allow"` model of optional `fields` serialises it (declared fields first, then the
    extras); None when a field holds another type or an extra is not plain JSON."""
    if type(obj) is not dict:
        return None
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        value = obj.get(name)
        if value is not None and type(value) is not kind:
            return None
        out[name] = value
    return out if _add_extras(obj, out, out) else None


def _add_extras(obj: dict[str, Any], declared: Any, out: dict[str, Any]) -> bool:
    """Copies `obj`'s keys not in `declared` into `out`; False when one is not plain JSON."""
    for key, value in obj.items():
        if key not in declared:
            if not _plain(value):
                return False
            out[key] = value
    return True


def _recommendation(rec: Any) -> dict[str, Any] | None:
    if type(rec) is not dict:
        return None
    out: dict[str, Any] = {}
    for name in _REC_STR_FIELDS:
        if type(value := rec.get(name)) is not str:
            return None
        out[name] = value
    breakdown = rec.get("breakdown")
    if breakdown is not None and (breakdown := _as_model(breakdown, _BREAKDOWN_FIELDS)) is None:
        return None
    out["breakdown"] = breakdown
    after = rec.get("allocationGapAfter")
    if after is not None and type(after) is not str:
        return None
    out["allocationGapAfter"] = after
    return out if _add_extras(rec, _REC_FIELDS, out) else None


def dashboard_body(data: dict[str, Any]) -> bytes | None:
    """Returns `{"data": data}` as `DashboardResponse` validates and serialises it (the same bytes, ~10x
    cheaper), or None when a value is not already of its declared type (then pydantic must coerce or refuse)."""
    recs = [_recommendation(r) for r in data["recommendations"]]
    freshness = data["dataFreshness"]
    if freshness is not None and (freshness := _as_model(freshness, _FRESHNESS_FIELDS)) is None:
        return None
    summary = data["portfolioSummary"]
    unallocated, unpriced = data.get("unallocated"), data.get("unpricedHoldings")
    known = data.get("lastKnownPrices")
    if unallocated is not None and ((unallocated := _as_model(unallocated, _UNALLOCATED_FIELDS)) is None
                                    or unallocated["amount"] is None):
        return None
    for items in (unpriced, known):
        if items is not None and not (type(items) is list and _plain(items) and all(type(u) is dict for u in items)):
            return None
    if (None in recs or type(data["userId"]) is not str or type(data["fromCache"]) is not bool
            or type(data["stale"]) is not bool or (data.get("staleReason") is not None and type(data.get("staleReason")) is not str)
            or (summary is not None and not (type(summary) is dict and _plain(summary)))
            or any(data[k] is not None and type(data[k]) is not str
                   for k in ("totalInvestable", "baseCurrency", "correlationId"))):
        return None
    return _JSON.encode({"data": {
        "userId": data["userId"], "recommendations": recs, "totalInvestable": data["totalInvestable"],
        "baseCurrency": data["baseCurrency"], "dataFreshness": freshness, "fromCache": data["fromCache"],
        "stale": data["stale"], "correlationId": data["correlationId"], "portfolioSummary": summary,
        "unallocated": unallocated, "unpricedHoldings": unpriced, "lastKnownPrices": known,
        "staleReason": data.get("staleReason"),
    }})


def _typed(model: type[BaseModel], name: str, nested: Mapping[str, Any] | None = None) -> Any:
    """A msgspec struct with `model`'s declared fields in its order (types as declared, or `nested`'s), which
    refuses extra fields: it decodes exactly the objects the response model serialises as they are."""
    fields = [(field, (nested or {}).get(field, info.annotation)) if info.is_required()
              else (field, (nested or {}).get(field, info.annotation), info.default)
              for field, info in model.model_fields.items()]
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True)


_CachedBreakdown = _typed(Breakdown, "CachedBreakdown")
_CachedRecommendation = _typed(Recommendation, "CachedRecommendation", {"breakdown": _CachedBreakdown | None})
_CachedUnallocated = _typed(Unallocated, "CachedUnallocated")


class _CachedDocument(msgspec.Struct):
    """The fields of a cached `CachedRecommendations` document that the dashboard shows, typed."""

    recommendations: list[_CachedRecommendation]  # type: ignore[valid-type]  # built from the response model
    generatedAt: str | None = None
    dataFreshness: dict[str, Any] | None = None
    portfolioSummary: dict[str, Any] | None = None
    totalInvestable: str | None = None
    ratesStale: bool | None = None
    correlationId: str | None = None
    market: str | None = None
    sessionDate: str | None = None
    unallocated: _CachedUnallocated | None = None  # type: ignore[valid-type]  # built from the response model
    unpricedHoldings: list[dict[str, Any]] | None = None
    lastKnownPrices: list[dict[str, Any]] | None = None


_decode_cached = msgspec.json.Decoder(_CachedDocument).decode


def cached_dashboard_body(user_id: str, raw: bytes, now: datetime | None = None,
                          next_run: Callable[[str, str], str | None] | None = None) -> bytes | None:
    """`dashboard_body` of the view of a cached document, straight from its JSON: typed and validated by
    msgspec in one pass, with the same bytes; None for anything but a document as the overnight run writes
    it (extras, other types, invalid JSON), which then takes the general path. A document whose market's next
    run is due or overdue needs to know what happened to that run: `next_run(market, sessionDate)`
    (`DashboardStore.known_next_run`) says it when recently read, else None also sends it to the general path."""
    try:
        doc = _decode_cached(raw)
    except msgspec.DecodeError:  # ValidationError included
        return None
    generated = parse_time(doc.generatedAt)
    given = dict(doc.dataFreshness or {})
    given["generatedAt"] = generated.isoformat() if generated else doc.generatedAt
    if (freshness := _as_model(given, _FRESHNESS_FIELDS)) is None:
        return None
    summary = doc.portfolioSummary or None
    if summary is not None and not _plain(summary):
        return None
    unpriced, last_known = doc.unpricedHoldings, doc.lastKnownPrices
    for items in (unpriced, last_known):
        if items is not None and not (_plain(items) and all(type(u) is dict for u in items)):
            return None
    recs = doc.recommendations
    base = (summary or {}).get("baseCurrency") or (recs[0].currency if recs else None)  # type: ignore[attr-defined]
    if base is not None and type(base) is not str:
        return None
    reason = staleness(generated, bool(doc.ratesStale), doc.market, doc.sessionDate, now)
    if reason == OVERDUE or reason == DUE:  # what happened to the next run: known, or the general path asks Postgres
        market, session = doc.market, doc.sessionDate
        known = next_run(market, session) if next_run is not None and market and session else None
        if known is None:
            return None
        reason = resolved(reason, known)
    return _JSON.encode({"data": {
        "userId": user_id, "recommendations": recs, "totalInvestable": doc.totalInvestable,
        "baseCurrency": base.strip() if base is not None else None, "dataFreshness": freshness, "fromCache": True,
        "stale": reason is not None, "correlationId": doc.correlationId,
        "portfolioSummary": summary, "unallocated": doc.unallocated, "unpricedHoldings": unpriced,
        "lastKnownPrices": last_known, "staleReason": reason,
    }})


async def dashboard_answer(store: DashboardStore, user_id: str) -> bytes | dict[str, Any]:
    """A user's dashboard as `DashboardResponse` writes it (pre-encoded bytes), or, for a value pydantic must
    coerce or refuse, the `data` object to hand to it. The cached document is decoded typed when it is as the
    overnight run writes it; a miss asks Postgres without asking Redis again. Raises InvalidUserId,
    UnknownUser, StoreUnavailable."""
    uid = parse_user_id(user_id)
    raw = await store.cached_raw(uid)
    if raw is not None and (body := cached_dashboard_body(
            uid, raw, next_run=lambda market, session: store.known_next_run(market, session))) is not None:
        return body
    data = (await store.dashboard(uid, ask_cache=raw is not None)).to_json()
    return dashboard_body(data) or data


# Investors' data is never kept by a browser or a proxy: a cookie session's answers would otherwise stay on disk
NO_STORE = (b"cache-control", b"no-store")


def _encoded(body: bytes, accept_encoding: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """`body` gzipped when the client takes gzip and the api-server's GZipMiddleware would, with the headers
    that say so. The middleware builds a compressor with a 32 KB window for every response (~110 us); one
    sized to the body, at level 1, takes ~25 us (4% larger), and the middleware passes a gzipped body through."""
    if len(body) < _GZIP_MIN_BYTES or "gzip" not in accept_encoding:  # the middleware's own test
        return body, [NO_STORE]
    window_bits = max(9, min(15, (len(body) - 1).bit_length()))
    gz = zlib.compressobj(1, zlib.DEFLATED, 16 + window_bits, 4)
    return gz.compress(body) + gz.flush(), [NO_STORE, (b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]


def json_response(body: bytes, accept_encoding: str) -> Response:
    """A JSON response of pre-encoded `body`, gzipped as `_encoded` says."""
    content, headers = _encoded(body, accept_encoding)
    response = Response(content, media_type="application/json")
    response.raw_headers[:0] = headers  # where Starlette puts the headers it is given
    return response

"""Generates one overnight scoring DAG per market of `include/markets.yaml` (thin: wiring only)."""

from __future__ import annotations

from airflow.sdk import get_parsing_context

from overnight.domain.markets import load_markets
from overnight.night.dag_factory import build_market_dag

_CURRENT = get_parsing_context().dag_id  # while a task runs, build only its DAG, and cheaply
_LOADED = load_markets(check_codes=_CURRENT is None)
_CODES = _LOADED.codes

for _market in sorted(_LOADED.markets, key=lambda m: m.code):
    if _CURRENT is None or _CURRENT == _market.dag_id:
        globals()[_market.dag_id] = build_market_dag(_market, _CODES)

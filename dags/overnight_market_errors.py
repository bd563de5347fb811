"""Shows bad `include/markets.yaml` entries as a DAG import error (the valid markets keep their DAGs).

Airflow reports import errors per file: this file fails to import, naming each bad market, its field
and what to do, while `overnight_scoring.py` builds the DAGs of the valid markets.
"""

from __future__ import annotations

from overnight.domain.markets import load_markets

_ERRORS = load_markets().errors
if _ERRORS:
    raise ValueError("include/markets.yaml has bad entries (the DAG and airflow packages skip them):\n"
                     + "\n".join(f"- {e}" for e in _ERRORS))

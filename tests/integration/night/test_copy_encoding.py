"""The batch writer's COPY text round-trips through real Postgres, whatever the symbols hold."""

from __future__ import annotations

import json

from overnight.night import jobrun, writing

ARRAYS = [None, [], ["AAPL"], ["BRK.B", "PETR4", "7203"], ['A"B', "C\\D", "tab\there", "new\nline", "com,ma",
          "{brace}", "sp ace", "ünï", "NULL", ""]]
PAYLOADS = [{"a": 'quote " back \\ slash', "b": "tab\tnew\nline\r", "c": ["ünï", None, 1.5]}, {}]


def test_arrays_and_json_round_trip(conn):
    conn.execute("CREATE TEMP TABLE t (i int, symbols text[], payload jsonb)")
    with conn.cursor().copy("COPY t (i, symbols, payload) FROM STDIN") as cp:
        lines = [f"{i}\t{writing._copy_array(a)}\t{writing._copy_json(jobrun._encode(PAYLOADS[i % 2]))}"
                 for i, a in enumerate(ARRAYS)]
        cp.write("\n".join(lines) + "\n")
    rows = conn.execute("SELECT symbols, payload FROM t ORDER BY i").fetchall()
    assert [r[0] for r in rows] == ARRAYS
    assert [r[1] for r in rows] == [json.loads(json.dumps(PAYLOADS[i % 2])) for i in range(len(ARRAYS))]

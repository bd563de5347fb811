"""The price provider's rate limit is shared by every batch: two batch processes, one budget (Redis).

Two processes build the price provider exactly as a batch task does (`runtime.price_provider`, the real
Redis token bucket `ratelimit:prices`) and fetch from the local HTTP price server at once. The server's
arrival times are the oracle: over any window, no more than the bucket's burst plus rate x window arrived
(two separate budgets would let twice the burst through at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import TEST_ENV
from tests.support.fake_provider import QUOTE_PATH, FakeProviderServer

ROOT = Path(__file__).resolve().parents[2]
RATE_PER_S = 4  # OVERNIGHT_PRICES_RATE_PER_S; the burst is runtime's 10
BURST = 10
PER_PROCESS = 12  # requests (chunks of 50 symbols) each process makes

_FETCH = """
import sys
from overnight.night import runtime
provider = runtime.price_provider(None)
quotes = provider.fetch_prices(sys.argv[1].split(","))
print(len(quotes))
"""


def test_two_batch_processes_share_one_price_budget() -> None:
    symbols = [f"S{i:04d}" for i in range(2 * PER_PROCESS * 50)]
    server = FakeProviderServer(prices={s: ("10.5", "USD") for s in symbols}).start()
    client = redis.Redis.from_url(TEST_ENV["AIRFLOW_CONN_OVERNIGHT_REDIS"])
    client.delete("ratelimit:prices")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "OVERNIGHT_PRICES_RATE_PER_S": str(RATE_PER_S),
           "AIRFLOW_CONN_OVERNIGHT_PRICES_HTTP": server.base_url, "NO_PROXY": "*"}
    try:
        halves = [symbols[: PER_PROCESS * 50], symbols[PER_PROCESS * 50:]]
        procs = [subprocess.Popen([sys.executable, "-c", _FETCH, ",".join(h)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for h in halves]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        server.stop()
        client.delete("ratelimit:prices")
        client.close()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert [int(o[0].strip().splitlines()[-1]) for o in outs] == [PER_PROCESS * 50] * 2
    times = sorted(r.at for r in server.requests_for(QUOTE_PATH))
    assert len(times) == 2 * PER_PROCESS
    # a token bucket of BURST at RATE_PER_S/s lets at most BURST + RATE_PER_S x window through in any window
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            window = times[j] - start
            assert j - i + 1 <= BURST + RATE_PER_S * window + 1, (j - i + 1, round(window, 3))
    # so the 24 requests took at least (24 - 10) / 4 = 3.5 s; two budgets of their own would take 0.5 s
    assert times[-1] - times[0] >= (2 * PER_PROCESS - BURST) / RATE_PER_S - 0.3

"""Measures the dashboard endpoint's latency through a running api-server: a cache hit and a cache miss.

`python -m overnight.dev.api_latency --url http://localhost:8080 --token <JWT> --user <uuid> [-n 200]`
makes n sequential calls with the user's `recs:{id}` key in Redis (hit), then n with it deleted
(miss, served from Postgres), restores the key with its TTL, and prints p50/p99 of each, then one
JSON line. Redis is reached through the `overnight_redis` connection (or `--redis-url`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import httpx
import redis

from overnight.adapters import cache

WARMUP = 5


def percentile(samples: list[float], pct: float) -> float:
    """Returns the nearest-rank percentile of `samples` (pct in 0-100)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _series(client: httpx.Client, path: str, n: int, want_cache: bool) -> dict[str, Any]:
    for _ in range(WARMUP):
        client.get(path)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        resp = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise SystemExit(f"call {i + 1}: HTTP {resp.status_code}: {resp.text[:300]}")
        if resp.json()["data"]["fromCache"] is not want_cache:
            raise SystemExit(f"call {i + 1}: fromCache is {not want_cache}, expected {want_cache}")
    return {"n": n, "p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
            "mean_ms": round(statistics.fmean(times), 2), "max_ms": round(max(times), 2)}


def measure(url: str, token: str, user: str, n: int = 200, redis_url: str | None = None) -> dict[str, Any]:
    """Returns {"hit": {...}, "miss": {...}} latency figures for `n` sequential calls each."""
    from overnight.adapters.connections import redis_url as conn_redis_url

    rclient = redis.Redis.from_url(redis_url or conn_redis_url())
    key = cache.recs_key(user)
    if rclient.get(key) is None:
        from overnight.ops import cache_warmer

        cache_warmer.run([user])
    saved, ttl_ms = rclient.get(key), rclient.pttl(key)
    if saved is None:
        raise SystemExit(f"user {user} has no recommendations to cache; pick a user the overnight run scored")
    path = f"/overnight/api/v1/dashboard/{user}"
    with httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=10,
                      trust_env=False) as client:
        hit = _series(client, path, n, want_cache=True)
        rclient.delete(key)
        try:
            miss = _series(client, path, n, want_cache=False)
        finally:
            rclient.set(key, saved, px=ttl_ms if ttl_ms and ttl_ms > 0 else cache.TTL_SECONDS * 1000)
    rclient.close()
    return {"url": url, "user": user, "hit": hit, "miss": miss}


def main(argv: list[str] | None = None) -> int:
    """Command line: prints p50/p99 for a cache hit and a cache miss, then one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m overnight.dev.api_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="api-server base URL, e.g. http://localhost:8080")
    parser.add_argument("--token", required=True, help="a JWT from POST /auth/token")
    parser.add_argument("--user", required=True, help="a user id with recommendations")
    parser.add_argument("-n", type=int, default=200, help="sequential calls per case (default 200)")
    parser.add_argument("--redis-url", default=None, help="default: the overnight_redis connection")
    args = parser.parse_args(argv)
    result = measure(args.url, args.token, args.user, args.n, args.redis_url)
    for case in ("hit", "miss"):
        r = result[case]
        print(f"cache {case:<4}: n={r['n']} p50={r['p50_ms']:.2f} ms p99={r['p99_ms']:.2f} ms "
              f"(mean {r['mean_ms']:.2f}, max {r['max_ms']:.2f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

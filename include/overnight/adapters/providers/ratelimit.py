"""Token-bucket rate limiters: in-process, and Redis-backed (shared by every worker using the same key)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from overnight.adapters.providers.base import ProviderError

logger = logging.getLogger(__name__)

KEY_PREFIX = "ratelimit:"

# Atomic token bucket. KEYS[1] = bucket hash; ARGV = rate_per_s, burst, cost, ttl_ms.
# Uses the Redis server clock so workers on different hosts agree on time.
# Returns {granted (0/1), seconds to wait before the cost could be granted (string)}.
_TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local granted = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  granted = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {granted, tostring(wait)}
"""


class RateLimitTimeout(ProviderError):
    """Acquiring rate-limit tokens would have taken longer than the limiter's max_wait_s."""


class RateLimiter(Protocol):
    """Blocks until `cost` request tokens are available (raises RateLimitTimeout if that takes too long)."""

    def acquire(self, cost: int = 1) -> None: ...


def _check_params(rate_per_s: float, burst: int, max_wait_s: float) -> None:
    """Raises ValueError on limiter settings that cannot work."""
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")
    if max_wait_s < 0:
        raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")


def _check_cost(cost: int, burst: int) -> None:
    """Raises ValueError for a cost the bucket could never grant."""
    if cost < 1 or cost > burst:
        raise ValueError(f"cost must be between 1 and burst={burst}, got {cost!r}")


class LocalRateLimiter:
    """Thread-safe in-process token bucket (limits this process only)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_wait_s: float = 30.0,
    ) -> None:
        _check_params(rate_per_s, burst, max_wait_s)
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self.max_wait_s = float(max_wait_s)
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._ts = clock()

    def _try_take(self, cost: int) -> float:
        """Takes `cost` tokens if available and returns 0, else returns the seconds to wait."""
        with self._lock:
            now = self._clock()
            if now > self._ts:
                self._tokens = min(
                    float(self.burst), self._tokens + (now - self._ts) * self.rate_per_s
                )
                self._ts = now
            if self._tokens >= cost:
                self._tokens -= cost
                return 0.0
            return (cost - self._tokens) / self.rate_per_s

    def acquire(self, cost: int = 1) -> None:
        """Blocks until `cost` tokens are taken; raises RateLimitTimeout after max_wait_s."""
        _check_cost(cost, self.burst)
        deadline = self._clock() + self.max_wait_s
        while True:
            wait = self._try_take(cost)
            if wait <= 0:
                return
            _wait_or_give_up(
                wait, deadline, self._clock, self._sleep, "local", self.max_wait_s
            )


def _wait_or_give_up(
    wait: float,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    where: str,
    max_wait_s: float,
) -> None:
    """Sleeps `wait` seconds unless that would pass the deadline, in which case raises RateLimitTimeout."""
    if clock() + wait > deadline:
        raise RateLimitTimeout(
            f"Rate limiter ({where}) could not grant a request within max_wait_s={max_wait_s:g}s "
            f"(next token in {wait:.2f}s); too many concurrent callers share the budget: "
            "lower task parallelism, raise rate_per_s/burst if the provider allows it, or raise max_wait_s."
        )
    sleep(wait)


class RedisRateLimiter:
    """Token bucket stored in Redis under `ratelimit:<key>`, shared by all processes using the same key.

    If Redis cannot be reached, it degrades to a LocalRateLimiter (with a warning) and tries Redis
    again after `recheck_s`; the run keeps going but the limit is then per process only.
    """

    def __init__(
        self,
        redis_client: Any,
        key: str,
        rate_per_s: float,
        burst: int,
        *,
        sleep: Callable[[float], None] = time.sleep,
        max_wait_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        recheck_s: float = 60.0,
    ) -> None:
        _check_params(rate_per_s, burst, max_wait_s)
        if not key:
            raise ValueError("key must be a non-empty string (e.g. the provider name)")
        self.key = key if key.startswith(KEY_PREFIX) else KEY_PREFIX + key
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self.max_wait_s = float(max_wait_s)
        self.recheck_s = float(recheck_s)
        self._redis = redis_client
        self._sleep = sleep
        self._clock = clock
        self._script = redis_client.register_script(_TOKEN_BUCKET_LUA)
        # Idle buckets disappear once they would be full again anyway.
        self._ttl_ms = int(1000 * (self.burst / self.rate_per_s)) + 1000
        self._local = LocalRateLimiter(
            rate_per_s, burst, sleep=sleep, clock=clock, max_wait_s=max_wait_s
        )
        self._degraded_until: float | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        key: str,
        rate_per_s: float,
        burst: int,
        *,
        socket_timeout_s: float = 2.0,
        **kwargs: Any,
    ) -> RedisRateLimiter:
        """Builds the limiter with a Redis client that fails fast (short timeouts, no client retries)."""
        client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, key, rate_per_s, burst, **kwargs)

    @property
    def degraded(self) -> bool:
        """True while acquiring from the local fallback instead of Redis."""
        return self._degraded_until is not None

    def _redis_try_take(self, cost: int) -> float:
        """Runs the bucket script once: 0 if granted, else the seconds to wait."""
        granted, wait = self._script(
            keys=[self.key], args=[self.rate_per_s, self.burst, cost, self._ttl_ms]
        )
        if int(granted) == 1:
            return 0.0
        return max(float(wait), 0.001)

    def _degrade(self, exc: Exception) -> None:
        """Switches to the local limiter until `recheck_s` has passed, with a warning."""
        self._degraded_until = self._clock() + self.recheck_s
        logger.warning(
            "rate limiter: Redis unavailable, degrading to a per-process limiter key=%s error=%s "
            "recheck_s=%g; the limit is no longer shared between tasks, check the Redis connection",
            self.key,
            f"{type(exc).__name__}: {exc}",
            self.recheck_s,
            extra={
                "ratelimit_key": self.key,
                "error_type": type(exc).__name__,
                "degraded": True,
            },
        )

    def acquire(self, cost: int = 1) -> None:
        """Blocks until `cost` tokens are taken from the shared bucket; raises RateLimitTimeout after max_wait_s."""
        _check_cost(cost, self.burst)
        deadline = self._clock() + self.max_wait_s
        while True:
            if self._degraded_until is not None:
                if self._clock() < self._degraded_until:
                    self._local.acquire(cost)
                    return
                self._degraded_until = None
                logger.info(
                    "rate limiter: retrying Redis key=%s",
                    self.key,
                    extra={"ratelimit_key": self.key},
                )
            try:
                wait = self._redis_try_take(cost)
            except redis.RedisError as exc:
                self._degrade(exc)
                continue
            if wait <= 0:
                return
            _wait_or_give_up(
                wait,
                deadline,
                self._clock,
                self._sleep,
                f"redis {self.key}",
                self.max_wait_s,
            )

"""Rate limits per client on chat and feedback: a token bucket per (route, client), in process or in Redis.

A client (its API key's id; without keys, its address) may send a route ``rate`` requests per second
on average and ``burst`` at once: a bucket of ``burst`` tokens, refilled at ``rate``, one token per
request. It is kept in the form of GCRA (the generic cell rate algorithm, ITU-T I.371), which needs
one number per client, its theoretical arrival time TAT, instead of a count and a timestamp:

    T = 1 / rate                                  (the emission interval: one token's refill)
    a request at time t:   TAT' = max(TAT, t) + T
    allowed   iff  TAT' - burst * T <= t         (then TAT := TAT'; a full bucket is TAT <= t)
    refused:  Retry-After = TAT' - burst * T - t (and TAT is unchanged: refusals cost nothing)

A refused request is answered 429 with ``Retry-After`` in OpenAI's error shape. With
``THUMBTUNE_REDIS_URL`` set, every replica shares one TAT per client (an atomic Lua step on Redis's
clock), so the limit is the cluster's; without it each replica limits on its own. A Redis outage
lets requests through (logged and counted): the limiter never takes the service down with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from service import metrics
from service.errors import APIError
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)

ROUTES = ("chat", "feedback")


@dataclass(frozen=True)
class Limit:
    per_minute: float
    burst: int

    @property
    def interval(self) -> float:
        """T, seconds per token."""
        return 60.0 / self.per_minute


def gcra(tat: float, now: float, limit: Limit) -> tuple[float, float]:
    """One request at ``now`` against a client's TAT: (the new TAT, 0.0) if allowed, else (``tat``, wait)."""
    new = max(tat, now) + limit.interval
    wait = new - limit.burst * limit.interval - now
    return (tat, wait) if wait > 0 else (new, 0.0)


class Buckets(Protocol):
    def take(self, key: str, limit: Limit) -> float:
        """Take a token from ``key``'s bucket: 0.0 when allowed, else the seconds until one is there."""
        ...

    def close(self) -> None: ...


class MemoryBuckets:
    """One replica's TATs; clients whose bucket is full again are forgotten (a full bucket is no state)."""

    SWEEP_EVERY = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._calls = 0

    def take(self, key: str, limit: Limit) -> float:
        with self._lock:
            now = self._clock()
            self._tat[key], wait = gcra(self._tat.get(key, now), now, limit)
            self._calls += 1
            if self._calls % self.SWEEP_EVERY == 0:
                self._tat = {k: t for k, t in self._tat.items() if t > now}
            return wait

    def __len__(self) -> int:
        return len(self._tat)

    def close(self) -> None:
        pass


# gcra() on Redis's clock, in one atomic step; numbers cross as strings (Lua numbers become integers).
_GCRA_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = tat + interval
local wait = new - burst * interval - now
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], string.format('%.6f', new), 'PX', math.ceil((new - now) * 1000) + 1)
return '0'
"""


class RedisBuckets:
    """TATs in Redis, shared by every replica on the same URL: ``thumbtune:ratelimit:<route>:<client>``,
    each expiring when its bucket is full again."""

    WARN_EVERY_S = 60.0

    def __init__(self, url: str, prefix: str = "thumbtune:ratelimit:", socket_timeout_s: float = 0.5) -> None:
        self._prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            decode_responses=True,
        )
        self._script = self._client.register_script(_GCRA_SCRIPT)
        self._warned = -math.inf

    def take(self, key: str, limit: Limit) -> float:
        try:
            return float(self._script(keys=[self._prefix + key], args=[repr(limit.interval), limit.burst]))
        except redis.RedisError as exc:
            metrics.RATE_LIMIT_ERRORS.inc()
            if time.monotonic() - self._warned > self.WARN_EVERY_S:
                self._warned = time.monotonic()
                log.warning("rate limits are not enforced: Redis failed (%s: %s)", type(exc).__name__, exc)
            return 0.0

    def close(self) -> None:
        self._client.close()


class RateLimiter:
    """The configured limits per route; ``check`` raises the 429."""

    def __init__(self, limits: dict[str, Limit], buckets: Buckets) -> None:
        unknown = set(limits) - set(ROUTES)
        if unknown:
            raise ValueError(f"no such rate-limited route: {sorted(unknown)} (routes: {ROUTES})")
        self.limits = limits
        self.buckets = buckets

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        limits = {
            route: Limit(per_minute, burst)
            for route, per_minute, burst in (
                ("chat", settings.rate_limit_chat_per_min, settings.rate_limit_chat_burst),
                ("feedback", settings.rate_limit_feedback_per_min, settings.rate_limit_feedback_burst),
            )
            if per_minute > 0
        }
        buckets: Buckets = (
            RedisBuckets(settings.redis_url) if settings.redis_url and limits else MemoryBuckets()
        )
        return cls(limits, buckets)

    def check(self, route: str, client: str) -> None:
        limit = self.limits.get(route)
        if limit is None:
            return
        wait = self.buckets.take(f"{route}:{client}", limit)
        if wait <= 0:
            return
        metrics.RATE_LIMITED.labels(route).inc()
        retry = max(1, math.ceil(wait))
        raise APIError(
            429,
            f"rate limit reached on {route}: {limit.per_minute:g} requests per minute, "
            f"{limit.burst} at once, "
            f"per {'API key' if not client.startswith('addr:') else 'client address'}; retry in {retry} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )

    def close(self) -> None:
        self.buckets.close()

"""The rate limiter's token bucket (GCRA) against hand-counted schedules, on a fake clock."""

from __future__ import annotations

import pytest

from service.errors import APIError
from service.ratelimit import Limit, MemoryBuckets, RateLimiter, gcra

PER_SECOND = Limit(per_minute=60, burst=3)  # T = 1 s, 3 at once


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gcra_allows_the_burst_then_one_per_interval() -> None:
    tat, now = 0.0, 50.0
    for expected_tat in (51.0, 52.0, 53.0):  # a full bucket: 3 at once
        tat, wait = gcra(tat, now, PER_SECOND)
        assert (tat, wait) == (expected_tat, 0.0)
    refused_tat, wait = gcra(tat, now, PER_SECOND)
    assert refused_tat == tat and wait == pytest.approx(1.0)  # a refusal leaves the state as it was
    assert gcra(tat, now + 0.5, PER_SECOND)[1] == pytest.approx(0.5)
    assert gcra(tat, now + 1.0, PER_SECOND) == (54.0, 0.0)  # one token back after T


def test_sustained_rate_is_the_limit_plus_the_burst() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock)
    limit = Limit(per_minute=120, burst=5)  # 2 per second
    allowed = 0
    for _ in range(600):  # 60 s of 10 attempts per second
        allowed += buckets.take("k", limit) == 0.0
        clock.now += 0.1
    assert allowed == 5 + 120 - 1 or allowed == 5 + 120  # the burst, then 2/s (the last refill may not land)


def test_clients_have_their_own_buckets_and_full_ones_are_forgotten() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock)
    buckets.SWEEP_EVERY = 4
    for _ in range(3):
        assert buckets.take("a", PER_SECOND) == 0.0
    assert buckets.take("a", PER_SECOND) > 0
    assert buckets.take("b", PER_SECOND) == 0.0  # the 4th call (a's refusal) swept: nothing was full
    assert len(buckets) == 2
    clock.now += 10  # both refilled
    for _ in range(4):
        buckets.take("c", PER_SECOND)  # the 8th call sweeps: a and b are full again, c is not
    assert len(buckets) == 1


def test_check_raises_a_429_with_retry_after_per_route_and_client() -> None:
    clock = Clock()
    limiter = RateLimiter({"feedback": Limit(per_minute=6, burst=2)}, MemoryBuckets(clock))
    limiter.check("feedback", "key-1")
    limiter.check("feedback", "key-1")
    with pytest.raises(APIError) as refused:
        limiter.check("feedback", "key-1")
    err = refused.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert err.headers == {"Retry-After": "10"}  # 6 per minute: a token every 10 s
    assert "6 requests per minute, 2 at once, per API key" in err.message
    limiter.check("feedback", "key-2")  # another client
    for _ in range(50):
        limiter.check("chat", "key-1")  # no limit configured on chat
    with pytest.raises(APIError, match="per client address"):
        for _ in range(3):
            limiter.check("feedback", "addr:10.0.0.7")
    clock.now += 10
    limiter.check("feedback", "key-1")


def test_an_unknown_route_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="no such rate-limited route"):
        RateLimiter({"chats": Limit(60, 1)}, MemoryBuckets())

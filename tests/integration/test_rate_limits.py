"""Rate limits through the API: 429 + Retry-After in OpenAI's shape, per API key or address, and one
shared bucket per client across replicas on Redis."""

from __future__ import annotations

import uuid

import pytest

from service import metrics
from service.ratelimit import Limit, RedisBuckets
from tests.support.api import USER, assert_openai_error


def chat(client, headers: dict | None = None):  # noqa: ANN001, ANN201 - a TestClient, its response
    body = {"model": "thumbtune", "messages": USER, "max_tokens": 1}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def _key() -> str:
    return f"sk-test-{uuid.uuid4().hex}"  # a fresh client per test: Redis buckets outlive a test briefly


def test_chat_over_its_limit_is_refused_with_retry_after(client_factory) -> None:  # noqa: ANN001
    k1, k2 = _key(), _key()
    client = client_factory(api_keys=f"{k1},{k2}", rate_limit_chat_per_min=2, rate_limit_chat_burst=2)
    as_k1 = {"Authorization": f"Bearer {k1}"}
    before = metrics.RATE_LIMITED.labels("chat")._value.get()
    for _ in range(2):
        assert chat(client, headers=as_k1).status_code == 200
    refused = chat(client, headers=as_k1)
    err = assert_openai_error(refused, 429)
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 30  # 2 per minute: a token every 30 s
    assert metrics.RATE_LIMITED.labels("chat")._value.get() == before + 1
    assert chat(client, headers={"Authorization": f"Bearer {k2}"}).status_code == 200
    unauthenticated = chat(client)
    assert unauthenticated.status_code == 401  # who the caller is comes first


def test_feedback_is_limited_per_address_without_keys(client_factory) -> None:  # noqa: ANN001
    client = client_factory(rate_limit_feedback_per_min=1, rate_limit_feedback_burst=1)
    rid = chat(client).json()["id"]
    assert client.post("/v1/feedback", json={"response_id": rid, "thumb": "up"}).status_code == 202
    again = client.post("/v1/feedback", json={"response_id": rid, "thumb": "down"})
    assert_openai_error(again, 429)
    assert "per client address" in again.json()["error"]["message"]
    for _ in range(3):
        assert chat(client).status_code == 200  # chat has no limit here


@pytest.mark.redis
def test_replicas_share_one_bucket_per_client_through_redis(client_factory, redis_url: str) -> None:  # noqa: ANN001
    key = _key()
    limits = dict(api_keys=key, redis_url=redis_url, rate_limit_chat_per_min=1, rate_limit_chat_burst=3)
    a, b = client_factory(**limits), client_factory(**limits)
    as_key = {"Authorization": f"Bearer {key}"}
    assert [chat(c, headers=as_key).status_code for c in (a, b, a)] == [200, 200, 200]
    assert_openai_error(chat(b, headers=as_key), 429)
    assert_openai_error(chat(a, headers=as_key), 429)


@pytest.mark.redis
def test_the_redis_bucket_is_the_same_gcra(redis_url: str, redis_prefix: str) -> None:
    buckets = RedisBuckets(redis_url, prefix=redis_prefix)
    limit = Limit(per_minute=60, burst=3)
    assert [buckets.take("k", limit) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 0.8 < buckets.take("k", limit) <= 1.0  # one token a second, on Redis's clock
    assert buckets.take("other", limit) == 0.0
    buckets.close()


def test_a_redis_outage_lets_requests_through_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    buckets = RedisBuckets("redis://127.0.0.1:1/0")  # nothing listens on port 1
    before = metrics.RATE_LIMIT_ERRORS._value.get()
    with caplog.at_level("WARNING", logger="service.ratelimit"):
        assert buckets.take("k", Limit(per_minute=1, burst=1)) == 0.0
        assert buckets.take("k", Limit(per_minute=1, burst=1)) == 0.0
    assert metrics.RATE_LIMIT_ERRORS._value.get() == before + 2
    warnings = [r for r in caplog.records if "rate limits are not enforced" in r.getMessage()]
    assert len(warnings) == 1  # once a minute, not once a request
    buckets.close()
